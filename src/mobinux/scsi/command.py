"""The per-command context handed to handlers, and the result they return."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ScsiResult:
    """What ``ScsiTarget.execute`` returns.

    ``data`` is the data-in, already cut to the CDB's allocation or transfer
    length (it may be a memoryview into the buffer the caller lent).  ``sense``
    is set when ``status`` is CHECK CONDITION.
    """

    status: int
    data: bytes | bytearray | memoryview
    sense: bytes = b""


EMPTY = b""


@dataclass(slots=True)
class Command:
    """One command as a handler sees it (the CDB is already validated against the table)."""

    cdb: bytes
    data_out: memoryview
    nexus: str
    nowait: bool
    buffer: bytearray | None
    # A piece after the first of a READ split by ScsiTarget.split_read: the
    # command was admitted by its first piece (unit attention, reservations).
    continued: bool = False

    def data_in_buffer(self, length: int) -> memoryview:
        """A writable view of *length* bytes: the lent buffer if it is big enough."""
        buf = self.buffer
        if buf is not None and len(buf) >= length:
            return memoryview(buf)[:length]
        return memoryview(bytearray(length))


def good(data: bytes | bytearray | memoryview = EMPTY, alloc: int | None = None) -> ScsiResult:
    """GOOD status with *data* cut to the allocation length (SPC-4 4.2.5.6)."""
    if alloc is not None and len(data) > alloc:
        data = data[:alloc]
    return ScsiResult(0, data)
