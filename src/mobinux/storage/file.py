"""FileDevice: a BlockDevice backed by a regular file or a block device node.

Data moves with ``os.preadv``/``os.pwritev`` straight into and out of the
caller's buffers.  With ``nowait=True`` the call passes ``RWF_NOWAIT`` so that a
read served from the page cache (or a write that needs no allocation) finishes
on the calling thread; anything that would have to wait for the disk raises
:class:`WouldBlock` and the caller retries in a worker thread (preadv2(2)).

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
import stat
import threading
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


class FileDevice:
    """A BlockDevice over a file (regular or block special)."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
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
        if nowait and not self._nowait_write_ok:
            raise WouldBlock
        done = 0
        while done < length:
            view = mv[done:]
            if nowait:
                try:
                    n = os.pwritev(self._fd, [view], offset + done, _RWF_NOWAIT)
                except BlockingIOError:
                    raise WouldBlock from None
                except OSError as exc:
                    if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        self._nowait_write_ok = False
                        raise WouldBlock from None
                    raise
                if n < len(view):
                    raise WouldBlock
            else:
                n = os.pwritev(self._fd, [view], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
            done += n

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
