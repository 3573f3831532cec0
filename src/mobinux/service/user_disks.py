"""Users' persistent disks: open, attach as a node's LUN 1, snapshot, roll back.

Each user's disk is a :class:`~mobinux.storage.chain.UserDisk` in
``users/<name>/disk/`` (a chain of copy-on-write layers over a blank disk;
snapshots cost metadata only). Only one process may have a disk open: the
server, when it runs (it attaches disks to nodes), else the CLI. So the CLI
hands snapshot work to a running server through ``disk_requests`` rows, which
:meth:`UserDisks.run_request` carries out; without a server it opens the disk
itself, holding the server lock so that no server starts meanwhile.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mobinux.errors import InventoryError, LocalError

if TYPE_CHECKING:  # imported where used: the CLI loads this module for every command
    from mobinux.storage.chain import SnapshotInfo, UserDisk

log = logging.getLogger("mobinux.users")

USERS_DIR = "users"
USER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
FORMATS = ("ext4",)
REQUEST_KINDS = ("snapshot-create", "snapshot-rollback", "snapshot-delete")

Progress = Callable[[int, int], None]


def user_dir(data_dir: Path, name: str) -> Path:
    return data_dir / USERS_DIR / name


def disk_dir(data_dir: Path, name: str) -> Path:
    return user_dir(data_dir, name) / "disk"


def check_user_name(name: str) -> str:
    if not USER_NAME.match(name):
        raise InventoryError(f"user name {name!r}: use lower-case letters, digits, '_', '-' and '.', "
                             "at most 32, starting with a letter or '_' (like Linux user names)")
    return name


def create_user_disk(data_dir: Path, name: str, size: int, fmt: str | None,
                     progress: Progress | None = None) -> None:
    """Make the user's disk: blank, or with a fresh file system made without root."""
    directory = disk_dir(data_dir, name)
    if directory.exists():
        shutil.rmtree(directory)  # left by an interrupted `user add` that never registered it
    directory.mkdir(parents=True, mode=0o700)
    from mobinux.storage.chain import UserDisk

    disk = UserDisk.create(directory, size)
    try:
        if fmt is not None:
            _format_into(disk, size, fmt, progress)
        disk.flush()
    except BaseException:
        disk.close()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    disk.close()


def _format_into(disk: UserDisk, size: int, fmt: str, progress: Progress | None) -> None:
    """mkfs into a sparse temporary file, then copy only its data extents into the disk."""
    if fmt not in FORMATS:
        raise InventoryError(f"--format {fmt}: only {', '.join(FORMATS)} is supported")
    with tempfile.TemporaryDirectory(prefix="mbxuser-") as tmp:
        image = Path(tmp) / "fs.img"
        with open(image, "wb") as f:
            f.truncate(size)
        try:
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                            str(image)], check=True, capture_output=True, timeout=300)
        except FileNotFoundError:
            raise LocalError("mkfs.ext4 not found (apt-get install e2fsprogs)") from None
        except subprocess.CalledProcessError as exc:
            raise LocalError(f"mkfs.ext4 failed: {exc.stderr.decode(errors='replace').strip()}") from None
        fd = os.open(image, os.O_RDONLY)
        try:
            segments = []
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
                segments.append((start, end - start))
                pos = end
            total = sum(n for _, n in segments)
            done = 0
            for start, length in segments:
                offset = start
                while offset < start + length:
                    n = min(1 << 20, start + length - offset)
                    disk.write(offset, os.pread(fd, n, offset))
                    offset += n
                    done += n
                    if progress is not None:
                        progress(done, total)
        finally:
            os.close(fd)


class UserDisks:
    """The user disks a server has open (attached to nodes), and snapshot requests."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._open: dict[str, UserDisk] = {}

    def get(self, name: str) -> UserDisk | None:
        return self._open.get(name)

    def open(self, name: str) -> UserDisk:
        disk = self._open.get(name)
        if disk is None:
            from mobinux.storage.chain import UserDisk

            disk = UserDisk.open(disk_dir(self._data_dir, name))
            self._open[name] = disk
        return disk

    def close_user(self, name: str) -> None:
        disk = self._open.pop(name, None)
        if disk is not None:
            try:
                disk.close()
            except OSError as exc:
                log.warning("user %s: closing the disk: %s", name, exc.strerror or exc)

    def names(self) -> list[str]:
        return list(self._open)

    def close(self) -> None:
        for name in list(self._open):
            self.close_user(name)

    def run(self, kind: str, user: str, arg: str, now: float) -> None:
        """Carry out one snapshot operation on *user*'s disk (open here or opened for it)."""
        opened_here = user not in self._open
        disk = self.open(user)
        try:
            apply_snapshot_op(disk, kind, arg, now)
        finally:
            if opened_here:
                self.close_user(user)


def apply_snapshot_op(disk: UserDisk, kind: str, arg: str, now: float) -> None:
    """Run one snapshot operation; a refused one raises InventoryError with the reason."""
    from mobinux.storage.chain import SnapshotError

    try:
        if kind == "snapshot-create":
            disk.create_snapshot(arg, now)
        elif kind == "snapshot-rollback":
            disk.rollback(arg)
        elif kind == "snapshot-delete":
            disk.delete_snapshot(arg)
        else:
            raise InventoryError(f"unknown disk request {kind!r}")
    except SnapshotError as exc:
        raise InventoryError(str(exc)) from None


def list_snapshots(data_dir: Path, name: str) -> list[SnapshotInfo]:
    """The user's snapshots, read without opening the disk for writing."""
    from mobinux.storage.chain import UserDisk

    try:
        return UserDisk.list_snapshots(disk_dir(data_dir, name))
    except FileNotFoundError:
        raise LocalError(f"user {name}'s disk is missing ({disk_dir(data_dir, name)})") from None
