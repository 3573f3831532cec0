"""FileDevice on real temporary files: I/O, holes, extents, nowait, errors."""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mobinux.scsi import LogicalUnit, ScsiTarget
from mobinux.scsi.sense import parse_sense
from mobinux.storage import file as file_module
from mobinux.storage.device import WouldBlock
from mobinux.storage.file import FileDevice

MiB = 1 << 20


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _supports_holes(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) >= 0
    except OSError as exc:
        return exc.errno == errno.ENXIO  # an all-hole file: holes are supported
    finally:
        os.close(fd)


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[FileDevice]:
    d = FileDevice(_sparse(tmp_path / "disk.img", 4 * MiB))
    yield d
    d.close()


def test_size_is_rounded_down_to_whole_sectors(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"x" * 1000)
    with FileDevice(path) as d:
        assert d.size == 512


def test_write_then_read(dev: FileDevice) -> None:
    dev.write(8192, b"hello" * 100)
    buf = bytearray(500)
    dev.read_into(8192, memoryview(buf))
    assert buf == b"hello" * 100
    dev.flush()


def test_reads_of_holes_are_zero(dev: FileDevice) -> None:
    buf = bytearray(b"\xff" * 4096)
    dev.read_into(MiB, memoryview(buf))
    assert buf == bytes(4096)


def test_read_past_eof_of_a_truncated_file_is_zero(tmp_path: Path) -> None:
    path = _sparse(tmp_path / "t.img", MiB)
    with FileDevice(path) as d:
        d.write(0, b"a" * 4096)
        os.truncate(path, 2048)  # shrunk behind our back
        buf = bytearray(b"\xff" * 4096)
        d.read_into(0, memoryview(buf))
        assert buf == b"a" * 2048 + bytes(2048)


def test_out_of_range_io_is_refused_without_growing_the_file(
    dev: FileDevice, tmp_path: Path
) -> None:
    with pytest.raises(OSError) as exc:
        dev.write(4 * MiB - 512, b"x" * 1024)
    assert exc.value.errno == errno.EINVAL
    assert (tmp_path / "disk.img").stat().st_size == 4 * MiB
    with pytest.raises(OSError):
        dev.read_into(-512, memoryview(bytearray(512)))


def test_discard_punches_a_hole_and_reads_zero(dev: FileDevice, tmp_path: Path) -> None:
    dev.write(0, b"d" * MiB)
    dev.flush()
    used = os.stat(tmp_path / "disk.img").st_blocks
    dev.discard(64 * 1024, 512 * 1024)
    buf = bytearray(MiB)
    dev.read_into(0, memoryview(buf))
    assert buf[: 64 * 1024] == b"d" * 64 * 1024
    assert buf[64 * 1024 : 576 * 1024] == bytes(512 * 1024)
    assert buf[576 * 1024 :] == b"d" * (MiB - 576 * 1024)
    if _supports_holes(tmp_path / "disk.img"):
        assert os.stat(tmp_path / "disk.img").st_blocks < used
        assert (64 * 1024, 512 * 1024, False) in dev.extents(0, MiB)
    assert (tmp_path / "disk.img").stat().st_size == 4 * MiB  # KEEP_SIZE


def test_discard_falls_back_to_writing_zeros(
    dev: FileDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(file_module, "fallocate", no_fallocate)
    dev.write(0, b"z" * 8192)
    dev.discard(0, 4096)
    dev.write_zeroes(4096, 2048)
    buf = bytearray(8192)
    dev.read_into(0, memoryview(buf))
    assert buf == bytes(6144) + b"z" * 2048


def test_write_zeroes_reads_zero(dev: FileDevice) -> None:
    dev.write(0, b"w" * 16384)
    dev.write_zeroes(4096, 8192)
    buf = bytearray(16384)
    dev.read_into(0, memoryview(buf))
    assert buf == b"w" * 4096 + bytes(8192) + b"w" * 4096


def test_extents_cover_the_range_exactly(dev: FileDevice, tmp_path: Path) -> None:
    dev.write(MiB, b"e" * 8192)
    runs = dev.extents(0, 2 * MiB)
    assert runs[0][0] == 0
    assert sum(length for _, length, _ in runs) == 2 * MiB
    for (off, length, _), (nxt, _, _) in itertools.pairwise(runs):
        assert off + length == nxt
    mapped = [(o, n) for o, n, m in runs if m]
    assert any(o <= MiB and MiB + 8192 <= o + n for o, n in mapped)
    if _supports_holes(tmp_path / "disk.img"):
        assert runs[0] == (0, MiB, False)
    assert dev.extents(MiB + 100, 0) == []


def test_nowait_read_either_completes_or_would_block(dev: FileDevice) -> None:
    dev.write(0, b"n" * 4096)
    buf = bytearray(4096)
    try:
        dev.read_into(0, memoryview(buf), nowait=True)
    except WouldBlock:
        dev.read_into(0, memoryview(buf))
    assert buf == b"n" * 4096


def test_nowait_eagain_becomes_would_block(dev: FileDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    def eagain(*args: object) -> int:
        raise BlockingIOError(errno.EAGAIN, "would block")

    monkeypatch.setattr(file_module.os, "preadv", eagain)
    with pytest.raises(WouldBlock):
        dev.read_into(0, memoryview(bytearray(512)), nowait=True)
    monkeypatch.setattr(file_module.os, "pwritev", eagain)
    with pytest.raises(WouldBlock):
        dev.write(0, b"x" * 4096, nowait=True)


class FakeVmstat:
    """What read_vmstat would say: (dirty + writeback pages, background threshold)."""

    def __init__(self, dirty: int = 0, background: int = 1000) -> None:
        self.state: tuple[int, int] | None = (dirty, background)
        self.reads = 0

    def __call__(self) -> tuple[int, int] | None:
        self.reads += 1
        return self.state


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


PAGE = file_module._PAGE


def test_inline_gate_admits_up_to_the_background_threshold_per_sample() -> None:
    vmstat, clock = FakeVmstat(dirty=990, background=1000), FakeClock()
    gate = file_module.InlineWriteGate(vmstat, clock)
    assert gate.admit(6 * PAGE) and gate.admit(4 * PAGE)
    assert not gate.admit(1)  # what it saw plus what it admitted reaches the threshold
    assert vmstat.reads == 1  # sampled at most every SAMPLE_INTERVAL
    clock.now += gate.SAMPLE_INTERVAL
    vmstat.state = (1001, 1000)
    assert not gate.admit(512) and vmstat.reads == 2  # above the threshold: none at all
    clock.now += gate.SAMPLE_INTERVAL
    vmstat.state = (0, 1000)
    assert gate.admit(512)


def test_inline_gate_without_vmstat_sends_everything_to_threads() -> None:
    vmstat = FakeVmstat()
    vmstat.state = None
    assert not file_module.InlineWriteGate(vmstat, FakeClock()).admit(512)


def test_inline_gate_refuses_large_writes() -> None:
    gate = file_module.InlineWriteGate(FakeVmstat(background=1 << 30), FakeClock())
    assert gate.admit(gate.MAX_INLINE)
    assert not gate.admit(gate.MAX_INLINE + 512)


def test_a_slow_inline_write_pauses_inline_writes_for_a_while() -> None:
    clock = FakeClock()
    gate = file_module.InlineWriteGate(FakeVmstat(background=1 << 20), clock)
    assert gate.admit(4096)
    gate.took(gate.SLOW_WRITE / 2)
    assert gate.admit(4096)
    gate.took(gate.SLOW_WRITE * 5)
    assert gate.slow_writes == 1
    assert not gate.admit(4096)
    clock.now += gate.BACKOFF
    assert gate.admit(4096)
    # slow again right after the pause: the next pause is twice as long, and so on
    pauses = []
    for _ in range(8):
        gate.took(gate.SLOW_WRITE * 5)
        start = clock.now
        while not gate.admit(4096):
            clock.now += 0.01
        pauses.append(round(clock.now - start, 1))
    assert pauses == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    # an isolated stall much later starts again from the shortest pause
    clock.now += 60
    gate.took(gate.SLOW_WRITE * 5)
    assert not gate.admit(4096)
    clock.now += gate.BACKOFF
    assert gate.admit(4096)


def test_read_vmstat(tmp_path: Path) -> None:
    sample = tmp_path / "vmstat"
    sample.write_bytes(
        b"nr_free_pages 100\nnr_dirty 519\nnr_writeback 7\nnr_writeback_temp 3\n"
        b"nr_dirty_threshold 1204248\nnr_dirty_background_threshold 601389\n"
    )
    assert file_module.read_vmstat(str(sample)) == (526, 601389)
    sample.write_bytes(b"nr_dirty 1\n")
    assert file_module.read_vmstat(str(sample)) is None
    assert file_module.read_vmstat(str(tmp_path / "missing")) is None
    if os.path.exists("/proc/vmstat"):
        assert file_module.read_vmstat() is not None


def _no_rwf_nowait_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """pwritev as on ext4: RWF_NOWAIT refused; returns the (offset, length) of real writes."""
    real = os.pwritev
    writes: list[tuple[int, int]] = []

    def pwritev(fd: int, bufs: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "no RWF_NOWAIT for buffered writes")
        writes.append((offset, sum(len(b) for b in bufs)))
        return real(fd, bufs, offset)

    monkeypatch.setattr(file_module.os, "pwritev", pwritev)
    return writes


def test_nowait_write_without_rwf_nowait_runs_inline_when_the_gate_admits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = _no_rwf_nowait_writes(monkeypatch)
    vmstat, clock = FakeVmstat(background=1 << 20), FakeClock()
    gate = file_module.InlineWriteGate(vmstat, clock)
    with FileDevice(_sparse(tmp_path / "d.img", MiB), inline_writes=gate) as d:
        d.write(PAGE, b"i" * PAGE, nowait=True)
        assert writes == [(PAGE, PAGE)]
        buf = bytearray(PAGE)
        d.read_into(PAGE, memoryview(buf))
        assert buf == b"i" * PAGE
        vmstat.state = (1 << 20, 1 << 20)  # dirty pages reached the background threshold
        clock.now += gate.SAMPLE_INTERVAL
        with pytest.raises(WouldBlock):
            d.write(0, b"j" * PAGE, nowait=True)
        assert writes == [(PAGE, PAGE)]  # refused before touching the file
        d.write(0, b"j" * PAGE)  # the thread's retry
        assert writes[-1] == (0, PAGE)


def test_partial_page_write_runs_inline_only_when_the_page_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = _no_rwf_nowait_writes(monkeypatch)
    gate = file_module.InlineWriteGate(FakeVmstat(background=1 << 20), FakeClock())
    with FileDevice(_sparse(tmp_path / "d.img", MiB), inline_writes=gate) as d:
        real_preadv = os.preadv
        probes: list[int] = []

        def preadv(fd: int, bufs: list[bytearray], offset: int, flags: int = 0) -> int:
            if flags:
                probes.append(offset)
                if offset >= PAGE:  # only the first page is in the page cache
                    raise BlockingIOError(errno.EAGAIN, "not cached")
            return real_preadv(fd, bufs, offset, flags)

        monkeypatch.setattr(file_module.os, "preadv", preadv)
        d.write(512, b"a" * 512, nowait=True)  # both edges in page 0: cached
        assert writes == [(512, 512)] and probes == [512, 1023]
        with pytest.raises(WouldBlock):
            d.write(PAGE + 512, b"b" * 512, nowait=True)  # page 1 would be read from disk
        assert writes == [(512, 512)]
        d.write(2 * PAGE, b"c" * PAGE, nowait=True)  # whole pages: no probe needed
        assert writes[-1] == (2 * PAGE, PAGE) and len(probes) == 3


def test_inline_write_durations_reach_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_rwf_nowait_writes(monkeypatch)
    gate = file_module.InlineWriteGate(FakeVmstat(background=1 << 20), FakeClock())
    seen: list[float] = []
    monkeypatch.setattr(gate, "took", seen.append)
    with FileDevice(_sparse(tmp_path / "d.img", MiB), inline_writes=gate) as d:
        d.write(0, b"t" * PAGE, nowait=True)
        d.write(PAGE, b"t" * PAGE)  # blocking writes are not the gate's business
    assert len(seen) == 1 and 0 <= seen[0] < 1


def test_nowait_short_read_is_would_block(dev: FileDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_module.os, "preadv", lambda fd, bufs, off, flags=0: 100)
    with pytest.raises(WouldBlock):
        dev.read_into(0, memoryview(bytearray(512)), nowait=True)


def test_readonly_device(tmp_path: Path) -> None:
    path = _sparse(tmp_path / "ro.img", MiB)
    with FileDevice(path, readonly=True) as d:
        assert d.readonly
        with pytest.raises(OSError) as exc:
            d.write(0, b"x" * 512)
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError):
            d.discard(0, 512)
        d.flush()  # nothing to do, no error


def test_descriptor_is_close_on_exec(dev: FileDevice) -> None:
    assert not os.get_inheritable(dev.fileno())


def test_refresh_size_sees_a_grown_file(tmp_path: Path) -> None:
    path = _sparse(tmp_path / "g.img", MiB)
    with FileDevice(path) as d:
        os.truncate(path, 2 * MiB)
        assert d.size == MiB
        assert d.refresh_size() == 2 * MiB


def test_enospc_on_a_file_becomes_space_allocation_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _sparse(tmp_path / "full.img", MiB)
    d = FileDevice(path)

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_module.os, "pwritev", full)
    target = ScsiTarget({0: LogicalUnit(d, device_id="full")})
    target.execute(0, bytes(6), None, "n")
    r = target.execute(0, bytes.fromhex("2a000000000000000100"), b"x" * 512, "n")
    sense = parse_sense(r.sense)
    assert (r.status, sense.key, sense.asc, sense.ascq) == (2, 7, 0x27, 0x07)
    d.close()
