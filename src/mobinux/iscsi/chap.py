"""CHAP for the iSCSI login, target side (RFC 7143 §12.1.3; RFC 1994).

The exchange, after the target picked ``AuthMethod=CHAP``::

    I->T  CHAP_A=<A1,A2,...>
    T->I  CHAP_A=5  CHAP_I=<id>  CHAP_C=<challenge>
    I->T  CHAP_N=<user>  CHAP_R=<MD5(id || secret || challenge)>  [CHAP_I=<id'>  CHAP_C=<challenge'>]
    T->I  [CHAP_N=<mutual user>  CHAP_R=<MD5(id' || mutual secret || challenge')>]

The bracketed keys are mutual CHAP: the initiator asks the target to prove
itself. §12.1.3 requires the responder to refuse a challenge identical to the
one it sent (a reflection attack: the initiator would get the target to
compute the answer to its own challenge); we also refuse short ones.

Secrets never leave this module except inside a digest; nothing here logs,
and the reprs show no secret or challenge.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable, Mapping

from mobinux.errors import RemoteProtocolError
from mobinux.iscsi.keys import BINARY_MAX_LEN, decode_binary, encode_hex, parse_number
from mobinux.iscsi.params import ChapSecret

CHAP_MD5 = 5  # RFC 1994 / §12.1.3: the one algorithm every implementation must offer
MD5_LEN = 16
CHALLENGE_LEN = 16  # what we send: as long as the digest, like LIO
# The shortest challenge we answer for mutual CHAP. open-iscsi and iPXE send 16
# bytes, libiscsi 32; anything shorter makes the target's answer cheap to replay.
MIN_PEER_CHALLENGE_LEN = 16


class ChapFailure(RemoteProtocolError):
    """The initiator failed CHAP or broke its sequence; the login ends with Authentication Failure."""


class ChapConfigError(Exception):
    """The target's own CHAP configuration is unusable; the login ends with Target Error."""


class ChapState(enum.Enum):
    WAIT_ALGORITHM = "wait-algorithm"
    WAIT_RESPONSE = "wait-response"
    DONE = "done"


def chap_response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 §4.1: MD5 over the identifier octet, the secret and the challenge."""
    return hashlib.md5(bytes([identifier]) + secret + challenge).digest()


def select_algorithm(value: str) -> int | None:
    """The first algorithm of a CHAP_A list we implement (only 5, MD5), or None."""
    for item in value.split(","):
        if parse_number(item) == CHAP_MD5:
            return CHAP_MD5
    return None


class ChapAuthenticator:
    """One CHAP exchange as the target: challenge, verify, and answer a mutual challenge."""

    __slots__ = ("_challenge", "_identifier", "_mutual", "_random_bytes", "_secret", "state")

    def __init__(
        self,
        secret: ChapSecret,
        mutual: ChapSecret | None,
        random_bytes: Callable[[int], bytes],
    ) -> None:
        self._secret = secret
        self._mutual = mutual
        self._random_bytes = random_bytes
        self._identifier = 0
        self._challenge = b""
        self.state = ChapState.WAIT_ALGORITHM

    def __repr__(self) -> str:
        return f"ChapAuthenticator(user={self._secret.user!r}, state={self.state.value})"

    def start(self, chap_a: str) -> list[tuple[str, str]]:
        """Answer CHAP_A: our algorithm, identifier and a fresh random challenge."""
        if self.state is not ChapState.WAIT_ALGORITHM:
            raise ChapFailure("CHAP_A out of sequence")
        if select_algorithm(chap_a) is None:
            raise ChapFailure(f"no supported CHAP algorithm in CHAP_A={chap_a[:40]}")
        ident = self._random_bytes(1)
        challenge = self._random_bytes(CHALLENGE_LEN)
        if len(ident) != 1 or len(challenge) != CHALLENGE_LEN:
            raise ValueError("random_bytes returned the wrong number of bytes")
        self._identifier = ident[0]
        self._challenge = challenge
        self.state = ChapState.WAIT_RESPONSE
        return [
            ("CHAP_A", str(CHAP_MD5)),
            ("CHAP_I", str(self._identifier)),
            ("CHAP_C", encode_hex(challenge)),
        ]

    def finish(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        """Check CHAP_N/CHAP_R; answer CHAP_I/CHAP_C (mutual) with our CHAP_N/CHAP_R.

        Raises :class:`ChapFailure` on a wrong user or response, a malformed
        value, or an unacceptable mutual challenge.
        """
        if self.state is not ChapState.WAIT_RESPONSE:
            raise ChapFailure("CHAP response out of sequence")
        name = keys.get("CHAP_N")
        response = keys.get("CHAP_R")
        if name is None or response is None:
            raise ChapFailure("CHAP_N and CHAP_R are required")
        try:
            received = decode_binary(response)
        except ValueError as exc:
            raise ChapFailure(f"CHAP_R is not a binary value: {exc}") from None
        expected = chap_response(self._identifier, self._secret.secret, self._challenge)
        # Both comparisons always run, in constant time, so timing tells nothing about which failed.
        user_ok = hmac.compare_digest(name.encode("utf-8"), self._secret.user.encode("utf-8"))
        response_ok = hmac.compare_digest(received, expected)
        if not (user_ok and response_ok):
            raise ChapFailure("wrong CHAP user or response")

        reply: list[tuple[str, str]] = []
        peer_id = keys.get("CHAP_I")
        peer_challenge = keys.get("CHAP_C")
        if peer_id is not None or peer_challenge is not None:
            reply = self._answer_mutual(peer_id, peer_challenge)
        self.state = ChapState.DONE
        return reply

    def _answer_mutual(
        self, peer_id: str | None, peer_challenge: str | None
    ) -> list[tuple[str, str]]:
        if peer_id is None or peer_challenge is None:
            raise ChapFailure("mutual CHAP needs both CHAP_I and CHAP_C")
        if self._mutual is None:
            raise ChapFailure("initiator asked for mutual CHAP but the target has no mutual secret")
        if hmac.compare_digest(self._mutual.secret, self._secret.secret):
            # §12.1.3: one secret for both directions lets anyone who can
            # make us answer a challenge impersonate the initiator.
            raise ChapConfigError("mutual CHAP secret equals the initiator's secret")
        identifier = parse_number(peer_id)
        if identifier is None or identifier > 255:
            raise ChapFailure("CHAP_I is not a number from 0 to 255")
        try:
            challenge = decode_binary(peer_challenge)
        except ValueError as exc:
            raise ChapFailure(f"CHAP_C is not a binary value: {exc}") from None
        if not MIN_PEER_CHALLENGE_LEN <= len(challenge) <= BINARY_MAX_LEN:
            raise ChapFailure(f"CHAP_C of {len(challenge)} bytes")
        if hmac.compare_digest(challenge, self._challenge):
            raise ChapFailure("CHAP_C reflects the target's own challenge")
        answer = chap_response(identifier, self._mutual.secret, challenge)
        return [("CHAP_N", self._mutual.user), ("CHAP_R", encode_hex(answer))]
