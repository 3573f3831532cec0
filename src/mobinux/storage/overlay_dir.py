"""The files of one overlay directory, behind an interface small enough to fake.

:class:`~mobinux.storage.overlay.Overlay` does every file operation through an
:class:`OverlayDir`: the real one is :class:`PosixDir` (``os`` calls, and a
:class:`~mobinux.storage.file.FileDevice` for the data file, so nowait I/O and
hole punching behave exactly as for a raw export);
:class:`~mobinux.storage.powerloss.PowerLossDir` is an in-memory one that can
lose power at any moment, for the crash tests.

The interface spells out the durability rules the overlay relies on, which are
the POSIX ones with nothing assumed beyond them:

* a file's *contents* (and size) are durable only after ``sync()`` of that
  file (``DataFile.flush`` / ``MetaFile.sync``);
* a *name* (creation, rename, unlink) is durable only after ``sync()`` of the
  directory; before that a power loss may keep any prefix of the name changes;
* ``rename`` replaces the target atomically.

:class:`TreeDir` adds subdirectories (:class:`PosixDir` and
:class:`~mobinux.storage.powerloss.PowerLossDir` are both), for the user disks
of :mod:`mobinux.storage.chain`, whose layers are one overlay directory each.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Protocol

from mobinux.storage.file import FileDevice


class DataFile(Protocol):
    """The overlay's sparse data file: the I/O half of a BlockDevice."""

    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None: ...

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None: ...

    def flush(self) -> None:
        """fdatasync: contents written so far are durable."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole (the range reads zeros and gives its space back)."""
        ...

    def close(self) -> None: ...


class MetaFile(Protocol):
    """A small metadata file open for writing (checkpoint or journal)."""

    def pwrite(self, offset: int, data: bytes) -> None:
        """Write all of *data* at *offset* or raise."""
        ...

    def sync(self) -> None:
        """fsync: contents and size are durable."""
        ...

    def close(self) -> None: ...


class OverlayDir(Protocol):
    def listdir(self) -> list[str]: ...

    def read(self, name: str) -> bytes:
        """The whole file; FileNotFoundError if there is none."""
        ...

    def create(self, name: str) -> MetaFile:
        """Create *name* empty (truncating an existing file) and open it for writing."""
        ...

    def open_meta(self, name: str) -> MetaFile:
        """Open an existing file for writing (FileNotFoundError if there is none)."""
        ...

    def create_data(self, name: str, size: int) -> None:
        """Create a new sparse file of *size* bytes (all holes) whose size is already synced."""
        ...

    def open_data(self, name: str) -> DataFile: ...

    def rename(self, src: str, dst: str) -> None: ...

    def unlink(self, name: str) -> None:
        """Remove *name*; a missing file is not an error."""
        ...

    def sync(self) -> None:
        """fsync the directory: every name change so far is durable."""
        ...


class TreeDir(OverlayDir, Protocol):
    """A directory that also holds subdirectories (a user disk's layers, one each)."""

    def subdir(self, name: str) -> TreeDir:
        """The subdirectory *name*, made (with its name durable) if it is missing."""
        ...

    def subdirs(self) -> list[str]:
        """The names of the subdirectories."""
        ...

    def remove_subdir(self, name: str) -> None:
        """Remove *name* and everything in it; a missing one is not an error.

        Not durable by itself (like ``rm -r``): after a crash part of it may be
        back, so callers remove only what they no longer name, and again later.
        """
        ...


class _PosixMetaFile:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[n:]
            offset += n

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class PosixDir:
    """An overlay directory on a real file system."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            self.path.mkdir(parents=True, exist_ok=True)
            # The new directory's own name must survive a crash too.
            _fsync_dir(self.path.parent)

    def __repr__(self) -> str:
        return f"PosixDir({str(self.path)!r})"

    def listdir(self) -> list[str]:
        return sorted(os.listdir(self.path))

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def create(self, name: str) -> MetaFile:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        return _PosixMetaFile(os.open(self.path / name, flags, 0o600))

    def open_meta(self, name: str) -> MetaFile:
        return _PosixMetaFile(os.open(self.path / name, os.O_WRONLY | os.O_CLOEXEC))

    def create_data(self, name: str, size: int) -> None:
        path = self.path / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)  # a hole: costs no space, touches no data
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)

    def open_data(self, name: str) -> DataFile:
        return FileDevice(self.path / name)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self.path / src, self.path / dst)

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / name)

    def sync(self) -> None:
        _fsync_dir(self.path)

    def subdir(self, name: str) -> PosixDir:
        _check_subdir_name(name)
        return PosixDir(self.path / name)

    def subdirs(self) -> list[str]:
        with os.scandir(self.path) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    def remove_subdir(self, name: str) -> None:
        _check_subdir_name(name)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.path / name)


def _check_subdir_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"bad subdirectory name {name!r}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
