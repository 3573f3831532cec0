"""The BlockDevice contract every storage backend implements.

Offsets and lengths are in bytes.  Devices are addressed in 512-byte units by
the layers above, but nothing here depends on that beyond ``size`` being a
multiple of 512.  Errors are reported as :class:`OSError` (with ``errno`` set
as the operating system would, e.g. ``ENOSPC`` when a sparse file cannot grow);
the SCSI layer translates them into sense data once, at its boundary.  Nothing
in this package knows SCSI.

Thread safety: implementations must allow concurrent ``read_into``/``write``
calls from several threads on disjoint or overlapping ranges (the result of
overlapping concurrent writes is one of the writes, as on a real disk).
"""

from __future__ import annotations

import errno
from typing import Protocol

SECTOR = 512
"""The unit ``size`` is a multiple of."""


class WouldBlock(Exception):
    """A nowait I/O could not finish without blocking.

    The caller re-runs the whole command with nowait=False in a thread.
    """


class BlockDevice(Protocol):
    @property
    def size(self) -> int:
        """Size in bytes, a multiple of 512."""
        ...

    @property
    def readonly(self) -> bool: ...

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        """Fill *buf* completely from *offset*; holes (and past-EOF of a sparse file) read as zeros.

        With ``nowait=True`` the call either completes without blocking on disk I/O
        or raises :class:`WouldBlock` (possibly after filling part of *buf*).
        """
        ...

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None:
        """Write all of *data* at *offset*.

        With ``nowait=True`` may raise :class:`WouldBlock` after writing part of
        the data; re-running the same write is harmless.
        """
        ...

    def flush(self) -> None:
        """Make everything written so far durable (fdatasync)."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Deallocate the range if possible; later reads return zeros either way."""
        ...

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros (allocation state is up to the device)."""
        ...

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, mapped)`` runs covering exactly ``[offset, offset+length)``."""
        ...

    def close(self) -> None: ...


def check_range(size: int, offset: int, length: int) -> None:
    """Raise ``OSError(EINVAL)`` unless ``[offset, offset+length)`` lies within the device.

    The SCSI layer checks LBA ranges itself; this is the backstop that keeps a
    bug above from writing past the end of a file (which would grow it).
    """
    if offset < 0 or length < 0 or offset + length > size:
        raise OSError(errno.EINVAL, f"range {offset}+{length} outside device of {size} bytes")


def merge_extents(runs: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """Join adjacent runs with the same mapped state and drop empty runs."""
    out: list[tuple[int, int, bool]] = []
    for off, length, mapped in runs:
        if length <= 0:
            continue
        if out and out[-1][2] == mapped and out[-1][0] + out[-1][1] == off:
            prev = out[-1]
            out[-1] = (prev[0], prev[1] + length, mapped)
        else:
            out.append((off, length, mapped))
    return out
