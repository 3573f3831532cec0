"""Fuzzing PduReader: any byte stream gives PDUs or MalformedPacket, never anything else,
and the reader never holds more than it was fed nor hands out a data segment over its limit.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mobinux.errors import MalformedPacket
from mobinux.iscsi.pdu import PduReader
from tests.unit.test_iscsi_pdu import bhs_with, wire_pdu

SEEDS = [
    wire_pdu(bhs_with(0x43), data=b"InitiatorName=iqn.x\0SessionType=Discovery\0"),
    wire_pdu(bhs_with(0x01), ahs=b"\0" * 8, data=b"x" * 33, header_digest=True, data_digest=True),
    wire_pdu(bhs_with(0x00)) + wire_pdu(bhs_with(0x04), data=b"SendTargets=All\0"),
    wire_pdu(bhs_with(0x05), data=b"\xff" * 1024, data_digest=True),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "dup", "length"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "dup":
            data += data[pos:]
        elif kind == "length" and len(data) >= 8:
            data[4:8] = draw(
                st.binary(min_size=4, max_size=4)
            )  # TotalAHSLength and DataSegmentLength
    return bytes(data)


def drain(
    stream: bytes, chunks: list[int], max_data: int, header_digest: bool, data_digest: bool
) -> None:
    reader = PduReader(max_data_segment=max_data)
    reader.enable_digests(header_digest, data_digest)
    fed = 0
    pos = 0
    for size in [*chunks, len(stream)]:
        piece = stream[pos : pos + size]
        pos += size
        reader.feed(piece)
        fed += len(piece)
        try:
            while (pdu := reader.next_pdu()) is not None:
                assert len(pdu.bhs) == 48
                assert len(pdu.data) <= max_data
                assert len(pdu.ahs) <= 255 * 4
        except MalformedPacket:
            return  # the connection would be dropped here
        assert reader.buffered <= fed
        if pos >= len(stream):
            return


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=3000),
    st.lists(st.integers(1, 200), max_size=20),
    st.booleans(),
    st.booleans(),
)
def test_random_streams(
    stream: bytes, chunks: list[int], header_digest: bool, data_digest: bool
) -> None:
    drain(stream, chunks, 8192, header_digest, data_digest)


@settings(max_examples=300, deadline=None)
@given(
    mutated(),
    st.lists(st.integers(1, 100), max_size=20),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 48, 512, 8192]),
)
def test_mutated_streams(
    stream: bytes, chunks: list[int], header_digest: bool, data_digest: bool, max_data: int
) -> None:
    drain(stream, chunks, max_data, header_digest, data_digest)
