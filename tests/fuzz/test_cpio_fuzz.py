"""Garbage in: a parsed archive or ImageError out, never another exception, never a big allocation."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import tempfile
import tracemalloc
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobinux.errors import ImageError
from mobinux.images.compress import SUPPORTED, Compression, compress_bytes, decompress_bytes
from mobinux.images.cpio import CpioEntry, CpioHeader, CpioReader, read_archive, write_archive
from mobinux.images.initrd import iter_segments, repack_initrd, unpack_initrd

# MOBINUX_FUZZ_EXAMPLES=20000 for a long run; the default keeps the suite fast.
_EXAMPLES = int(os.environ.get("MOBINUX_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW_FUZZ = settings(
    max_examples=max(1, _EXAMPLES // 5), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _entry(name: str, data: bytes = b"", mode: int = stat.S_IFREG | 0o644, **kw: int) -> CpioEntry:
    return CpioEntry(CpioHeader(name=name, mode=mode, filesize=len(data), **kw), data)


SEED = write_archive(
    [
        _entry("dir", mode=stat.S_IFDIR | 0o755),
        _entry("dir/file", b"hello world\n" * 5),
        _entry("dir/link", b"file", mode=stat.S_IFLNK | 0o777),
        _entry("dir/h1", b"", ino=5, nlink=2),
        _entry("dir/h2", b"linked", ino=5, nlink=2),
        _entry("dev/null", mode=stat.S_IFCHR | 0o666, rdev_major=1, rdev_minor=3),
        _entry("../evil", b"x"),
    ]
)
SEED_CRC = write_archive([_entry("a", b"abc"), _entry("b", b"\xff" * 9)], crc=True)


def _parse(data: bytes) -> list[CpioEntry] | None:
    try:
        return read_archive(data)
    except ImageError:
        return None


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "hex", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "hex":
            # Rewrite one 8-digit header field with any hex value (absurd lengths included).
            headers = [i for i in range(len(data) - 110) if data[i : i + 5] == b"07070"]
            if headers:
                at = draw(st.sampled_from(headers)) + 6 + 8 * draw(st.integers(0, 12))
                data[at : at + 8] = b"%08X" % draw(st.integers(0, 0xFFFFFFFF))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes(data: bytes) -> None:
    _parse(data)
    _parse(b"070701" + data)


@FUZZ
@given(st.one_of(mutated(SEED), mutated(SEED_CRC)))
def test_mutated_archives(data: bytes) -> None:
    result = _parse(data)
    if result is not None:
        assert all(len(e.data) == e.header.filesize for e in result)


class Trickle:
    """A stream that hands out data in small, irregular pieces."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data = io.BytesIO(data)
        self._sizes = sizes or [1]
        self._i = 0

    def read(self, n: int) -> bytes:
        size = self._sizes[self._i % len(self._sizes)]
        self._i += 1
        return self._data.read(min(n, size))


@FUZZ
@given(mutated(SEED), st.lists(st.integers(1, 300), max_size=8))
def test_streaming_reader_agrees_with_the_whole_buffer_reader(
    data: bytes, sizes: list[int]
) -> None:
    whole = _parse(data)
    reader = CpioReader(Trickle(data, sizes))
    streamed: list[CpioEntry] = []
    try:
        for header in reader:
            streamed.append(CpioEntry(header, reader.read_all(len(data))))
    except ImageError:
        assert whole is None
        return
    if whole is not None:
        assert streamed == whole


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 0xFFFFFFFF), min_size=13, max_size=13), st.binary(max_size=64))
def test_absurd_header_values_allocate_little(values: list[int], tail: bytes) -> None:
    data = b"070701" + b"".join(b"%08X" % v for v in values) + tail
    tracemalloc.start()
    try:
        _parse(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


@FUZZ
@given(st.sampled_from(sorted(SUPPORTED - {Compression.NONE})), st.binary(max_size=600))
def test_decoders_on_garbage(kind: Compression, data: bytes) -> None:
    with contextlib.suppress(ImageError):
        decompress_bytes(data, kind, max_size=1 << 20)


@FUZZ
@given(st.sampled_from(sorted(SUPPORTED - {Compression.NONE})), st.data())
def test_decoders_on_mutated_streams(kind: Compression, data: st.DataObject) -> None:
    packed = compress_bytes(SEED, kind)
    try:
        out = decompress_bytes(data.draw(mutated(packed)), kind, max_size=1 << 20)
    except ImageError:
        return
    assert len(out) <= 1 << 20


def _initrd_seed() -> bytes:
    early = write_archive([_entry("kernel/x86/microcode/GenuineIntel.bin", b"\x01" * 64)])
    main = write_archive(
        [
            _entry("init", b"#!/bin/sh\n", mode=stat.S_IFREG | 0o755),
            _entry("d", mode=stat.S_IFDIR | 0o755),
        ]
    )
    return (
        early
        + b"\0" * 8
        + compress_bytes(main, Compression.GZIP)
        + compress_bytes(main, Compression.ZSTD)
    )


INITRD_SEED = _initrd_seed()


@SLOW_FUZZ
@given(mutated(INITRD_SEED))
def test_initrd_listing_on_mutated_images(image: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "i.img"
        path.write_bytes(image)
        try:
            for _number, _kind, _offset, header in iter_segments(path):
                assert header.name
        except ImageError:
            pass


@SLOW_FUZZ
@given(st.one_of(mutated(INITRD_SEED), mutated(SEED)))
def test_unpack_and_repack_on_mutated_images(image: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "i.img"
        path.write_bytes(image)
        try:
            unpack_initrd(path, Path(tmp) / "un")
        except ImageError:
            assert not (Path(tmp) / "un" / "mobinux-initrd.json").exists()
            return
        finally:
            # Nothing may appear outside the unpack directory.
            assert sorted(p.name for p in Path(tmp).iterdir()) in (["i.img"], ["i.img", "un"])
        repack_initrd(Path(tmp) / "un", Path(tmp) / "re.img")
        unpack_initrd(Path(tmp) / "re.img", Path(tmp) / "un2")
        shutil.rmtree(Path(tmp) / "un", ignore_errors=True)
