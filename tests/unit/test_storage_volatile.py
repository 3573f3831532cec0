"""VolatileCacheDevice: acknowledged writes live in a cache until flush; power cuts lose them."""

from __future__ import annotations

import errno

import pytest

from mobinux.storage.memory import MemoryDevice
from mobinux.storage.volatile import VolatileCacheDevice

SIZE = 64 * 512


def _read(dev: VolatileCacheDevice | MemoryDevice, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    dev.read_into(offset, memoryview(buf))
    return bytes(buf)


def test_writes_are_visible_but_not_durable_until_flush() -> None:
    inner = MemoryDevice(SIZE)
    dev = VolatileCacheDevice(inner)
    dev.write(1024, b"c" * 1024)
    assert _read(dev, 1024, 1024) == b"c" * 1024
    assert _read(inner, 1024, 1024) == bytes(1024)
    assert dev.dirty_bytes == 1024
    dev.flush()
    assert _read(inner, 1024, 1024) == b"c" * 1024
    assert inner.flush_count == 1
    assert dev.dirty_bytes == 0


def test_power_cut_loses_exactly_the_unflushed_writes() -> None:
    inner = MemoryDevice(SIZE)
    dev = VolatileCacheDevice(inner)
    dev.write(0, b"1" * 512)
    dev.flush()
    dev.write(0, b"2" * 512)
    dev.write(512, b"3" * 512)
    dev.power_cut()
    assert _read(dev, 0, 1024) == b"1" * 512 + bytes(512)


def test_unaligned_writes_merge_with_what_is_below() -> None:
    inner = MemoryDevice(SIZE)
    inner.write(0, b"i" * 1024)
    dev = VolatileCacheDevice(inner)
    dev.write(100, b"u" * 600)
    assert _read(dev, 0, 1024) == b"i" * 100 + b"u" * 600 + b"i" * 324
    assert _read(dev, 50, 100) == b"i" * 50 + b"u" * 50
    dev.flush()
    assert _read(inner, 0, 1024) == b"i" * 100 + b"u" * 600 + b"i" * 324


def test_discard_and_write_zeroes_are_cached_too() -> None:
    inner = MemoryDevice(SIZE)
    inner.write(0, b"d" * 2048)
    dev = VolatileCacheDevice(inner)
    dev.discard(0, 512)
    dev.write_zeroes(512, 512)
    assert _read(dev, 0, 1024) == bytes(1024)
    assert _read(inner, 0, 1024) == b"d" * 1024
    assert dev.extents(0, 1024) == [(0, 512, False), (512, 512, True)]
    dev.power_cut()
    assert _read(dev, 0, 1024) == b"d" * 1024
    dev.discard(0, 1024)
    dev.flush()
    assert _read(inner, 0, 1024) == bytes(1024)


def test_readonly_inner_refuses_writes() -> None:
    dev = VolatileCacheDevice(MemoryDevice(SIZE, readonly=True))
    assert dev.readonly
    with pytest.raises(OSError) as exc:
        dev.write(0, b"x" * 512)
    assert exc.value.errno == errno.EROFS
    with pytest.raises(OSError):
        dev.discard(0, 512)


def test_close_closes_inner() -> None:
    inner = MemoryDevice(SIZE)
    VolatileCacheDevice(inner).close()
    assert inner.closed
