"""FileDevice: a BlockDevice backed by a regular file or a block device node.

Data moves with ``os.preadv``/``os.pwritev`` straight into and out of the
caller's buffers.  With ``nowait=True`` the call finishes on the calling
thread only when it cannot wait for the disk; otherwise it raises
:class:`WouldBlock` and the caller retries in a worker thread.  The iSCSI
target calls with ``nowait=True`` from its event loop, so this is where "disk
I/O never blocks the event loop" is decided:

* **Reads** pass ``RWF_NOWAIT`` (preadv2(2)): served from the page cache they
  finish here, anything else is ``EAGAIN`` -> :class:`WouldBlock`.
* **Writes** pass ``RWF_NOWAIT`` where the file system supports it for
  buffered writes (XFS, btrfs).  ext4 does not (``EOPNOTSUPP``, still in 6.x
  kernels), and without help every write would then cost a thread hop, which
  on a small VM is most of a 4 KiB write's latency (measured: 2,000 vs 5,300
  writes/s at queue depth 1).  So for those files an :class:`InlineWriteGate`
  decides: a buffered write is a copy into the page cache and returns in
  microseconds unless the kernel makes it wait, which it does for

  - dirty-page throttling (``balance_dirty_pages``): no writer is ever paused
    while dirty + writeback pages stay below the "free run" ceiling, half-way
    between the background and the foreground dirty thresholds.  The gate
    reads ``/proc/vmstat`` (``nr_dirty``, ``nr_writeback`` and the kernel's
    own ``nr_dirty_background_threshold``, so ``vm.dirty_*`` settings count)
    at most every 100 ms, and admits inline writes only while what it saw plus
    what it admitted since stays below the *background* threshold: the whole
    gap up to free run is margin for other writers between samples;
  - reading a page it only partly overwrites: a write that does not cover
    whole pages is admitted only if those edge pages are cached (a one-byte
    ``RWF_NOWAIT`` read of each says so);
  - rarer waits no counter shows (an ext4 journal commit or checkpoint, a
    page under writeback on a device that needs stable pages, memory-cgroup
    dirty limits, direct reclaim): every inline write is timed, and one that
    took longer than 2 ms sends all writes to the threads for 100 ms, for up to
    5 s when slow writes keep coming back.

  Writes larger than 1 MiB, and writes that must be durable (FUA, WCE=0: the
  SCSI layer never asks those with ``nowait``) always go to a thread.  The
  worst case is thus one slow write on the loop per pause, not a stalled
  loop under write pressure.

Discards punch holes (fallocate(2) ``FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE``)
so a sparse backing file gets its space back; if the file system cannot punch
holes we write zeros instead, which keeps the "discarded blocks read zeros"
promise the SCSI layer makes (LBPRZ).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mobinux.storage.device import SECTOR, WouldBlock, check_range, merge_extents

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
_ZERO_CHUNK = 1 << 20
_ZEROS = bytes(_ZERO_CHUNK)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_perf_counter = time.perf_counter

_libc_lock = threading.Lock()
_libc_fallocate: Callable[[int, int, int, int], int] | None = None
_libc_loaded = False


def _fallocate_fn() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2) wrapper, or None where there is none (non-Linux)."""
    global _libc_fallocate, _libc_loaded
    with _libc_lock:
        if not _libc_loaded:
            _libc_loaded = True
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.fallocate
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
                fn.restype = ctypes.c_int
                _libc_fallocate = fn
            except (OSError, AttributeError):
                _libc_fallocate = None
        return _libc_fallocate


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call fallocate(2) with *mode*; raise OSError (EOPNOTSUPP when unavailable)."""
    fn = _fallocate_fn()
    if fn is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_VMSTAT_FIELD = re.compile(
    rb"^(nr_dirty|nr_writeback|nr_dirty_background_threshold) (\d+)$", re.MULTILINE
)


def read_vmstat(path: str = "/proc/vmstat") -> tuple[int, int] | None:
    """``(dirty + writeback pages, background threshold in pages)``, or None if unknown."""
    try:
        with open(path, "rb", buffering=0) as f:
            text = f.read(65536)
    except OSError:
        return None
    fields = {m[1]: int(m[2]) for m in _VMSTAT_FIELD.finditer(text)}
    if len(fields) != 3:
        return None
    return (
        fields[b"nr_dirty"] + fields[b"nr_writeback"],
        fields[b"nr_dirty_background_threshold"],
    )


class InlineWriteGate:
    """Admits a buffered write to run on the calling thread when it cannot block for long.

    Shared by every :class:`FileDevice` of the process (dirty pages are a
    machine-wide budget); the module docstring explains the rules.  Safe to
    call from several threads: a race only mis-counts a few admitted bytes.
    """

    SAMPLE_INTERVAL = 0.1  # seconds between /proc/vmstat reads
    SLOW_WRITE = 0.002  # an inline write slower than this...
    BACKOFF = 0.1  # ...sends writes to the threads for this long,
    MAX_BACKOFF = 5.0  # doubling up to this while slow writes keep coming
    MAX_INLINE = 1 << 20  # larger writes always go to a thread

    def __init__(
        self,
        vmstat: Callable[[], tuple[int, int] | None] = read_vmstat,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._vmstat = vmstat
        self._clock = clock
        self._sampled = -1e18
        self._budget = 0  # bytes still admissible until the next sample
        self._paused_until = -1e18
        self._backoff = self.BACKOFF
        self.slow_writes = 0  # for diagnostics and tests

    def admit(self, nbytes: int) -> bool:
        """True: write *nbytes* inline now (and report its duration with :meth:`took`)."""
        if nbytes > self.MAX_INLINE:
            return False
        now = self._clock()
        if now < self._paused_until:
            return False
        if now - self._sampled >= self.SAMPLE_INTERVAL:
            self._sampled = now
            state = self._vmstat()
            if state is None:
                self._budget = 0  # no /proc/vmstat: never guess, use the threads
            else:
                dirty, background = state
                self._budget = max(0, background - dirty) * _PAGE
        if nbytes > self._budget:
            return False
        self._budget -= nbytes
        return True

    def took(self, seconds: float) -> None:
        """How long an admitted write took; a slow one pauses inline writes for a while.

        An isolated stall (an ext4 journal commit every few seconds) costs a
        tenth of a second of thread hops; stalls that come back as soon as
        inline writes resume double the pause, up to :attr:`MAX_BACKOFF`.
        """
        if seconds > self.SLOW_WRITE:
            self.slow_writes += 1
            now = self._clock()
            if now - self._paused_until < 4 * self._backoff:
                self._backoff = min(2 * self._backoff, self.MAX_BACKOFF)
            else:
                self._backoff = self.BACKOFF
            self._paused_until = now + self._backoff


INLINE_WRITES = InlineWriteGate()
"""The process-wide gate every FileDevice uses unless given its own."""


class FileDevice:
    """A BlockDevice over a file (regular or block special)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        inline_writes: InlineWriteGate | None = None,
    ) -> None:
        self._path = Path(path)
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(self._path, flags)
        try:
            st = os.fstat(self._fd)
            self._is_blockdev = stat.S_ISBLK(st.st_mode)
            end = os.lseek(self._fd, 0, os.SEEK_END) if self._is_blockdev else st.st_size
        except BaseException:
            os.close(self._fd)
            raise
        # A trailing partial sector cannot be addressed as a logical block.
        self._size = end - end % SECTOR
        self._readonly = readonly
        # Cleared the first time the kernel says RWF_NOWAIT is unsupported for
        # this file; from then on every nowait call is sent to a thread at once.
        self._nowait_read_ok = _RWF_NOWAIT != 0
        self._nowait_write_ok = _RWF_NOWAIT != 0
        self._inline_writes = INLINE_WRITES if inline_writes is None else inline_writes
        self._punch_ok = True
        self._zero_range_ok = True
        self._seek_data_ok = not self._is_blockdev
        self._closed = False

    def __repr__(self) -> str:
        return f"FileDevice({str(self._path)!r}, readonly={self._readonly})"

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self._readonly

    def fileno(self) -> int:
        return self._fd

    def refresh_size(self) -> int:
        """Re-read the size of the file (after it was grown offline); returns it."""
        st = os.fstat(self._fd)
        end = os.lseek(self._fd, 0, os.SEEK_END) if self._is_blockdev else st.st_size
        self._size = end - end % SECTOR
        return self._size

    # -- data path ---------------------------------------------------------

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        length = len(buf)
        check_range(self._size, offset, length)
        if nowait and not self._nowait_read_ok:
            raise WouldBlock
        done = 0
        while done < length:
            view = buf[done:]
            if nowait:
                try:
                    n = os.preadv(self._fd, [view], offset + done, _RWF_NOWAIT)
                except BlockingIOError:
                    raise WouldBlock from None
                except OSError as exc:
                    if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        self._nowait_read_ok = False
                        raise WouldBlock from None
                    raise
                if n < len(view):
                    # Part of the range is not in the page cache (or the file
                    # shrank): the blocking retry sorts out which.
                    raise WouldBlock
            else:
                n = os.preadv(self._fd, [view], offset + done)
                if n == 0:
                    # Past EOF (the file was truncated under us): reads as zeros,
                    # like the hole it would be in a sparse file.
                    view[:] = bytes(len(view))
                    return
            done += n

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None:
        if self._readonly:
            raise OSError(errno.EROFS, "device is read-only")
        mv = memoryview(data).cast("B")
        length = len(mv)
        check_range(self._size, offset, length)
        if nowait:
            if self._nowait_write_ok:
                try:
                    n = os.pwritev(self._fd, [mv], offset, _RWF_NOWAIT)
                except BlockingIOError:
                    raise WouldBlock from None
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    # The file system cannot say (ext4): the gate decides from now on.
                    self._nowait_write_ok = False
                else:
                    if n < length:
                        raise WouldBlock
                    return
            self._write_inline(offset, mv)
            return
        done = 0
        while done < length:
            n = os.pwritev(self._fd, [mv[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n

    def _write_inline(self, offset: int, mv: memoryview) -> None:
        """A nowait write without RWF_NOWAIT: inline if the gate admits it, else WouldBlock."""
        length = len(mv)
        end = offset + length
        if (offset % _PAGE and not self._page_cached(offset)) or (
            end % _PAGE and not self._page_cached(end - 1)
        ):
            raise WouldBlock  # the kernel would read the page first
        gate = self._inline_writes
        if not gate.admit(length):
            raise WouldBlock
        start = _perf_counter()
        try:
            done = os.pwritev(self._fd, [mv], offset)
            while done < length:
                n = os.pwritev(self._fd, [mv[done:]], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
        finally:
            gate.took(_perf_counter() - start)

    def _page_cached(self, offset: int) -> bool:
        """Is the page holding byte *offset* in the page cache? (a one-byte nowait read)"""
        if not self._nowait_read_ok:
            return False
        probe = bytearray(1)
        try:
            return os.preadv(self._fd, [probe], offset, _RWF_NOWAIT) == 1
        except OSError:
            return False

    def flush(self) -> None:
        if not self._readonly:
            os.fdatasync(self._fd)

    # -- provisioning ------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        if self._readonly:
            raise OSError(errno.EROFS, "device is read-only")
        check_range(self._size, offset, length)
        if length == 0:
            return
        if self._punch_ok:
            try:
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._punch_ok = False
        self._write_zero_bytes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self._readonly:
            raise OSError(errno.EROFS, "device is read-only")
        check_range(self._size, offset, length)
        if length == 0:
            return
        # ZERO_RANGE keeps the blocks allocated (WRITE SAME without UNMAP maps
        # the blocks, SBC-3 5.42) and costs no data transfer.
        if self._zero_range_ok:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._zero_range_ok = False
        self._write_zero_bytes(offset, length)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self.write(offset, memoryview(_ZEROS)[:n])
            offset += n

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        check_range(self._size, offset, length)
        end = offset + length
        if length == 0:
            return []
        if not self._seek_data_ok:
            return [(offset, length, True)]
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        try:
            while pos < end:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = end  # no data at or after pos: the rest is a hole
                data = min(data, end)
                if data > pos:
                    runs.append((pos, data - pos, False))
                if data >= end:
                    break
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
                runs.append((data, hole - data, True))
                pos = hole
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            self._seek_data_ok = False
            return [(offset, length, True)]
        return merge_extents(runs)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> FileDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
