"""Durability of acknowledged writes across a simulated power loss, driven by qemu-io.

The exported disk is ``VolatileCacheDevice -> PowerRail -> FileDevice``: the
cache is the disk's volatile write cache (writes reach the media only when the
target flushes it, for SYNCHRONIZE CACHE, a FUA write or WCE=0), the rail is
the power supply of the media.  A power cut switches the rail off first, so
nothing more reaches the backing file whatever the target still does, then
drops the cache.  Only then are the initiator (SIGKILL, so it cannot send the
SYNCHRONIZE CACHE it would send on close) and the service stopped, and the
backing file is read directly.

qemu-io runs interactively, so the power fails while the initiator is still
connected and holds its acknowledgements, and with ``-t writeback``: its
default cache mode is writethrough, which sets FUA on every write and would
make every write durable.  A recording ScsiTarget shows which commands the
target really got (WRITE with or without FUA, SYNCHRONIZE CACHE) and what it
answered, so each test proves which path made the data durable.

(``kill -9`` of the whole server is covered in test_serve_iscsi.py.)
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import select
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mobinux.iscsi.params import TargetEntry, TargetLimits
from mobinux.scsi import LogicalUnit, ScsiTarget
from mobinux.scsi.command import ScsiResult
from mobinux.storage.device import SECTOR
from mobinux.storage.file import FileDevice
from mobinux.storage.volatile import VolatileCacheDevice
from tests.interop.iscsi_helpers import (
    HOST,
    INITIATOR,
    IQN,
    Export,
    RawInitiator,
    ServiceThread,
    iscsi_service,
    need,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

KiB = 1024
DISK_SIZE = 1024 * KiB
PROMPT = b"qemu-io> "

_WRITES = frozenset((0x0A, 0x2A, 0xAA, 0x8A))  # WRITE(6/10/12/16)
_SYNC_CACHE = frozenset((0x35, 0x91))  # SYNCHRONIZE CACHE(10/16)


# -- the power supply of the media ------------------------------------------------------------


class PowerRail:
    """A BlockDevice pass-through that stops forwarding anything once the power is off.

    :meth:`arm` makes it fail in the middle of whatever writes come next: after
    *sectors* more 512-byte sectors have reached the media the power goes off,
    the rest of that write (sector by sector, as a disk with atomic sectors
    would) and everything after it is lost and reported as EIO.
    """

    def __init__(self, inner: FileDevice) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self._on = True
        self._budget: int | None = None
        self.sectors_written = 0

    @property
    def on(self) -> bool:
        return self._on

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def readonly(self) -> bool:
        return self._inner.readonly

    def arm(self, sectors: int) -> None:
        with self._lock:
            self._budget = sectors

    def cut(self) -> None:
        with self._lock:
            self._on = False

    def _dead(self) -> OSError:
        return OSError(errno.EIO, "power is off")

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        self._inner.read_into(offset, buf, nowait=nowait)

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None:
        mv = memoryview(data).cast("B")
        with self._lock:
            if not self._on:
                raise self._dead()
            allowed = len(mv)
            if self._budget is not None:
                allowed = min(allowed, self._budget * SECTOR)
            self._inner.write(offset, mv[:allowed])
            self.sectors_written += allowed // SECTOR
            if self._budget is not None:
                self._budget -= allowed // SECTOR
                if self._budget == 0:
                    self._on = False
            if allowed < len(mv):
                raise self._dead()

    def flush(self) -> None:
        with self._lock:
            if not self._on:
                raise self._dead()
            self._inner.flush()

    def discard(self, offset: int, length: int) -> None:
        with self._lock:
            if not self._on:
                raise self._dead()
            self._inner.discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._lock:
            if not self._on:
                raise self._dead()
            self._inner.write_zeroes(offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self._inner.extents(offset, length)

    def close(self) -> None:
        self._inner.close()


# -- what the target was asked and what it answered --------------------------------------------


@dataclasses.dataclass(frozen=True)
class Seen:
    opcode: int
    fua: bool
    status: int

    @property
    def is_write(self) -> bool:
        return self.opcode in _WRITES

    @property
    def is_sync(self) -> bool:
        return self.opcode in _SYNC_CACHE


class RecordingTarget(ScsiTarget):
    """A ScsiTarget that records every command it completes (from any thread)."""

    def __init__(self, luns: dict[int, LogicalUnit]) -> None:
        super().__init__(luns)
        self.seen: list[Seen] = []

    def execute(self, lun: int, cdb: bytes | bytearray | memoryview,
                data_out: bytes | bytearray | memoryview | None, nexus: str, **kwargs: Any) -> ScsiResult:
        result = super().execute(lun, cdb, data_out, nexus, **kwargs)  # WouldBlock: not done yet
        op = cdb[0]
        fua = op in _WRITES and op != 0x0A and bool(cdb[1] & 0x08)
        self.seen.append(Seen(op, fua, result.status))
        return result

    def mark(self) -> int:
        return len(self.seen)

    def since(self, mark: int) -> list[Seen]:
        return self.seen[mark:]


# -- qemu-io, interactive ---------------------------------------------------------------------------


class QemuIo:
    """``qemu-io -t writeback`` on the target's LUN 0, fed one command at a time."""

    def __init__(self, port: int, *, timeout: float = 30) -> None:
        opts = (f"driver=iscsi,transport=tcp,portal={HOST}:{port},target={IQN},lun=0,"
                f"initiator-name={INITIATOR}")
        self.timeout = timeout
        self.proc = subprocess.Popen(
            ["qemu-io", "-t", "writeback", "--image-opts", opts],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._buf = b""
        try:
            self._until_prompt()
        except BaseException:
            self.kill()
            raise

    def _until_prompt(self) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while PROMPT not in self._buf:
            ready, _, _ = select.select([fd], [], [], self.timeout)
            if not ready:
                raise TimeoutError(f"qemu-io gave no prompt within {self.timeout}s: {self._buf!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"qemu-io exited ({self.proc.wait(5)}): {self._buf!r}")
            self._buf += chunk
        out, _, self._buf = self._buf.partition(PROMPT)
        return out.decode(errors="replace")

    def cmd(self, line: str) -> str:
        """Run one command; returns what qemu-io printed before its next prompt."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._until_prompt()

    def ok(self, line: str) -> str:
        out = self.cmd(line)
        assert "fail" not in out.lower() and "error" not in out.lower(), f"{line!r}: {out}"
        if line.startswith("write"):
            assert "wrote " in out, f"{line!r}: {out}"
        if line.startswith("read"):
            assert "read " in out, f"{line!r}: {out}"
        return out

    def kill(self) -> None:
        """SIGKILL: the initiator gets no chance to flush on close."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


# -- the whole rig ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Rig:
    srv: ServiceThread
    path: Path
    old: bytes
    cache: VolatileCacheDevice
    rail: PowerRail
    scsi: RecordingTarget
    lu: LogicalUnit
    clients: list[QemuIo]

    def qemu_io(self) -> QemuIo:
        q = QemuIo(self.srv.port)
        self.clients.append(q)
        return q

    def power_cut(self) -> None:
        """The machine loses power: the media stop taking writes, the cache is gone."""
        self.rail.cut()
        self.cache.power_cut()


@contextmanager
def powered_target(tmp_path: Path, *, write_cache: bool = True, limits: TargetLimits | None = None,
                   seed: int = 1) -> Iterator[Rig]:
    """One LUN over a backing file of random 'old' bytes; after the block, the file is at rest."""
    need("qemu-io")
    path = tmp_path / "disk.img"
    old = random.Random(seed).randbytes(DISK_SIZE)
    with path.open("wb") as f:
        f.write(old)
        f.flush()
        os.fsync(f.fileno())
    rail = PowerRail(FileDevice(path))
    cache = VolatileCacheDevice(rail)
    lu = LogicalUnit(cache, device_id=f"{IQN}-0", write_cache=write_cache)
    scsi = RecordingTarget({0: lu})
    kwargs: dict[str, Any] = {} if limits is None else {"limits": limits}
    clients: list[QemuIo] = []
    try:
        with iscsi_service([Export(TargetEntry(IQN), scsi, [path])], **kwargs) as srv:
            rig = Rig(srv, path, old, cache, rail, scsi, lu, clients)
            try:
                yield rig
            finally:
                # If a test failed before cutting the power, still make sure nothing
                # reaches the file once the initiators go away.
                rig.power_cut()
                for q in clients:
                    q.kill()
    finally:
        cache.close()


def pattern(byte: int, length: int) -> bytes:
    return bytes([byte]) * length


# -- 1-3: FUA, SYNCHRONIZE CACHE, and neither -----------------------------------------------------------


def test_fua_write_survives_power_cut(tmp_path: Path) -> None:
    with powered_target(tmp_path) as rig:
        q = rig.qemu_io()
        mark = rig.scsi.mark()
        q.ok("write -f -P 0xa1 0 64k")
        seen = rig.scsi.since(mark)
        assert any(s.is_write and s.fua and s.status == 0 for s in seen), seen
        assert not any(s.is_sync for s in seen), seen
        assert rig.cache.dirty_bytes == 0
        # Control: a plain write acknowledged after it, never synced.
        q.ok("write -P 0xa2 64k 64k")
        assert rig.cache.dirty_bytes == 64 * KiB
        rig.power_cut()
    data = rig.path.read_bytes()
    assert data[: 64 * KiB] == pattern(0xA1, 64 * KiB)
    assert data[64 * KiB :] == rig.old[64 * KiB :]


def test_write_then_synchronize_cache_survives_power_cut(tmp_path: Path) -> None:
    with powered_target(tmp_path) as rig:
        q = rig.qemu_io()
        mark = rig.scsi.mark()
        q.ok("write -P 0xb1 64k 64k")
        assert not any(s.fua or s.is_sync for s in rig.scsi.since(mark))
        assert rig.cache.dirty_bytes == 64 * KiB  # acknowledged, still only in the volatile cache
        mark = rig.scsi.mark()
        q.ok("flush")
        assert any(s.is_sync and s.status == 0 for s in rig.scsi.since(mark)), rig.scsi.since(mark)
        assert rig.cache.dirty_bytes == 0
        q.ok("write -P 0xb2 192k 64k")  # control: never synced
        rig.power_cut()
    data = rig.path.read_bytes()
    assert data[64 * KiB : 128 * KiB] == pattern(0xB1, 64 * KiB)
    assert data[: 64 * KiB] == rig.old[: 64 * KiB]
    assert data[128 * KiB :] == rig.old[128 * KiB :]


def test_unsynced_write_is_lost_in_power_cut(tmp_path: Path) -> None:
    """The storage layer really loses what was not synced: survival above comes from the flush."""
    with powered_target(tmp_path) as rig:
        q = rig.qemu_io()
        mark = rig.scsi.mark()
        q.ok("write -P 0xc3 128k 64k")
        q.ok("read -P 0xc3 128k 64k")  # acknowledged and visible to the initiator
        seen = rig.scsi.since(mark)
        assert any(s.is_write and s.status == 0 for s in seen)
        assert not any(s.fua or s.is_sync for s in seen), seen
        assert rig.cache.dirty_bytes == 64 * KiB
        rig.power_cut()
    assert rig.path.read_bytes() == rig.old


# -- 4: a power cut in the middle of unsynced writes tears no block --------------------------------------


@dataclasses.dataclass(frozen=True)
class Write:
    offset: int
    length: int
    byte: int

    def sectors(self) -> range:
        return range(self.offset // SECTOR, (self.offset + self.length) // SECTOR)

    def command(self, verb: str = "write") -> str:
        return f"{verb} -P 0x{self.byte:02x} {self.offset} {self.length}"


def _writes(rng: random.Random, first_byte: int, count: int, lo: int, hi: int) -> list[Write]:
    """*count* writes of 1-40 sectors in [lo, hi), each with its own pattern byte."""
    out = []
    for i in range(count):
        sectors = rng.randint(1, 40)
        start = rng.randrange(lo // SECTOR, hi // SECTOR - sectors)
        out.append(Write(start * SECTOR, sectors * SECTOR, first_byte + i))
    return out


def test_power_cut_mid_flush_tears_no_block(tmp_path: Path) -> None:
    """Each 512-byte block ends up whole: its old bytes, its last synced data, or one later write.

    Data-Out segments of 1000 bytes split blocks between PDUs (the target must
    not write a block before all of it arrived), and the power fails in the
    middle of a SYNCHRONIZE CACHE while asynchronous writes are in flight: the
    media take a prefix of the cached sectors and then nothing more.
    """
    rng = random.Random(4)
    synced = _writes(rng, 0x01, 20, 0, 256 * KiB)
    unsynced = _writes(rng, 0x21, 30, 128 * KiB, 512 * KiB)
    in_flight = _writes(rng, 0x51, 30, 128 * KiB, 512 * KiB)
    limits = TargetLimits(max_recv_data_segment_length=1000, max_burst_length=5000,
                          first_burst_length=3000)
    with powered_target(tmp_path, limits=limits) as rig:
        q = rig.qemu_io()
        for w in synced:
            q.ok(w.command())
        mark = rig.scsi.mark()
        q.ok("flush")
        assert any(s.is_sync and s.status == 0 for s in rig.scsi.since(mark))
        assert rig.cache.dirty_bytes == 0
        for w in unsynced:
            q.ok(w.command())
        dirty = rig.cache.dirty_bytes // SECTOR
        assert dirty > 1
        before = rig.rail.sectors_written
        rig.rail.arm(dirty // 2)
        for w in in_flight:
            q.cmd(w.command("aio_write"))
        mark = rig.scsi.mark()
        q.cmd("flush")  # the power fails half way through it
        assert not rig.rail.on
        assert rig.rail.sectors_written - before == dirty // 2
        seen_sync = [s for s in rig.scsi.since(mark) if s.is_sync]
        assert seen_sync and all(s.status != 0 for s in seen_sync), seen_sync
        rig.power_cut()
    data = rig.path.read_bytes()

    last_synced: dict[int, int] = {}
    for w in synced:
        for s in w.sectors():
            last_synced[s] = w.byte
    later: dict[int, set[int]] = {}
    for w in unsynced + in_flight:
        for s in w.sectors():
            later.setdefault(s, set()).add(w.byte)

    torn = []
    kept_new = lost = 0
    for s in range(DISK_SIZE // SECTOR):
        block = data[s * SECTOR : (s + 1) * SECTOR]
        old = rig.old[s * SECTOR : (s + 1) * SECTOR]
        uniform = block[0] if block == pattern(block[0], SECTOR) else None
        if s in last_synced:
            if uniform == last_synced[s]:
                lost += s in later
                continue
        elif block == old:
            lost += s in later
            continue
        if uniform is not None and uniform in later.get(s, ()):
            kept_new += 1
            continue
        torn.append((s, block[:16].hex(), last_synced.get(s), sorted(later.get(s, ()))))
    assert not torn, f"{len(torn)} blocks hold data never written there as a whole: {torn[:10]}"
    # The cut really fell in the middle: part of the unsynced data reached the media, part did not.
    assert kept_new > 0 and lost > 0, (kept_new, lost)


# -- write cache off: every acknowledged write is durable ------------------------------------------------


def _wce(ini: RawInitiator) -> tuple[bool, bytes]:
    """MODE SENSE(6), DBD, current caching page: (WCE, the page)."""
    status, data = 0, b""
    for _ in range(4):  # the first command of a new nexus reports the power-on unit attention
        status, data = ini.command(bytes((0x1A, 0x08, 0x08, 0, 255, 0)), read=255)
        if status == 0:
            break
    assert status == 0, status
    page = data[4 : 4 + 2 + data[5]]
    assert page[0] & 0x3F == 0x08, data.hex()
    return bool(page[2] & 0x04), page


def _command_out(ini: RawInitiator, cdb: bytes, data: bytes) -> int:
    """One SCSI command with its Data-Out as immediate data; returns the status."""
    itt = ini.next_itt()
    ini.send(ini.pdu(0x01, 0x80 | 0x20 | 1, itt=itt, data=data,
                     fields={20: len(data), 24: ini.cmd_sn, 28: ini.exp_stat_sn},
                     tail=cdb.ljust(16, b"\0")))
    ini.cmd_sn = (ini.cmd_sn + 1) & 0xFFFFFFFF
    while (pdu := ini.recv()) is not None:
        if pdu.opcode == 0x21 and pdu.itt == itt:
            return pdu.bhs[3]
    raise ConnectionError("target closed the connection")


def _turn_write_cache_off(port: int) -> None:
    """MODE SELECT(6) the caching page with WCE=0, as `sdparm --clear WCE` would."""
    ini = RawInitiator(port)
    try:
        ini.login()
        wce, page = _wce(ini)
        assert wce
        new = bytearray(page)
        new[0] &= 0x3F  # PS is reserved in MODE SELECT
        new[2] &= ~0x04 & 0xFF
        params = bytes(4) + bytes(new)
        assert _command_out(ini, bytes((0x15, 0x10, 0, 0, len(params), 0)), params) == 0
        assert _wce(ini)[0] is False
        ini.logout()
    finally:
        ini.close()


def test_write_cache_off_makes_plain_writes_durable(tmp_path: Path) -> None:
    with powered_target(tmp_path, write_cache=False) as rig:
        q = rig.qemu_io()
        mark = rig.scsi.mark()
        q.ok("write -P 0xd4 0 64k")
        seen = rig.scsi.since(mark)
        assert not any(s.fua or s.is_sync for s in seen), seen
        assert rig.cache.dirty_bytes == 0
        rig.power_cut()
    data = rig.path.read_bytes()
    assert data[: 64 * KiB] == pattern(0xD4, 64 * KiB)
    assert data[64 * KiB :] == rig.old[64 * KiB :]


def test_mode_select_wce0_makes_later_plain_writes_durable(tmp_path: Path) -> None:
    with powered_target(tmp_path) as rig:
        q = rig.qemu_io()
        q.ok("write -P 0xe1 0 64k")  # WCE=1: cached only
        assert rig.cache.dirty_bytes == 64 * KiB
        q.ok("flush")
        _turn_write_cache_off(rig.srv.port)
        assert not rig.lu.mode.wce
        mark = rig.scsi.mark()
        q.ok("write -P 0xe2 64k 64k")
        seen = rig.scsi.since(mark)
        assert not any(s.fua or s.is_sync for s in seen), seen
        assert rig.cache.dirty_bytes == 0
        rig.power_cut()
    data = rig.path.read_bytes()
    assert data[: 128 * KiB] == pattern(0xE1, 64 * KiB) + pattern(0xE2, 64 * KiB)
    assert data[128 * KiB :] == rig.old[128 * KiB :]


def test_mode_select_wce0_writes_back_what_was_cached(tmp_path: Path) -> None:
    """Turning the write cache off must not leave acknowledged data in it.

    An initiator that switched a disk to write-through stops sending SYNCHRONIZE
    CACHE (Linux drops flushes for a queue without a write cache), so a write
    acknowledged just before the switch would otherwise never become durable.
    """
    with powered_target(tmp_path) as rig:
        q = rig.qemu_io()
        q.ok("write -P 0xf1 0 64k")  # WCE=1: cached only
        assert rig.cache.dirty_bytes == 64 * KiB
        _turn_write_cache_off(rig.srv.port)
        rig.power_cut()
    assert rig.path.read_bytes()[: 64 * KiB] == pattern(0xF1, 64 * KiB)


def test_write_cache_off_makes_unmap_durable(tmp_path: Path) -> None:
    """With WCE=0 no SYNCHRONIZE CACHE follows, so an acknowledged UNMAP must already be on the media.

    Otherwise the blocks, which read zeros once unmapped (LBPRZ=1), come back
    with their old contents after a power cut.
    """
    with powered_target(tmp_path, write_cache=False) as rig:
        q = rig.qemu_io()
        mark = rig.scsi.mark()
        q.ok("discard 0 64k")
        q.ok("read -P 0 0 64k")
        seen = rig.scsi.since(mark)
        assert any(s.opcode == 0x42 and s.status == 0 for s in seen), seen
        assert not any(s.is_sync for s in seen), seen
        rig.power_cut()
    data = rig.path.read_bytes()
    assert data[64 * KiB :] == rig.old[64 * KiB :]
    assert data[: 64 * KiB] == bytes(64 * KiB)
