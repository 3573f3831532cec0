"""VolatileCacheDevice: a write-back cache that can lose power.

It stands in front of another BlockDevice the way a disk's volatile write
cache stands in front of its media: writes land in the cache and reach the
inner device only on :meth:`flush`.  :meth:`power_cut` throws away everything
not yet flushed, as a power loss would.  Durability tests use it to prove that
data acknowledged by SYNCHRONIZE CACHE or a FUA write survives a power cut,
and that data never synced may be lost.

Granularity is one 512-byte sector; this device is for tests and is not fast.
"""

from __future__ import annotations

import errno
import threading

from mobinux.storage.device import SECTOR, BlockDevice, WouldBlock, check_range, merge_extents

_ZERO_SECTOR = bytes(SECTOR)


class VolatileCacheDevice:
    def __init__(self, inner: BlockDevice) -> None:
        self._inner = inner
        # sector number -> its cached contents, or None for "discarded" (reads
        # zeros; on flush the inner device gets a discard for it).
        self._dirty: dict[int, bytes | None] = {}
        self._lock = threading.Lock()
        self.nowait_would_block = False

    @property
    def inner(self) -> BlockDevice:
        return self._inner

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def readonly(self) -> bool:
        return self._inner.readonly

    @property
    def dirty_bytes(self) -> int:
        """Bytes written but not yet flushed (what a power cut would lose)."""
        with self._lock:
            return len(self._dirty) * SECTOR

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        check_range(self.size, offset, len(buf))
        if nowait and self.nowait_would_block:
            raise WouldBlock
        if offset % SECTOR or len(buf) % SECTOR:
            # Unaligned request: go through an aligned bounce buffer.
            start = offset - offset % SECTOR
            end = -(-(offset + len(buf)) // SECTOR) * SECTOR
            bounce = bytearray(end - start)
            self.read_into(start, memoryview(bounce), nowait=nowait)
            buf[:] = bounce[offset - start : offset - start + len(buf)]
            return
        self._inner.read_into(offset, buf, nowait=nowait)
        with self._lock:
            if not self._dirty:
                return
            first = offset // SECTOR
            for i in range(len(buf) // SECTOR):
                if (first + i) in self._dirty:
                    cached = self._dirty[first + i]
                    buf[i * SECTOR : (i + 1) * SECTOR] = _ZERO_SECTOR if cached is None else cached

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None:
        mv = memoryview(data).cast("B")
        if self.readonly:
            raise OSError(errno.EROFS, "device is read-only")
        check_range(self.size, offset, len(mv))
        if nowait and self.nowait_would_block:
            raise WouldBlock
        if offset % SECTOR or len(mv) % SECTOR:
            start = offset - offset % SECTOR
            end = -(-(offset + len(mv)) // SECTOR) * SECTOR
            bounce = bytearray(end - start)
            self.read_into(start, memoryview(bounce))
            bounce[offset - start : offset - start + len(mv)] = mv
            mv = memoryview(bounce)
            offset = start
        first = offset // SECTOR
        with self._lock:
            for i in range(len(mv) // SECTOR):
                self._dirty[first + i] = bytes(mv[i * SECTOR : (i + 1) * SECTOR])

    def _mark_zero(self, offset: int, length: int, *, discard: bool) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "device is read-only")
        check_range(self.size, offset, length)
        if offset % SECTOR or length % SECTOR:
            self.write(offset, bytes(length))
            return
        first = offset // SECTOR
        with self._lock:
            for i in range(length // SECTOR):
                self._dirty[first + i] = None if discard else _ZERO_SECTOR

    def discard(self, offset: int, length: int) -> None:
        self._mark_zero(offset, length, discard=True)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._mark_zero(offset, length, discard=False)

    def flush(self) -> None:
        """Write every cached sector to the inner device, then flush it."""
        with self._lock:
            pending = sorted(self._dirty.items())
            # Push runs of adjacent sectors of the same kind in one call each.
            i = 0
            while i < len(pending):
                sector, content = pending[i]
                j = i + 1
                while (
                    j < len(pending)
                    and pending[j][0] == sector + (j - i)
                    and (pending[j][1] is None) == (content is None)
                ):
                    j += 1
                offset = sector * SECTOR
                if content is None:
                    self._inner.discard(offset, (j - i) * SECTOR)
                else:
                    self._inner.write(offset, b"".join(c or b"" for _, c in pending[i:j]))
                i = j
            self._inner.flush()
            self._dirty.clear()

    def power_cut(self) -> None:
        """Lose every write not yet flushed."""
        with self._lock:
            self._dirty.clear()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        base = self._inner.extents(offset, length)
        with self._lock:
            if not self._dirty:
                return base
            dirty = dict(self._dirty)
        runs: list[tuple[int, int, bool]] = []
        for off, ln, mapped in base:
            pos = off
            while pos < off + ln:
                sector = pos // SECTOR
                n = min(SECTOR - pos % SECTOR, off + ln - pos)
                state = mapped
                if sector in dirty:
                    state = dirty[sector] is not None
                runs.append((pos, n, state))
                pos += n
        return merge_extents(runs)

    def close(self) -> None:
        self._inner.close()
