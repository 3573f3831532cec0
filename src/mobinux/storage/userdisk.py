"""A user's persistent disk with snapshots: a chain of copy-on-write layers.

The disk is a stack of :class:`~mobinux.storage.overlay.Overlay` layers over a
blank device that reads zeros. The top layer is live (it takes the writes);
every layer below it is frozen and is the state of one snapshot::

    live top      l4  (writes go here)
    snapshot "b"  l3  (frozen: the disk as it was when "b" was taken)
    snapshot "a"  l1
    ZeroDevice        (a blank disk of the user's size)

Reading falls through the layers to the first one holding the chunk (a layer's
ZERO chunks hide what is below, so a discard never uncovers old data).

Operations, all costing metadata except delete:

* **create snapshot**: flush the top, freeze it (the snapshot names it),
  start a new empty top above it;
* **rollback to S**: drop every layer above S's, start a new empty top above
  it; the snapshots taken after S go with their layers (space freed);
* **delete S**: S's layer L and the layer just above it, U, are merged: each
  chunk L holds that U does not is copied into U (data, or ZERO), which does
  not change what U shows; U is flushed; then U is reopened over L's base and
  L is dropped. This copies at most what L holds.

On disk, ``<dir>/manifest`` (replaced atomically: write ``manifest.tmp``,
fsync, rename, fsync the directory) lists the disk's size, its layers bottom
up and its snapshots. Layer directories are ``l<N>`` with N never reused. A
layer directory the manifest does not name is what an interrupted operation
left and is removed at :meth:`UserDisk.open`. Every step writes new files
first, then switches the manifest, then removes what is no longer named, so
after a crash at any moment the disk opens as it was before or after the
operation. The layers are overlays and inherit their crash safety: flushed
writes survive a power cut, and a torn write shows only this disk's own data.

Manifest (UTF-8 JSON, then a newline and the CRC-32 of the JSON text in hex)::

    {"version": 1, "size": N, "next": 5, "layers": ["l1", "l3", "l4"],
     "snapshots": [{"name": "a", "created": 1.7e9, "layer": "l1"}, ...]}
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from mobinux.storage.device import SECTOR, BlockDevice, check_range
from mobinux.storage.overlay import Overlay
from mobinux.storage.overlay_reader import BASE, DATA, ZERO, read_overlay_map

MANIFEST = "manifest"
CHUNK_SIZE = 65536
_LAYER = re.compile(r"^l\d+$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class SnapshotError(ValueError):
    """A snapshot operation that cannot be done (unknown name, duplicate, ...)."""


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    created: float  # Unix time
    used_bytes: int  # disk space its layer takes


class ZeroDevice:
    """A read-only device of *size* bytes that reads zeros: a blank disk."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % SECTOR:
            raise ValueError(f"size {size} is not a positive multiple of {SECTOR}")
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return True

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        check_range(self._size, offset, len(buf))
        buf[:] = bytes(len(buf))

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False) -> None:
        raise OSError(errno.EROFS, "a blank base is read-only")

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        raise OSError(errno.EROFS, "a blank base is read-only")

    def write_zeroes(self, offset: int, length: int) -> None:
        raise OSError(errno.EROFS, "a blank base is read-only")

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        check_range(self._size, offset, length)
        return [(offset, length, False)] if length else []

    def close(self) -> None:
        pass


@dataclass
class _Manifest:
    size: int
    next: int
    layers: list[str]
    snapshots: list[dict[str, object]]

    def encode(self) -> bytes:
        text = json.dumps({"version": 1, "size": self.size, "next": self.next,
                           "layers": self.layers, "snapshots": self.snapshots}, sort_keys=True)
        return f"{text}\n{zlib.crc32(text.encode()):08x}\n".encode()

    @classmethod
    def decode(cls, blob: bytes) -> _Manifest:
        try:
            text, crc, _ = blob.decode().split("\n")
            if int(crc, 16) != zlib.crc32(text.encode()):
                raise ValueError("CRC")
            d = json.loads(text)
            if d["version"] != 1:
                raise ValueError("version")
            m = cls(int(d["size"]), int(d["next"]), [str(x) for x in d["layers"]],
                    list(d["snapshots"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise OSError(errno.EUCLEAN, f"user disk manifest is damaged ({exc})") from None
        if not m.layers or any(not _LAYER.match(name) for name in m.layers):
            raise OSError(errno.EUCLEAN, "user disk manifest names no valid layers")
        return m


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(directory: Path, manifest: _Manifest) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "wb") as f:
        f.write(manifest.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    _fsync_dir(directory)


def _read_manifest(directory: Path) -> _Manifest:
    return _Manifest.decode((directory / MANIFEST).read_bytes())


def _dir_bytes(directory: Path) -> int:
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


class UserDisk:
    """The live view of a user's disk (a BlockDevice) and its snapshots.

    Build one with :meth:`create` or :meth:`open`. Data I/O may run from
    several threads; snapshot operations must not run while I/O is in flight
    (the callers refuse rollback and delete while the disk is in use and
    take snapshots between commands).
    """

    def __init__(self, directory: Path, manifest: _Manifest, base: ZeroDevice,
                 layers: list[Overlay]) -> None:
        self._dir = directory
        self._manifest = manifest
        self._base = base
        self._layers = layers  # bottom up; the last is the live top
        self._top = layers[-1]
        self._ops = threading.Lock()

    # -- construction --------------------------------------------------------

    @classmethod
    def create(cls, directory: str | os.PathLike[str], size: int) -> UserDisk:
        """A blank disk of *size* bytes in the empty (or missing) *directory*."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if (path / MANIFEST).exists():
            raise FileExistsError(errno.EEXIST, "a user disk exists already", str(path))
        base = ZeroDevice(size)
        overlay = Overlay.create(base, path / "l1", chunk_size=CHUNK_SIZE)
        manifest = _Manifest(size, 2, ["l1"], [])
        try:
            _write_manifest(path, manifest)
        except BaseException:
            overlay.close()
            raise
        return cls(path, manifest, base, [overlay])

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> UserDisk:
        path = Path(directory)
        manifest = _read_manifest(path)
        for entry in path.iterdir():  # what an interrupted operation left
            if entry.is_dir() and _LAYER.match(entry.name) and entry.name not in manifest.layers:
                shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (path / (MANIFEST + ".tmp")).unlink()
        base = ZeroDevice(manifest.size)
        layers: list[Overlay] = []
        below: BlockDevice = base
        try:
            for name in manifest.layers:
                layer = Overlay.open(below, path / name)
                layers.append(layer)
                below = layer
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        return cls(path, manifest, base, layers)

    @staticmethod
    def list_snapshots(directory: str | os.PathLike[str]) -> list[SnapshotInfo]:
        """The snapshots of the disk in *directory*, read without opening it (another
        process may have it open)."""
        path = Path(directory)
        manifest = _read_manifest(path)
        return [SnapshotInfo(str(s["name"]), float(str(s["created"])), _dir_bytes(path / str(s["layer"])))
                for s in manifest.snapshots]

    # -- BlockDevice ---------------------------------------------------------

    @property
    def size(self) -> int:
        return self._manifest.size

    @property
    def readonly(self) -> bool:
        return False

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        self._top.read_into(offset, buf, nowait=nowait)

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False) -> None:
        self._top.write(offset, data, nowait=nowait)

    def flush(self) -> None:
        self._top.flush()

    def discard(self, offset: int, length: int) -> None:
        self._top.discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._top.write_zeroes(offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self._top.extents(offset, length)

    @property
    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes for layer in self._layers)

    def close(self) -> None:
        with self._ops:
            try:
                self._top.flush()
            finally:
                for layer in reversed(self._layers):
                    with contextlib.suppress(OSError):
                        layer.close()

    # -- snapshots -----------------------------------------------------------

    def snapshots(self) -> list[SnapshotInfo]:
        return [SnapshotInfo(str(s["name"]), float(str(s["created"])),
                             self._layer(str(s["layer"])).allocated_bytes)
                for s in self._manifest.snapshots]

    def _layer(self, name: str) -> Overlay:
        return self._layers[self._manifest.layers.index(name)]

    def _find(self, name: str) -> int:
        for i, snap in enumerate(self._manifest.snapshots):
            if snap["name"] == name:
                return i
        raise SnapshotError(f"no snapshot named {name!r}")

    def _new_layer(self, below: BlockDevice) -> tuple[str, Overlay]:
        name = f"l{self._manifest.next}"
        self._manifest.next += 1
        layer_dir = self._dir / name
        shutil.rmtree(layer_dir, ignore_errors=True)
        return name, Overlay.create(below, layer_dir, chunk_size=CHUNK_SIZE)

    def create_snapshot(self, name: str, now: float) -> None:
        """Freeze the disk as it is now under *name*; costs metadata only."""
        if not _NAME.match(name):
            raise SnapshotError(f"snapshot name {name!r}: 1 to 64 letters, digits, '.', '_', '-'")
        with self._ops:
            if any(s["name"] == name for s in self._manifest.snapshots):
                raise SnapshotError(f"a snapshot named {name!r} exists already")
            top = self._top
            top.flush()
            new_name, new = self._new_layer(top)
            old = self._manifest
            manifest = _Manifest(old.size, old.next, [*old.layers, new_name],
                                 [*old.snapshots, {"name": name, "created": now, "layer": old.layers[-1]}])
            try:
                _write_manifest(self._dir, manifest)
            except BaseException:
                new.close()
                raise
            self._manifest = manifest
            self._layers.append(new)
            self._top = new

    def rollback(self, name: str) -> None:
        """Return the disk to snapshot *name*; later snapshots and every change since go."""
        with self._ops:
            index = self._find(name)
            snap_layer = str(self._manifest.snapshots[index]["layer"])
            keep = self._manifest.layers.index(snap_layer) + 1
            frozen = self._layers[keep - 1]
            new_name, new = self._new_layer(frozen)
            old = self._manifest
            manifest = _Manifest(old.size, old.next, [*old.layers[:keep], new_name],
                                 old.snapshots[: index + 1])
            try:
                _write_manifest(self._dir, manifest)
            except BaseException:
                new.close()
                raise
            dropped = list(zip(old.layers[keep:], self._layers[keep:], strict=True))
            self._manifest = manifest
            self._layers = [*self._layers[:keep], new]
            self._top = new
            for layer_name, layer in dropped:
                with contextlib.suppress(OSError):
                    layer.close()
                shutil.rmtree(self._dir / layer_name, ignore_errors=True)

    def delete_snapshot(self, name: str) -> None:
        """Forget snapshot *name*; the disk and the other snapshots stay as they are."""
        with self._ops:
            index = self._find(name)
            layers = self._manifest.layers
            k = layers.index(str(self._manifest.snapshots[index]["layer"]))
            lower, upper = self._layers[k], self._layers[k + 1]
            below: BlockDevice = self._base if k == 0 else self._layers[k - 1]
            _merge_down(lower, self._dir / layers[k], upper, self._dir / layers[k + 1])
            # upper now holds every chunk lower held: it shows the same over lower's base
            upper.close()
            reopened = Overlay.open(below, self._dir / layers[k + 1])
            old = self._manifest
            manifest = _Manifest(old.size, old.next, old.layers[:k] + old.layers[k + 1:],
                                 old.snapshots[:index] + old.snapshots[index + 1:])
            try:
                _write_manifest(self._dir, manifest)
            except BaseException:
                reopened.close()
                raise
            self._manifest = manifest
            self._layers = [*self._layers[:k], reopened, *self._layers[k + 2:]]
            # the layer above the merged one read through it: reopen it over the new one
            if k + 1 < len(self._layers):
                above_name = manifest.layers[k + 1]
                self._layers[k + 1].close()
                self._layers[k + 1] = Overlay.open(reopened, self._dir / above_name)
                for j in range(k + 2, len(self._layers)):
                    self._layers[j].close()
                    self._layers[j] = Overlay.open(self._layers[j - 1], self._dir / manifest.layers[j])
            self._top = self._layers[-1]
            with contextlib.suppress(OSError):
                lower.close()
            shutil.rmtree(self._dir / old.layers[k], ignore_errors=True)


def _merge_down(lower: Overlay, lower_dir: Path, upper: Overlay, upper_dir: Path) -> None:
    """Copy into *upper* each chunk *lower* holds that *upper* does not (content-preserving)."""
    lower.flush()
    upper.flush()
    lmap = read_overlay_map(lower_dir)
    try:
        umap = read_overlay_map(upper_dir)
        umap.close()
        cs = lmap.chunk_size
        if umap.chunk_size != cs:
            raise OSError(errno.EINVAL, "layers of different chunk sizes")
        size = lower.size
        buf = bytearray(cs)
        for c, (lstate, ustate) in enumerate(zip(lmap.states, umap.states, strict=True)):
            if ustate != BASE or lstate == BASE:
                continue
            start = c * cs
            n = min(cs, size - start)
            if lstate == DATA:
                view = memoryview(buf)[:n]
                lower.read_into(start, view)
                upper.write(start, view)
            elif lstate == ZERO:
                upper.write_zeroes(start, n)
    finally:
        lmap.close()
    upper.flush()
