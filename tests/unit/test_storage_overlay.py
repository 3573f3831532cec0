"""Overlay: copy-on-write over a read-only base, zeroing, space limits, reset, reopen.

Plus a stateful hypothesis test against a bytearray model.  Crash safety is in
tests/fuzz/test_storage_overlay_crash.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mobinux.storage.device import BlockDevice, WouldBlock
from mobinux.storage.file import FileDevice
from mobinux.storage.memory import MemoryDevice
from mobinux.storage.overlay import BASE, DATA, ZERO, Overlay, _encode_record
from mobinux.storage.overlay_dir import DataFile, MetaFile, OverlayDir, PosixDir
from mobinux.storage.powerloss import PowerLossDir

KiB = 1024
CS = 4 * KiB  # chunk size used by most tests
SIZE = 512 * KiB  # base size: 128 chunks
PATTERN_END = SIZE - 64 * KiB  # the base's last 64 KiB were never written (a hole)


def base_bytes(offset: int, length: int) -> bytes:
    """What the test base holds: every sector names itself, except the trailing hole."""
    out = bytearray()
    for sector in range(offset // 512, (offset + length + 511) // 512):
        if sector * 512 >= PATTERN_END:
            out += bytes(512)
        else:
            out += (b"base%06d|" % sector) * 46 + b"\xa5" * 6
    start = offset % 512
    return bytes(out[start : start + length])


class SpyBase:
    """A base that records every read and fails the test if anything writes to it."""

    def __init__(self, size: int = SIZE) -> None:
        self.inner = MemoryDevice(size)
        self.inner.write(0, base_bytes(0, min(size, PATTERN_END)))
        self.reads: list[tuple[int, int, bool]] = []
        self.would_block = False
        self.before_read: Callable[[], None] | None = None
        self.closed = False

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def readonly(self) -> bool:
        return True

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        self.reads.append((offset, len(buf), nowait))
        if nowait and self.would_block:
            raise WouldBlock
        if self.before_read is not None:
            self.before_read()
        self.inner.read_into(offset, buf)

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None:
        raise AssertionError("the base was written")

    def flush(self) -> None:
        raise AssertionError("the base was flushed")

    def discard(self, offset: int, length: int) -> None:
        raise AssertionError("the base was discarded")

    def write_zeroes(self, offset: int, length: int) -> None:
        raise AssertionError("the base was zeroed")

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.inner.extents(offset, length)

    def close(self) -> None:
        self.closed = True


class RecordingData:
    def __init__(self, inner: DataFile, calls: list[str]) -> None:
        self.inner, self.calls = inner, calls
        self.nowait_flags: list[bool] = []

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        self.calls.append("data.read")
        self.nowait_flags.append(nowait)
        self.inner.read_into(offset, buf, nowait=nowait)

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None:
        self.calls.append("data.write")
        self.nowait_flags.append(nowait)
        self.inner.write(offset, data, nowait=nowait)

    def flush(self) -> None:
        self.calls.append("data.flush")
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        self.calls.append("data.discard")
        self.inner.discard(offset, length)

    def close(self) -> None:
        self.calls.append("data.close")
        self.inner.close()


class RecordingMeta:
    def __init__(self, inner: MetaFile, calls: list[str]) -> None:
        self.inner, self.calls = inner, calls

    def pwrite(self, offset: int, data: bytes) -> None:
        self.calls.append(f"meta.pwrite {len(data)}")
        self.inner.pwrite(offset, data)

    def sync(self) -> None:
        self.calls.append("meta.sync")
        self.inner.sync()

    def close(self) -> None:
        self.inner.close()


class RecordingDir:
    """Wraps an OverlayDir and records every call (names left out, sizes kept)."""

    def __init__(self, inner: OverlayDir) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.data_files: list[RecordingData] = []

    def listdir(self) -> list[str]:
        self.calls.append("listdir")
        return self.inner.listdir()

    def read(self, name: str) -> bytes:
        self.calls.append("read")
        return self.inner.read(name)

    def create(self, name: str) -> MetaFile:
        self.calls.append("create")
        return RecordingMeta(self.inner.create(name), self.calls)

    def open_meta(self, name: str) -> MetaFile:
        self.calls.append("open_meta")
        return RecordingMeta(self.inner.open_meta(name), self.calls)

    def create_data(self, name: str, size: int) -> None:
        self.calls.append("create_data")
        self.inner.create_data(name, size)

    def open_data(self, name: str) -> DataFile:
        self.calls.append("open_data")
        data = RecordingData(self.inner.open_data(name), self.calls)
        self.data_files.append(data)
        return data

    def rename(self, src: str, dst: str) -> None:
        self.calls.append("rename")
        self.inner.rename(src, dst)

    def unlink(self, name: str) -> None:
        self.calls.append("unlink")
        self.inner.unlink(name)

    def sync(self) -> None:
        self.calls.append("sync")
        self.inner.sync()


def read(dev: BlockDevice, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    dev.read_into(offset, memoryview(buf))
    return bytes(buf)


@pytest.fixture
def base() -> SpyBase:
    return SpyBase()


@pytest.fixture
def ov(base: SpyBase, tmp_path: Path) -> Iterator[Overlay]:
    o = Overlay.create(base, tmp_path / "ov", chunk_size=CS)
    yield o
    o.close()


# -- reads and writes -----------------------------------------------------------


def test_a_new_overlay_reads_the_base(ov: Overlay, base: SpyBase) -> None:
    assert ov.size == SIZE and not ov.readonly and ov.chunk_size == CS
    assert read(ov, 0, SIZE) == base_bytes(0, SIZE)
    assert read(ov, 1000, 5000) == base_bytes(1000, 5000)
    assert ov.allocated_bytes == 0


def test_writes_are_private_to_each_overlay(base: SpyBase, tmp_path: Path) -> None:
    a = Overlay.create(base, tmp_path / "a", chunk_size=CS)
    b = Overlay.create(base, tmp_path / "b", chunk_size=CS)
    a.write(8192, b"A" * 4096)
    b.write(8192 + 100, b"B" * 10)
    assert read(a, 8192, 4096) == b"A" * 4096
    assert read(b, 8192, 4096) == base_bytes(8192, 100) + b"B" * 10 + base_bytes(8302, 3986)
    assert read(base.inner, 0, SIZE) == base_bytes(0, SIZE)  # never written (SpyBase asserts)
    a.close()
    b.close()
    assert not base.closed  # the base is shared: closing an overlay leaves it open


def test_a_partial_chunk_write_copies_up_the_rest_of_the_chunk(ov: Overlay) -> None:
    ov.write(3 * CS + 700, b"x" * 10)
    assert read(ov, 3 * CS, CS) == base_bytes(3 * CS, 700) + b"x" * 10 + base_bytes(
        3 * CS + 710, CS - 710
    )
    # unaligned, across two chunk boundaries
    ov.write(5 * CS - 3, b"y" * (CS + 6))
    expect = base_bytes(4 * CS, CS - 3) + b"y" * (CS + 6) + base_bytes(6 * CS + 3, CS - 3)
    assert read(ov, 4 * CS, 3 * CS) == expect
    assert ov.allocated_bytes == 4 * CS
    # writing again into a copied-up chunk keeps the earlier write
    ov.write(3 * CS, b"z")
    assert read(ov, 3 * CS, 710) == b"z" + base_bytes(3 * CS + 1, 699) + b"x" * 10
    assert ov.allocated_bytes == 4 * CS


def test_a_whole_chunk_write_does_not_read_the_base(ov: Overlay, base: SpyBase) -> None:
    ov.write(2 * CS, b"w" * (3 * CS))
    assert base.reads == []
    assert read(ov, 2 * CS, 3 * CS) == b"w" * (3 * CS)


def test_reads_mix_base_data_and_zero_chunks(ov: Overlay) -> None:
    ov.write(CS, b"d" * CS)
    ov.discard(2 * CS, CS)
    got = read(ov, 100, 4 * CS)
    assert got == base_bytes(100, CS - 100) + b"d" * CS + bytes(CS) + base_bytes(3 * CS, CS + 100)


def test_out_of_range_io_is_refused(ov: Overlay) -> None:
    for call in (
        lambda: ov.write(SIZE - 512, b"x" * 1024),
        lambda: ov.read_into(SIZE, memoryview(bytearray(1))),
        lambda: ov.discard(SIZE - 512, 1024),
        lambda: ov.extents(-1, 10),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EINVAL


# -- discard / write_zeroes -----------------------------------------------------


@pytest.mark.parametrize("op", ["discard", "write_zeroes"])
def test_zeroed_ranges_read_zeros_never_base_data(ov: Overlay, op: str) -> None:
    zero = getattr(ov, op)
    zero(4 * CS, 2 * CS)  # whole chunks: ZERO state, no space
    assert read(ov, 4 * CS, 2 * CS) == bytes(2 * CS)
    assert ov.allocated_bytes == 0
    zero(10 * CS + 512, 1024)  # inside a base chunk: copied up with zeros
    assert read(ov, 10 * CS, CS) == base_bytes(10 * CS, 512) + bytes(1024) + base_bytes(
        10 * CS + 1536, CS - 1536
    )
    assert ov.allocated_bytes == CS
    zero(20 * CS - 100, CS + 200)  # partial, whole, partial
    assert read(ov, 19 * CS, 3 * CS) == base_bytes(19 * CS, CS - 100) + bytes(CS + 200) + (
        base_bytes(21 * CS + 100, CS - 100)
    )
    assert ov.allocated_bytes == 3 * CS
    assert read(ov, 0, 4 * CS) == base_bytes(0, 4 * CS)


def test_a_write_into_a_zeroed_chunk_copies_up_zeros_not_the_base(ov: Overlay) -> None:
    ov.discard(6 * CS, CS)
    ov.write(6 * CS + 1000, b"n" * 10)
    assert read(ov, 6 * CS, CS) == bytes(1000) + b"n" * 10 + bytes(CS - 1010)
    ov.close()


def test_discarding_written_chunks_gives_their_space_back(ov: Overlay, tmp_path: Path) -> None:
    ov.write(0, b"q" * (8 * CS))
    assert ov.allocated_bytes == 8 * CS
    ov.discard(2 * CS, 3 * CS)
    assert ov.allocated_bytes == 5 * CS
    assert read(ov, 0, 8 * CS) == b"q" * (2 * CS) + bytes(3 * CS) + b"q" * (3 * CS)
    ov.discard(7 * CS + 10, 20)  # inside a data chunk: zeros written, space kept
    assert ov.allocated_bytes == 5 * CS
    assert read(ov, 7 * CS, CS) == b"q" * 10 + bytes(20) + b"q" * (CS - 30)


def test_discarding_the_whole_device_costs_nothing(ov: Overlay, tmp_path: Path) -> None:
    ov.write(5 * CS, b"e" * (10 * CS))
    ov.discard(0, SIZE)  # what mkfs does
    assert read(ov, 0, SIZE) == bytes(SIZE)
    assert ov.allocated_bytes == 0
    ov.flush()
    journal = [p for p in (tmp_path / "ov").iterdir() if p.name.startswith("journal.")]
    assert len(journal) == 1 and journal[0].stat().st_size < 200  # one run, not 128 entries


def test_extents_report_data_mapped_zero_unmapped_and_base_as_the_base_says(
    ov: Overlay,
) -> None:
    hole = PATTERN_END  # the base's own hole (64 KiB MemoryDevice chunks)
    assert ov.extents(0, SIZE) == [(0, hole, True), (hole, SIZE - hole, False)]
    ov.discard(CS, 2 * CS)
    ov.write(hole + CS, b"h" * 10)
    assert ov.extents(0, SIZE) == [
        (0, CS, True),
        (CS, 2 * CS, False),
        (3 * CS, hole - 3 * CS, True),
        (hole, CS, False),
        (hole + CS, CS, True),
        (hole + 2 * CS, SIZE - hole - 2 * CS, False),
    ]
    assert ov.extents(CS + 5, 10) == [(CS + 5, 10, False)]
    assert ov.extents(0, 0) == []
    for off, length, mapped in ov.extents(0, SIZE):
        if not mapped:
            assert read(ov, off, length) == bytes(length)  # unmapped reads zeros (LBPRZ)


# -- space --------------------------------------------------------------------


def test_allocated_bytes_counts_written_chunks_and_the_data_file_is_sparse(
    tmp_path: Path,
) -> None:
    big = SpyBase(64 << 20)
    ov = Overlay.create(big, tmp_path / "ov")  # 64 KiB chunks
    ov.write(0, b"a")
    ov.write(10 << 20, b"b" * 100_000)  # two chunks
    ov.write(1, b"c")  # same chunk again
    assert ov.allocated_bytes == 3 * 65536
    ov.flush()
    data = tmp_path / "ov" / "data.1"
    assert data.stat().st_size == 64 << 20
    assert data.stat().st_blocks * 512 <= 3 * 65536 + 65536  # only what was written
    total = sum(p.stat().st_blocks * 512 for p in (tmp_path / "ov").iterdir())
    assert total < 3 * 65536 + 4 * 65536
    ov.close()


def test_the_last_short_chunk_is_counted_by_its_real_size(tmp_path: Path) -> None:
    odd = SpyBase(10 * CS + 1024)  # the last chunk is 1 KiB
    ov = Overlay.create(odd, tmp_path / "ov", chunk_size=CS, limit=CS + 1024)
    ov.write(10 * CS + 100, b"t" * 10)
    assert ov.allocated_bytes == 1024
    assert read(ov, 10 * CS, 1024) == base_bytes(10 * CS, 100) + b"t" * 10 + base_bytes(
        10 * CS + 110, 914
    )
    ov.write(0, b"u")
    assert ov.allocated_bytes == CS + 1024
    ov.close()
    ov = Overlay.open(odd, tmp_path / "ov")
    assert ov.allocated_bytes == CS + 1024
    ov.close()


def test_the_limit_refuses_writes_with_enospc_and_changes_nothing(
    base: SpyBase, tmp_path: Path
) -> None:
    ov = Overlay.create(base, tmp_path / "ov", chunk_size=CS, limit=3 * CS)
    ov.write(0, b"1" * (2 * CS))
    ov.write(5 * CS, b"2" * 100)
    assert ov.allocated_bytes == 3 * CS
    before = read(ov, 0, SIZE)
    # a write that needs one more chunk, even when most of it lands in DATA chunks
    for offset, length in ((9 * CS, 10), (CS, CS + 1), (5 * CS - 1, 2)):
        with pytest.raises(OSError) as exc:
            ov.write(offset, b"X" * length)
        assert exc.value.errno == errno.ENOSPC
        assert read(ov, 0, SIZE) == before
        assert ov.allocated_bytes == 3 * CS
    # a partial discard of a base chunk needs a copy-up too
    with pytest.raises(OSError) as exc:
        ov.discard(9 * CS + 512, 512)
    assert exc.value.errno == errno.ENOSPC
    assert read(ov, 0, SIZE) == before
    # writes into what is already allocated, and whole-chunk zeroing, still work
    ov.write(CS + 10, b"3" * 10)
    ov.discard(20 * CS, 4 * CS)
    assert read(ov, 20 * CS, 4 * CS) == bytes(4 * CS)
    # freeing a chunk makes room again
    ov.discard(0, CS)
    assert ov.allocated_bytes == 2 * CS
    ov.write(9 * CS, b"4")
    assert ov.allocated_bytes == 3 * CS
    ov.limit = None
    ov.write(40 * CS, b"5" * (4 * CS))
    assert ov.allocated_bytes == 7 * CS
    ov.close()


def test_a_full_data_directory_fails_the_write_with_enospc_and_changes_nothing(
    base: SpyBase,
) -> None:
    fs = PowerLossDir()
    ov = Overlay.create(base, fs, chunk_size=CS, limit=2 * CS)
    ov.write(0, b"k" * CS)
    ov.flush()
    before = read(ov, 0, SIZE)
    fs.fail_after(0)  # the copy-up's write into the data file
    with pytest.raises(OSError) as exc:
        ov.write(3 * CS + 5, b"m" * 100)
    assert exc.value.errno == errno.ENOSPC
    assert read(ov, 0, SIZE) == before
    assert ov.allocated_bytes == CS
    # nothing was leaked: the one chunk left under the limit can still be used
    ov.write(3 * CS + 5, b"m" * 100)
    assert ov.allocated_bytes == 2 * CS
    # the journal append of a flush fails: the flush fails, the next one catches up
    fs.fail_after(1)  # 0 = the data file's fdatasync, 1 = the journal write
    with pytest.raises(OSError) as exc:
        ov.flush()
    assert exc.value.errno == errno.ENOSPC
    ov.flush()
    contents = read(ov, 0, SIZE)
    fs.power_cut("scramble")
    fs.reboot()
    again = Overlay.open(base, fs)
    assert read(again, 0, SIZE) == contents
    again.close()


def test_a_failed_data_sync_fails_every_later_flush_until_reset(base: SpyBase) -> None:
    fs = PowerLossDir()
    ov = Overlay.create(base, fs, chunk_size=CS)
    ov.write(0, b"p" * CS)
    fs.fail_after(0, errno.EIO)
    with pytest.raises(OSError) as exc:
        ov.flush()
    assert exc.value.errno == errno.EIO
    with pytest.raises(OSError) as exc:
        ov.flush()  # the kernel may have dropped the pages: never acknowledge them
    assert exc.value.errno == errno.EIO
    ov.reset()
    ov.write(0, b"r")
    ov.flush()
    ov.close()


# -- reset ------------------------------------------------------------------------


def _reset_trace(tmp_path: Path, name: str, chunks: int) -> tuple[list[str], SpyBase]:
    base = SpyBase()
    files = RecordingDir(PosixDir(tmp_path / name))
    ov = Overlay.create(base, files, chunk_size=CS)
    for c in range(chunks):
        ov.write(c * CS + 7, b"w" * 9)
    ov.flush()
    files.calls.clear()
    base.reads.clear()
    ov.reset()
    trace = list(files.calls)
    reads = list(base.reads)
    assert read(ov, 0, SIZE) == base_bytes(0, SIZE)
    assert ov.allocated_bytes == 0
    assert sorted(os.listdir(tmp_path / name)) == ["data.2", "journal.2.2", "meta"]
    assert (tmp_path / name / "data.2").stat().st_blocks == 0
    ov.close()
    assert reads == []  # the base is neither read nor copied
    return trace, base


def test_reset_is_o1_and_never_touches_the_base_or_the_data(tmp_path: Path) -> None:
    small, _ = _reset_trace(tmp_path, "small", 1)
    large, _ = _reset_trace(tmp_path, "large", 100)
    # the same file-system calls, with the same sizes, whatever was written
    assert small == large
    assert not [c for c in small if c.startswith(("data.read", "data.write", "data.discard"))]
    assert "create_data" in small and small.count("unlink") == 2


def test_reset_leaves_a_file_base_untouched(tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    image.write_bytes(base_bytes(0, SIZE))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    base = FileDevice(image, readonly=True)
    ov = Overlay.create(base, tmp_path / "ov", chunk_size=CS)
    ov.write(1000, b"x" * 50_000)
    ov.discard(100_000, 20_000)
    ov.flush()
    ov.reset()
    assert read(ov, 0, SIZE) == base_bytes(0, SIZE)
    ov.write(0, b"after reset")
    ov.close()
    base.close()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest


def test_io_in_flight_during_a_reset_lands_in_the_discarded_generation(
    base: SpyBase, tmp_path: Path
) -> None:
    files = RecordingDir(PosixDir(tmp_path / "ov"))
    ov = Overlay.create(base, files, chunk_size=CS)
    entered, release = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        assert release.wait(10)

    base.before_read = block
    writer = threading.Thread(target=ov.write, args=(CS + 10, b"late"))
    writer.start()
    assert entered.wait(10)  # the writer is copying up
    ov.reset()  # does not wait for it
    base.before_read = None
    release.set()
    writer.join(10)
    assert not writer.is_alive()
    assert read(ov, CS, CS) == base_bytes(CS, CS)
    assert ov.allocated_bytes == 0
    old_data = files.data_files[0]
    assert old_data.calls[-1] == "data.close"  # closed once its last I/O returned
    ov.close()


# -- reopen, recovery, format -------------------------------------------------------


def _scribble(ov: Overlay, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        off = rng.randrange(SIZE - 3 * CS)
        n = rng.randrange(1, 3 * CS)
        kind = rng.random()
        if kind < 0.7:
            ov.write(off, bytes([rng.randrange(256)]) * n)
        elif kind < 0.85:
            ov.discard(off, n)
        else:
            ov.write_zeroes(off, n)


def test_reopen_after_close_returns_the_same_contents(base: SpyBase, tmp_path: Path) -> None:
    ov = Overlay.create(base, tmp_path / "ov", chunk_size=CS)
    _scribble(ov, 1)
    ov.flush()
    _scribble(ov, 2)  # not flushed: close flushes
    contents, allocated, extents = read(ov, 0, SIZE), ov.allocated_bytes, ov.extents(0, SIZE)
    ov.close()
    ov.close()  # idempotent
    again = Overlay.open(base, tmp_path / "ov")
    assert read(again, 0, SIZE) == contents
    assert again.allocated_bytes == allocated
    assert again.extents(0, SIZE) == extents
    again.close()


def test_reopen_after_a_kill_keeps_flushed_writes(base: SpyBase, tmp_path: Path) -> None:
    ov = Overlay.create(base, tmp_path / "ov", chunk_size=CS)
    ov.write(0, b"flushed" * 100)
    ov.discard(4 * CS, CS)
    ov.flush()
    ov.write(8 * CS, b"unflushed")
    # no close: as if the process were killed (its page cache survives)
    again = Overlay.open(base, tmp_path / "ov")
    assert read(again, 0, 700) == b"flushed" * 100
    assert read(again, 4 * CS, CS) == bytes(CS)
    assert read(again, 8 * CS, 9) in (b"unflushed", base_bytes(8 * CS, 9))
    again.close()


def test_journal_compaction_keeps_the_contents(base: SpyBase, tmp_path: Path) -> None:
    ov = Overlay.create(base, tmp_path / "ov", chunk_size=CS)
    ov.COMPACT_MIN = 0  # compact whenever the journal outgrows twice the checkpoint
    epochs = set()
    for i in range(30):
        ov.write(((i * 7) % 100) * CS, bytes([i]) * 100)
        if i % 4 == 0:
            ov.discard(((i * 3) % 100) * CS, CS)
        ov.flush()
        epochs.update(p.name for p in (tmp_path / "ov").glob("journal.*"))
    assert len(epochs) > 3  # it did compact
    assert len(list((tmp_path / "ov").glob("journal.*"))) == 1  # old journals removed
    contents = read(ov, 0, SIZE)
    ov.close()
    again = Overlay.open(base, tmp_path / "ov")
    assert read(again, 0, SIZE) == contents
    again.close()


def test_the_checkpoint_header_documents_itself(base: SpyBase, tmp_path: Path) -> None:
    Overlay.create(base, tmp_path / "ov", chunk_size=CS).close()
    meta = (tmp_path / "ov" / "meta").read_bytes()
    magic, version, chunk, size, gen, _epoch, flags, plen = struct.unpack_from("<8sIIQQQII", meta)
    assert (magic, version, chunk, size, gen, flags, plen) == (
        b"MBXOVMAP",
        1,
        CS,
        SIZE,
        1,
        1,
        0,
    )
    journal = next((tmp_path / "ov").glob("journal.*")).read_bytes()
    assert journal[:8] == b"MBXOVJNL" and len(journal) == 32


def test_a_torn_journal_tail_is_ignored(base: SpyBase, tmp_path: Path) -> None:
    ov = Overlay.create(base, tmp_path / "ov", chunk_size=CS)
    ov.write(0, b"one" * 10)
    ov.flush()
    ov.write(2 * CS, b"two")
    ov.flush()
    journal = next((tmp_path / "ov").glob("journal.*"))
    records = journal.read_bytes()
    ov.close()  # (close flushes nothing new)
    # The second record torn at every possible length, with one byte flipped,
    # or intact but out of sequence (a stale record can never be replayed):
    first_end = 32 + 20 + 17 + 4
    for tear in [*range(first_end, len(records)), -1, -2]:
        d = tmp_path / f"torn{tear}"
        shutil.copytree(tmp_path / "ov", d)
        j = d / journal.name
        if tear >= 0:
            j.write_bytes(records[:tear])
        elif tear == -1:
            bad = bytearray(records)
            bad[first_end + 30] ^= 1
            j.write_bytes(bytes(bad))
        else:
            stale = _encode_record(3, [[2, 1, DATA]])
            second = records[first_end:]
            assert stale[:8] + stale[16:-4] == second[:8] + second[16:-4]  # all but seq, CRC
            j.write_bytes(records[:first_end] + stale)
        again = Overlay.open(base, d)
        assert read(again, 0, 30) == b"one" * 10
        assert read(again, 2 * CS, 3) == base_bytes(2 * CS, 3)  # that record is ignored
        again.write(3 * CS, b"three")
        again.close()
        third = Overlay.open(base, d)  # records after a torn one were never appended
        assert read(third, 3 * CS, 5) == b"three"
        third.close()


def test_a_corrupt_checkpoint_refuses_the_open(base: SpyBase, tmp_path: Path) -> None:
    Overlay.create(base, tmp_path / "ov", chunk_size=CS).close()
    meta = tmp_path / "ov" / "meta"
    blob = bytearray(meta.read_bytes())
    blob[20] ^= 0x40
    meta.write_bytes(bytes(blob))
    with pytest.raises(OSError) as exc:
        Overlay.open(base, tmp_path / "ov")
    assert exc.value.errno == errno.EIO


def test_create_and_open_refuse_what_does_not_fit(base: SpyBase, tmp_path: Path) -> None:
    Overlay.create(base, tmp_path / "ov", chunk_size=CS).close()
    with pytest.raises(FileExistsError):
        Overlay.create(base, tmp_path / "ov", chunk_size=CS)
    with pytest.raises(FileNotFoundError):
        Overlay.open(base, tmp_path / "none")
    with pytest.raises(ValueError, match="base of"):
        Overlay.open(SpyBase(SIZE * 2), tmp_path / "ov")
    for bad in (0, 1000, 256, 3 * 4096, 1 << 25):
        with pytest.raises(ValueError):
            Overlay.create(base, tmp_path / f"c{bad}", chunk_size=bad)
    with pytest.raises(ValueError):
        Overlay.create(base, tmp_path / "neg", limit=-1)


def test_open_removes_what_an_interrupted_reset_left(base: SpyBase, tmp_path: Path) -> None:
    ov = Overlay.create(base, tmp_path / "ov", chunk_size=CS)
    ov.write(0, b"keep")
    ov.close()
    for name in ("data.7", "journal.7.9", "meta.tmp", "journal.1.5"):
        (tmp_path / "ov" / name).write_bytes(b"leftover")
    (tmp_path / "ov" / "notes.txt").write_text("not ours")
    again = Overlay.open(base, tmp_path / "ov")
    assert read(again, 0, 4) == b"keep"
    assert sorted(os.listdir(tmp_path / "ov")) == ["data.1", "journal.1.2", "meta", "notes.txt"]
    again.close()


def test_a_closed_overlay_refuses_io(ov: Overlay, base: SpyBase) -> None:
    ov.close()
    for call in (
        lambda: ov.write(0, b"x"),
        lambda: ov.read_into(0, memoryview(bytearray(1))),
        lambda: ov.flush(),
        lambda: ov.discard(0, 512),
        lambda: ov.reset(),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EBADF
    assert ov.closed and ov.allocated_bytes == 0 and not base.closed


# -- nowait -------------------------------------------------------------------------


def test_nowait_is_passed_through_and_copy_up_would_block(base: SpyBase) -> None:
    fs = RecordingDir(PowerLossDir())
    ov = Overlay.create(base, fs, chunk_size=CS)
    data = fs.data_files[0]
    # a read of base chunks goes to the base with nowait
    read_buf = memoryview(bytearray(100))
    ov.read_into(10, read_buf, nowait=True)
    assert base.reads[-1] == (10, 100, True)
    base.would_block = True
    with pytest.raises(WouldBlock):
        ov.read_into(10, read_buf, nowait=True)
    # a first write to a chunk needs a copy-up: WouldBlock, nothing changed
    with pytest.raises(WouldBlock):
        ov.write(CS + 1, b"n", nowait=True)
    assert ov.allocated_bytes == 0 and not any(c.startswith("data.") for c in data.calls)
    ov.write(CS + 1, b"n")  # the retry in a thread
    # writes and reads of DATA chunks go to the data file with nowait
    ov.write(CS + 2, b"o", nowait=True)
    ov.read_into(CS, memoryview(bytearray(CS)), nowait=True)
    assert data.nowait_flags[-2:] == [True, True]
    inner = fs.inner
    assert isinstance(inner, PowerLossDir)
    inner.nowait_would_block = True
    with pytest.raises(WouldBlock):
        ov.write(CS + 3, b"p", nowait=True)
    with pytest.raises(WouldBlock):
        ov.read_into(CS, memoryview(bytearray(10)), nowait=True)
    # zero chunks need no I/O at all
    ov.discard(5 * CS, CS)
    buf = bytearray(b"\xff" * CS)
    ov.read_into(5 * CS, memoryview(buf), nowait=True)
    assert buf == bytes(CS)
    inner.nowait_would_block = False
    assert read(ov, CS, 4) == base_bytes(CS, 1) + b"no" + base_bytes(CS + 3, 1)
    ov.close()


def test_nowait_on_real_files(ov: Overlay) -> None:
    ov.write(0, b"a" * CS)
    try:
        ov.write(0, b"b" * 512, nowait=True)
    except WouldBlock:
        ov.write(0, b"b" * 512)
    buf = bytearray(512)
    try:
        ov.read_into(0, memoryview(buf), nowait=True)
    except WouldBlock:
        ov.read_into(0, memoryview(buf))
    assert buf == b"b" * 512


# -- concurrency --------------------------------------------------------------------


def test_concurrent_first_writes_to_one_chunk_keep_every_write(tmp_path: Path) -> None:
    """Each thread writes its own sector of every chunk; slow base reads widen the race."""
    base = SpyBase()
    base.before_read = lambda: time.sleep(0.0005)
    ov = Overlay.create(base, tmp_path / "ov", chunk_size=CS)
    threads_n, chunks = CS // 512, 16
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            order = list(range(chunks))
            random.Random(t).shuffle(order)
            for c in order:
                ov.write(c * CS + t * 512, bytes([t + 1]) * 512)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors
    for c in range(chunks):
        assert read(ov, c * CS, CS) == b"".join(bytes([t + 1]) * 512 for t in range(threads_n))
    assert ov.allocated_bytes == chunks * CS
    ov.close()


def test_concurrent_writes_discards_reads_and_flushes(tmp_path: Path) -> None:
    base = SpyBase()
    ov = Overlay.create(base, tmp_path / "ov", chunk_size=CS, limit=64 * CS)
    errors: list[BaseException] = []
    stop = threading.Event()
    # thread t owns chunks t, t+4, t+8, ...: the final contents are predictable
    expected: dict[int, bytes] = {}
    lock = threading.Lock()

    def owner(t: int) -> None:
        rng = random.Random(t)
        try:
            for i in range(150):
                c = rng.randrange(t, 60, 4)
                if rng.random() < 0.2:
                    ov.discard(c * CS, CS)
                    value = bytes(CS)
                else:
                    off = rng.randrange(0, CS - 100)
                    ov.write(c * CS + off, bytes([i % 250 + 1]) * 100)
                    value = read(ov, c * CS, CS)
                with lock:
                    expected[c] = value
        except BaseException as exc:
            errors.append(exc)

    def flusher() -> None:
        try:
            while not stop.wait(0.002):
                ov.flush()
                read(ov, 0, SIZE)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=owner, args=(t,)) for t in range(4)]
    side = threading.Thread(target=flusher)
    side.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    stop.set()
    side.join(60)
    assert not errors
    contents = read(ov, 0, SIZE)
    for c, value in expected.items():
        assert contents[c * CS : (c + 1) * CS] == value
    ov.close()
    again = Overlay.open(base, tmp_path / "ov")
    assert read(again, 0, SIZE) == contents
    again.close()


# -- layering: absorb_base, rebase, chunk_states ---------------------------------------


def test_absorb_base_keeps_every_byte_and_stops_reading_the_base(
    ov: Overlay, base: SpyBase, tmp_path: Path
) -> None:
    last = SIZE // CS - 1  # the base's last 16 chunks are a hole (zeros)
    ov.write(CS + 5, b"w")  # chunk 1: DATA already
    ov.discard(2 * CS, CS)  # chunk 2: ZERO already
    before = read(ov, 0, SIZE)
    copied = ov.absorb_base(0, 4)
    assert copied == 2 * CS  # chunks 0 and 3; 1 and 2 were left alone
    states = ov.chunk_states()
    assert list(states[:4]) == [DATA, DATA, ZERO, DATA] and states[4] == BASE
    assert ov.absorb_base(last - 1, last + 1) == 0  # zeros in the base: ZERO, no space
    assert list(ov.chunk_states()[last - 1 :]) == [ZERO, ZERO]
    assert ov.allocated_bytes == 3 * CS
    assert read(ov, 0, SIZE) == before
    # Over another base that agrees outside the absorbed chunks, nothing changes.
    other = MemoryDevice(SIZE)
    other.write(4 * CS, base_bytes(4 * CS, (last - 5) * CS))
    ov.rebase(other)
    assert ov.base is other
    assert read(ov, 0, SIZE) == before
    ov.close()
    again = Overlay.open(other, tmp_path / "ov")
    assert read(again, 0, SIZE) == before
    with pytest.raises(ValueError):
        again.absorb_base(0, last + 2)
    with pytest.raises(ValueError):
        again.rebase(MemoryDevice(SIZE - 512))
    again.close()


def test_absorb_base_leaves_alone_a_chunk_written_meanwhile(ov: Overlay, base: SpyBase) -> None:
    def write_first() -> None:
        base.before_read = None
        ov.write(CS + 10, b"new")  # a copy-up of chunk 1 while absorb reads it

    base.before_read = write_first
    ov.absorb_base(1, 2)
    assert read(ov, CS, 20) == base_bytes(CS, 10) + b"new" + base_bytes(CS + 13, 7)
    assert ov.allocated_bytes == CS


def test_absorb_base_respects_the_limit(base: SpyBase, tmp_path: Path) -> None:
    o = Overlay.create(base, tmp_path / "ov", chunk_size=CS, limit=CS)
    assert o.absorb_base(0, 1) == CS
    with pytest.raises(OSError) as info:
        o.absorb_base(1, 2)
    assert info.value.errno == errno.ENOSPC
    assert o.chunk_states()[1] == BASE and read(o, CS, CS) == base_bytes(CS, CS)
    o.close()


def test_close_without_flush_loses_what_was_not_flushed(base: SpyBase, tmp_path: Path) -> None:
    o = Overlay.create(base, tmp_path / "ov", chunk_size=CS)
    o.write(0, b"kept")
    o.flush()
    o.write(5 * CS, b"lost")  # a copy-up whose state change was never flushed
    o.close(flush=False)
    o.close()  # idempotent either way
    again = Overlay.open(base, tmp_path / "ov")
    assert read(again, 0, 4) == b"kept"
    assert read(again, 5 * CS, 4) == base_bytes(5 * CS, 4)
    again.close()


# -- stateful model test ---------------------------------------------------------------

M_CS = 1024
M_SIZE = 12 * M_CS + 512  # a short last chunk
M_CHUNKS = -(-M_SIZE // M_CS)
M_BASE = bytes((i * 7 + i // 512) % 251 + 1 for i in range(M_SIZE))


class OverlayModel(RuleBasedStateMachine):
    """The overlay against a bytearray and a chunk-state model."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="ovmodel-"))
        self.base = MemoryDevice(M_SIZE)
        self.base.write(0, M_BASE)
        self.model = bytearray(M_BASE)
        self.states = [BASE] * M_CHUNKS
        self.limit: int | None = None
        self.ov: Overlay | None = None

    @initialize(limit=st.none() | st.integers(0, 8).map(lambda n: n * M_CS))
    def start(self, limit: int | None) -> None:
        self.limit = limit
        self.ov = Overlay.create(self.base, self.tmp / "ov", chunk_size=M_CS, limit=limit)

    def teardown(self) -> None:
        if self.ov is not None:
            self.ov.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def o(self) -> Overlay:
        assert self.ov is not None
        return self.ov

    def _chunk_len(self, c: int) -> int:
        return min(M_CS, M_SIZE - c * M_CS)

    def _allocated(self, states: list[int]) -> int:
        return sum(self._chunk_len(c) for c, s in enumerate(states) if s == DATA)

    def _commit_or_enospc(self, call: Callable[[], None], states: list[int]) -> bool:
        """Run *call*; it must fail with ENOSPC exactly when *states* would exceed the limit."""
        over = self.limit is not None and self._allocated(states) > self.limit
        if over:
            with pytest.raises(OSError) as exc:
                call()
            assert exc.value.errno == errno.ENOSPC
            return False
        call()
        self.states = states
        return True

    ranges = st.integers(0, M_SIZE - 1).flatmap(
        lambda off: st.tuples(st.just(off), st.integers(1, min(3 * M_CS, M_SIZE - off)))
    )

    @rule(r=ranges, byte=st.integers(0, 255))
    def write(self, r: tuple[int, int], byte: int) -> None:
        off, n = r
        states = list(self.states)
        for c in range(off // M_CS, (off + n - 1) // M_CS + 1):
            states[c] = DATA
        if self._commit_or_enospc(lambda: self.o.write(off, bytes([byte]) * n), states):
            self.model[off : off + n] = bytes([byte]) * n

    @rule(r=ranges, discard=st.booleans())
    def zero(self, r: tuple[int, int], discard: bool) -> None:
        off, n = r
        whole_states, states = list(self.states), list(self.states)
        whole: list[int] = []
        for c in range(off // M_CS, (off + n - 1) // M_CS + 1):
            if off <= c * M_CS and off + n >= c * M_CS + self._chunk_len(c):
                whole.append(c)
                whole_states[c] = states[c] = ZERO
            elif states[c] == BASE:
                states[c] = DATA
        call = self.o.discard if discard else self.o.write_zeroes
        if self._commit_or_enospc(lambda: call(off, n), states):
            self.model[off : off + n] = bytes(n)
        else:
            # whole chunks are zeroed first (freeing space); the ends need room
            self.states = whole_states
            for c in whole:
                self.model[c * M_CS : c * M_CS + self._chunk_len(c)] = bytes(self._chunk_len(c))

    @rule(r=ranges)
    def read(self, r: tuple[int, int]) -> None:
        off, n = r
        assert read(self.o, off, n) == bytes(self.model[off : off + n])

    @rule()
    def flush(self) -> None:
        self.o.flush()

    @rule()
    def reset(self) -> None:
        self.o.reset()
        self.model = bytearray(M_BASE)
        self.states = [BASE] * M_CHUNKS

    @rule(compact=st.booleans())
    def reopen(self, compact: bool) -> None:
        self.o.close()
        self.ov = Overlay.open(self.base, self.tmp / "ov", limit=self.limit)
        if compact:
            self.ov.COMPACT_MIN = 0

    @precondition(lambda self: self.ov is not None)
    @invariant()
    def accounting(self) -> None:
        assert self.o.allocated_bytes == self._allocated(self.states)
        if self.limit is not None:
            assert self.o.allocated_bytes <= self.limit

    @precondition(lambda self: self.ov is not None)
    @invariant()
    def contents_and_extents(self) -> None:
        assert read(self.o, 0, M_SIZE) == bytes(self.model)
        runs = self.o.extents(0, M_SIZE)
        assert sum(n for _, n, _ in runs) == M_SIZE
        for off, n, mapped in runs:
            if not mapped:
                assert self.model[off : off + n] == bytes(n)


TestOverlayModel = OverlayModel.TestCase
TestOverlayModel.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
