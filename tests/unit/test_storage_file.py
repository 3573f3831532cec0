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


def test_nowait_eagain_and_unsupported_become_would_block(
    dev: FileDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    def eagain(*args: object) -> int:
        raise BlockingIOError(errno.EAGAIN, "would block")

    monkeypatch.setattr(file_module.os, "preadv", eagain)
    with pytest.raises(WouldBlock):
        dev.read_into(0, memoryview(bytearray(512)), nowait=True)

    def unsupported(*args: object) -> int:
        raise OSError(errno.EOPNOTSUPP, "no RWF_NOWAIT")

    monkeypatch.setattr(file_module.os, "pwritev", unsupported)
    with pytest.raises(WouldBlock):
        dev.write(0, b"x" * 512, nowait=True)
    # From now on nowait writes go straight to the thread, without a syscall.
    calls: list[object] = []
    monkeypatch.setattr(file_module.os, "pwritev", lambda *a: calls.append(a) or 512)
    with pytest.raises(WouldBlock):
        dev.write(0, b"x" * 512, nowait=True)
    assert calls == []


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
