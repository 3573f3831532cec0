"""PowerLossDir: an in-memory overlay directory that can lose power at any moment.

A test fake shipped with the library (like :class:`~mobinux.storage.volatile.
VolatileCacheDevice`), for proving that the overlay's metadata survives power
loss.  It implements :class:`~mobinux.storage.overlay_dir.OverlayDir` and keeps,
for every file, what reads see *and* what is durable, and for the directory
the names as they are *and* as they were at the last directory sync:

* file contents become durable only at that file's ``sync``/``flush``;
* names (create, rename, unlink) become durable only at the ``sync`` of the
  directory holding them.

It is also a :class:`~mobinux.storage.overlay_dir.TreeDir`: :meth:`PowerLossDir.
subdir` gives a :class:`PowerLossSubDir`, a directory in the same file system
(same files, same power), so several overlays -- or the layers of a user disk
-- can share one power switch.  Each directory syncs only its own names.

:meth:`PowerLossDir.power_cut` throws away what is not durable, in one of three
ways (``mode``), from kindest to nastiest:

``"drop"``
    every unsynced write and name change is lost;
``"tear"``
    as ``drop``, except that a random subset of the 512-byte sectors of each
    file's *last* unsynced write reached the media (each such sector whole, as
    the page cache held it right after that write), and a random prefix of the
    unsynced name changes (a journalling file system commits them in order)
    survived;
``"scramble"``
    every sector touched since the file's last sync independently holds any
    value it had since then (the sync-time one or one written later, as page
    writeback in any order would leave it), the file's size is any size it had
    since, and a random prefix of the name changes survived.

Sectors are the unit of atomicity (a sector is never half old, half new), as
on real disks.  :meth:`PowerLossDir.cut_after` arms a cut just before the
N-th next state-changing call, which then raises :class:`PowerCut` -- so the
power can go off *inside* an overlay operation, between any two of its file
system calls.  After a cut every call (through any handle) raises
:class:`PowerCut` until :meth:`reboot`; handles opened before the cut stay dead.

:meth:`PowerLossDir.fail_after` makes the N-th next state-changing call fail
with an ``OSError`` instead (``ENOSPC`` by default; a failing write may first
store a prefix of itself ending on a sector boundary), for testing error paths.
"""

from __future__ import annotations

import errno
import random
import threading
from typing import Literal

from mobinux.storage.device import WouldBlock
from mobinux.storage.overlay_dir import DataFile, MetaFile

SECTOR = 512

LossMode = Literal["drop", "tear", "scramble"]


class PowerCut(BaseException):
    """The power went off.

    A BaseException, so that code under test which handles ``OSError`` (or
    even ``Exception``) cannot mistake it for an I/O error and carry on.
    """


class _Inode:
    __slots__ = ("data", "log", "synced")

    def __init__(self, data: bytearray) -> None:
        self.data = data  # what reads see
        self.synced = bytes(data)  # what survives a power cut
        # unsynced changes, oldest first: ("write", offset, bytes) |
        # ("punch", offset, length)
        self.log: list[tuple[str, int, bytes | int]] = []


def _sectors(offset: int, length: int) -> range:
    if length <= 0:
        return range(0)
    return range(offset // SECTOR, (offset + length - 1) // SECTOR + 1)


def _apply(buf: bytearray, op: tuple[str, int, bytes | int]) -> None:
    kind, offset, arg = op
    if kind == "write":
        assert isinstance(arg, bytes)
        end = offset + len(arg)
        if len(buf) < end:
            buf.extend(bytes(end - len(buf)))
        buf[offset:end] = arg
    else:
        assert isinstance(arg, int)
        end = min(offset + arg, len(buf))
        if end > offset:
            buf[offset:end] = bytes(end - offset)


def _op_span(op: tuple[str, int, bytes | int]) -> tuple[int, int]:
    _kind, offset, arg = op
    return offset, len(arg) if isinstance(arg, bytes) else arg


def _after_loss(inode: _Inode, mode: LossMode, rng: random.Random) -> bytearray:
    """The contents *inode* has after a power cut."""
    out = bytearray(inode.synced)
    if not inode.log or mode == "drop":
        return out
    if mode == "tear":
        kind, offset, arg = inode.log[-1]
        if kind == "write":
            assert isinstance(arg, bytes)
            # A torn sector holds what the *whole* sector held right after the
            # write (the page cache's copy, which includes earlier unsynced
            # writes to the same sector) -- never the written bytes pasted onto
            # the synced sector: a sector reaches the media whole, so a value
            # the sector never held cannot appear.  The last write is the last
            # change, so the sector's current contents are exactly that value.
            current = inode.data
            for s in _sectors(offset, len(arg)):
                if rng.random() < 0.5:
                    a, b = s * SECTOR, min((s + 1) * SECTOR, len(current))
                    if len(out) < b:
                        out.extend(bytes(b - len(out)))
                    out[a:b] = current[a:b]
        return out
    # scramble: each touched sector takes any value it held since the sync.
    cur = bytearray(inode.synced)
    sizes = [len(cur)]
    history: dict[int, list[bytes]] = {}

    def sector_value(s: int) -> bytes:
        value = bytes(cur[s * SECTOR : (s + 1) * SECTOR])
        return value + bytes(SECTOR - len(value))

    for op in inode.log:
        touched = _sectors(*_op_span(op))
        for s in touched:
            history.setdefault(s, [sector_value(s)])
        _apply(cur, op)
        sizes.append(len(cur))
        for s in touched:
            history[s].append(sector_value(s))
    top = max(sizes)
    out = cur + bytes(top - len(cur))
    for s, values in history.items():
        out[s * SECTOR : (s + 1) * SECTOR] = rng.choice(values)
    del out[rng.choice(sizes) :]
    return out


class _Handle:
    def __init__(self, fs: PowerLossDir, inode: _Inode) -> None:
        self._fs = fs
        self._inode = inode
        self._boot = fs.boot

    def _alive(self) -> None:
        self._fs._check_alive(self._boot)

    def _write(self, offset: int, data: bytes) -> None:
        fs = self._fs
        with fs._lock:
            failure = fs._mutating(self._boot)
            if failure is not None:
                # A failing write may have stored some of its sectors first (a
                # short write ends on a page, hence sector, boundary).
                ends = range(-(-(offset + 1) // SECTOR) * SECTOR, offset + len(data), SECTOR)
                keep = fs._rng.choice([offset, *ends]) - offset
                if keep:
                    self._store(("write", offset, data[:keep]))
                raise failure
            self._store(("write", offset, data))

    def _store(self, op: tuple[str, int, bytes | int]) -> None:
        _apply(self._inode.data, op)
        self._inode.log.append(op)

    def _sync(self) -> None:
        fs = self._fs
        with fs._lock:
            failure = fs._mutating(self._boot)
            if failure is not None:
                raise failure
            self._inode.synced = bytes(self._inode.data)
            self._inode.log.clear()


class _MetaHandle(_Handle):
    def pwrite(self, offset: int, data: bytes) -> None:
        self._write(offset, bytes(data))

    def sync(self) -> None:
        self._sync()

    def close(self) -> None:
        pass


class _DataHandle(_Handle):
    def read_into(self, offset: int, buf: memoryview, *, nowait: bool = False) -> None:
        with self._fs._lock:
            self._alive()
            if nowait and self._fs.nowait_would_block:
                raise WouldBlock
            data = self._inode.data
            piece = data[offset : offset + len(buf)]
            buf[: len(piece)] = piece
            if len(piece) < len(buf):
                buf[len(piece) :] = bytes(len(buf) - len(piece))

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, nowait: bool = False
    ) -> None:
        with self._fs._lock:
            self._alive()
            if nowait and self._fs.nowait_would_block:
                raise WouldBlock
            payload = bytes(memoryview(data).cast("B"))
            if offset < 0 or offset + len(payload) > len(self._inode.data):
                raise OSError(errno.EINVAL, "write past the end of the data file")
            self._write(offset, payload)

    def flush(self) -> None:
        self._sync()

    def discard(self, offset: int, length: int) -> None:
        fs = self._fs
        with fs._lock:
            failure = fs._mutating(self._boot)
            if failure is not None:
                raise failure
            self._store(("punch", offset, length))

    def close(self) -> None:
        pass


class PowerLossDir:
    """An in-memory :class:`~mobinux.storage.overlay_dir.OverlayDir` with a power switch."""

    def __init__(self, *, seed: int = 0) -> None:
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._names: dict[str, _Inode] = {}
        self._synced_names: dict[str, _Inode] = {}
        # unsynced name changes: ("link", name, inode) | ("unlink", name, None)
        # | ("rename", src, dst)
        self._name_log: list[tuple[str, str, _Inode | str | None]] = []
        self.boot = 0
        self.dead = False
        self.ops = 0  # state-changing calls so far (across boots)
        self.cuts = 0
        self.nowait_would_block = False
        self._cut_countdown: int | None = None
        self._cut_mode: LossMode = "drop"
        self._fail_countdown: int | None = None
        self._fail_errno = errno.ENOSPC

    # -- the power switch --------------------------------------------------

    def cut_after(self, n: int | None, mode: LossMode = "drop") -> None:
        """Cut the power just before the state-changing call *n* calls from now (None: never)."""
        with self._lock:
            self._cut_countdown = n
            self._cut_mode = mode

    def fail_after(self, n: int | None, err: int = errno.ENOSPC) -> None:
        """Make the state-changing call *n* calls from now fail with OSError(*err*)."""
        with self._lock:
            self._fail_countdown = n
            self._fail_errno = err

    @property
    def armed(self) -> tuple[bool, bool]:
        """(a power cut is armed, a failure is armed)."""
        return self._cut_countdown is not None, self._fail_countdown is not None

    def power_cut(self, mode: LossMode = "drop") -> None:
        """Lose everything not durable, as described in the module docstring."""
        with self._lock:
            rng = self._rng
            names = dict(self._synced_names)
            if mode != "drop" and self._name_log:
                for kind, name, arg in self._name_log[: rng.randint(0, len(self._name_log))]:
                    if kind == "link":
                        assert isinstance(arg, _Inode)
                        names[name] = arg
                    elif kind == "unlink":
                        names.pop(name, None)
                    else:
                        assert isinstance(arg, str)
                        if name in names:
                            names[arg] = names.pop(name)
            survivors: dict[int, _Inode] = {}
            for inode in names.values():
                if id(inode) not in survivors:
                    survivors[id(inode)] = inode
                    inode.data = _after_loss(inode, mode, rng)
                    inode.synced = bytes(inode.data)
                    inode.log = []
            self._names = names
            self._synced_names = dict(names)
            self._name_log = []
            self._cut_countdown = None
            self._fail_countdown = None
            self.dead = True
            self.cuts += 1

    def reboot(self) -> None:
        """Power back on; handles opened before the cut stay dead."""
        with self._lock:
            self.dead = False
            self.boot += 1

    def snapshot(self) -> dict[str, bytes]:
        """Name -> contents as reads see them (for assertions)."""
        with self._lock:
            return {name: bytes(inode.data) for name, inode in self._names.items()}

    def _check_alive(self, boot: int | None = None) -> None:
        if self.dead or (boot is not None and boot != self.boot):
            raise PowerCut

    def _mutating(self, boot: int | None = None) -> OSError | None:
        """Account for one state-changing call: cut the power, fail it, or let it run."""
        self._check_alive(boot)
        if self._cut_countdown is not None:
            if self._cut_countdown <= 0:
                self.power_cut(self._cut_mode)
                raise PowerCut
            self._cut_countdown -= 1
        self.ops += 1
        if self._fail_countdown is not None:
            if self._fail_countdown <= 0:
                self._fail_countdown = None
                return OSError(self._fail_errno, "injected failure")
            self._fail_countdown -= 1
        return None

    def _mutate_or_raise(self) -> None:
        failure = self._mutating()
        if failure is not None:
            raise failure

    # -- directories -------------------------------------------------------
    #
    # Names are paths ("l3/meta"): a directory is the set of names under its
    # prefix, and exists while it holds a file.  Each directory syncs its own
    # name changes, as fsync of a POSIX directory does; a new subdirectory's
    # own name is durable at once (PosixDir fsyncs the parent when it makes one).

    def _in_dir(self, prefix: str, name: str) -> bool:
        return name.startswith(prefix) and "/" not in name[len(prefix) :]

    def _listdir(self, prefix: str) -> list[str]:
        with self._lock:
            self._check_alive()
            return sorted(n[len(prefix) :] for n in self._names if self._in_dir(prefix, n))

    def _subdirs(self, prefix: str) -> list[str]:
        with self._lock:
            self._check_alive()
            rests = [n[len(prefix) :] for n in self._names if n.startswith(prefix)]
            return sorted({rest.split("/", 1)[0] for rest in rests if "/" in rest})

    def _read(self, path: str) -> bytes:
        with self._lock:
            self._check_alive()
            try:
                return bytes(self._names[path].data)
            except KeyError:
                raise FileNotFoundError(errno.ENOENT, "no such file", path) from None

    def _link(self, name: str, inode: _Inode) -> None:
        self._names[name] = inode
        self._name_log.append(("link", name, inode))

    def _create(self, path: str) -> MetaFile:
        with self._lock:
            self._mutate_or_raise()
            inode = _Inode(bytearray())
            self._link(path, inode)
            return _MetaHandle(self, inode)

    def _open_meta(self, path: str) -> MetaFile:
        with self._lock:
            self._check_alive()
            if path not in self._names:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            return _MetaHandle(self, self._names[path])

    def _create_data(self, path: str, size: int) -> None:
        with self._lock:
            self._mutate_or_raise()
            if path in self._names:
                raise FileExistsError(errno.EEXIST, "file exists", path)
            self._link(path, _Inode(bytearray(size)))

    def _open_data(self, path: str) -> DataFile:
        with self._lock:
            self._check_alive()
            if path not in self._names:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            return _DataHandle(self, self._names[path])

    def _rename(self, src: str, dst: str) -> None:
        with self._lock:
            self._mutate_or_raise()
            if src not in self._names:
                raise FileNotFoundError(errno.ENOENT, "no such file", src)
            self._names[dst] = self._names.pop(src)
            self._name_log.append(("rename", src, dst))

    def _unlink(self, path: str) -> None:
        with self._lock:
            self._mutate_or_raise()
            if self._names.pop(path, None) is not None:
                self._name_log.append(("unlink", path, None))

    def _remove_tree(self, prefix: str) -> None:
        """Unlink every file under *prefix*, one call each (as rmtree does)."""
        with self._lock:
            names = sorted(n for n in self._names if n.startswith(prefix))
        for name in names:
            self._unlink(name)

    def sync_dir(self, prefix: str) -> None:
        """fsync the directory *prefix* ("" for the root, else ending in "/")."""
        with self._lock:
            self._mutate_or_raise()
            for name in set(self._names) | set(self._synced_names):
                if self._in_dir(prefix, name):
                    if name in self._names:
                        self._synced_names[name] = self._names[name]
                    else:
                        self._synced_names.pop(name, None)
            # Renames stay within one directory, so their source decides.
            self._name_log = [e for e in self._name_log if not self._in_dir(prefix, e[1])]

    # -- OverlayDir / TreeDir of the root directory ---------------------------

    def listdir(self) -> list[str]:
        return self._listdir("")

    def read(self, name: str) -> bytes:
        return self._read(name)

    def create(self, name: str) -> MetaFile:
        return self._create(name)

    def open_meta(self, name: str) -> MetaFile:
        return self._open_meta(name)

    def create_data(self, name: str, size: int) -> None:
        self._create_data(name, size)

    def open_data(self, name: str) -> DataFile:
        return self._open_data(name)

    def rename(self, src: str, dst: str) -> None:
        self._rename(src, dst)

    def unlink(self, name: str) -> None:
        self._unlink(name)

    def sync(self) -> None:
        self.sync_dir("")

    def subdir(self, name: str) -> PowerLossSubDir:
        return PowerLossSubDir(self, name + "/")

    def subdirs(self) -> list[str]:
        return self._subdirs("")

    def remove_subdir(self, name: str) -> None:
        self._remove_tree(name + "/")


class PowerLossSubDir:
    """A directory inside a :class:`PowerLossDir` (the same files, the same power).

    File calls go through the root's public methods with the whole path, so a
    test subclass of PowerLossDir that overrides one sees the subdirectories' too.
    """

    def __init__(self, fs: PowerLossDir, prefix: str) -> None:
        if not prefix.endswith("/") or prefix.startswith("/") or "//" in prefix:
            raise ValueError(f"bad directory prefix {prefix!r}")
        self.fs, self.prefix = fs, prefix

    def __repr__(self) -> str:
        return f"PowerLossSubDir({self.prefix!r})"

    def listdir(self) -> list[str]:
        return self.fs._listdir(self.prefix)

    def read(self, name: str) -> bytes:
        return self.fs.read(self.prefix + name)

    def create(self, name: str) -> MetaFile:
        return self.fs.create(self.prefix + name)

    def open_meta(self, name: str) -> MetaFile:
        return self.fs.open_meta(self.prefix + name)

    def create_data(self, name: str, size: int) -> None:
        self.fs.create_data(self.prefix + name, size)

    def open_data(self, name: str) -> DataFile:
        return self.fs.open_data(self.prefix + name)

    def rename(self, src: str, dst: str) -> None:
        self.fs.rename(self.prefix + src, self.prefix + dst)

    def unlink(self, name: str) -> None:
        self.fs.unlink(self.prefix + name)

    def sync(self) -> None:
        self.fs.sync_dir(self.prefix)

    def subdir(self, name: str) -> PowerLossSubDir:
        return PowerLossSubDir(self.fs, self.prefix + name + "/")

    def subdirs(self) -> list[str]:
        return self.fs._subdirs(self.prefix)

    def remove_subdir(self, name: str) -> None:
        self.fs._remove_tree(self.prefix + name + "/")
