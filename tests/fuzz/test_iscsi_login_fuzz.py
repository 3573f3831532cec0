"""Fuzzing the login: random and mutated Login PDUs, and random byte streams through
PduReader, give well-formed Login Responses or MalformedPacket, never anything else.

Every reply must be exactly one Login Response PDU whose data fits the 8192
bytes in force during login; a refusal closes for good; parameters appear
only on a successful transit to the full-feature phase; a target that
requires CHAP is never entered without it; and memory stays bounded however
long the initiator keeps continuing its text.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobinux.errors import MalformedPacket
from mobinux.iscsi.constants import LOGIN_MAX_RECV_DATA_SEGMENT_LENGTH
from mobinux.iscsi.keys import encode_text
from mobinux.iscsi.login import MAX_LOGIN_REQUESTS, MAX_LOGIN_TEXT, Login
from mobinux.iscsi.params import TargetEntry
from mobinux.iscsi.pdu import Pdu, PduReader
from tests.unit.test_iscsi_login import (
    CHAP,
    IPXE_OPERATIONAL,
    LIBISCSI_OPERATIONAL,
    OPEN_ISCSI_OPERATIONAL,
    TARGET,
    leading,
    make_login,
    request,
)

FLOWS: list[list[bytes]] = [
    # libiscsi: operational stage first.
    [request(csg=1, nsg=3, transit=True, text=leading() + LIBISCSI_OPERATIONAL)],
    # open-iscsi: security with AuthMethod=None, then operational.
    [
        request(csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", "None")]),
        request(csg=1, nsg=3, transit=True, text=OPEN_ISCSI_OPERATIONAL),
    ],
    # iPXE with CHAP (the response cannot match the target's random challenge).
    [
        request(csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", "CHAP,None")]),
        request(csg=0, nsg=1, transit=True, text=[("CHAP_A", "5")]),
        request(
            csg=0,
            nsg=1,
            transit=True,
            text=[
                ("CHAP_N", CHAP.user),
                ("CHAP_R", "0x" + "00" * 16),
                ("CHAP_I", "3"),
                ("CHAP_C", "0x" + "11" * 16),
            ],
        ),
        request(csg=1, nsg=3, transit=True, text=IPXE_OPERATIONAL),
    ],
    # Discovery, and a continued text.
    [
        request(
            csg=0,
            nsg=3,
            transit=True,
            text=[("InitiatorName", "iqn.x"), ("SessionType", "Discovery")],
        )
    ],
    [
        request(csg=1, cont=True, text=encode_text(leading())[:20]),
        request(csg=1, nsg=3, transit=True, text=encode_text(leading())[20:]),
    ],
]


def check_step(login: Login, pdu: Pdu, state: dict[str, bool]) -> None:
    """Feed one PDU and check the invariants of the reply."""
    try:
        step = login.receive(pdu)
    except MalformedPacket:
        assert pdu.opcode >= 0x20  # only for what is not an initiator PDU at all
        return
    wire = b"".join(bytes(b) for b in step.reply)
    reader = PduReader(LOGIN_MAX_RECV_DATA_SEGMENT_LENGTH)
    reader.feed(wire)
    reply = reader.next_pdu()
    assert reply is not None and reader.buffered == 0, "exactly one PDU"
    assert reply.opcode == 0x23 and reply.bhs[4] == 0
    status = reply.u16(36)
    assert status >> 8 in (0, 2, 3)
    transit = bool(reply.flags & 0x80)
    if state["closed"]:
        assert step.close  # a refused login stays refused
    if step.close:
        assert status != 0 and step.params is None and reply.data == b""
        state["closed"] = True
    else:
        assert status == 0
    if step.params is not None:
        assert transit and reply.flags & 3 == 3 and reply.u16(14) != 0
        assert not state["full_feature"]
        state["full_feature"] = True
    elif not step.close:
        assert not (transit and reply.flags & 3 == 3)
    assert len(login._text) <= MAX_LOGIN_TEXT
    assert sum(len(piece) for piece in login._out) <= 3 * MAX_LOGIN_TEXT


def pdus_from(wires: list[bytes]) -> list[Pdu]:
    out = []
    for wire in wires:
        reader = PduReader(1 << 24)
        reader.feed(wire)
        while (pdu := reader.next_pdu()) is not None:
            out.append(pdu)
    return out


@st.composite
def mutated_flow(draw: st.DrawFn) -> list[bytes]:
    flow = [bytearray(w) for w in draw(st.sampled_from(FLOWS))]
    for _ in range(draw(st.integers(0, 6))):
        wire = flow[draw(st.integers(0, len(flow) - 1))]
        kind = draw(st.sampled_from(["flags", "byte", "text", "drop", "dup", "key"]))
        if kind == "flags":
            wire[1] = draw(st.integers(0, 255))
        elif kind == "byte":
            wire[draw(st.integers(0, 47))] = draw(st.integers(0, 255))
        elif kind == "text" and len(wire) > 48:
            wire[draw(st.integers(48, len(wire) - 1))] = draw(
                st.sampled_from([0, ord("="), ord(","), 0xFF, ord("A")])
            )
        elif kind == "drop" and len(flow) > 1:
            flow.pop(draw(st.integers(0, len(flow) - 1)))
        elif kind == "dup":
            flow.append(bytearray(draw(st.sampled_from(flow))))
        elif kind == "key":
            # Append a pair to the text and fix up DataSegmentLength.
            key = draw(
                st.sampled_from(
                    ["HeaderDigest", "CHAP_A", "X-x", "MaxBurstLength", "AuthMethod", "TargetName"]
                )
            )
            value = draw(
                st.sampled_from(["", "Reject", "None", "5", "0x10", "CRC32C,None", "9" * 30])
            )
            n = int.from_bytes(wire[5:8], "big")
            text = bytes(wire[48 : 48 + n]) + f"{key}={value}\0".encode()
            wire[5:8] = len(text).to_bytes(3, "big")
            wire[48:] = text + b"\0" * (-len(text) & 3)
    return [bytes(w) for w in flow]


@settings(max_examples=400, deadline=None)
@given(mutated_flow())
def test_mutated_login_flows(flow: list[bytes]) -> None:
    login = make_login()
    state = {"closed": False, "full_feature": False}
    for pdu in pdus_from(flow):
        check_step(login, pdu, state)


@settings(max_examples=300, deadline=None)
@given(mutated_flow())
def test_chap_cannot_be_bypassed(flow: list[bytes]) -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP), discovery_chap=CHAP)
    state = {"closed": False, "full_feature": False}
    for pdu in pdus_from(flow):
        check_step(login, pdu, state)
    assert not state["full_feature"]


random_pdu = st.builds(
    lambda head, flags, rest, data: Pdu(bytes([head, flags]) + rest, b"", data),
    st.sampled_from([0x03, 0x43, 0x04, 0x01, 0x23, 0x7F, 0xC3]),
    st.integers(0, 255),
    st.binary(min_size=46, max_size=46),
    st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "InitiatorName",
                        "TargetName",
                        "SessionType",
                        "AuthMethod",
                        "CHAP_A",
                        "X-y",
                        "HeaderDigest",
                    ]
                ),
                st.text(max_size=20),
            ),
            max_size=6,
        ).map(lambda pairs: "".join(f"{k}={v}\0" for k, v in pairs).encode()),
        st.binary(min_size=8000, max_size=9000),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(random_pdu, min_size=1, max_size=8))
def test_random_login_pdus(pdus: list[Pdu]) -> None:
    login = make_login()
    state = {"closed": False, "full_feature": False}
    for pdu in pdus:
        check_step(login, pdu, state)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4000), st.lists(st.integers(1, 300), max_size=20))
def test_random_streams_through_the_reader(stream: bytes, chunks: list[int]) -> None:
    login = make_login()
    reader = PduReader(LOGIN_MAX_RECV_DATA_SEGMENT_LENGTH)
    state = {"closed": False, "full_feature": False}
    pos = 0
    try:
        for size in [*chunks, len(stream)]:
            reader.feed(stream[pos : pos + size])
            pos += size
            while (pdu := reader.next_pdu()) is not None:
                check_step(login, pdu, state)
    except MalformedPacket:
        pass


def test_endless_continuation_is_cut_off() -> None:
    login = make_login()
    state = {"closed": False, "full_feature": False}
    piece = b"X-junk=" + b"j" * 200 + b"\0"
    wire = request(csg=0, cont=True, text=piece * 39)
    sent = 0
    for _ in range(MAX_LOGIN_REQUESTS):
        check_step(login, pdus_from([wire])[0], state)
        sent += 1
        if state["closed"]:
            break
    assert state["closed"]
    assert sent <= MAX_LOGIN_TEXT // 8000 + 1


def test_endless_empty_requests_are_cut_off() -> None:
    login = make_login()
    state = {"closed": False, "full_feature": False}
    check_step(login, pdus_from([request(csg=1, text=leading())])[0], state)
    for _ in range(MAX_LOGIN_REQUESTS):
        check_step(login, pdus_from([request(csg=1)])[0], state)
    assert state["closed"]
