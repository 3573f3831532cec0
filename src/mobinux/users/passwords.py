"""Password hashes for boot-time login: scrypt (RFC 7914) from the standard library.

Stored form: ``scrypt$<log2 N>$<r>$<p>$<salt, base64>$<hash, base64>``. The
cost parameters travel with each hash, so raising them later leaves old hashes
valid. N = 2^15, r = 8, p = 1 (32 MiB, about 0.1 s here): slow for a guesser,
fast enough for a room of machines logging in at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

_LOG2_N, _R, _P = 15, 8, 1
_SALT_BYTES, _HASH_BYTES = 16, 32
_MAXMEM = 128 << 20
MAX_PASSWORD = 256


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=1 << log2_n, r=r, p=p,
                          maxmem=_MAXMEM, dklen=_HASH_BYTES)


def hash_password(password: str) -> str:
    if not password or len(password) > MAX_PASSWORD:
        raise ValueError(f"a password has 1 to {MAX_PASSWORD} characters")
    salt = os.urandom(_SALT_BYTES)
    digest = _scrypt(password, salt, _LOG2_N, _R, _P)
    return "$".join(("scrypt", str(_LOG2_N), str(_R), str(_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()))


def verify_password(password: str, stored: str) -> bool:
    """Whether *password* matches *stored*; False (never an exception) for a malformed hash."""
    try:
        scheme, log2_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt" or not 10 <= int(log2_n) <= 20 or not 1 <= int(r) <= 32 \
                or not 1 <= int(p) <= 16:
            return False
        expected = base64.b64decode(digest, validate=True)
        if len(password) > MAX_PASSWORD:
            return False
        got = _scrypt(password, base64.b64decode(salt, validate=True), int(log2_n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)
