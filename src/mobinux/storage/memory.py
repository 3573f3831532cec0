"""MemoryDevice: a sparse in-memory BlockDevice for tests and scratch disks.

Storage is a dict of fixed-size chunks; a chunk that was never written (or was
discarded whole) does not exist and reads as zeros, so a "1 TiB" test disk
costs only what is written to it.  ``extents`` reports chunk granularity.

ZeroDevice: a read-only blank disk of any size that costs nothing (the base
of a user disk's first layer).
"""

from __future__ import annotations

import errno
import threading

from mobinux.storage.device import SECTOR, WouldBlock, check_range, merge_extents

CHUNK = 64 * 1024


class MemoryDevice:
    """A sparse RAM disk.

    ``nowait_would_block=True`` makes every nowait call raise WouldBlock, so
    callers can exercise their retry-in-a-thread path without a real disk.
    """

    def __init__(
        self, size: int, *, readonly: bool = False, nowait_would_block: bool = False
    ) -> None:
        if size < 0 or size % SECTOR:
            raise ValueError(f"size {size} is not a non-negative multiple of {SECTOR}")
        self._size = size
        self._readonly = readonly
        self.nowait_would_block = nowait_would_block
        self._chunks: dict[int, bytearray] = {}
        # Only chunk creation/removal is locked; copies in and out of an existing
        # chunk are plain slice assignments.
        self._lock = threading.Lock()
        self.flush_count = 0
        self.closed = False

    def __repr__(self) -> str:
        return f"MemoryDevice({self._size}, readonly={self._readonly})"

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self._readonly

    def _check_write(self, offset: int, length: int) -> None:
        if self._readonly:
            raise OSError(errno.EROFS, "device is read-only")
        check_range(self._size, offset, length)

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        check_range(self._size, offset, len(buf))
        if nowait and self.nowait_would_block:
            raise WouldBlock
        pos = 0
        length = len(buf)
        while pos < length:
            idx, within = divmod(offset + pos, CHUNK)
            n = min(CHUNK - within, length - pos)
            chunk = self._chunks.get(idx)
            if chunk is None:
                buf[pos : pos + n] = bytes(n)
            else:
                buf[pos : pos + n] = chunk[within : within + n]
            pos += n

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None:
        mv = memoryview(data).cast("B")
        self._check_write(offset, len(mv))
        if nowait and self.nowait_would_block:
            raise WouldBlock
        pos = 0
        length = len(mv)
        while pos < length:
            idx, within = divmod(offset + pos, CHUNK)
            n = min(CHUNK - within, length - pos)
            chunk = self._chunks.get(idx)
            if chunk is None:
                with self._lock:
                    chunk = self._chunks.setdefault(idx, bytearray(CHUNK))
            chunk[within : within + n] = mv[pos : pos + n]
            pos += n

    def flush(self) -> None:
        self.flush_count += 1

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        end = offset + length
        pos = offset
        while pos < end:
            idx, within = divmod(pos, CHUNK)
            n = min(CHUNK - within, end - pos)
            if n == CHUNK:
                with self._lock:
                    self._chunks.pop(idx, None)
            else:
                chunk = self._chunks.get(idx)
                if chunk is not None:
                    chunk[within : within + n] = bytes(n)
            pos += n

    def write_zeroes(self, offset: int, length: int) -> None:
        self.discard(offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        check_range(self._size, offset, length)
        end = offset + length
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            idx, within = divmod(pos, CHUNK)
            n = min(CHUNK - within, end - pos)
            runs.append((pos, n, idx in self._chunks))
            pos += n
        return merge_extents(runs)

    def close(self) -> None:
        self.closed = True


class ZeroDevice:
    """A read-only device of *size* bytes that reads zeros and holds nothing: a blank disk."""

    def __init__(self, size: int) -> None:
        if size < 0 or size % SECTOR:
            raise ValueError(f"size {size} is not a non-negative multiple of {SECTOR}")
        self._size = size

    def __repr__(self) -> str:
        return f"ZeroDevice({self._size})"

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return True

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        check_range(self._size, offset, len(buf))
        pos = 0
        while pos < len(buf):
            n = min(len(_ZEROS), len(buf) - pos)
            buf[pos : pos + n] = _ZEROS[:n]
            pos += n

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None:
        raise OSError(errno.EROFS, "a blank disk is read-only")

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        raise OSError(errno.EROFS, "a blank disk is read-only")

    def write_zeroes(self, offset: int, length: int) -> None:
        raise OSError(errno.EROFS, "a blank disk is read-only")

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        check_range(self._size, offset, length)
        return [(offset, length, False)] if length else []

    def close(self) -> None:
        pass


_ZEROS = bytes(1 << 20)
