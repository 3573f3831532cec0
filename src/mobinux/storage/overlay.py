"""Overlay: a client's private copy-on-write layer over a shared read-only base.

Every node writes to its own overlay; the base image is shared by all and is
never written (the overlay only ever calls ``read_into`` and ``extents`` on
it).  An :class:`Overlay` is itself a :class:`~mobinux.storage.device.
BlockDevice`, so the SCSI layer and the iSCSI target use it unchanged.

Chunks
======

The device is cut into chunks of ``chunk_size`` bytes (64 KiB by default, a
power of two; the last chunk may be shorter).  Each chunk is in one of three
states, one byte per chunk in memory (a 2 GiB image: 32 KiB per overlay):

``BASE`` (0)
    the overlay holds nothing: reads fall through to the base;
``ZERO`` (1)
    the chunk was discarded or zeroed whole (UNMAP, WRITE SAME): it reads as
    zeros, never as base data, and costs no space;
``DATA`` (2)
    the chunk's bytes live in the overlay's data file.

The first write to a ``BASE`` or ``ZERO`` chunk *copies it up*: the rest of the
chunk is read from the base (or taken as zeros) and the whole chunk is written
to the data file before the chunk becomes ``DATA``, so writes of any size and
alignment are correct.  Discarding or zeroing part of a chunk writes zeros (a
``BASE`` chunk is copied up with zeros in the range); discarding whole chunks
makes them ``ZERO`` and punches their holes in the data file.

The data file is *direct-mapped*: chunk ``i`` lives at offset
``i * chunk_size`` of a sparse file as large as the base, so it costs only
what was copied up, needs no allocation table, and a chunk's place never
changes.  :attr:`Overlay.allocated_bytes` counts the ``DATA`` chunks (what
``mobinux node show --json`` reports as ``overlay_bytes``); ``limit`` caps it.

On-disk format
==============

All integers little-endian; every CRC is zlib's CRC-32 of the bytes before it.
An overlay directory holds the files of exactly one overlay::

    meta                      the checkpoint (replaced atomically by rename)
    data.<G>                  sparse data file of generation G
    journal.<G>.<E>           chunk-state journal of generation G, epoch E
    meta.tmp                  a checkpoint being written (ignored, removed)

Any other ``data.*``/``journal.*``/``meta.tmp`` is left over from an
interrupted reset or compaction and is removed by :meth:`Overlay.open`.

``meta`` (48-byte header, payload, CRC)::

    0   8  magic b"MBXOVMAP"
    8   4  version (1)
    12  4  chunk size
    16  8  base size in bytes
    24  8  generation G (names data.<G>)
    32  8  epoch E (names journal.<G>.<E>)
    40  4  flags: bit 0 = "every chunk is BASE" (no payload)
    44  4  payload length n
    48  n  zlib-compressed chunk-state map (one byte per chunk)
    48+n 4 CRC

``journal.<G>.<E>``: a 32-byte header, then records appended at each flush::

    header: 0 8 magic b"MBXOVJNL" | 8 4 version | 12 8 G | 20 8 E | 28 4 CRC
    record: 0 4 magic b"JREC" | 4 4 record length L | 8 8 sequence (1, 2, ...)
            | 16 4 run count k | 20 17*k runs (start u64, count u64, state u8)
            | L-4 4 CRC

The state of the overlay is the checkpoint's map with the journal's records
applied in order.  Replay stops at the first record that is short, has a bad
magic or CRC, or is not the next sequence number: that is a write torn by a
crash, and it (with anything after it) is ignored.  A record whose CRC is good
but whose contents are impossible is corruption and refuses the open.  Open
then fdatasyncs the data file (what a killed process left in the page cache)
and *compacts*: it writes the recovered map as a new checkpoint with a new
epoch, so what it recovered is durable and nothing is ever appended after a
torn tail.  (If the directory is too full for that, open fsyncs the journal
it replayed instead, still succeeds, and the first flush writes the
checkpoint.)  Before it removes anything, open fsyncs the directory: the
``meta`` it read may have been renamed into place by a process that died (or
whose directory fsync failed) before making that durable, and an older
``meta`` must not come back once the files it names are gone, nor after
contents it does not have were served.  Flush compacts too when the journal
has grown past ``COMPACT_MIN`` and twice its checkpoint, when pending changes
pile up past 65536 runs without a flush, and after any failed metadata write.
Epoch and generation numbers only grow, so a name a failed attempt may have
left is never reused.

Why it is crash safe
====================

The invariant: *a chunk is ``DATA`` on disk only if its bytes were durable
before that state became durable*, and the data file of a generation is only
ever read through a map of the same generation.

* Copy-up writes the chunk's data first and changes the chunk's state in
  memory only afterwards.  :meth:`Overlay.flush` takes the state changes made
  so far, *then* fdatasyncs the data file (so every change it took has its
  data durable), *then* appends them to the journal and fsyncs it.  A flush
  that returns has made every write acknowledged before it durable and
  visible; a crash before that leaves the old map, which reads base, zeros or
  the chunk's earlier (durable) contents.  Unflushed writes may be lost.
* Discard punches the hole before marking chunks ``ZERO``; if only the punch
  survives, a chunk still ``DATA`` on disk reads zeros, which is what the
  discard promised anyway.
* The checkpoint is written to ``meta.tmp``, fsynced, renamed over ``meta``,
  and the directory fsynced, so ``meta`` is always a complete old or a
  complete new checkpoint.  A new journal (with its header fsynced) and a new
  data file (created as a hole, its size fsynced) are made *before* the
  checkpoint naming them, and the same directory fsync makes their names
  durable.  Old files are unlinked only after the new checkpoint is durable.
* Records carry a CRC and a sequence number, and nothing is appended after a
  failed append (flush compacts into a new journal file instead), so a torn
  append is detected and ignored and a stale tail can never be replayed.
* Reset creates generation G+1 (empty data file, empty journal, empty
  checkpoint) and only then unlinks generation G's files: O(1), it never
  reads or copies the base, and after a crash the overlay is either wholly
  the old one or wholly empty.
* Isolation: each overlay has its own directory and files; a fresh data file
  is a hole (reads zeros), and a chunk of it is read only when the map says
  ``DATA``, i.e. after this overlay wrote that chunk whole.  So a torn write
  can expose only this disk's own earlier contents, zeros or base data,
  never another client's or another disk's bytes.
* A failed fdatasync of the data file may have lost pages (the kernel marks
  them clean): the overlay then refuses every later flush (the same error)
  until it is reset, rather than acknowledge data it may have lost.

Space
=====

A copy-up reserves its chunk against ``limit`` before writing (a write
reserves all the chunks it needs at once, so a write refused by the limit
changes nothing) and raises ``OSError(ENOSPC)`` past it.  Discard and
write_zeroes first zero the whole chunks of their range (which never needs
space, so a full overlay can always be trimmed), then reserve the copy-ups of
the partial chunks at its ends.  A write the file
system refuses (``ENOSPC``/``EDQUOT``: the data directory is full) leaves the
chunk's state as it was and punches back the space the partial copy took; the
SCSI layer reports either as SPACE ALLOCATION FAILED WRITE PROTECT.  Writes
into ``DATA`` chunks never allocate (the chunk was written whole).

Layers
======

An overlay's base may be another overlay (a user disk is a chain of them,
:mod:`mobinux.storage.chain`).  Two calls support merging a layer away:
:meth:`Overlay.absorb_base` copies up (or marks ``ZERO``) the ``BASE`` chunks
of a range without changing what they read, and :meth:`Overlay.rebase` then
swaps the base for one that agrees with it everywhere else.  Nothing on disk
names the base, so the format above is unchanged.

Concurrency
===========

``read_into``/``write``/``discard``/``write_zeroes``/``extents`` may run
concurrently from several threads.  Data I/O never holds a lock; one short lock
guards the chunk map.  A chunk being copied up or punched is *busy*: other
state changes of it wait (in nowait mode they raise ``WouldBlock``), so two
first writes to one chunk never copy base data over each other.  Plain
writes into ``DATA`` chunks and all reads take no part in this: overlapping
concurrent commands end as one of them, as on a disk.  ``flush``, ``reset``
and ``close`` are serialized with each other; ``reset`` and ``close`` do not
wait for in-flight I/O (the old generation's files are closed when its last
I/O returns, and writes that race a reset land in the discarded generation).

With ``nowait=True``, reads and writes that touch only ``DATA`` chunks (or only
the base, for reads) pass ``nowait`` to the data file (or the base); anything
needing a copy-up raises :class:`~mobinux.storage.device.WouldBlock` before
changing anything, and the caller retries in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Final

from mobinux.storage.device import (
    SECTOR,
    BlockDevice,
    WouldBlock,
    check_range,
    merge_extents,
)
from mobinux.storage.overlay_dir import DataFile, MetaFile, OverlayDir, PosixDir

BASE: Final = 0
ZERO: Final = 1
DATA: Final = 2

MAX_CHUNK: Final = 1 << 24
VERSION: Final = 1
META: Final = "meta"
META_TMP: Final = "meta.tmp"
_META_MAGIC: Final = b"MBXOVMAP"
_META_HEADER = struct.Struct("<8sIIQQQII")
_FLAG_EMPTY: Final = 1
_JOURNAL_MAGIC: Final = b"MBXOVJNL"
_JOURNAL_HEADER = struct.Struct("<8sIQQ")
_JOURNAL_HEADER_LEN: Final = _JOURNAL_HEADER.size + 4
_RECORD_MAGIC: Final = b"JREC"
_RECORD_HEADER = struct.Struct("<4sIQI")
_RUN = struct.Struct("<QQB")
_CRC = struct.Struct("<I")

_DATA_RUNS = re.compile(rb"\x02+")
_NONBASE_RUNS = re.compile(rb"[\x01\x02]+")
_OWN_FILE = re.compile(r"^(meta\.tmp|data\.\d+|journal\.\d+\.\d+)$")

_ZEROS = bytes(1 << 20)
_MAX_PENDING_RUNS = 1 << 16  # past this, the next flush writes a checkpoint instead
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _data_name(generation: int) -> str:
    return f"data.{generation}"


def _journal_name(generation: int, epoch: int) -> str:
    return f"journal.{generation}.{epoch}"


def _corrupt(what: str) -> OSError:
    return OSError(errno.EIO, f"corrupt overlay metadata: {what}")


def _zero_fill(view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        n = min(len(_ZEROS), len(view) - pos)
        view[pos : pos + n] = _ZEROS[:n]
        pos += n


# -- on-disk encoding ---------------------------------------------------------


@dataclass(frozen=True)
class _Checkpoint:
    chunk_size: int
    base_size: int
    generation: int
    epoch: int
    states: bytes | None  # None: every chunk is BASE


def _encode_checkpoint(cp: _Checkpoint) -> bytes:
    empty = cp.states is None or cp.states.count(BASE) == len(cp.states)
    payload = b"" if empty or cp.states is None else zlib.compress(cp.states, 1)
    header = _META_HEADER.pack(
        _META_MAGIC,
        VERSION,
        cp.chunk_size,
        cp.base_size,
        cp.generation,
        cp.epoch,
        _FLAG_EMPTY if empty else 0,
        len(payload),
    )
    blob = header + payload
    return blob + _CRC.pack(zlib.crc32(blob))


def _decode_checkpoint(blob: bytes) -> _Checkpoint:
    hlen = _META_HEADER.size
    if len(blob) < hlen + 4:
        raise _corrupt("checkpoint is short")
    magic, version, chunk_size, base_size, generation, epoch, flags, plen = (
        _META_HEADER.unpack_from(blob)
    )
    if magic != _META_MAGIC:
        raise _corrupt("not an overlay checkpoint")
    if version != VERSION:
        raise OSError(errno.EINVAL, f"overlay format version {version} is not supported")
    if len(blob) != hlen + plen + 4:
        raise _corrupt("checkpoint length")
    (crc,) = _CRC.unpack_from(blob, hlen + plen)
    if crc != zlib.crc32(blob[: hlen + plen]):
        raise _corrupt("checkpoint CRC")
    if chunk_size < SECTOR or chunk_size & (chunk_size - 1) or chunk_size > MAX_CHUNK:
        raise _corrupt(f"chunk size {chunk_size}")
    nchunks = -(-base_size // chunk_size)
    states: bytes | None = None
    if not flags & _FLAG_EMPTY:
        try:
            d = zlib.decompressobj()
            states = d.decompress(blob[hlen : hlen + plen], nchunks + 1)
        except zlib.error:
            raise _corrupt("checkpoint map") from None
        if len(states) != nchunks or not d.eof or states.translate(None, b"\0\1\2"):
            raise _corrupt("checkpoint map")
    return _Checkpoint(chunk_size, base_size, generation, epoch, states)


def _encode_journal_header(generation: int, epoch: int) -> bytes:
    header = _JOURNAL_HEADER.pack(_JOURNAL_MAGIC, VERSION, generation, epoch)
    return header + _CRC.pack(zlib.crc32(header))


def _encode_record(seq: int, runs: list[list[int]]) -> bytes:
    length = _RECORD_HEADER.size + _RUN.size * len(runs) + 4
    parts = [_RECORD_HEADER.pack(_RECORD_MAGIC, length, seq, len(runs))]
    parts.extend(_RUN.pack(start, count, state) for start, count, state in runs)
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def _replay_journal(blob: bytes, generation: int, epoch: int, states: bytearray) -> tuple[int, int]:
    """Apply the journal's valid records to *states*; return (valid length, last sequence)."""
    if len(blob) < _JOURNAL_HEADER_LEN:
        raise _corrupt("journal header is short")
    magic, version, gen, ep = _JOURNAL_HEADER.unpack_from(blob)
    (crc,) = _CRC.unpack_from(blob, _JOURNAL_HEADER.size)
    if crc != zlib.crc32(blob[: _JOURNAL_HEADER.size]) or magic != _JOURNAL_MAGIC:
        raise _corrupt("journal header")
    if (version, gen, ep) != (VERSION, generation, epoch):
        raise _corrupt("journal does not belong to this checkpoint")
    pos = _JOURNAL_HEADER_LEN
    seq = 0
    nchunks = len(states)
    while pos + _RECORD_HEADER.size + 4 <= len(blob):
        magic, length, rseq, count = _RECORD_HEADER.unpack_from(blob, pos)
        if magic != _RECORD_MAGIC or length < _RECORD_HEADER.size + 4:
            break
        if pos + length > len(blob):
            break  # torn: the end of the record never reached the disk
        (crc,) = _CRC.unpack_from(blob, pos + length - 4)
        if crc != zlib.crc32(blob[pos : pos + length - 4]) or rseq != seq + 1:
            break
        if length != _RECORD_HEADER.size + _RUN.size * count + 4:
            raise _corrupt("journal record length")
        at = pos + _RECORD_HEADER.size
        for _ in range(count):
            start, n, state = _RUN.unpack_from(blob, at)
            at += _RUN.size
            if state not in (ZERO, DATA) or n == 0 or start + n > nchunks:
                raise _corrupt("journal record")
            states[start : start + n] = bytes((state,)) * n
        seq = rseq
        pos += length
    return pos, seq


# -- the overlay --------------------------------------------------------------


@dataclass(eq=False)
class _Generation:
    """One life of the overlay between resets: its data file, map and journal."""

    number: int
    data: DataFile
    states: bytearray
    allocated: int  # bytes in DATA chunks
    epoch: int
    journal: MetaFile
    journal_len: int
    journal_seq: int
    checkpoint_len: int
    # State changes not yet flushed, oldest first: [start, count, state] runs.
    pending: list[list[int]] = field(default_factory=list)
    need_checkpoint: bool = False  # the next flush writes a checkpoint, not a record
    busy: list[tuple[int, int]] = field(default_factory=list)  # [first, end) chunk ranges
    reserved: int = 0  # bytes reserved against the limit by copy-ups in progress
    refs: int = 0  # I/O calls in progress
    retired: bool = False
    closed: bool = False
    failed: OSError | None = None  # a failed fdatasync: flushes refuse until reset


class _Reservation:
    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


def _as_dir(directory: str | os.PathLike[str] | OverlayDir) -> OverlayDir:
    if isinstance(directory, str | os.PathLike):
        return PosixDir(directory)
    return directory


class Overlay:
    """A copy-on-write BlockDevice over *base*, with crash-safe metadata in a directory.

    Build one with :meth:`create` or :meth:`open`.  The base is borrowed: it is
    never written and :meth:`close` does not close it (many overlays share it).
    """

    COMPACT_MIN = 1 << 20
    """Journal bytes past which (and past twice the checkpoint) flush compacts."""

    def __init__(
        self,
        base: BlockDevice,
        files: OverlayDir,
        *,
        chunk_size: int,
        limit: int | None,
        gen: _Generation,
        next_generation: int,
        next_epoch: int,
    ) -> None:
        """Internal: use :meth:`create` or :meth:`open`."""
        self._base = base
        self._files = files
        self._size = base.size
        self._chunk_size = chunk_size
        self._nchunks = -(-self._size // chunk_size)
        self._limit = limit
        self._gen: _Generation | None = gen
        self._next_generation = next_generation
        self._next_epoch = next_epoch
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._meta_lock = threading.Lock()  # flush, reset, close

    # -- construction --------------------------------------------------------

    @classmethod
    def create(
        cls,
        base: BlockDevice,
        directory: str | os.PathLike[str] | OverlayDir,
        *,
        chunk_size: int = 65536,
        limit: int | None = None,
    ) -> Overlay:
        """Start an empty overlay of *base* in *directory* (FileExistsError if one is there)."""
        if chunk_size < SECTOR or chunk_size & (chunk_size - 1) or chunk_size > MAX_CHUNK:
            raise ValueError(f"chunk size {chunk_size} is not a power of two in [512, 16 MiB]")
        if base.size % SECTOR:
            raise ValueError(f"base size {base.size} is not a multiple of {SECTOR}")
        _check_limit(limit)
        files = _as_dir(directory)
        names = files.listdir()
        if META in names:
            raise FileExistsError(errno.EEXIST, "an overlay already exists", META)
        for name in names:  # leftovers of an interrupted create
            if _OWN_FILE.match(name):
                files.unlink(name)
        files.create_data(_data_name(1), base.size)
        journal = _new_journal(files, 1, 1)
        try:
            cp_len = _write_checkpoint(files, _Checkpoint(chunk_size, base.size, 1, 1, None))
            data = files.open_data(_data_name(1))
        except BaseException:
            journal.close()
            raise
        nchunks = -(-base.size // chunk_size)
        gen = _Generation(
            number=1,
            data=data,
            states=bytearray(nchunks),
            allocated=0,
            epoch=1,
            journal=journal,
            journal_len=_JOURNAL_HEADER_LEN,
            journal_seq=0,
            checkpoint_len=cp_len,
        )
        return cls(
            base,
            files,
            chunk_size=chunk_size,
            limit=limit,
            gen=gen,
            next_generation=2,
            next_epoch=2,
        )

    @classmethod
    def open(
        cls,
        base: BlockDevice,
        directory: str | os.PathLike[str] | OverlayDir,
        *,
        limit: int | None = None,
    ) -> Overlay:
        """Open the overlay in *directory* after a close, a restart or a crash.

        Recovers the state of the last completed flush (or later), makes it
        durable in a fresh checkpoint, and removes files left over by an
        interrupted reset or compaction.  FileNotFoundError if there is no
        overlay; ValueError if it was made over a base of another size.
        """
        _check_limit(limit)
        files = _as_dir(directory)
        cp = _decode_checkpoint(files.read(META))
        if cp.base_size != base.size:
            raise ValueError(
                f"overlay was made over a base of {cp.base_size} bytes, not {base.size}"
            )
        nchunks = -(-cp.base_size // cp.chunk_size)
        states = bytearray(nchunks) if cp.states is None else bytearray(cp.states)
        journal_name = _journal_name(cp.generation, cp.epoch)
        try:
            blob = files.read(journal_name)
        except FileNotFoundError:
            raise _corrupt(f"{journal_name} is missing") from None
        valid_len, seq = _replay_journal(blob, cp.generation, cp.epoch, states)

        # A killed process may have renamed this checkpoint into place without
        # the directory fsync (it failed, or the kill came first).  Make it
        # durable before removing the files an older checkpoint names, and
        # before serving what it says: else a power loss could bring back the
        # older one -- naming deleted files, or contents we no longer show.
        files.sync()
        keep = {META, _data_name(cp.generation), journal_name}
        for name in files.listdir():
            if _OWN_FILE.match(name) and name not in keep:
                files.unlink(name)
        data_name = _data_name(cp.generation)
        try:
            data = files.open_data(data_name)
        except FileNotFoundError:
            raise _corrupt(f"{data_name} is missing") from None
        try:
            # What a killed process left in the page cache becomes durable
            # before the recovered map is written again as the new checkpoint.
            data.flush()
            new_epoch = cp.epoch + 1
            journal: MetaFile | None = None
            cp_len = 0
            try:
                journal = _new_journal(files, cp.generation, new_epoch)
                cp_len = _write_checkpoint(
                    files,
                    _Checkpoint(
                        cp.chunk_size, cp.base_size, cp.generation, new_epoch, bytes(states)
                    ),
                )
            except OSError as exc:
                if journal is not None:
                    journal.close()
                    journal = None
                if exc.errno not in _SPACE_ERRNOS:
                    raise
            except BaseException:
                if journal is not None:
                    journal.close()
                raise
            if journal is not None:
                epoch, journal_len, seq, need_checkpoint = new_epoch, _JOURNAL_HEADER_LEN, 0, False
                with contextlib.suppress(OSError):
                    files.unlink(journal_name)
            else:
                # The directory is full: open anyway.  The next flush writes a
                # checkpoint (with a new epoch) before anything else, so the
                # replayed journal is never appended to after its torn tail.
                journal = files.open_meta(journal_name)
                # What we recovered must be durable before anyone reads it: the
                # killed process may have appended records whose fsync failed
                # (its flush reported the error), and without a new checkpoint
                # only this journal holds them.  (If the failure above came
                # after the rename, the new checkpoint holds the same map.)
                try:
                    journal.sync()
                except BaseException:
                    journal.close()
                    raise
                epoch, journal_len, need_checkpoint = cp.epoch, valid_len, True
                cp_len = len(blob)
        except BaseException:
            data.close()
            raise
        allocated = _allocated_bytes(states, cp.chunk_size, cp.base_size)
        gen = _Generation(
            number=cp.generation,
            data=data,
            states=states,
            allocated=allocated,
            epoch=epoch,
            journal=journal,
            journal_len=journal_len,
            journal_seq=seq,
            checkpoint_len=cp_len,
            need_checkpoint=need_checkpoint,
        )
        return cls(
            base,
            files,
            chunk_size=cp.chunk_size,
            limit=limit,
            gen=gen,
            next_generation=cp.generation + 1,
            next_epoch=cp.epoch + 2,
        )

    def __repr__(self) -> str:
        return f"Overlay({self._base!r}, {self._files!r})"

    # -- properties ----------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return False

    @property
    def chunk_size(self) -> int:
        """Copy-up granularity; also the useful UNMAP granularity."""
        return self._chunk_size

    @property
    def base(self) -> BlockDevice:
        return self._base

    @property
    def limit(self) -> int | None:
        return self._limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        """A new cap; space already allocated beyond it stays (writes into it still work)."""
        _check_limit(value)
        self._limit = value

    @property
    def allocated_bytes(self) -> int:
        """Bytes the overlay holds for written chunks (flushed or not); 0 once closed."""
        gen = self._gen
        return 0 if gen is None else gen.allocated

    @property
    def generation(self) -> int:
        """Bumped by every reset (names the data file)."""
        gen = self._gen
        return 0 if gen is None else gen.number

    @property
    def closed(self) -> bool:
        return self._gen is None

    def chunk_states(self) -> bytes:
        """The chunk map as it is now: one of BASE/ZERO/DATA per chunk (flushed or not)."""
        gen = self._enter()
        try:
            with self._lock:
                return bytes(gen.states)
        finally:
            self._leave(gen)

    # -- helpers -------------------------------------------------------------

    def _enter(self) -> _Generation:
        with self._lock:
            gen = self._gen
            if gen is None:
                raise OSError(errno.EBADF, "overlay is closed")
            gen.refs += 1
            return gen

    def _leave(self, gen: _Generation) -> None:
        with self._lock:
            gen.refs -= 1
            close_now = gen.retired and gen.refs == 0 and not gen.closed
            if close_now:
                gen.closed = True
        if close_now:
            _close_generation(gen)

    def _chunk_end(self, chunk: int) -> int:
        return min((chunk + 1) * self._chunk_size, self._size)

    def _run_end(self, states: bytearray, chunk: int, last: int) -> int:
        """The first chunk after *chunk* (up to last + 1) in another state."""
        state = states[chunk]
        c = chunk + 1
        while c <= last and states[c] == state:
            c += 1
        return c

    def _busy(self, gen: _Generation, first: int, end: int) -> bool:
        return any(a < end and first < b for a, b in gen.busy)

    def _reserve(self, gen: _Generation, nbytes: int) -> None:
        """Reserve *nbytes* against the limit (lock held)."""
        limit = self._limit
        if limit is not None and gen.allocated + gen.reserved + nbytes > limit:
            raise OSError(
                errno.ENOSPC,
                f"overlay limit of {limit} bytes reached ({gen.allocated} allocated)",
            )
        gen.reserved += nbytes

    def _copy_size(self, states: bytearray, first: int, last: int) -> int:
        """Bytes a copy-up of every non-DATA chunk in [first, last] would allocate."""
        n = (last + 1 - first) - states.count(DATA, first, last + 1)
        if n == 0:
            return 0
        nbytes = n * self._chunk_size
        if last == self._nchunks - 1 and states[last] != DATA:
            nbytes -= (last + 1) * self._chunk_size - self._size
        return nbytes

    @staticmethod
    def _log(gen: _Generation, start: int, count: int, state: int) -> None:
        """Record a state change for the next flush (lock held)."""
        pending = gen.pending
        if pending and pending[-1][2] == state and pending[-1][0] + pending[-1][1] == start:
            pending[-1][1] += count
            return
        if len(pending) >= _MAX_PENDING_RUNS:
            pending.clear()  # the checkpoint will carry the whole map
            gen.need_checkpoint = True
        if not gen.need_checkpoint:
            pending.append([start, count, state])

    # -- data path -----------------------------------------------------------

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        length = len(buf)
        check_range(self._size, offset, length)
        if length == 0:
            return
        gen = self._enter()
        try:
            cs = self._chunk_size
            first, last = offset // cs, (offset + length - 1) // cs
            states = gen.states
            n = last + 1 - first
            if states.count(BASE, first, last + 1) == n:
                self._base.read_into(offset, buf, nowait=nowait)
                return
            if states.count(DATA, first, last + 1) == n:
                gen.data.read_into(offset, buf, nowait=nowait)
                return
            end = offset + length
            pos = offset
            while pos < end:
                c = pos // cs
                state = states[c]
                run_end = min(end, self._run_end(states, c, last) * cs)
                view = buf[pos - offset : run_end - offset]
                if state == DATA:
                    gen.data.read_into(pos, view, nowait=nowait)
                elif state == ZERO:
                    _zero_fill(view)
                else:
                    self._base.read_into(pos, view, nowait=nowait)
                pos = run_end
        finally:
            self._leave(gen)

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None:
        mv = memoryview(data).cast("B")
        length = len(mv)
        check_range(self._size, offset, length)
        if length == 0:
            return
        gen = self._enter()
        try:
            cs = self._chunk_size
            first, last = offset // cs, (offset + length - 1) // cs
            states = gen.states
            if states.count(DATA, first, last + 1) == last + 1 - first:
                gen.data.write(offset, mv, nowait=nowait)
                return
            if nowait:
                raise WouldBlock  # a copy-up reads the base and allocates
            with self._lock:
                res = _Reservation(self._copy_size(states, first, last))
                self._reserve(gen, res.left)
            try:
                end = offset + length
                pos = offset
                while pos < end:
                    c = pos // cs
                    if states[c] == DATA:
                        run_end = min(end, self._run_end(states, c, last) * cs)
                        gen.data.write(pos, mv[pos - offset : run_end - offset])
                    else:
                        run_end = min(end, self._chunk_end(c))
                        piece = mv[pos - offset : run_end - offset]
                        if not self._copy_up(gen, c, pos, piece, len(piece), res):
                            gen.data.write(pos, piece)
                    pos = run_end
            finally:
                if res.left:
                    with self._lock:
                        gen.reserved -= res.left
        finally:
            self._leave(gen)

    def _copy_up(
        self,
        gen: _Generation,
        c: int,
        pos: int,
        piece: memoryview | None,
        n: int,
        res: _Reservation,
        *,
        only_base: bool = False,
    ) -> bool:
        """Make chunk *c* DATA with *piece* (None: zeros) at *pos*; False if it already was.

        Takes the chunk's space from *res* or, if that is spent (the chunk was
        DATA when the caller reserved, and was discarded since), reserves it.
        With *only_base*, a chunk that is not BASE (any more) is left alone.
        """
        cstart = c * self._chunk_size
        clen = self._chunk_end(c) - cstart
        with self._cond:
            while self._busy(gen, c, c + 1):
                self._cond.wait()
            state = gen.states[c]
            if state == DATA or (only_base and state != BASE):
                return False
            if res.left >= clen:
                res.left -= clen
            else:
                self._reserve(gen, clen)
            gen.busy.append((c, c + 1))
        done = False
        try:
            try:
                buf = bytearray(clen)
                view = memoryview(buf)
                rel = pos - cstart
                if state == BASE:
                    if rel > 0:
                        self._base.read_into(cstart, view[:rel])
                    if rel + n < clen:
                        self._base.read_into(pos + n, view[rel + n :])
                if piece is not None:
                    view[rel : rel + n] = piece
                gen.data.write(cstart, view)
                done = True
            except BaseException:
                # Give back whatever part of the chunk the failed write allocated;
                # the chunk's state is unchanged, so its contents do not matter.
                with contextlib.suppress(OSError):
                    gen.data.discard(cstart, clen)
                raise
        finally:
            with self._cond:
                gen.busy.remove((c, c + 1))
                gen.reserved -= clen
                if done:
                    gen.states[c] = DATA
                    gen.allocated += clen
                    self._log(gen, c, 1, DATA)
                self._cond.notify_all()
        return True

    def flush(self) -> None:
        """Make every write acknowledged so far durable and visible after a crash."""
        with self._meta_lock:
            gen = self._gen
            if gen is None:
                raise OSError(errno.EBADF, "overlay is closed")
            self._flush_locked(gen)

    def _flush_locked(self, gen: _Generation) -> None:
        if gen.failed is not None:
            raise OSError(
                gen.failed.errno,
                f"an earlier flush failed ({gen.failed.strerror}); reset the overlay",
            )
        with self._lock:
            pending, gen.pending = gen.pending, []
            checkpoint = gen.need_checkpoint or gen.journal_len > max(
                self.COMPACT_MIN, 2 * gen.checkpoint_len
            )
            # Taken with the pending changes, before the fdatasync below: every
            # DATA chunk in it has its data written already.
            snapshot = bytes(gen.states) if checkpoint else None
            gen.need_checkpoint = False
        try:
            gen.data.flush()
        except OSError as exc:
            gen.failed = exc
            raise
        except BaseException:
            self._requeue(gen, pending, snapshot is not None)
            raise
        try:
            if snapshot is not None:
                self._compact(gen, snapshot)
            elif pending:
                record = _encode_record(gen.journal_seq + 1, pending)
                gen.journal.pwrite(gen.journal_len, record)
                gen.journal.sync()
                gen.journal_len += len(record)
                gen.journal_seq += 1
        except BaseException:
            # Never append after a record that may be half written: the next
            # flush writes a checkpoint and a new journal instead.
            self._requeue(gen, pending, True)
            raise

    def _requeue(self, gen: _Generation, pending: list[list[int]], checkpoint: bool) -> None:
        with self._lock:
            gen.pending = pending + gen.pending
            gen.need_checkpoint = gen.need_checkpoint or checkpoint

    def _compact(self, gen: _Generation, states: bytes) -> None:
        """Write *states* (all durable) as a new checkpoint with a new, empty journal."""
        epoch = self._next_epoch
        self._next_epoch += 1  # never reuse a name a failed attempt may have left
        journal = _new_journal(self._files, gen.number, epoch)
        try:
            cp_len = _write_checkpoint(
                self._files, _Checkpoint(self._chunk_size, self._size, gen.number, epoch, states)
            )
        except BaseException:
            journal.close()
            raise
        old_name = _journal_name(gen.number, gen.epoch)
        gen.journal.close()
        gen.journal, gen.epoch = journal, epoch
        gen.journal_len, gen.journal_seq = _JOURNAL_HEADER_LEN, 0
        gen.checkpoint_len = cp_len
        with contextlib.suppress(OSError):
            self._files.unlink(old_name)

    def discard(self, offset: int, length: int) -> None:
        self._zero(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        # Same as discard: a zeroed range of an overlay is best not stored at all.
        self._zero(offset, length)

    def _zero(self, offset: int, length: int) -> None:
        check_range(self._size, offset, length)
        if length == 0:
            return
        gen = self._enter()
        try:
            cs = self._chunk_size
            end = offset + length
            first, last = offset // cs, (end - 1) // cs
            full_first = first if offset == first * cs else first + 1
            full_end = last + 1 if end == self._chunk_end(last) else last  # exclusive
            partial = sorted(c for c in {first, last} if not full_first <= c < full_end)
            # Whole chunks first: that never needs space and may free some, so
            # a full overlay can still be trimmed.  The partial chunks at the
            # ends may need a copy-up, reserved (all or nothing) afterwards.
            if full_first < full_end:
                self._zero_whole(gen, full_first, full_end)
            if not partial:
                return
            states = gen.states
            with self._lock:
                need = sum(self._chunk_end(c) - c * cs for c in partial if states[c] == BASE)
                res = _Reservation(need)
                self._reserve(gen, need)
            try:
                for c in partial:
                    a, b = max(offset, c * cs), min(end, self._chunk_end(c))
                    self._zero_partial(gen, c, a, b - a, res)
            finally:
                if res.left:
                    with self._lock:
                        gen.reserved -= res.left
        finally:
            self._leave(gen)

    def _zero_partial(self, gen: _Generation, c: int, pos: int, n: int, res: _Reservation) -> None:
        state = gen.states[c]
        if state == ZERO:
            return
        if state == BASE and self._copy_up(gen, c, pos, None, n, res):
            return
        # DATA: it may be discarded meanwhile; then these zeros land in a ZERO chunk.
        _write_zeros(gen.data, pos, n)

    def _zero_whole(self, gen: _Generation, first: int, end: int) -> None:
        """Make chunks [first, end) ZERO, punching out those that hold data."""
        cs = self._chunk_size
        with self._cond:
            while self._busy(gen, first, end):
                self._cond.wait()
            segment = bytes(gen.states[first:end])
            if segment.count(ZERO) == len(segment):
                return
            data_runs = [(first + m.start(), first + m.end()) for m in _DATA_RUNS.finditer(segment)]
            gen.busy.append((first, end))
        done = False
        try:
            for a, b in data_runs:
                gen.data.discard(a * cs, self._chunk_end(b - 1) - a * cs)
            done = True
        finally:
            with self._cond:
                gen.busy.remove((first, end))
                if done:
                    freed = sum(self._chunk_end(b - 1) - a * cs for a, b in data_runs)
                    gen.states[first:end] = bytes((ZERO,)) * (end - first)
                    gen.allocated -= freed
                    self._log(gen, first, end - first, ZERO)
                self._cond.notify_all()

    def absorb_base(self, first: int, end: int) -> int:
        """Stop depending on the base in chunks [first, end), without changing any byte read.

        Each of these chunks that is ``BASE`` is read from the base and becomes
        ``ZERO`` if that read zeros (costs no space), else ``DATA`` holding what
        was read (a copy-up).  Chunks written, zeroed or discarded meanwhile are
        left alone (the same busy-chunk rule as copy-up), so this may run while
        the overlay is in use.  The base must not change meanwhile.

        After it (and a flush, for a crash), the overlay reads the same over any
        base that agrees with the current one outside [first, end) -- see
        :meth:`rebase`.  Merging a user disk's snapshot layer into the one above
        is exactly that.  Returns the bytes copied up.  Crash safe as copy-up
        is: until a flush, a crash leaves these chunks ``BASE``, which reads the
        same.  ``ENOSPC`` past ``limit``, like a write.
        """
        if not 0 <= first <= end <= self._nchunks:
            raise ValueError(f"chunk range [{first}, {end}) outside [0, {self._nchunks})")
        gen = self._enter()
        try:
            copied = 0
            buf = bytearray(self._chunk_size)
            for c in range(first, end):
                if gen.states[c] != BASE:  # a hint only: rechecked under the lock below
                    continue
                cstart = c * self._chunk_size
                clen = self._chunk_end(c) - cstart
                view = memoryview(buf)[:clen]
                self._base.read_into(cstart, view)
                if buf.count(0, 0, clen) == clen:
                    self._base_to_zero(gen, c)
                elif self._copy_up(gen, c, cstart, view, clen, _Reservation(0), only_base=True):
                    copied += clen
            return copied
        finally:
            self._leave(gen)

    def _base_to_zero(self, gen: _Generation, c: int) -> None:
        """Mark chunk *c* ZERO if it is still BASE (whose base part reads zeros)."""
        with self._cond:
            while self._busy(gen, c, c + 1):
                self._cond.wait()
            if gen.states[c] == BASE:
                # No hole to punch: a BASE chunk's bytes in the data file are never read.
                gen.states[c] = ZERO
                self._log(gen, c, 1, ZERO)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """DATA chunks are mapped, ZERO chunks unmapped, BASE chunks as the base says."""
        check_range(self._size, offset, length)
        if length == 0:
            return []
        gen = self._enter()
        try:
            cs = self._chunk_size
            end = offset + length
            last = (end - 1) // cs
            states = gen.states
            runs: list[tuple[int, int, bool]] = []
            pos = offset
            while pos < end:
                c = pos // cs
                state = states[c]
                run_end = min(end, self._run_end(states, c, last) * cs)
                if state == BASE:
                    runs.extend(self._base.extents(pos, run_end - pos))
                else:
                    runs.append((pos, run_end - pos, state == DATA))
                pos = run_end
            return merge_extents(runs)
        finally:
            self._leave(gen)

    # -- lifecycle -----------------------------------------------------------

    def reset(self) -> None:
        """Discard everything written, durably, in O(1).

        Creates an empty generation (a new sparse data file, an empty journal
        and checkpoint), switches to it, then unlinks the old generation's
        files.  Never reads or writes the base, and costs the same however
        much was written.  I/O racing a reset lands in the old generation.
        """
        with self._meta_lock:
            old = self._gen
            if old is None:
                raise OSError(errno.EBADF, "overlay is closed")
            number = self._next_generation
            self._next_generation += 1
            epoch = self._next_epoch
            self._next_epoch += 1
            files = self._files
            files.create_data(_data_name(number), self._size)
            journal = _new_journal(files, number, epoch)
            try:
                cp_len = _write_checkpoint(
                    files, _Checkpoint(self._chunk_size, self._size, number, epoch, None)
                )
                data = files.open_data(_data_name(number))
            except BaseException:
                journal.close()
                # The checkpoint may or may not name the new generation now:
                # make the next flush say again which one is current.
                with self._lock:
                    old.need_checkpoint = True
                raise
            new = _Generation(
                number=number,
                data=data,
                states=bytearray(self._nchunks),
                allocated=0,
                epoch=epoch,
                journal=journal,
                journal_len=_JOURNAL_HEADER_LEN,
                journal_seq=0,
                checkpoint_len=cp_len,
            )
            with self._lock:
                self._gen = new
                self._retire(old)
            for name in (_data_name(old.number), _journal_name(old.number, old.epoch)):
                with contextlib.suppress(OSError):
                    files.unlink(name)

    def rebase(self, base: BlockDevice) -> None:
        """Read through *base* from now on instead of the current base.

        The caller promises that *base* reads the same as the current base in
        every chunk that is ``BASE`` here (e.g. after :meth:`absorb_base` of the
        chunks where they differ), so no byte read changes, and that no I/O is
        in flight.  Nothing on disk names the base: after a restart, the caller
        opens the overlay over whichever base it recorded.
        """
        if base.size != self._size:
            raise ValueError(f"a base of {base.size} bytes cannot replace one of {self._size}")
        self._base = base

    def _retire(self, gen: _Generation) -> None:
        """Close *gen*'s files now or when its last I/O returns (lock held)."""
        gen.retired = True
        if gen.refs == 0 and not gen.closed:
            gen.closed = True
            _close_generation(gen)

    def close(self, *, flush: bool = True) -> None:
        """Flush, then close the overlay's files (not the base).  Idempotent.

        ``flush=False`` closes without flushing, for an overlay about to be
        deleted: what was not flushed may then be lost, as after a kill.
        """
        with self._meta_lock:
            gen = self._gen
            if gen is None:
                return
            try:
                if flush:
                    self._flush_locked(gen)
            finally:
                with self._lock:
                    self._gen = None
                    self._retire(gen)

    def __enter__(self) -> Overlay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"overlay limit {limit} is negative")


def _allocated_bytes(states: bytes | bytearray, chunk_size: int, size: int) -> int:
    nbytes = states.count(DATA) * chunk_size
    if states and states[-1] == DATA:
        nbytes -= len(states) * chunk_size - size
    return nbytes


def _write_zeros(data: DataFile, pos: int, n: int) -> None:
    end = pos + n
    while pos < end:
        step = min(len(_ZEROS), end - pos)
        data.write(pos, memoryview(_ZEROS)[:step])
        pos += step


def _close_generation(gen: _Generation) -> None:
    for f in (gen.data, gen.journal):
        with contextlib.suppress(OSError):
            f.close()


def _new_journal(files: OverlayDir, generation: int, epoch: int) -> MetaFile:
    """Create an empty journal whose header is durable (its name is not yet)."""
    journal = files.create(_journal_name(generation, epoch))
    try:
        journal.pwrite(0, _encode_journal_header(generation, epoch))
        journal.sync()
    except BaseException:
        journal.close()
        raise
    return journal


def _write_checkpoint(files: OverlayDir, cp: _Checkpoint) -> int:
    """Atomically replace ``meta``: write, fsync, rename, fsync the directory."""
    blob = _encode_checkpoint(cp)
    f = files.create(META_TMP)
    try:
        f.pwrite(0, blob)
        f.sync()
    finally:
        f.close()
    files.rename(META_TMP, META)
    files.sync()
    return len(blob)
