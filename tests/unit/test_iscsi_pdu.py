"""PDU framing (RFC 7143 §11.2): PduReader against an independent encoder, digests, padding, limits."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobinux.errors import MalformedPacket
from mobinux.iscsi.pdu import (
    DataDigestError,
    Pdu,
    PduReader,
    crc32c,
    digest_bytes,
    encode_lun,
    encode_pdu,
    new_bhs,
    pad_len,
    put_u16,
    put_u32,
)


def slow_crc32c(data: bytes) -> int:
    """CRC32C bit by bit (reflected polynomial 0x82F63B78), independent of the C library."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def wire_digest(data: bytes) -> bytes:
    return struct.pack("<I", slow_crc32c(data))  # least significant byte first on the wire


def wire_pdu(
    bhs: bytes,
    ahs: bytes = b"",
    data: bytes = b"",
    *,
    header_digest: bool = False,
    data_digest: bool = False,
) -> bytes:
    """A PDU as an initiator puts it on the wire (§11.2), written without pdu.py."""
    assert len(bhs) == 48 and len(ahs) % 4 == 0
    head = bytearray(bhs)
    head[4] = len(ahs) // 4
    head[5:8] = len(data).to_bytes(3, "big")
    out = bytes(head) + ahs
    if header_digest:
        out += wire_digest(out)
    if data:
        padded = data + b"\0" * (-len(data) & 3)
        out += padded
        if data_digest:
            out += wire_digest(padded)
    return out


# -- digests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        # The CRC32C examples of RFC 3720 Appendix B.4 (bytes as they go on the wire).
        (bytes(32), "aa36918a"),
        (b"\xff" * 32, "43aba862"),
        (bytes(range(32)), "4e79dd46"),
        (bytes(range(31, -1, -1)), "5cdb3f11"),
    ],
)
def test_crc32c_examples(data: bytes, wire: str) -> None:
    assert digest_bytes(data).hex() == wire
    assert wire_digest(data).hex() == wire
    assert digest_bytes(data[:5], data[5:]) == digest_bytes(data)  # parts chain


@given(st.binary(max_size=300))
def test_crc32c_matches_the_slow_one(data: bytes) -> None:
    assert crc32c(data) == slow_crc32c(data)


def test_pad_len() -> None:
    assert [pad_len(n) for n in range(9)] == [0, 3, 2, 1, 0, 3, 2, 1, 0]


# -- reader ------------------------------------------------------------------------------


def bhs_with(opcode: int, itt: int = 0x11223344, fill: int = 0) -> bytes:
    bhs = bytearray([fill] * 48)
    bhs[0] = opcode
    struct.pack_into("!I", bhs, 16, itt)
    return bytes(bhs)


def test_one_pdu() -> None:
    reader = PduReader()
    reader.feed(wire_pdu(bhs_with(0x43), data=b"InitiatorName=x\0"))
    pdu = reader.next_pdu()
    assert pdu is not None
    assert (pdu.opcode, pdu.immediate, pdu.itt) == (0x03, True, 0x11223344)
    assert pdu.data == b"InitiatorName=x\0"
    assert pdu.ahs == b""
    assert reader.next_pdu() is None
    assert reader.buffered == 0


def test_padding_is_stripped_and_not_data() -> None:
    for size in range(1, 9):
        reader = PduReader()
        reader.feed(wire_pdu(bhs_with(0x04), data=b"a" * size) + wire_pdu(bhs_with(0x00, itt=7)))
        first, second = reader.next_pdu(), reader.next_pdu()
        assert first is not None and first.data == b"a" * size
        assert second is not None and second.itt == 7


def test_needs_the_whole_pdu() -> None:
    wire = wire_pdu(
        bhs_with(0x01), ahs=b"\x01" * 8, data=b"xyz", header_digest=True, data_digest=True
    )
    reader = PduReader()
    reader.enable_digests(True, True)
    for i, byte in enumerate(wire):
        assert reader.next_pdu() is None
        reader.feed(bytes([byte]))
        assert reader.buffered == i + 1
    pdu = reader.next_pdu()
    assert pdu is not None
    assert (pdu.ahs, pdu.data) == (b"\x01" * 8, b"xyz")


def test_header_digest_covers_the_ahs() -> None:
    wire = bytearray(wire_pdu(bhs_with(0x01), ahs=b"\x00" * 4, header_digest=True))
    wire[50] ^= 0x01  # inside the AHS
    reader = PduReader()
    reader.enable_digests(True, False)
    reader.feed(wire)
    with pytest.raises(MalformedPacket, match="header digest"):
        reader.next_pdu()


def test_bad_data_digest() -> None:
    wire = bytearray(wire_pdu(bhs_with(0x05), data=b"payload", data_digest=True))
    wire[50] ^= 0xFF
    reader = PduReader()
    reader.enable_digests(False, True)
    reader.feed(wire)
    with pytest.raises(DataDigestError):
        reader.next_pdu()


def test_data_digest_covers_the_padding() -> None:
    wire = bytearray(wire_pdu(bhs_with(0x05), data=b"abc", data_digest=True))
    wire[48 + 3] = 0x55  # the pad byte
    reader = PduReader()
    reader.enable_digests(False, True)
    reader.feed(wire)
    with pytest.raises(DataDigestError):
        reader.next_pdu()


def test_no_data_digest_without_data() -> None:
    wire = wire_pdu(bhs_with(0x00), header_digest=True, data_digest=True)
    assert len(wire) == 52
    reader = PduReader()
    reader.enable_digests(True, True)
    reader.feed(wire + wire)
    assert reader.next_pdu() is not None
    assert reader.next_pdu() is not None
    assert reader.buffered == 0


def test_digests_switched_on_after_login() -> None:
    login = wire_pdu(bhs_with(0x43), data=b"A=1\0")
    command = wire_pdu(bhs_with(0x01), data=b"data", header_digest=True, data_digest=True)
    reader = PduReader()
    reader.feed(login + command)
    assert reader.next_pdu() is not None
    reader.enable_digests(True, True)  # §13.1: digests start with the full-feature phase
    pdu = reader.next_pdu()
    assert pdu is not None and pdu.data == b"data"


def test_oversize_data_segment_refused_before_it_arrives() -> None:
    reader = PduReader(max_data_segment=8192)
    head = wire_pdu(bhs_with(0x43), data=b"x" * 8193)[:48]
    reader.feed(head)  # only the BHS: the declared length is already too much
    with pytest.raises(MalformedPacket, match="MaxRecvDataSegmentLength"):
        reader.next_pdu()


def test_data_segment_at_the_limit() -> None:
    reader = PduReader(max_data_segment=8192)
    reader.feed(wire_pdu(bhs_with(0x43), data=b"x" * 8192))
    pdu = reader.next_pdu()
    assert pdu is not None and len(pdu.data) == 8192


def test_feed_accepts_any_buffer() -> None:
    wire = wire_pdu(bhs_with(0x00), data=b"abcd")
    reader = PduReader()
    reader.feed(memoryview(wire)[:10])
    reader.feed(bytearray(wire[10:]))
    pdu = reader.next_pdu()
    assert pdu is not None and pdu.data == b"abcd"


pdu_parts = st.tuples(
    st.integers(0, 0x3F),  # opcode
    st.binary(min_size=43, max_size=43),  # BHS bytes 1-3 and 8-47
    st.integers(0, 3),  # AHS words
    st.binary(max_size=600),  # data segment
)


def make_bhs(opcode: int, rest: bytes) -> bytes:
    return bytes([opcode]) + rest[:3] + b"\0\0\0\0" + rest[3:]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(pdu_parts, min_size=1, max_size=6),
    st.booleans(),
    st.booleans(),
    st.lists(st.integers(1, 700), max_size=30),
)
def test_framing_survives_any_chunking(
    parts: list[tuple[int, bytes, int, bytes]],
    header_digest: bool,
    data_digest: bool,
    cuts: list[int],
) -> None:
    wire = b""
    expected = []
    for opcode, rest, ahs_words, data in parts:
        bhs = make_bhs(opcode, rest)
        ahs = bytes(range(ahs_words * 4))
        wire += wire_pdu(bhs, ahs, data, header_digest=header_digest, data_digest=data_digest)
        expected.append((opcode, ahs, data, bhs[8:]))
    reader = PduReader(max_data_segment=1024)
    reader.enable_digests(header_digest, data_digest)
    got = []
    pos = 0
    for size in [*cuts, len(wire)]:
        reader.feed(wire[pos : pos + size])
        pos += size
        while (pdu := reader.next_pdu()) is not None:
            got.append((pdu.opcode, pdu.ahs, pdu.data, pdu.bhs[8:]))
        if pos >= len(wire):
            break
    assert got == expected
    assert reader.buffered == 0


# -- encoder -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_encode_pdu_round_trip(
    data: bytes, header_digest: bool, data_digest: bool, itt: int
) -> None:
    bhs = new_bhs(0x23, 0x87)
    put_u32(bhs, 16, itt)
    bhs[4] = 9  # encode_pdu writes no AHS, whatever the buffer held
    buffers = encode_pdu(bhs, data, header_digest=header_digest, data_digest=data_digest)
    wire = b"".join(bytes(b) for b in buffers)
    expected = wire_pdu(
        bytes(bhs[:4]) + b"\0" * 4 + bytes(bhs[8:]),
        b"",
        data,
        header_digest=header_digest,
        data_digest=data_digest,
    )
    assert wire == expected
    reader = PduReader(max_data_segment=1024)
    reader.enable_digests(header_digest, data_digest)
    reader.feed(wire)
    pdu = reader.next_pdu()
    assert pdu is not None
    assert (pdu.opcode, pdu.flags, pdu.final, pdu.itt, pdu.data) == (0x23, 0x87, True, itt, data)


def test_encode_pdu_does_not_copy_the_data() -> None:
    payload = memoryview(b"x" * 4096)
    buffers = encode_pdu(new_bhs(0x25), payload)
    assert any(b is payload for b in buffers)


# -- Pdu accessors -----------------------------------------------------------------------


def test_bhs_must_be_48_bytes() -> None:
    with pytest.raises(MalformedPacket):
        Pdu(b"\0" * 47)


def test_accessors() -> None:
    bhs = new_bhs(0x41, 0x81)
    put_u16(bhs, 20, 0xBEEF)
    put_u32(bhs, 24, 0xCAFEF00D)
    bhs[8:16] = encode_lun(5)
    pdu = Pdu(bytes(bhs))
    assert (pdu.opcode, pdu.immediate, pdu.final, pdu.flags) == (0x01, True, True, 0x81)
    assert (pdu.u16(20), pdu.u32(24), pdu.lun, pdu.lun_bytes) == (
        0xBEEF,
        0xCAFEF00D,
        5,
        encode_lun(5),
    )
    assert "0x01" in repr(pdu)


@pytest.mark.parametrize("lun", [0, 1, 255, 256, 1000, 16383])
def test_lun_round_trip(lun: int) -> None:
    bhs = bytearray(48)
    bhs[8:16] = encode_lun(lun)
    assert Pdu(bytes(bhs)).lun == lun


def test_multi_level_lun_never_matches() -> None:
    bhs = bytearray(48)
    bhs[8:16] = bytes([0, 1, 0, 2, 0, 0, 0, 0])
    assert Pdu(bytes(bhs)).lun == -1
