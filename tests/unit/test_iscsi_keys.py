"""The iSCSI text codec and the negotiation rules of RFC 7143 §6 and §13."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mobinux.errors import MalformedPacket
from mobinux.iscsi.keys import (
    IRRELEVANT,
    NOT_UNDERSTOOD,
    OPERATIONAL_KEYS,
    REJECT,
    Kind,
    NegotiationError,
    OperationalNegotiation,
    decode_binary,
    encode_hex,
    encode_text,
    first_supported,
    offers_reserved_value,
    parse_boolean,
    parse_number,
    parse_text,
)
from mobinux.iscsi.params import SessionParams, SessionType, TargetLimits

# -- codec -----------------------------------------------------------------------------


def test_parse_text_keeps_order_and_duplicates() -> None:
    data = b"InitiatorName=iqn.a:b\0SessionType=Normal\0X-a=1\0X-a=2\0"
    assert parse_text(data) == [
        ("InitiatorName", "iqn.a:b"),
        ("SessionType", "Normal"),
        ("X-a", "1"),
        ("X-a", "2"),
    ]


def test_parse_text_skips_padding_and_allows_empty_values_and_equals_in_values() -> None:
    assert parse_text(b"SendTargets=\0\0\0CHAP_R=0bAAAA==\0\0") == [
        ("SendTargets", ""),
        ("CHAP_R", "0bAAAA=="),
    ]


def test_parse_text_tolerates_a_missing_final_nul() -> None:
    assert parse_text(b"A=1\0B=2") == [("A", "1"), ("B", "2")]


def test_parse_text_of_nothing() -> None:
    assert parse_text(b"") == []
    assert parse_text(b"\0\0\0\0") == []


@pytest.mark.parametrize(
    "data",
    [
        b"NoEquals\0",
        b"=value\0",
        b"K" * 64 + b"=v\0",  # §6.1: key names are at most 63 bytes
        b"Key=" + b"v" * 256 + b"\0",  # §6.1: simple values at most 255 bytes
        b"Key=\xff\xfe\0",  # not UTF-8
        b"K\xc3\xa9y=v\0",  # key outside the §6.1 characters
        b"bad key=v\0",
        b"CHAP_R=0x" + b"a" * 2049 + b"\0",  # longer than 1024 bytes of binary
    ],
)
def test_parse_text_refuses_garbage(data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse_text(data)


def test_parse_text_limits() -> None:
    assert parse_text(b"K" * 63 + b"=v\0") == [("K" * 63, "v")]
    assert parse_text(b"Key=" + b"v" * 255 + b"\0") == [("Key", "v" * 255)]
    long_binary = "0x" + "ab" * 1024  # CHAP values may carry 1024 bytes (§12.1.3)
    assert parse_text(f"CHAP_C={long_binary}\0".encode()) == [("CHAP_C", long_binary)]
    assert parse_text("TargetAlias=disque é\0".encode()) == [("TargetAlias", "disque é")]
    assert parse_text(b"X#com.example.flag=1\0") == [("X#com.example.flag", "1")]


def test_encode_text_terminates_every_pair() -> None:
    assert encode_text([("A", "1"), ("B", "")]) == b"A=1\0B=\0"
    assert encode_text([]) == b""


@pytest.mark.parametrize("pair", [("", "v"), ("A=B", "v"), ("A", "x\0y")])
def test_encode_text_refuses_what_cannot_be_parsed_back(pair: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        encode_text([pair])


_KEY_CHARS = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-+@_#",
    min_size=1,
    max_size=63,
)
_VALUES = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=60)


@given(st.lists(st.tuples(_KEY_CHARS, _VALUES), max_size=20))
def test_text_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert parse_text(encode_text(pairs)) == pairs


# -- value grammar ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("0", 0),
        ("8192", 8192),
        ("0x2000", 8192),
        ("0X2000", 8192),
        ("007", 7),
        ("18446744073709551615", 2**64 - 1),
    ],
)
def test_parse_number(text: str, number: int) -> None:
    assert parse_number(text) == number


@pytest.mark.parametrize(
    "text",
    ["", "-1", "1.5", "0x", "0xg", "12a", "²", " 1", "18446744073709551616", "0x1" + "0" * 16],
)
def test_parse_number_refuses(text: str) -> None:
    assert parse_number(text) is None


def test_parse_boolean_is_case_sensitive() -> None:
    assert parse_boolean("Yes") is True
    assert parse_boolean("No") is False
    assert parse_boolean("yes") is None
    assert parse_boolean("") is None


def test_binary_values() -> None:
    assert decode_binary("0x00ff10") == b"\x00\xff\x10"
    assert decode_binary("0XABCD") == b"\xab\xcd"
    assert decode_binary("0xabc") == b"\x0a\xbc"  # odd digit count: leading zero implied
    assert decode_binary("0bAAEC") == b"\x00\x01\x02"
    assert encode_hex(b"\x01\xfe") == "0x01fe"
    for bad in ("", "0x", "abcd", "0xzz", "0b!!!!", "0bAAE", "1x00"):
        with pytest.raises(ValueError):
            decode_binary(bad)


def test_reserved_answers_cannot_be_offered() -> None:
    assert offers_reserved_value("Reject")
    assert offers_reserved_value("CRC32C,Irrelevant")
    assert offers_reserved_value("NotUnderstood")
    assert not offers_reserved_value("None")
    assert not offers_reserved_value("CRC32C,None")


def test_first_supported_follows_the_originator_order() -> None:
    assert first_supported("None,CRC32C", ("CRC32C", "None")) == "None"
    assert first_supported("CRC32C,None", ("CRC32C", "None")) == "CRC32C"
    assert first_supported("X-md5,CRC32C", ("CRC32C", "None")) == "CRC32C"
    assert first_supported("X-md5", ("CRC32C", "None")) is None


# -- operational negotiation -----------------------------------------------------------


def answer(
    offers: list[tuple[str, str]], limits: TargetLimits | None = None, *, discovery: bool = False
) -> dict[str, str]:
    neg = OperationalNegotiation(limits or TargetLimits(), discovery=discovery)
    replies = neg.answer(offers)
    assert [key for key, _ in replies] == [
        key for key, _ in offers
    ]  # every offer answered, in order
    return dict(replies)


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ("None", "None"),
        ("CRC32C", "CRC32C"),
        ("None,CRC32C", "None"),
        ("CRC32C,None", "CRC32C"),
        ("X-foo,CRC32C", "CRC32C"),
        ("X-foo", REJECT),
    ],
)
def test_digests_pick_the_first_supported(offered: str, chosen: str) -> None:
    assert answer([("HeaderDigest", offered), ("DataDigest", offered)]) == {
        "HeaderDigest": chosen,
        "DataDigest": chosen,
    }


def test_digest_outcome_reaches_the_session_parameters() -> None:
    neg = OperationalNegotiation(TargetLimits(), discovery=False)
    neg.answer([("HeaderDigest", "CRC32C,None"), ("DataDigest", "None,CRC32C")])
    params = _params()
    neg.apply(params)
    assert params.header_digest is True
    assert params.data_digest is False


@pytest.mark.parametrize(
    ("key", "offered", "reply"),
    [
        # Minimum (§13.2, §13.13, §13.14, §13.16, §13.17, §13.20): never more than our limit.
        ("MaxConnections", "4", "1"),
        ("MaxBurstLength", "16776192", "1048576"),
        ("MaxBurstLength", "65536", "65536"),
        ("FirstBurstLength", "16776192", "262144"),
        ("DefaultTime2Retain", "20", "0"),
        ("MaxOutstandingR2T", "8", "1"),
        ("ErrorRecoveryLevel", "2", "0"),
        ("iSCSIProtocolLevel", "2", "1"),
        ("iSCSIProtocolLevel", "0", "0"),
        # Maximum (§13.15).
        ("DefaultTime2Wait", "0", "2"),
        ("DefaultTime2Wait", "10", "10"),
        # OR (§13.10, §13.18, §13.19): our Yes wins.
        ("InitialR2T", "No", "Yes"),
        ("InitialR2T", "Yes", "Yes"),
        ("DataPDUInOrder", "No", "Yes"),
        ("DataSequenceInOrder", "No", "Yes"),
        # AND (§13.11): the initiator's No wins.
        ("ImmediateData", "No", "No"),
        ("ImmediateData", "Yes", "Yes"),
        # Obsolete markers (§13.25) and iSER (RFC 7145).
        ("OFMarker", "Yes", "No"),
        ("IFMarker", "No", "No"),
        ("OFMarkInt", "2048~65535", REJECT),
        ("IFMarkInt", "2048", REJECT),
        ("RDMAExtensions", "Yes", "No"),
        # TaskReporting (§13.23): only the RFC 3720 semantics.
        ("TaskReporting", "FastAbort,RFC3720", "RFC3720"),
        ("TaskReporting", "ResponseFence", REJECT),
        # Values out of range or ill-formed are rejected (§6.2.2).
        ("MaxBurstLength", "511", REJECT),
        ("MaxBurstLength", "16777216", REJECT),
        ("MaxConnections", "0", REJECT),
        ("ErrorRecoveryLevel", "3", REJECT),
        ("DefaultTime2Wait", "3601", REJECT),
        ("InitialR2T", "yes", REJECT),
        ("ImmediateData", "1", REJECT),
        ("MaxBurstLength", "lots", REJECT),
        ("MaxBurstLength", "0x10000", "65536"),
    ],
)
def test_result_functions(key: str, offered: str, reply: str) -> None:
    assert answer([(key, offered)]) == {key: reply}


def test_limits_are_never_exceeded() -> None:
    limits = TargetLimits(
        max_burst_length=65536, first_burst_length=131072, max_outstanding_r2t=4, max_connections=2
    )
    replies = answer(
        [
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "262144"),
            ("MaxOutstandingR2T", "8"),
            ("MaxConnections", "8"),
        ],
        limits,
    )
    # FirstBurstLength is capped by our limit and by the negotiated MaxBurstLength (§13.14);
    # MaxConnections stays 1 whatever the limits say, as no second connection is accepted.
    assert replies == {
        "MaxBurstLength": "65536",
        "FirstBurstLength": "65536",
        "MaxOutstandingR2T": "4",
        "MaxConnections": "1",
    }


def test_first_burst_capped_by_a_max_burst_offered_after_it() -> None:
    neg = OperationalNegotiation(TargetLimits(), discovery=False)
    replies = neg.answer([("FirstBurstLength", "262144"), ("MaxBurstLength", "131072")])
    assert replies == [("FirstBurstLength", "131072"), ("MaxBurstLength", "131072")]  # order kept


def test_first_burst_never_exceeds_max_burst_in_the_outcome() -> None:
    neg = OperationalNegotiation(TargetLimits(), discovery=False)
    neg.answer([("FirstBurstLength", "262144")])
    neg.answer([("MaxBurstLength", "65536")])  # a later request lowers MaxBurstLength
    params = _params()
    neg.apply(params)
    assert params.max_burst_length == 65536
    assert params.first_burst_length == 65536


def test_mrdsl_is_declared_both_ways() -> None:
    neg = OperationalNegotiation(TargetLimits(max_recv_data_segment_length=65536), discovery=False)
    assert neg.answer([("MaxRecvDataSegmentLength", "262144")]) == [
        ("MaxRecvDataSegmentLength", "65536")
    ]
    assert neg.declarations() == []  # declared once only
    params = _params()
    neg.apply(params)
    assert params.initiator_max_recv_data_segment_length == 262144
    assert params.target_max_recv_data_segment_length == 65536


def test_mrdsl_declared_even_when_the_initiator_does_not_declare() -> None:
    neg = OperationalNegotiation(TargetLimits(), discovery=False)
    assert neg.declarations() == [("MaxRecvDataSegmentLength", "262144")]
    assert neg.declarations() == []
    params = _params()
    neg.apply(params)
    assert params.initiator_max_recv_data_segment_length == 8192  # §13.12 default
    assert params.target_max_recv_data_segment_length == 262144


def test_mrdsl_not_declared_means_8192() -> None:
    params = _params()
    OperationalNegotiation(TargetLimits(), discovery=False).apply(params)
    assert params.target_max_recv_data_segment_length == 8192


def test_mrdsl_clamped_into_its_range() -> None:
    neg = OperationalNegotiation(TargetLimits(max_recv_data_segment_length=2**30), discovery=False)
    assert neg.declarations() == [("MaxRecvDataSegmentLength", str(2**24 - 1))]


@pytest.mark.parametrize("value", ["511", "16777216", "big", "Reject"])
def test_invalid_mrdsl_is_a_protocol_error(value: str) -> None:
    with pytest.raises(NegotiationError):
        OperationalNegotiation(TargetLimits(), discovery=False).answer(
            [("MaxRecvDataSegmentLength", value)]
        )


@pytest.mark.parametrize("value", ["Reject", "Irrelevant", "NotUnderstood", "CRC32C,Reject"])
def test_offering_an_answer_constant_is_a_protocol_error(value: str) -> None:
    with pytest.raises(NegotiationError):
        OperationalNegotiation(TargetLimits(), discovery=False).answer([("HeaderDigest", value)])


def test_discovery_answers_irrelevant_for_normal_session_keys() -> None:
    offers = [
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("MaxConnections", "1"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("ErrorRecoveryLevel", "0"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("MaxRecvDataSegmentLength", "8192"),
        ("TaskReporting", "RFC3720"),
        ("iSCSIProtocolLevel", "1"),
    ]
    replies = answer(offers, discovery=True)
    irrelevant = {key for key, value in replies.items() if value == IRRELEVANT}
    assert irrelevant == {
        "MaxConnections",
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
        "TaskReporting",
        "iSCSIProtocolLevel",
    }
    assert replies["HeaderDigest"] == "None"
    assert replies["MaxRecvDataSegmentLength"] == "262144"


def test_every_table_entry_answers_its_default() -> None:
    for spec in OPERATIONAL_KEYS.values():
        if spec.kind is Kind.OBSOLETE_INTERVAL:
            continue
        default = spec.default
        text = ("Yes" if default else "No") if isinstance(default, bool) else str(default)
        reply = answer([(spec.name, text)])[spec.name]
        assert reply not in (REJECT, NOT_UNDERSTOOD), spec.name


def test_no_proposals_with_default_limits() -> None:
    neg = OperationalNegotiation(TargetLimits(), discovery=False)
    assert not neg.needs_proposals()
    assert neg.proposals() == []


def test_proposals_when_a_default_exceeds_a_limit() -> None:
    neg = OperationalNegotiation(
        TargetLimits(max_burst_length=65536, first_burst_length=16384), discovery=False
    )
    assert neg.needs_proposals()
    assert neg.proposals() == [("MaxBurstLength", "65536"), ("FirstBurstLength", "16384")]
    assert neg.proposals() == []  # already offered
    # The initiator answers with a value not above ours (§6.2.2, Minimum).
    assert neg.answer([("MaxBurstLength", "32768"), ("FirstBurstLength", "16384")]) == []
    params = _params()
    neg.apply(params)
    assert (params.max_burst_length, params.first_burst_length) == (32768, 16384)


def test_offered_keys_are_not_proposed() -> None:
    neg = OperationalNegotiation(
        TargetLimits(max_burst_length=65536, first_burst_length=16384), discovery=False
    )
    neg.answer([("MaxBurstLength", "1048576"), ("FirstBurstLength", "4096")])
    assert neg.proposals() == []


def test_discovery_never_proposes() -> None:
    neg = OperationalNegotiation(TargetLimits(max_burst_length=4096), discovery=True)
    assert neg.proposals() == []


@pytest.mark.parametrize("reply", ["131072", "Reject", "Irrelevant", "junk"])
def test_bad_reply_to_a_proposal(reply: str) -> None:
    neg = OperationalNegotiation(
        TargetLimits(max_burst_length=65536, first_burst_length=16384), discovery=False
    )
    neg.proposals()
    with pytest.raises(NegotiationError):
        neg.answer([("MaxBurstLength", reply)])


def test_defaults_apply_when_nothing_is_offered() -> None:
    params = _params()
    OperationalNegotiation(TargetLimits(), discovery=False).apply(params)
    assert (params.initial_r2t, params.immediate_data) == (True, True)
    assert (params.max_burst_length, params.first_burst_length) == (262144, 65536)
    assert (params.default_time2wait, params.default_time2retain) == (2, 20)
    assert (params.header_digest, params.data_digest) == (False, False)
    assert params.error_recovery_level == 0


def _params() -> SessionParams:
    return SessionParams(
        session_type=SessionType.NORMAL,
        initiator_name="iqn.i",
        initiator_alias="",
        target_name="iqn.t",
        isid=b"\0" * 6,
        tsih=1,
        cid=0,
        tpgt=1,
    )
