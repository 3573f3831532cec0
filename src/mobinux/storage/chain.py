"""User disks with snapshots: a chain of copy-on-write layers.

A user's persistent disk is a stack of :class:`~mobinux.storage.overlay.
Overlay` layers.  The bottom one sits on a :class:`~mobinux.storage.memory.
ZeroDevice` (a blank disk of the disk's size), each other one on the layer
below it.  The top layer is *live*: it takes the writes.  Every layer below
it is *frozen* (never written by I/O again) and is the state of exactly one
snapshot, oldest at the bottom::

    live top       l7   writes go here; reads fall through to the first layer
    snapshot "b"   l4   holding the chunk (a ZERO chunk hides what is below,
    snapshot "a"   l1   so a discard never uncovers older data)
    ZeroDevice          the blank disk

:class:`UserDisk` is a :class:`~mobinux.storage.device.BlockDevice` (the live
view) plus the snapshot operations:

**create** (name, now)
    flush the top, freeze it (the snapshot names it), start an empty top
    above it.  Metadata only: one new layer directory and the manifest.
**rollback** (name)
    start an empty top over the snapshot's layer and drop every layer above
    it: the changes since and the later snapshots go, with their space.
    Metadata only (the dropped directories are deleted afterwards).
**delete** (name)
    merge the snapshot's layer L into the layer U just above it: every chunk
    L holds that U does not is copied up into U (or marked ZERO, if it reads
    zeros), which does not change what U shows
    (:meth:`~mobinux.storage.overlay.Overlay.absorb_base`); then U is flushed,
    the manifest drops L, U reads through L's base
    (:meth:`~mobinux.storage.overlay.Overlay.rebase`) and L is deleted.  This
    copies at most what L holds, and never a whole disk.  U is merged *in
    place* (rather than into a new layer) because the merge never changes
    what U shows, so a crash in the middle leaves a disk identical to the one
    before; and U keeps serving I/O meanwhile (absorb_base is safe with
    concurrent writes), so only the final switch pauses the disk.

:meth:`UserDisk.snapshots` lists (name, created, used_bytes): a snapshot's
space is what its layer holds, the chunks changed between the snapshot before
it and it.  :meth:`UserDisk.read_snapshot` reads a snapshot in place, and
:meth:`UserDisk.list_snapshots` lists them from another process.  A read of a
chunk no layer holds passes through every layer's map (cheap, but the chain's
depth is the number of snapshots).

On-disk format
==============

A user disk directory holds::

    manifest        the layers and snapshots (replaced atomically by rename)
    manifest.tmp    a manifest being written (ignored, removed at open)
    l<N>/           one layer: an overlay directory (see overlay.py)

A layer directory the manifest does not name is what an interrupted operation
left, and is removed by :meth:`UserDisk.open`.  Layer numbers come from the
manifest's ``next_layer`` and are never reused once a manifest naming them may
have been in place.

``manifest`` (all integers little-endian)::

    0   8  magic b"MBXCHAIN"
    8   4  version (1)
    12  4  body length n
    16  n  body: UTF-8 JSON, below
    16+n 4 CRC-32 (zlib) of bytes [0, 16+n)

    {"size": 10737418240, "chunk_size": 65536, "next_layer": 8,
     "layers": [{"dir": "l1", "snapshot": "a", "created": 1767225600.0},
                {"dir": "l4", "snapshot": "b", "created": 1767229200.5},
                {"dir": "l7"}]}

``layers`` is bottom up; every layer but the last names its snapshot (1 to 64
of ``A-Z a-z 0-9 . _ -``, unique) and creation time (Unix time, given by the
caller: nothing here reads a clock); the last is the live top.

Crash safety
============

Each operation makes its new files durable first (a new layer is a complete,
synced overlay before anything names it), then switches the manifest
(``manifest.tmp`` written and fsynced, renamed over ``manifest``, directory
fsynced), and only then deletes what the new manifest no longer names.  So
after a crash at any moment the disk opens as it was before the operation or
after it: a completed operation (one that returned) is always there.  The
layers are overlays and bring their own guarantees: a flushed write survives,
a torn write shows only this disk's own earlier data, zeros or new data.
Different users' disks share no files.

* If only the directory fsync after the rename fails, the new manifest is in
  place but may not survive a power loss: the operation raises, the disk
  carries on in its new state, nothing is deleted, and the next flush (or
  operation, or close) writes the manifest again before it succeeds.  A
  failure before the rename changes nothing the disk shows (a delete may
  have merged part of a layer already: the next delete reuses that work).
* :meth:`UserDisk.open` fsyncs the directory before it deletes anything, so
  a manifest a killed process renamed but never synced cannot come back after
  its layers are gone.

A failed fdatasync of the live layer may have lost pages the kernel then
marked clean, so (as for any overlay) every later flush and snapshot fails
too, until the disk is reopened: nothing is acknowledged that may be lost.

Concurrency
===========

Data I/O may run from several threads.  Snapshot operations run one at a
time; each pauses I/O only for its switch (a flush, the manifest, swapping
layers in memory), never for the copying of a delete.  A nowait I/O during a
switch raises :class:`~mobinux.storage.device.WouldBlock`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mobinux.errors import LocalError
from mobinux.storage.device import SECTOR, BlockDevice, WouldBlock
from mobinux.storage.memory import ZeroDevice
from mobinux.storage.overlay import BASE, MAX_CHUNK, Overlay, _allocated_bytes
from mobinux.storage.overlay_dir import PosixDir, TreeDir
from mobinux.storage.overlay_reader import read_overlay_map

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "InvalidSnapshotName",
    "SnapshotError",
    "SnapshotExists",
    "SnapshotInfo",
    "SnapshotNotFound",
    "UserDisk",
    "check_snapshot_name",
]

MANIFEST: Final = "manifest"
MANIFEST_TMP: Final = "manifest.tmp"
VERSION: Final = 1
DEFAULT_CHUNK_SIZE: Final = 65536
_MAGIC: Final = b"MBXCHAIN"
_HEADER = struct.Struct("<8sII")
_CRC = struct.Struct("<I")
_LAYER_DIR = re.compile(r"^l([1-9][0-9]{0,17})$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_LIST_ATTEMPTS: Final = 20
_NONBASE_RUNS = re.compile(b"[^" + re.escape(bytes((BASE,))) + b"]+")  # in a chunk map


class SnapshotError(LocalError):
    """A snapshot operation that cannot be done (the message says why)."""


class InvalidSnapshotName(SnapshotError, ValueError):
    """A snapshot name that is not 1-64 of ``A-Z a-z 0-9 . _ -``."""


class SnapshotExists(SnapshotError, ValueError):
    """The disk has a snapshot of that name already."""


class SnapshotNotFound(SnapshotError, LookupError):
    """The disk has no snapshot of that name."""


def check_snapshot_name(name: str) -> None:
    """Raise :class:`InvalidSnapshotName` unless *name* is a valid snapshot name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidSnapshotName(
            f"snapshot name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-'"
        )


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    created: float  # Unix time, as given to create_snapshot
    used_bytes: int  # what its layer holds: the changes made before it, since the one before


# -- the manifest (pure) ------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    dir: str
    snapshot: str | None = None  # None: the live top
    created: float = 0.0


@dataclass(frozen=True)
class _Manifest:
    size: int
    chunk_size: int
    next_layer: int
    layers: tuple[_Layer, ...]

    @property
    def snapshots(self) -> tuple[_Layer, ...]:
        return self.layers[:-1]

    def index(self, name: str) -> int:
        """The layer index of snapshot *name*."""
        for i, layer in enumerate(self.snapshots):
            if layer.snapshot == name:
                return i
        raise SnapshotNotFound(f"no snapshot named {name!r}")

    def new_dir(self) -> str:
        return f"l{self.next_layer}"

    def with_snapshot(self, name: str, now: float) -> _Manifest:
        """The top becomes snapshot *name*; a new empty top goes above it."""
        *frozen, top = self.layers
        return _Manifest(
            self.size,
            self.chunk_size,
            self.next_layer + 1,
            (*frozen, _Layer(top.dir, name, now), _Layer(self.new_dir())),
        )

    def rolled_back(self, k: int) -> _Manifest:
        """A new empty top over layer *k*; the layers above it are gone."""
        return _Manifest(
            self.size,
            self.chunk_size,
            self.next_layer + 1,
            (*self.layers[: k + 1], _Layer(self.new_dir())),
        )

    def without(self, k: int) -> _Manifest:
        """Layer *k* (merged into the one above) is gone."""
        return _Manifest(
            self.size, self.chunk_size, self.next_layer, self.layers[:k] + self.layers[k + 1 :]
        )


def _corrupt(what: str) -> OSError:
    return OSError(errno.EIO, f"corrupt user disk manifest: {what}")


def _encode_manifest(m: _Manifest) -> bytes:
    layers: list[dict[str, object]] = []
    for layer in m.layers:
        entry: dict[str, object] = {"dir": layer.dir}
        if layer.snapshot is not None:
            entry["snapshot"] = layer.snapshot
            entry["created"] = layer.created
        layers.append(entry)
    body = json.dumps(
        {
            "size": m.size,
            "chunk_size": m.chunk_size,
            "next_layer": m.next_layer,
            "layers": layers,
        },
        separators=(",", ":"),
    ).encode()
    blob = _HEADER.pack(_MAGIC, VERSION, len(body)) + body
    return blob + _CRC.pack(zlib.crc32(blob))


def _decode_manifest(blob: bytes) -> _Manifest:
    if len(blob) < _HEADER.size + _CRC.size:
        raise _corrupt("short")
    magic, version, n = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise _corrupt("not a user disk manifest")
    if version != VERSION:
        raise OSError(errno.EINVAL, f"user disk format version {version} is not supported")
    if len(blob) != _HEADER.size + n + _CRC.size:
        raise _corrupt("length")
    (crc,) = _CRC.unpack_from(blob, _HEADER.size + n)
    if crc != zlib.crc32(blob[: _HEADER.size + n]):
        raise _corrupt("CRC")
    # The CRC was good: anything wrong below was written that way, so it is
    # refused (never guessed around).
    try:
        d = json.loads(blob[_HEADER.size : _HEADER.size + n].decode())
        size, chunk_size, next_layer = d["size"], d["chunk_size"], d["next_layer"]
        entries = d["layers"]
        if not all(type(v) is int for v in (size, chunk_size, next_layer)):
            raise TypeError("integers")
        if not isinstance(entries, list) or not entries:
            raise TypeError("layers")
        layers = []
        for i, e in enumerate(entries):
            last = i == len(entries) - 1
            if not isinstance(e, dict) or not isinstance(e.get("dir"), str):
                raise TypeError("layer")
            if last:
                if set(e) != {"dir"}:
                    raise TypeError("the top layer is a snapshot")
                layers.append(_Layer(e["dir"]))
                continue
            name, created = e.get("snapshot"), e.get("created")
            if set(e) != {"dir", "snapshot", "created"} or not isinstance(name, str):
                raise TypeError("a frozen layer names no snapshot")
            if (
                not isinstance(created, int | float)
                or isinstance(created, bool)
                or not math.isfinite(created)
            ):
                raise TypeError("snapshot time")
            check_snapshot_name(name)
            layers.append(_Layer(e["dir"], name, float(created)))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise _corrupt(str(exc) or type(exc).__name__) from None
    if size <= 0 or size % SECTOR:
        raise _corrupt(f"size {size}")
    if chunk_size < SECTOR or chunk_size & (chunk_size - 1) or chunk_size > MAX_CHUNK:
        raise _corrupt(f"chunk size {chunk_size}")
    numbers = []
    for layer in layers:
        match = _LAYER_DIR.fullmatch(layer.dir)
        if match is None:
            raise _corrupt(f"layer directory {layer.dir!r}")
        numbers.append(int(match.group(1)))
    if len(set(numbers)) != len(numbers) or max(numbers) >= next_layer:
        raise _corrupt("layer numbers")
    names = [layer.snapshot for layer in layers[:-1]]
    if len(set(names)) != len(names):
        raise _corrupt("duplicate snapshot names")
    return _Manifest(size, chunk_size, next_layer, tuple(layers))


# -- the gate between I/O and layer switches -------------------------------------------


class _Gate:
    """Any number of I/O calls at once, or one layer switch alone.

    A waiting switch stops new I/O from entering, so I/O cannot starve it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._io = 0
        self._switching = False

    def enter(self, nowait: bool) -> None:
        with self._cond:
            while self._switching:
                if nowait:
                    raise WouldBlock
                self._cond.wait()
            self._io += 1

    def leave(self) -> None:
        with self._cond:
            self._io -= 1
            if self._io == 0:
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._switching:
                self._cond.wait()
            self._switching = True
            while self._io:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._switching = False
                self._cond.notify_all()


# -- the disk ------------------------------------------------------------------------


def _as_tree(directory: str | os.PathLike[str] | TreeDir) -> TreeDir:
    if isinstance(directory, str | os.PathLike):
        return PosixDir(directory)
    return directory


class UserDisk:
    """A user's persistent disk: the live view (a BlockDevice) and its snapshots.

    Build one with :meth:`create` or :meth:`open`; see the module docstring.
    """

    def __init__(
        self, files: TreeDir, manifest: _Manifest, base: ZeroDevice, layers: list[Overlay]
    ) -> None:
        """Internal: use :meth:`create` or :meth:`open`."""
        self._files = files
        self._manifest = manifest
        self._base = base
        self._layers = layers  # bottom up, as in the manifest; [] once closed
        self._ops = threading.Lock()  # snapshot operations, close
        self._gate = _Gate()
        # The manifest in place may not be durable (its directory fsync
        # failed): the next flush, operation or close writes it again.
        self._unsynced = False
        self._garbage: list[str] = []  # layer dirs to delete once the manifest is durable

    # -- construction ------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str] | TreeDir,
        size: int,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> UserDisk:
        """A blank disk of *size* bytes in *directory* (FileExistsError if one is there)."""
        if size <= 0 or size % SECTOR:
            raise ValueError(f"disk size {size} is not a positive multiple of {SECTOR}")
        if chunk_size < SECTOR or chunk_size & (chunk_size - 1) or chunk_size > MAX_CHUNK:
            raise ValueError(f"chunk size {chunk_size} is not a power of two in [512, 16 MiB]")
        files = _as_tree(directory)
        if MANIFEST in files.listdir():
            raise FileExistsError(errno.EEXIST, "a user disk exists already", MANIFEST)
        _remove_leftovers(files, keep=set())
        manifest = _Manifest(size, chunk_size, 2, (_Layer("l1"),))
        base = ZeroDevice(size)
        top = Overlay.create(base, files.subdir("l1"), chunk_size=chunk_size)
        try:
            _write_manifest(files, manifest)
        except BaseException:
            top.close(flush=False)
            raise
        return cls(files, manifest, base, [top])

    @classmethod
    def open(cls, directory: str | os.PathLike[str] | TreeDir) -> UserDisk:
        """Open the disk in *directory* after a close, a restart or a crash.

        Removes what an interrupted operation left.  FileNotFoundError if there
        is no disk; OSError(EIO) if its metadata is damaged.
        """
        files = _as_tree(directory)
        manifest = _decode_manifest(files.read(MANIFEST))
        # A manifest a killed process renamed into place but never synced must
        # not come back after a power loss once the layers it replaced are gone.
        files.sync()
        _remove_leftovers(files, keep={layer.dir for layer in manifest.layers})
        base = ZeroDevice(manifest.size)
        layers: list[Overlay] = []
        try:
            below: BlockDevice = base
            for layer in manifest.layers:
                sub = files.subdir(layer.dir)
                try:
                    ov = Overlay.open(below, sub)
                except FileNotFoundError:
                    raise _corrupt(f"layer {layer.dir} is missing") from None
                layers.append(ov)
                if ov.chunk_size != manifest.chunk_size:
                    raise _corrupt(f"layer {layer.dir} has chunks of {ov.chunk_size} bytes")
                below = ov
        except BaseException:
            for ov in layers:
                with contextlib.suppress(OSError):
                    ov.close(flush=False)
            raise
        return cls(files, manifest, base, layers)

    @staticmethod
    def list_snapshots(directory: str | os.PathLike[str]) -> list[SnapshotInfo]:
        """The snapshots of the disk in *directory*, read without opening it.

        For another process than the one serving the disk (which must be the
        only one to open it): nothing is written.  Shows the last operation
        whose manifest is in place; ``used_bytes`` counts flushed chunks.
        """
        path = Path(directory)
        last: OSError | None = None
        for _ in range(_LIST_ATTEMPTS):
            m = _decode_manifest((path / MANIFEST).read_bytes())
            out = []
            try:
                for layer in m.snapshots:
                    omap = read_overlay_map(path / layer.dir)
                    try:
                        used = _allocated_bytes(omap.states, omap.chunk_size, omap.base_size)
                    finally:
                        omap.close()
                    out.append(SnapshotInfo(layer.snapshot or "", layer.created, used))
            except FileNotFoundError as exc:
                last = exc  # a layer went with an operation that just finished: read again
                continue
            return out
        assert last is not None
        raise last

    def __repr__(self) -> str:
        return f"UserDisk({self._files!r})"

    # -- BlockDevice ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._manifest.size

    @property
    def readonly(self) -> bool:
        return False

    @property
    def chunk_size(self) -> int:
        return self._manifest.chunk_size

    @property
    def closed(self) -> bool:
        return not self._layers

    def _top(self) -> Overlay:
        """The live layer (gate entered)."""
        if not self._layers:
            raise OSError(errno.EBADF, "user disk is closed")
        return self._layers[-1]

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        self._gate.enter(nowait)
        try:
            self._top().read_into(offset, buf, nowait=nowait)
        finally:
            self._gate.leave()

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None:
        self._gate.enter(nowait)
        try:
            self._top().write(offset, data, nowait=nowait)
        finally:
            self._gate.leave()

    def discard(self, offset: int, length: int) -> None:
        self._gate.enter(False)
        try:
            self._top().discard(offset, length)
        finally:
            self._gate.leave()

    def write_zeroes(self, offset: int, length: int) -> None:
        self._gate.enter(False)
        try:
            self._top().write_zeroes(offset, length)
        finally:
            self._gate.leave()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._gate.enter(False)
        try:
            return self._top().extents(offset, length)
        finally:
            self._gate.leave()

    def flush(self) -> None:
        """Make every write acknowledged so far, and the last operation, durable."""
        self._gate.enter(False)
        try:
            self._top().flush()
        finally:
            self._gate.leave()
        if self._unsynced:
            with self._ops:
                self._settle()

    @property
    def allocated_bytes(self) -> int:
        """Bytes every layer holds (flushed or not); 0 once closed."""
        return sum(layer.allocated_bytes for layer in self._layers)

    def close(self) -> None:
        """Flush, then close every layer.  Idempotent."""
        with self._ops:
            if not self._layers:
                return
            with self._gate.exclusive():
                layers, self._layers = self._layers, []
                try:
                    layers[-1].close()
                    if self._unsynced:
                        _write_manifest(self._files, self._manifest)
                        self._unsynced = False
                finally:
                    for layer in layers[:-1]:
                        with contextlib.suppress(OSError):
                            layer.close()
                    layers[-1].close(flush=False)  # no-op if the close above worked
            self._collect()

    def __enter__(self) -> UserDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- snapshots -------------------------------------------------------------------

    def snapshots(self) -> list[SnapshotInfo]:
        """Oldest first."""
        with self._ops:
            return [
                SnapshotInfo(layer.snapshot or "", layer.created, ov.allocated_bytes)
                for layer, ov in zip(self._manifest.snapshots, self._layers, strict=False)
            ]

    def read_snapshot(self, name: str, offset: int, buf: memoryview) -> None:
        """Read snapshot *name* as it was taken (without rolling back to it)."""
        with self._ops:
            self._check_open()
            self._layers[self._manifest.index(name)].read_into(offset, buf)

    def create_snapshot(self, name: str, now: float) -> SnapshotInfo:
        """Freeze the disk as it is now under *name*, taken at Unix time *now*.

        Flushes first, so the snapshot holds every write acknowledged before it.
        """
        check_snapshot_name(name)
        if not math.isfinite(now):
            raise ValueError(f"snapshot time {now} is not a finite number")
        with self._ops:
            self._check_open()
            self._settle()
            m = self._manifest
            if any(layer.snapshot == name for layer in m.snapshots):
                raise SnapshotExists(f"a snapshot named {name!r} exists already")
            new_manifest = m.with_snapshot(name, float(now))
            top = self._layers[-1]
            new = self._new_layer(m, top)
            try:
                with self._gate.exclusive():
                    top.flush()
                    self._commit(new_manifest, lambda: self._layers.append(new))
            except BaseException:
                self._abandon(new_manifest, new, m.new_dir())
                raise
            return SnapshotInfo(name, float(now), top.allocated_bytes)

    def rollback(self, name: str) -> None:
        """Return the disk to snapshot *name*; the changes since and later snapshots go."""
        with self._ops:
            self._check_open()
            self._settle()
            m = self._manifest
            k = m.index(name)
            new_manifest = m.rolled_back(k)
            new = self._new_layer(m, self._layers[k])
            dropped: list[Overlay] = []

            def apply() -> None:
                dropped.extend(self._layers[k + 1 :])
                self._layers[k + 1 :] = [new]
                self._garbage.extend(layer.dir for layer in m.layers[k + 1 :])

            try:
                with self._gate.exclusive():
                    self._commit(new_manifest, apply)
            except BaseException:
                self._abandon(new_manifest, new, m.new_dir())
                raise
            finally:
                for ov in dropped:  # no I/O in flight on them: the gate drained it
                    with contextlib.suppress(OSError):
                        ov.close(flush=False)
            self._collect()

    def delete_snapshot(self, name: str) -> None:
        """Forget snapshot *name*; the disk and the other snapshots read the same."""
        with self._ops:
            self._check_open()
            self._settle()
            m = self._manifest
            k = m.index(name)
            lower, upper = self._layers[k], self._layers[k + 1]
            states = lower.chunk_states()
            # The frozen layer's own chunks are all that can differ between it
            # and its base: absorb exactly those into the layer above.
            for run in _NONBASE_RUNS.finditer(states):
                upper.absorb_base(run.start(), run.end())
            upper.flush()
            new_manifest = m.without(k)

            def apply() -> None:
                upper.rebase(lower.base)
                del self._layers[k]
                self._garbage.append(m.layers[k].dir)

            try:
                with self._gate.exclusive():
                    self._commit(new_manifest, apply)
            finally:
                if self._manifest is new_manifest:  # nothing reads through it any more
                    with contextlib.suppress(OSError):
                        lower.close(flush=False)
            self._collect()

    # -- helpers -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._layers:
            raise OSError(errno.EBADF, "user disk is closed")

    def _new_layer(self, m: _Manifest, below: BlockDevice) -> Overlay:
        """An empty, durable layer over *below* in the manifest's next directory."""
        name = m.new_dir()
        # No manifest in place ever named it (next_layer only grows with each
        # one): whatever is there is a leftover of a failed attempt.
        self._files.remove_subdir(name)
        try:
            return Overlay.create(below, self._files.subdir(name), chunk_size=m.chunk_size)
        except BaseException:
            with contextlib.suppress(OSError):
                self._files.remove_subdir(name)
            raise

    def _commit(self, m: _Manifest, apply: Callable[[], None]) -> None:
        """Switch to manifest *m*: write it, rename it into place, then *apply* it in memory.

        Gate held exclusively.  If this raises, ``self._manifest is m`` says
        whether the switch happened (only the directory fsync failed).
        """
        blob = _encode_manifest(m)
        _write_tmp(self._files, blob)
        self._files.rename(MANIFEST_TMP, MANIFEST)
        # The new manifest is in place: it is the disk from now on, durable or not.
        self._manifest = m
        self._unsynced = True
        apply()
        self._files.sync()
        self._unsynced = False

    def _abandon(self, m: _Manifest, layer: Overlay, name: str) -> None:
        """After a failed switch to *m*: drop its new *layer* unless the switch happened."""
        if self._manifest is m:
            return
        with contextlib.suppress(OSError):
            layer.close(flush=False)
        with contextlib.suppress(OSError):
            self._files.remove_subdir(name)

    def _settle(self) -> None:
        """Make the manifest in place durable if its directory fsync failed (ops held)."""
        if self._unsynced:
            _write_manifest(self._files, self._manifest)
            self._unsynced = False
            self._collect()

    def _collect(self) -> None:
        """Delete the layer dirs no durable manifest names any more."""
        if self._unsynced:
            return
        garbage, self._garbage = self._garbage, []
        for name in garbage:
            # A failure leaves a leftover that open removes.
            with contextlib.suppress(OSError):
                self._files.remove_subdir(name)


def _write_tmp(files: TreeDir, blob: bytes) -> None:
    f = files.create(MANIFEST_TMP)
    try:
        f.pwrite(0, blob)
        f.sync()
    finally:
        f.close()


def _write_manifest(files: TreeDir, m: _Manifest) -> None:
    """Atomically replace the manifest: write, fsync, rename, fsync the directory."""
    _write_tmp(files, _encode_manifest(m))
    files.rename(MANIFEST_TMP, MANIFEST)
    files.sync()


def _remove_leftovers(files: TreeDir, keep: set[str]) -> None:
    if MANIFEST_TMP in files.listdir():
        files.unlink(MANIFEST_TMP)
    for name in files.subdirs():
        if _LAYER_DIR.fullmatch(name) and name not in keep:
            files.remove_subdir(name)

