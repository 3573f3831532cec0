"""Each node's own disk: a copy-on-write overlay over a shared, read-only base image.

Every node that has a disk (``--boot iscsi``, ``--boot kernel`` on a disk
image, or ``--disk IMAGE``) gets one :class:`~mobinux.storage.overlay.Overlay`,
keyed by its MAC (not by iSCSI session: one boot uses two sessions, iPXE's and
the booted system's). The base file is opened read-only and shared by every
node on it, so the page cache holds one copy of the working set for the whole
classroom.

On-disk layout (all under the data directory)::

    overlays/<mac, 12 hex digits>/<key>/base     the base file, relative to the data dir
    overlays/<mac, 12 hex digits>/<key>/meta ... the overlay's own files (overlay.py)

``<key>`` is derived from the base file's path, so a node that moves to another
base (a new image version, ``node set --disk``) gets a new directory; the old
one is removed only after the new one exists, and a directory left by a crash
in between is removed at the next open. A node has at most one directory
afterwards.

What happens when:

* first login of a node (or after a server restart): the overlay is opened as
  it was left (a node that has not rebooted keeps its changes, even across a
  server restart), or created empty;
* a new boot of the node (:meth:`NodeDisks.reset`, called when the node's PXE
  DHCP request or boot script is seen): the overlay is emptied in O(1)
  (:meth:`Overlay.reset`) or, when the node should now use another base,
  replaced by a new empty one. A ``--persistent`` node keeps its overlay (and
  the base it was made on) until ``mobinux node reset``;
* the node is removed: its directory is removed.

Overlay space (:func:`overlay_usage`) is what the files take on disk
(allocated blocks), readable by the CLI while a server runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mobinux.inventory.db import Image, Node
from mobinux.storage.file import FileDevice
from mobinux.storage.overlay import Overlay

log = logging.getLogger("mobinux.iscsi")

OVERLAYS_DIR = "overlays"
BASE_FILE = "base"
CHUNK_SIZE = 65536


def node_base(node: Node, images: dict[str, Image]) -> str | None:
    """The base file (relative to the data dir) of *node*'s own disk, or None if it has none."""
    name = node.disk_image
    image = images.get(name) if name else None
    return None if image is None else image.disk


def node_overlay_root(data_dir: Path, mac: str) -> Path:
    return data_dir / OVERLAYS_DIR / mac.replace(":", "").lower()


def _key(base_rel: str) -> str:
    return "b-" + hashlib.sha256(base_rel.encode()).hexdigest()[:16]


def overlay_usage(data_dir: Path, mac: str) -> int:
    """Bytes of disk the node's overlay takes (allocated blocks of its files)."""
    total = 0
    root = node_overlay_root(data_dir, mac)
    with contextlib.suppress(FileNotFoundError):
        for sub in root.iterdir():
            with contextlib.suppress(OSError):
                for entry in os.scandir(sub):
                    with contextlib.suppress(OSError):
                        if entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def remove_overlay(data_dir: Path, mac: str) -> None:
    """Forget a node's overlay (the node was removed). Only when no server holds it open."""
    shutil.rmtree(node_overlay_root(data_dir, mac), ignore_errors=True)


def _read_base(directory: Path) -> str | None:
    try:
        return (directory / BASE_FILE).read_text().strip() or None
    except OSError:
        return None


def _write_base(directory: Path, base_rel: str) -> None:
    tmp = directory / (BASE_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(base_rel + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / BASE_FILE)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class NodeDisk:
    """One node's open overlay and the base it sits on."""

    mac: str
    base_rel: str
    overlay: Overlay
    # Set when a session may have written since the last reset: resetting an
    # untouched overlay would only churn files (a boot sends several DHCP packets).
    used: bool = field(default=True)


class NodeDisks:
    """The open overlays of the nodes, and their shared read-only bases."""

    def __init__(self, data_dir: Path, *, chunk_size: int = CHUNK_SIZE) -> None:
        self._data_dir = data_dir
        self._chunk_size = chunk_size
        self._disks: dict[str, NodeDisk] = {}
        self._bases: dict[str, tuple[FileDevice, int]] = {}  # base_rel -> (device, users)

    # -- bases ------------------------------------------------------------

    def _base(self, base_rel: str) -> FileDevice:
        entry = self._bases.get(base_rel)
        if entry is None:
            device = FileDevice(self._data_dir / base_rel, readonly=True)
            self._bases[base_rel] = (device, 1)
            return device
        self._bases[base_rel] = (entry[0], entry[1] + 1)
        return entry[0]

    def _release_base(self, base_rel: str) -> None:
        device, users = self._bases[base_rel]
        if users > 1:
            self._bases[base_rel] = (device, users - 1)
        else:
            del self._bases[base_rel]
            device.close()

    # -- overlays ---------------------------------------------------------

    def get(self, mac: str) -> NodeDisk | None:
        return self._disks.get(mac)

    def open(self, mac: str, base_rel: str, *, persistent: bool, limit: int | None) -> NodeDisk:
        """The node's overlay, opened as it was left, or created on *base_rel*.

        A non-persistent node left on another base (the image changed while
        it was off) moves to *base_rel* with an empty overlay: it has not
        booted since, and its next boot would empty it anyway.
        """
        disk = self._disks.get(mac)
        if disk is not None:
            disk.overlay.limit = limit
            return disk
        root = node_overlay_root(self._data_dir, mac)
        root.mkdir(parents=True, exist_ok=True)
        existing = self._existing(root)
        keep = None
        for directory, rel in existing:
            if rel == base_rel or (persistent and keep is None and rel is not None
                                   and (self._data_dir / rel).exists()):
                keep = (directory, rel)
        if keep is not None:
            directory, rel = keep
            assert rel is not None
            try:
                disk = self._open_dir(mac, directory, rel, limit)
            except OSError as exc:
                if persistent:
                    raise  # its changes are meant to last: never silently start over
                log.warning("node %s: overlay %s unreadable (%s); starting an empty one",
                            mac, directory, exc.strerror or exc)
                keep = None
        if keep is None:
            disk = self._create(mac, root, base_rel, limit)
        assert disk is not None
        for directory, _ in existing:
            if directory != root / _key(disk.base_rel):
                shutil.rmtree(directory, ignore_errors=True)
        self._disks[mac] = disk
        return disk

    def _existing(self, root: Path) -> list[tuple[Path, str | None]]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for sub in sorted(root.iterdir()):
                if sub.is_dir():
                    found.append((sub, _read_base(sub)))
        return found

    def _open_dir(self, mac: str, directory: Path, base_rel: str, limit: int | None) -> NodeDisk:
        base = self._base(base_rel)
        try:
            overlay = Overlay.open(base, directory, limit=limit)
        except BaseException:
            self._release_base(base_rel)
            raise
        return NodeDisk(mac, base_rel, overlay)

    def _create(self, mac: str, root: Path, base_rel: str, limit: int | None) -> NodeDisk:
        directory = root / _key(base_rel)
        shutil.rmtree(directory, ignore_errors=True)  # a broken or half-made one
        directory.mkdir(parents=True)
        base = self._base(base_rel)
        try:
            _write_base(directory, base_rel)
            overlay = Overlay.create(base, directory, chunk_size=self._chunk_size, limit=limit)
            _fsync_dir(root)
        except BaseException:
            self._release_base(base_rel)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return NodeDisk(mac, base_rel, overlay, used=False)

    def reset(self, mac: str, base_rel: str, *, persistent: bool, limit: int | None,
              force: bool = False) -> bool:
        """A new boot: empty the node's overlay (O(1)) unless it is persistent.

        *force* (``mobinux node reset``) empties a persistent overlay too.
        Returns whether anything was discarded. The caller has closed the
        node's sessions first.
        """
        if persistent and not force:
            return False
        disk = self._disks.get(mac)
        if disk is None:
            disk = self.open(mac, base_rel, persistent=persistent and not force, limit=limit)
        if disk.base_rel == base_rel:
            if not disk.used and not force:
                return False
            disk.overlay.reset()
            disk.used = False
            return True
        # Another base now (a new image version or disk): a new overlay, then drop the old.
        self.close_node(mac)
        root = node_overlay_root(self._data_dir, mac)
        new = self._create(mac, root, base_rel, limit)
        self._disks[mac] = new
        for directory, _ in self._existing(root):
            if directory != root / _key(base_rel):
                shutil.rmtree(directory, ignore_errors=True)
        return True

    def close_node(self, mac: str) -> None:
        disk = self._disks.pop(mac, None)
        if disk is None:
            return
        try:
            disk.overlay.close()
        except OSError as exc:
            log.warning("node %s: closing its overlay: %s", mac, exc.strerror or exc)
        finally:
            self._release_base(disk.base_rel)

    def forget(self, mac: str) -> None:
        """The node is gone: close and remove its overlay."""
        self.close_node(mac)
        remove_overlay(self._data_dir, mac)

    def macs(self) -> list[str]:
        return list(self._disks)

    def close(self) -> None:
        for mac in list(self._disks):
            self.close_node(mac)
        for device, _ in self._bases.values():
            device.close()
        self._bases.clear()
