"""Read an overlay's flushed state without opening it for writing.

:meth:`Overlay.open <mobinux.storage.overlay.Overlay.open>` recovers and
rewrites the metadata (a new checkpoint, leftovers removed), which only the
process serving the overlay may do. ``mobinux image commit`` runs in another
process while the server may hold the overlay open, so it reads the files
as they are: the checkpoint, then the journal's valid records, exactly as
:meth:`Overlay.open` replays them (a torn tail is ignored). What it sees is
the state of the last completed flush, or later; writes never flushed are
not part of it, as after a power cut.

The server may compact (replace ``meta`` and the journal) while we read; a
checkpoint naming files that are gone, or a journal of another epoch, means
exactly that, and the read is retried.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from mobinux.storage.overlay import (
    BASE,
    DATA,
    META,
    ZERO,
    _data_name,
    _decode_checkpoint,
    _journal_name,
    _replay_journal,
)

__all__ = ["BASE", "DATA", "ZERO", "OverlayMap", "read_overlay_map"]

_ATTEMPTS = 20


@dataclass(frozen=True)
class OverlayMap:
    """The chunk states of an overlay and the open data file they refer to."""

    chunk_size: int
    base_size: int
    states: bytes  # one of BASE / ZERO / DATA per chunk
    data_fd: int  # the data file of the generation the states belong to (caller closes)

    def runs(self, state: int) -> list[tuple[int, int]]:
        """(first chunk, count) of each run of chunks in *state*."""
        out: list[tuple[int, int]] = []
        states = self.states
        i, n = 0, len(states)
        while i < n:
            if states[i] != state:
                i += 1
                continue
            j = i
            while j < n and states[j] == state:
                j += 1
            out.append((i, j - i))
            i = j
        return out

    def close(self) -> None:
        os.close(self.data_fd)


def read_overlay_map(directory: Path) -> OverlayMap:
    """The overlay's flushed state. FileNotFoundError if *directory* holds no overlay."""
    last: OSError | None = None
    for _ in range(_ATTEMPTS):
        try:
            blob = (directory / META).read_bytes()
            cp = _decode_checkpoint(blob)
            # Open the data file first: once we hold it, a reset that unlinks it
            # cannot take the bytes our map refers to away from us.
            fd = os.open(directory / _data_name(cp.generation), os.O_RDONLY | os.O_CLOEXEC)
            try:
                journal = (directory / _journal_name(cp.generation, cp.epoch)).read_bytes()
                nchunks = -(-cp.base_size // cp.chunk_size)
                states = bytearray(nchunks) if cp.states is None else bytearray(cp.states)
                _replay_journal(journal, cp.generation, cp.epoch, states)
                if (directory / META).read_bytes() != blob:
                    raise OSError(errno.EAGAIN, "the overlay changed while it was read")
            except BaseException:
                os.close(fd)
                raise
            return OverlayMap(cp.chunk_size, cp.base_size, bytes(states), fd)
        except FileNotFoundError as exc:
            if not (directory / META).exists():
                raise
            last = exc  # compacted under us: read again
        except OSError as exc:
            last = exc
    assert last is not None
    raise last
