"""newc cpio reader/writer: round trips, real GNU cpio / busybox interop, bounded parsing."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobinux.errors import ImageError
from mobinux.images.cpio import (
    CHUNK,
    HEADER_SIZE,
    TRAILER,
    CpioEntry,
    CpioHeader,
    CpioReader,
    CpioWriter,
    data_checksum,
    decode_name,
    read_archive,
    write_archive,
)

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
needs_busybox = pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")

u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
names = (
    st.binary(min_size=1, max_size=80)
    .filter(lambda b: b"\x00" not in b and b != TRAILER.encode())
    .map(decode_name)
)


@st.composite
def entries(draw: st.DrawFn) -> CpioEntry:
    data = draw(st.binary(max_size=300))
    header = CpioHeader(
        name=draw(names),
        mode=draw(u32),
        ino=draw(u32),
        uid=draw(u32),
        gid=draw(u32),
        nlink=draw(u32),
        mtime=draw(u32),
        filesize=len(data),
        dev_major=draw(u32),
        dev_minor=draw(u32),
        rdev_major=draw(u32),
        rdev_minor=draw(u32),
    )
    return CpioEntry(header, data)


def reg(name: str, data: bytes = b"", mode: int = 0o644, **kw: int) -> CpioEntry:
    return CpioEntry(
        CpioHeader(name=name, mode=stat.S_IFREG | mode, filesize=len(data), **kw), data
    )


# ------------------------------------------------------------------ round trips


@given(st.lists(entries(), max_size=8))
@settings(max_examples=200)
def test_write_then_read_gives_the_same_entries(items: list[CpioEntry]) -> None:
    data = write_archive(items)
    assert len(data) % 4 == 0
    assert read_archive(data) == items


@given(st.lists(entries(), max_size=6))
@settings(max_examples=100)
def test_crc_format_round_trip_fills_in_checksums(items: list[CpioEntry]) -> None:
    data = write_archive(items, crc=True)
    assert data.startswith(b"070702") or not items
    got = read_archive(data)
    expected = [
        CpioEntry(
            replace(e.header, check=data_checksum(e.data) if e.header.is_regular else 0), e.data
        )
        for e in items
    ]
    assert got == expected


def test_header_layout_is_the_documented_one() -> None:
    h = CpioHeader(name="a", mode=0o100644, ino=1, nlink=1, mtime=0x5F5E100, filesize=3)
    raw = h.encode()
    assert raw[:6] == b"070701"
    assert raw[6:14] == b"00000001"  # ino
    assert raw[14:22] == b"000081A4"  # mode
    assert raw[54:62] == b"00000003"  # filesize
    assert raw[94:102] == b"00000002"  # namesize includes the NUL
    assert raw[HEADER_SIZE:] == b"a\x00"  # 110 + 2 = 112, already aligned
    assert len(CpioHeader(name="ab", mode=0).encode()) == 116  # 110 + 3 -> 116


def test_reader_streams_data_and_skips_what_is_not_read() -> None:
    big = bytes(range(256)) * 1000
    data = write_archive([reg("big", big), reg("small", b"xyz"), reg("empty")])
    reader = CpioReader(io.BytesIO(data))
    h = reader.next()
    assert h is not None and h.name == "big" and h.filesize == len(big)
    first = reader.read(10)
    assert first == big[:10]
    assert len(reader.read(10**9)) <= CHUNK  # bounded chunks
    h = reader.next()  # skips the rest of "big"
    assert h is not None and h.name == "small"
    assert reader.read_all(100) == b"xyz"
    h = reader.next()
    assert h is not None and h.name == "empty" and reader.read() == b""
    assert reader.next() is None and reader.finished
    assert reader.offset == len(data)
    assert reader.next() is None


def test_reader_stops_at_the_trailer_leaving_what_follows() -> None:
    one = write_archive([reg("a", b"1")])
    two = write_archive([reg("b", b"22")])
    stream = io.BytesIO(one + two)
    assert [h.name for h in CpioReader(stream)] == ["a"]
    assert stream.tell() == len(one)
    assert [h.name for h in CpioReader(stream, base_offset=len(one))] == ["b"]


def test_read_all_refuses_oversized_entries() -> None:
    reader = CpioReader(io.BytesIO(write_archive([reg("a", b"x" * 100)])))
    reader.next()
    with pytest.raises(ImageError, match="too large"):
        reader.read_all(99)


def test_writer_copies_from_streams_and_counts() -> None:
    out = io.BytesIO()
    w = CpioWriter(out)
    w.add(CpioHeader(name="f", mode=0o100600, filesize=5), io.BytesIO(b"hello-and-more"))
    w.close()
    w.close()  # idempotent
    assert w.bytes_written == len(out.getvalue()) and w.entries == 1
    assert read_archive(out.getvalue()) == [reg("f", b"hello", 0o600)]


def test_writer_crc_with_a_seekable_stream(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"\xff" * 10)
    out = io.BytesIO()
    w = CpioWriter(out, crc=True)
    with p.open("rb") as f:
        w.add(CpioHeader(name="f", mode=0o100644, filesize=10), f)
    w.close()
    [entry] = read_archive(out.getvalue())
    assert entry.header.check == 2550 and entry.data == b"\xff" * 10


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (CpioHeader(name="", mode=0), b"", "invalid cpio entry name"),
        (CpioHeader(name="a\x00b", mode=0), b"", "invalid cpio entry name"),
        (CpioHeader(name="x" * 4096, mode=0), b"", "longer than"),
        (CpioHeader(name="a", mode=0, uid=1 << 32), b"", "32 bits"),
        (CpioHeader(name="a", mode=0, mtime=-1), b"", "32 bits"),
        (CpioHeader(name="a", mode=0o100644, filesize=3), b"ab", "filesize"),
        (CpioHeader(name=TRAILER, mode=0), b"", "may not be named"),
        (CpioHeader(name="\ud800", mode=0), b"", "cannot be encoded"),
    ],
)
def test_writer_refuses_what_it_cannot_encode(
    header: CpioHeader, data: bytes, message: str
) -> None:
    w = CpioWriter(io.BytesIO())
    with pytest.raises(ImageError, match=message):
        w.add(header, data)


def test_writer_refuses_short_streams_and_adds_after_close() -> None:
    w = CpioWriter(io.BytesIO())
    with pytest.raises(ImageError, match="short"):
        w.add(CpioHeader(name="a", mode=0o100644, filesize=10), io.BytesIO(b"abc"))
    w.close()
    with pytest.raises(ImageError, match="closed"):
        w.add(CpioHeader(name="b", mode=0o100644))


def test_entry_checks_its_filesize() -> None:
    with pytest.raises(ValueError):
        CpioEntry(CpioHeader(name="a", mode=0, filesize=1), b"")


# ------------------------------------------------------------------ malformed input


def test_errors_carry_the_offset() -> None:
    good = write_archive([reg("a", b"x" * 10), reg("b", b"y")])
    second = good.index(b"070701", 1)
    bad = good[:second] + b"123456" + good[second + 6 :]
    with pytest.raises(ImageError, match=f"bad cpio magic .* at offset {second}"):
        read_archive(bad)


@pytest.mark.parametrize("cut", [0, 5, 109, 111, 113, 120, 123])
def test_truncation_anywhere_is_an_image_error(cut: int) -> None:
    data = write_archive([reg("abc", b"0123456789")])
    with pytest.raises(ImageError):
        read_archive(data[:cut])


def test_missing_trailer_and_junk_after_it() -> None:
    data = write_archive([reg("a", b"1")])
    trailer_at = data.index(TRAILER.encode()) - HEADER_SIZE
    with pytest.raises(ImageError, match="truncated"):
        read_archive(data[:trailer_at])
    assert read_archive(data + b"\x00" * 512) == [reg("a", b"1")]
    with pytest.raises(ImageError, match="after the cpio trailer"):
        read_archive(data + b"junk")


def _raw_header(**fields: bytes) -> bytes:
    order = [
        "ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
        "dev_major", "dev_minor", "rdev_major", "rdev_minor", "namesize", "check",
    ]  # fmt: skip
    values = {name: b"00000000" for name in order}
    values.update(fields)
    return b"070701" + b"".join(values[n] for n in order)


@pytest.mark.parametrize(
    "field_value", [b"+0000001", b" 0000001", b"0x000001", b"0000_001", b"0000000g", b"-0000001"]
)
def test_fields_must_be_plain_hex(field_value: bytes) -> None:
    data = _raw_header(filesize=field_value, namesize=b"00000002") + b"a\x00"
    with pytest.raises(ImageError, match="non-hexadecimal"):
        read_archive(data)


@pytest.mark.parametrize(
    ("namesize", "name", "message"),
    [
        (b"00000000", b"", "invalid name size"),
        (b"00000001", b"\x00", "invalid name size"),
        (b"FFFFFFFF", b"", "invalid name size"),
        (b"00001001", b"", "invalid name size"),
        (b"00000002", b"ab", "NUL-terminated"),
        (b"00000003", b"a\x00\x00\x00", "NUL-terminated"),
    ],
)
def test_bad_names(namesize: bytes, name: bytes, message: str) -> None:
    data = _raw_header(namesize=namesize) + name + b"\x00" * 16
    with pytest.raises(ImageError, match=message):
        read_archive(data)


def test_absurd_filesize_is_bounded_by_the_input() -> None:
    data = (
        _raw_header(mode=b"000081A4", filesize=b"FFFFFFFF", namesize=b"00000002")
        + b"a\x00"
        + b"x" * 1000
    )
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=r"too large|truncated"):
            read_archive(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_absurd_filesize_on_a_stream_reads_in_bounded_chunks() -> None:
    class Endless:
        """Twice as much data as a 32-bit length can claim would take hours; count calls instead."""

        def __init__(self) -> None:
            self.calls = 0
            self.biggest = 0

        def read(self, n: int) -> bytes:
            self.calls += 1
            self.biggest = max(self.biggest, n)
            if self.calls > 50:
                return b""
            return b"\x00" * n

    src = Endless()
    head = _raw_header(mode=b"000081A4", filesize=b"FFFFFFFF", namesize=b"00000002") + b"a\x00"

    class Chain:
        def __init__(self) -> None:
            self.head = io.BytesIO(head)

        def read(self, n: int) -> bytes:
            return self.head.read(n) or src.read(n)

    reader = CpioReader(Chain())
    assert reader.next() is not None
    with pytest.raises(ImageError, match="truncated"):
        reader.next()
    assert src.biggest <= CHUNK


def test_crc_mismatch_is_detected_and_can_be_ignored() -> None:
    data = bytearray(write_archive([reg("a", b"abc")], crc=True))
    pos = data.index(b"abc")
    data[pos] = ord("b")
    with pytest.raises(ImageError, match="checksum mismatch"):
        read_archive(bytes(data))
    reader = CpioReader(io.BytesIO(bytes(data)), verify_checksum=False)
    assert [h.name for h in reader] == ["a"]


# ------------------------------------------------------------------ interop


def _gnu_cpio_archive(tmp_path: Path, fmt: str) -> tuple[Path, bytes]:
    tree = tmp_path / "tree"
    (tree / "dir" / "sub").mkdir(parents=True)
    (tree / "dir" / "file").write_bytes(b"content\n" * 100)
    (tree / "dir" / "empty").write_bytes(b"")
    os.link(tree / "dir" / "file", tree / "dir" / "hard")
    (tree / "link").symlink_to("dir/file")
    (tree / "exe").write_bytes(b"#!/bin/sh\n")
    (tree / "exe").chmod(0o4755)
    for p in tree.rglob("*"):
        os.utime(p, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    listing = subprocess.run(
        ["find", ".", "-print0"], cwd=tree, check=True, capture_output=True
    ).stdout
    archive = subprocess.run(
        ["cpio", "-o", "-0", "-H", fmt, "--quiet"],
        cwd=tree,
        input=listing,
        check=True,
        capture_output=True,
    ).stdout
    return tree, archive


@needs_cpio
@pytest.mark.parametrize("fmt", ["newc", "crc"])
def test_reads_gnu_cpio_output(tmp_path: Path, fmt: str) -> None:
    _, archive = _gnu_cpio_archive(tmp_path, fmt)
    by_name = {e.header.name: e for e in read_archive(archive)}
    assert set(by_name) == {
        ".",
        "dir",
        "dir/sub",
        "dir/file",
        "dir/empty",
        "dir/hard",
        "link",
        "exe",
    }
    assert by_name["link"].data == b"dir/file" and by_name["link"].header.is_symlink
    assert by_name["exe"].header.permissions == 0o4755
    assert by_name["exe"].header.mtime == 1_600_000_000
    # Hard links: same inode, nlink 2, data on the last one only.
    file, hard = by_name["dir/file"], by_name["dir/hard"]
    assert file.header.ino == hard.header.ino and file.header.nlink == hard.header.nlink == 2
    assert sorted([file.data, hard.data]) == [b"", b"content\n" * 100]
    if fmt == "crc":
        assert any(e.header.check for e in by_name.values())


@needs_cpio
def test_gnu_cpio_extracts_what_we_write(tmp_path: Path) -> None:
    items = [
        CpioEntry(CpioHeader(name="d", mode=0o40755, nlink=2, mtime=1_234_567_890, ino=1)),
        reg("d/f", b"data" * 1000, 0o640, ino=2, mtime=1_234_567_890),
        CpioEntry(CpioHeader(name="d/l", mode=0o120777, filesize=1, ino=3), b"f"),
        reg("d/h1", b"", ino=4, nlink=2),
        reg("d/h2", b"linked", ino=4, nlink=2),
    ]
    archive = write_archive(items)
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=archive, check=True, capture_output=True
    ).stdout
    assert listing.decode().split() == ["d", "d/f", "d/l", "d/h1", "d/h2"]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], cwd=out, input=archive, check=True)
    assert (out / "d" / "f").read_bytes() == b"data" * 1000
    assert stat.S_IMODE((out / "d" / "f").stat().st_mode) == 0o640
    assert (out / "d" / "f").stat().st_mtime == 1_234_567_890
    assert os.readlink(out / "d" / "l") == "f"
    assert (out / "d" / "h1").read_bytes() == b"linked"
    assert (out / "d" / "h1").stat().st_ino == (out / "d" / "h2").stat().st_ino


@needs_cpio
def test_gnu_cpio_verifies_our_crc_archives(tmp_path: Path) -> None:
    archive = write_archive([reg("f", bytes(range(256)) * 7)], crc=True)
    subprocess.run(["cpio", "-i", "--quiet"], cwd=tmp_path, input=archive, check=True)
    assert (tmp_path / "f").read_bytes() == bytes(range(256)) * 7


@needs_busybox
def test_busybox_cpio_lists_what_we_write() -> None:
    archive = write_archive([reg("a", b"1"), reg("b/c", b"22")])
    res = subprocess.run(["busybox", "cpio", "-t"], input=archive, check=True, capture_output=True)
    assert res.stdout.decode().split() == ["a", "b/c"]
