"""MemoryDevice: the sparse RAM disk tests and scratch disks use."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobinux.storage.device import WouldBlock, merge_extents
from mobinux.storage.memory import CHUNK, MemoryDevice

SIZE = 8 * CHUNK


def _read(dev: MemoryDevice, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    dev.read_into(offset, memoryview(buf))
    return bytes(buf)


def test_size_must_be_whole_sectors() -> None:
    with pytest.raises(ValueError):
        MemoryDevice(1000)


def test_unwritten_space_reads_zero_and_costs_nothing() -> None:
    dev = MemoryDevice(1 << 40)  # a terabyte, sparse
    assert _read(dev, (1 << 40) - 512, 512) == bytes(512)
    assert dev.extents(0, 1 << 20) == [(0, 1 << 20, False)]


@settings(max_examples=200, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, SIZE - 1), st.binary(min_size=1, max_size=3 * CHUNK)), max_size=8
    ),
    discards=st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(0, 2 * CHUNK)), max_size=3),
)
def test_behaves_like_a_flat_bytearray(writes, discards) -> None:  # type: ignore[no-untyped-def]
    dev = MemoryDevice(SIZE)
    model = bytearray(SIZE)
    for offset, data in writes:
        data = data[: SIZE - offset]
        dev.write(offset, data)
        model[offset : offset + len(data)] = data
    for offset, length in discards:
        length = min(length, SIZE - offset)
        dev.discard(offset, length)
        model[offset : offset + length] = bytes(length)
    assert _read(dev, 0, SIZE) == model
    runs = dev.extents(0, SIZE)
    assert sum(n for _, n, _ in runs) == SIZE
    for off, n, mapped in runs:
        if not mapped:
            assert model[off : off + n] == bytes(n)


def test_whole_chunk_discard_deallocates() -> None:
    dev = MemoryDevice(SIZE)
    dev.write(0, b"x" * 2 * CHUNK)
    dev.discard(CHUNK, CHUNK)
    assert dev.extents(0, 2 * CHUNK) == [(0, CHUNK, True), (CHUNK, CHUNK, False)]


def test_readonly_refuses_writes() -> None:
    dev = MemoryDevice(SIZE, readonly=True)
    for call in (
        lambda: dev.write(0, b"x"),
        lambda: dev.discard(0, 512),
        lambda: dev.write_zeroes(0, 512),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EROFS


def test_out_of_range() -> None:
    dev = MemoryDevice(SIZE)
    with pytest.raises(OSError):
        dev.write(SIZE - 1, b"ab")
    with pytest.raises(OSError):
        dev.extents(SIZE, 1)


def test_nowait_would_block_switch() -> None:
    dev = MemoryDevice(SIZE, nowait_would_block=True)
    with pytest.raises(WouldBlock):
        dev.read_into(0, memoryview(bytearray(512)), nowait=True)
    with pytest.raises(WouldBlock):
        dev.write(0, b"x", nowait=True)
    dev.write(0, b"x")  # blocking calls work


def test_flush_and_close_are_recorded() -> None:
    dev = MemoryDevice(SIZE)
    dev.flush()
    dev.close()
    assert dev.flush_count == 1 and dev.closed


def test_merge_extents() -> None:
    assert merge_extents([(0, 5, True), (5, 5, True), (10, 0, False), (10, 2, False)]) == [
        (0, 10, True),
        (10, 2, False),
    ]
