"""Target-side CHAP (RFC 7143 §12.1.3, RFC 1994): challenge, verification, mutual answer."""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections.abc import Callable

import pytest

from mobinux.iscsi.chap import (
    CHALLENGE_LEN,
    ChapAuthenticator,
    ChapConfigError,
    ChapFailure,
    ChapState,
    chap_response,
    select_algorithm,
)
from mobinux.iscsi.keys import decode_binary
from mobinux.iscsi.params import ChapSecret

USER = ChapSecret("initiator-user", b"initiator-secret16")
MUTUAL = ChapSecret("target-user", b"target-secret-1234")


def counting_random(start: int = 1) -> Callable[[int], bytes]:
    """Deterministic 'random' bytes: 1, 2, 3, ... so tests know every challenge."""
    counter = itertools.count(start)
    return lambda n: bytes(next(counter) & 0xFF for _ in range(n))


def test_md5_vector() -> None:
    # MD5(0x07 || "password123" || 00 01 .. 0f), computed with openssl md5.
    digest = chap_response(7, b"password123", bytes(range(16)))
    assert digest.hex() == "fa2e255fabe84e606aab82e62a0f3959"


@pytest.mark.parametrize(
    ("value", "chosen"),
    [
        ("5", 5),
        ("7,5", 5),
        ("5,6,7,8", 5),
        ("0x5", 5),
        ("56", None),
        ("", None),
        ("7", None),
        ("6,X", None),
    ],
)
def test_algorithm_selection(value: str, chosen: int | None) -> None:
    # libiscsi's iscsi-test-cu sends "5,6,7,8" (must pass), "56" and "" (must fail).
    assert select_algorithm(value) == chosen


def started(mutual: ChapSecret | None = None) -> tuple[ChapAuthenticator, int, bytes]:
    auth = ChapAuthenticator(USER, mutual, counting_random())
    reply = dict(auth.start("5"))
    assert reply["CHAP_A"] == "5"
    ident = int(reply["CHAP_I"])
    challenge = decode_binary(reply["CHAP_C"])
    return auth, ident, challenge


def test_challenge_comes_from_the_random_source() -> None:
    auth, ident, challenge = started()
    assert ident == 1
    assert challenge == bytes(range(2, 2 + CHALLENGE_LEN))
    assert auth.state is ChapState.WAIT_RESPONSE


def test_challenge_is_hex_encoded() -> None:
    auth = ChapAuthenticator(USER, None, counting_random())
    value = dict(auth.start("5"))["CHAP_C"]
    assert value.startswith("0x")
    assert len(value) == 2 + 2 * CHALLENGE_LEN


def test_correct_response_passes() -> None:
    auth, ident, challenge = started()
    response = hashlib.md5(bytes([ident]) + USER.secret + challenge).hexdigest()
    assert auth.finish({"CHAP_N": USER.user, "CHAP_R": "0x" + response}) == []
    assert auth.state is ChapState.DONE


def test_uppercase_hex_and_base64_responses_pass() -> None:
    for encode in (lambda d: "0X" + d.hex().upper(), lambda d: "0b" + base64.b64encode(d).decode()):
        auth, ident, challenge = started()
        digest = hashlib.md5(bytes([ident]) + USER.secret + challenge).digest()
        assert auth.finish({"CHAP_N": USER.user, "CHAP_R": encode(digest)}) == []


@pytest.mark.parametrize(
    "keys",
    [
        {"CHAP_N": "someone-else", "CHAP_R": "GOOD"},
        {"CHAP_N": USER.user, "CHAP_R": "0x" + "00" * 16},
        {"CHAP_N": USER.user, "CHAP_R": "GOOD-TRUNCATED"},
        {"CHAP_N": USER.user, "CHAP_R": "GOOD-EXTENDED"},
        {"CHAP_N": USER.user, "CHAP_R": "not-binary"},
        {"CHAP_N": USER.user},
        {"CHAP_R": "GOOD"},
    ],
)
def test_wrong_user_or_response_fails(keys: dict[str, str]) -> None:
    auth, ident, challenge = started()
    digest = hashlib.md5(bytes([ident]) + USER.secret + challenge).digest()
    encoded = {
        "GOOD": "0x" + digest.hex(),
        "GOOD-TRUNCATED": "0x" + digest[:15].hex(),
        # libiscsi's "base64 oversize" test: a valid prefix glued before the right digest.
        "GOOD-EXTENDED": "0b" + base64.b64encode(b"oversize\n" + digest).decode(),
    }
    keys = {key: encoded.get(value, value) for key, value in keys.items()}
    with pytest.raises(ChapFailure):
        auth.finish(keys)


def test_wrong_secret_fails() -> None:
    auth, ident, challenge = started()
    wrong = hashlib.md5(bytes([ident]) + b"not-the-secret" + challenge).hexdigest()
    with pytest.raises(ChapFailure):
        auth.finish({"CHAP_N": USER.user, "CHAP_R": "0x" + wrong})


def test_unsupported_algorithm_fails() -> None:
    auth = ChapAuthenticator(USER, None, counting_random())
    with pytest.raises(ChapFailure):
        auth.start("7")


def test_out_of_sequence() -> None:
    auth = ChapAuthenticator(USER, None, counting_random())
    with pytest.raises(ChapFailure):
        auth.finish({"CHAP_N": "x", "CHAP_R": "0x00"})
    auth.start("5")
    with pytest.raises(ChapFailure):
        auth.start("5")


def respond(ident: int, challenge: bytes) -> dict[str, str]:
    return {
        "CHAP_N": USER.user,
        "CHAP_R": "0x" + chap_response(ident, USER.secret, challenge).hex(),
    }


def test_mutual_chap_answers_with_the_mutual_secret() -> None:
    auth, ident, challenge = started(MUTUAL)
    peer_challenge = bytes(range(100, 132))  # libiscsi sends 32 bytes
    keys = respond(ident, challenge) | {"CHAP_I": "9", "CHAP_C": "0x" + peer_challenge.hex()}
    reply = dict(auth.finish(keys))
    assert reply["CHAP_N"] == MUTUAL.user
    expected = hashlib.md5(bytes([9]) + MUTUAL.secret + peer_challenge).hexdigest()
    assert reply["CHAP_R"] == "0x" + expected


def test_mutual_is_optional_for_the_initiator() -> None:
    auth, ident, challenge = started(MUTUAL)
    assert auth.finish(respond(ident, challenge)) == []


@pytest.mark.parametrize(
    "extra",
    [
        {"CHAP_I": "9"},  # challenge missing
        {"CHAP_C": "0x" + "11" * 16},  # identifier missing
        {"CHAP_I": "256", "CHAP_C": "0x" + "11" * 16},
        {"CHAP_I": "x", "CHAP_C": "0x" + "11" * 16},
        {"CHAP_I": "9", "CHAP_C": "0x" + "11" * 15},  # too short
        {"CHAP_I": "9", "CHAP_C": "0x" + "11" * 1025},  # too long
        {"CHAP_I": "9", "CHAP_C": "nonsense"},
        {"CHAP_I": "9", "CHAP_C": "REFLECTED"},
    ],
)
def test_bad_mutual_challenges_fail(extra: dict[str, str]) -> None:
    auth, ident, challenge = started(MUTUAL)
    extra = {
        key: ("0x" + challenge.hex() if value == "REFLECTED" else value)
        for key, value in extra.items()
    }
    with pytest.raises(ChapFailure):
        auth.finish(respond(ident, challenge) | extra)


def test_reflected_challenge_refused_even_in_base64() -> None:
    auth, ident, challenge = started(MUTUAL)
    keys = respond(ident, challenge) | {
        "CHAP_I": "1",
        "CHAP_C": "0b" + base64.b64encode(challenge).decode(),
    }
    with pytest.raises(ChapFailure, match="reflect"):
        auth.finish(keys)


def test_mutual_requested_without_a_mutual_secret_fails() -> None:
    auth, ident, challenge = started(None)
    with pytest.raises(ChapFailure):
        auth.finish(respond(ident, challenge) | {"CHAP_I": "1", "CHAP_C": "0x" + "22" * 16})


def test_same_secret_both_ways_is_a_configuration_error() -> None:
    auth, ident, challenge = started(ChapSecret("target-user", USER.secret))
    with pytest.raises(ChapConfigError):
        auth.finish(respond(ident, challenge) | {"CHAP_I": "1", "CHAP_C": "0x" + "22" * 16})


def test_secrets_stay_out_of_reprs() -> None:
    auth, _, challenge = started(MUTUAL)
    text = repr(auth) + repr(USER) + repr(MUTUAL)
    assert "initiator-secret16" not in text
    assert "target-secret-1234" not in text
    assert challenge.hex() not in text
