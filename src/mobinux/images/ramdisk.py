"""Pack a directory into a compressed newc initramfs, reproducibly and without root.

``pack_ramdisk(DIR, OUT)`` writes the same bytes for the same tree, wherever
and whenever it runs:

* entries in byte order of their path components (a directory right before
  its contents), names relative without ``./``, as gen_init_cpio writes them;
* uid and gid 0, every mtime fixed (``SOURCE_DATE_EPOCH`` when set, else 0),
  device numbers of the containing file system 0;
* inode numbers 1, 2, 3, ... in archive order; hard links share one number,
  carry the number of names in the archive as ``nlink`` and the data on the
  last name only (what ``init/initramfs.c`` expects of newc);
* gzip without file name or timestamp, zstd single-threaded.

A non-root user cannot create device nodes in DIR, so ``dev/`` and
``dev/console`` (character 5:1, mode 0600) are added when the tree lacks
them: the kernel opens /dev/console for init's stdin/stdout/stderr before it
runs /init, and gen_init_cpio-built images carry it for the same reason.
Further special entries come in gen_init_cpio's own syntax (see
:func:`parse_special_entries`).

The archive streams from the files to the compressor to a temporary file
next to OUT, renamed into place at the end: memory use does not grow with
the tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from mobinux.errors import ImageError
from mobinux.images.compress import CompressingWriter, parse_compression
from mobinux.images.cpio import (
    CpioHeader,
    CpioWriter,
    SupportsRead,
    SupportsWrite,
    decode_name,
    stream_checksum,
)

Progress = Callable[[int, int], None]

#: Highest mtime a newc header can hold.
_MAX_MTIME = 0xFFFFFFFF
_PATH_MAX = 4096


@dataclass(frozen=True)
class RamdiskInfo:
    """What :func:`pack_ramdisk` wrote."""

    path: Path
    #: Size of the compressed file in bytes.
    size: int
    #: SHA-256 of the compressed file, hexadecimal.
    sha256: str
    #: Number of archive entries (trailer not counted).
    entries: int
    #: Size of the cpio archive before compression.
    uncompressed_size: int
    compression: str
    #: The mtime written into every entry.
    mtime: int
    #: Things the user should know (no /init, skipped sockets, ...); empty when all is well.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Member:
    """One planned archive entry: a header without inode/link bookkeeping, plus its data.

    Regular files read their data from *source* (a file system path) or take
    *data*; symlinks hold their target in *data*. Members with the same
    *link_key* are hard links of one file.
    """

    name: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev: tuple[int, int] = (0, 0)
    size: int = 0
    source: bytes | None = None
    data: bytes = b""
    link_key: object = None

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)


def sort_key(name: str) -> tuple[bytes, ...]:
    """Archive order: byte order of path components, so a directory precedes its contents."""
    return tuple(name.encode("utf-8", "surrogateescape").split(b"/"))


class _Counter:
    """A writable sink counting bytes and hashing them on the way to *inner*."""

    def __init__(
        self, inner: SupportsWrite, on_data: Callable[[bytes], object] | None = None
    ) -> None:
        self._inner = inner
        self._on_data = on_data
        self.count = 0

    def write(self, data: bytes) -> int:
        self._inner.write(data)
        if self._on_data is not None:
            self._on_data(data)
        self.count += len(data)
        return len(data)


class _ProgressReader:
    def __init__(self, fileobj: SupportsRead, on_read: Callable[[int], None]) -> None:
        self._f = fileobj
        self._on_read = on_read

    def read(self, size: int, /) -> bytes:
        data = self._f.read(size)
        if data:
            self._on_read(len(data))
        return data


def write_members(
    writer: CpioWriter,
    members: Sequence[Member],
    *,
    progress: Progress | None = None,
    first_ino: int = 1,
) -> int:
    """Write *members* in the given order with deterministic inode numbers.

    Returns the number of entries written. Hard links (same ``link_key``, a
    regular file) share an inode number, get ``nlink`` = their count here, and
    only the last carries the data.
    """
    counts: dict[object, int] = {}
    last: dict[object, int] = {}
    for index, m in enumerate(members):
        if m.is_regular and m.link_key is not None:
            counts[m.link_key] = counts.get(m.link_key, 0) + 1
            last[m.link_key] = index
    total = sum(
        m.size
        for i, m in enumerate(members)
        if m.is_regular and (m.link_key is None or last[m.link_key] == i)
    )
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    inodes: dict[object, int] = {}
    next_ino = first_ino
    for index, m in enumerate(members):
        linked = m.is_regular and m.link_key is not None and counts[m.link_key] > 1
        if linked and m.link_key in inodes:
            ino = inodes[m.link_key]
        else:
            ino = next_ino
            next_ino += 1
            if linked:
                inodes[m.link_key] = ino
        carries_data = not m.is_regular or not linked or last[m.link_key] == index
        size = m.size if carries_data else 0
        if stat.S_ISDIR(m.mode):
            nlink = 2
        elif linked:
            nlink = counts[m.link_key]
        else:
            nlink = 1
        header = CpioHeader(
            name=m.name,
            mode=m.mode,
            ino=ino,
            uid=m.uid,
            gid=m.gid,
            nlink=nlink,
            mtime=min(max(m.mtime, 0), _MAX_MTIME),
            filesize=size,
            rdev_major=m.rdev[0],
            rdev_minor=m.rdev[1],
        )
        if m.source is not None and m.is_regular and carries_data:
            _copy_file(writer, header, m.source, advance)
        else:
            writer.add(header, m.data if carries_data else b"")
            if m.is_regular and carries_data:
                advance(len(m.data))
    return len(members)


def _copy_file(
    writer: CpioWriter, header: CpioHeader, source: bytes, advance: Callable[[int], None]
) -> None:
    shown = decode_name(source)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"cannot read {shown}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != header.filesize:
            raise ImageError(f"{shown} changed while it was being packed")
        try:
            checksum = stream_checksum(f, header.filesize) if writer.crc else None
            writer.add(header, _ProgressReader(f, advance), checksum=checksum)
        except OSError as exc:
            raise ImageError(f"cannot read {shown}: {exc.strerror}") from exc
        if f.read(1):
            raise ImageError(f"{shown} grew while it was being packed")


# ------------------------------------------------------------ special entries


def normalise_name(raw: str, *, what: str = "entry") -> str:
    """A relative archive name; refuses ``..`` and empty names. A leading / is dropped."""
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{what} name {raw!r} contains '..'")
    if "\x00" in raw:
        raise ImageError(f"{what} name {raw!r} contains NUL")
    if not parts:
        raise ImageError(f"{what} name {raw!r} names the root")
    return "/".join(parts)


def _octal(text: str, line_no: int) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise ImageError(f"line {line_no}: {text!r} is not an octal mode") from None
    if not 0 <= value <= 0o7777:
        raise ImageError(f"line {line_no}: mode {text!r} out of range")
    return value


def _number(text: str, line_no: int, what: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ImageError(f"line {line_no}: {what} {text!r} is not a number") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise ImageError(f"line {line_no}: {what} {value} out of range")
    return value


_USAGE = {
    "dir": "<name> <mode> <uid> <gid>",
    "nod": "<name> <mode> <uid> <gid> <c|b> <major> <minor>",
    "slink": "<name> <target> <mode> <uid> <gid>",
    "pipe": "<name> <mode> <uid> <gid>",
    "sock": "<name> <mode> <uid> <gid>",
    "file": "<name> <location> <mode> <uid> <gid> [hard links...]",
}


def parse_special_entries(lines: str | Iterable[str], *, base: Path | None = None) -> list[Member]:
    """Entries in the syntax of the kernel's usr/gen_init_cpio, one per line.

    ::

        # comment
        dir   /dev 0755 0 0
        nod   /dev/null 0666 0 0 c 1 3
        nod   /dev/sda 0660 0 6 b 8 0
        slink /bin/sh busybox 0777 0 0
        pipe  /run/fifo 0600 0 0
        sock  /run/sock 0600 0 0
        file  /etc/motd ./motd 0644 0 0 [/etc/motd.link ...]

    ``file`` locations are relative to *base* (default: the current
    directory); extra names after a ``file`` line are hard links to it.
    """
    text_lines = lines.splitlines() if isinstance(lines, str) else list(lines)
    root = base if base is not None else Path.cwd()
    members: list[Member] = []
    for line_no, line in enumerate(text_lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            words = shlex.split(stripped, comments=True)
        except ValueError as exc:
            raise ImageError(f"line {line_no}: {exc}") from None
        kind, args = words[0], words[1:]
        usage = _USAGE.get(kind)
        if usage is None:
            raise ImageError(
                f"line {line_no}: unknown entry type {kind!r} (dir, nod, slink, pipe, sock, file)"
            )
        if len(args) < usage.count("<"):
            raise ImageError(f"line {line_no}: usage: {kind} {usage}")

        if kind == "dir":
            name = normalise_name(args[0], what="dir")
            members.append(
                Member(
                    name,
                    stat.S_IFDIR | _octal(args[1], line_no),
                    _number(args[2], line_no, "uid"),
                    _number(args[3], line_no, "gid"),
                )
            )
        elif kind == "nod":
            name = normalise_name(args[0], what="nod")
            if args[4] not in ("c", "b"):
                raise ImageError(f"line {line_no}: device type must be c or b, not {args[4]!r}")
            ftype = stat.S_IFCHR if args[4] == "c" else stat.S_IFBLK
            members.append(
                Member(
                    name,
                    ftype | _octal(args[1], line_no),
                    _number(args[2], line_no, "uid"),
                    _number(args[3], line_no, "gid"),
                    rdev=(_number(args[5], line_no, "major"), _number(args[6], line_no, "minor")),
                )
            )
        elif kind == "slink":
            name = normalise_name(args[0], what="slink")
            target = args[1].encode("utf-8", "surrogateescape")
            if not target or b"\x00" in target or len(target) >= _PATH_MAX:
                raise ImageError(f"line {line_no}: invalid symlink target {args[1]!r}")
            members.append(
                Member(
                    name,
                    stat.S_IFLNK | _octal(args[2], line_no),
                    _number(args[3], line_no, "uid"),
                    _number(args[4], line_no, "gid"),
                    size=len(target),
                    data=target,
                )
            )
        elif kind in ("pipe", "sock"):
            name = normalise_name(args[0], what=kind)
            ftype = stat.S_IFIFO if kind == "pipe" else stat.S_IFSOCK
            members.append(
                Member(
                    name,
                    ftype | _octal(args[1], line_no),
                    _number(args[2], line_no, "uid"),
                    _number(args[3], line_no, "gid"),
                )
            )
        else:  # file
            location = root / args[1]
            try:
                st = location.stat()
            except OSError as exc:
                raise ImageError(
                    f"line {line_no}: cannot read {location}: {exc.strerror}"
                ) from None
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"line {line_no}: {location} is not a regular file")
            source = os.fsencode(location)
            mode = stat.S_IFREG | _octal(args[2], line_no)
            uid = _number(args[3], line_no, "uid")
            gid = _number(args[4], line_no, "gid")
            key = ("extra-file", line_no) if len(args) > 5 else None
            for link_name in [args[0], *args[5:]]:
                members.append(
                    Member(
                        normalise_name(link_name, what="file"),
                        mode,
                        uid,
                        gid,
                        size=st.st_size,
                        source=source,
                        link_key=key,
                    )
                )
    return members


# ------------------------------------------------------------ tree scanning


@dataclass
class _Scan:
    members: dict[str, Member] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _scan_tree(root: Path, mtime: int) -> _Scan:
    scan = _Scan()
    root_b = os.fsencode(root)

    def walk(dir_b: bytes, prefix: bytes) -> None:
        try:
            with os.scandir(dir_b) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise ImageError(f"cannot list {decode_name(dir_b)}: {exc.strerror}") from exc
        for child in children:
            rel = prefix + child.name
            name = decode_name(rel)
            try:
                st = child.stat(follow_symlinks=False)
            except OSError as exc:
                raise ImageError(f"cannot stat {decode_name(child.path)}: {exc.strerror}") from exc
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                scan.members[name] = Member(name, mode, mtime=mtime)
                walk(child.path, rel + b"/")
            elif stat.S_ISREG(mode):
                key = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
                scan.members[name] = Member(
                    name, mode, mtime=mtime, size=st.st_size, source=child.path, link_key=key
                )
            elif stat.S_ISLNK(mode):
                try:
                    target = os.readlink(child.path)
                except OSError as exc:
                    raise ImageError(
                        f"cannot read link {decode_name(child.path)}: {exc.strerror}"
                    ) from exc
                scan.members[name] = Member(name, mode, mtime=mtime, size=len(target), data=target)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                scan.members[name] = Member(name, mode, mtime=mtime, rdev=rdev)
            elif stat.S_ISFIFO(mode):
                scan.members[name] = Member(name, mode, mtime=mtime)
            else:
                scan.warnings.append(
                    f"skipped {name}: sockets are not packed (add a 'sock' line instead)"
                )

    try:
        root_mode = os.stat(root_b).st_mode
    except OSError as exc:
        raise ImageError(f"cannot read {root}: {exc.strerror}") from exc
    if not stat.S_ISDIR(root_mode):
        raise ImageError(f"{root} is not a directory")
    walk(root_b, b"")
    return scan


def _resolve(name: str, members: dict[str, Member], hops: int = 40) -> Member | None:
    """Follow symlinks inside the archive the way the kernel would from /."""
    parts = name.split("/")
    resolved: list[str] = []
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        here = "/".join([*resolved, part])
        member = members.get(here)
        if member is None:
            return None
        if stat.S_ISLNK(member.mode):
            hops -= 1
            if hops < 0:
                return None
            target = decode_name(member.data)
            if target.startswith("/"):
                resolved = []
            parts = target.split("/") + parts
            continue
        resolved.append(part)
    return members.get("/".join(resolved))


def source_date_epoch() -> int | None:
    """``SOURCE_DATE_EPOCH`` from the environment (reproducible-builds.org), or None."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    try:
        epoch = int(value)
    except ValueError:
        raise ImageError(f"SOURCE_DATE_EPOCH={value!r} is not an integer") from None
    if not 0 <= epoch <= _MAX_MTIME:
        raise ImageError(f"SOURCE_DATE_EPOCH={value!r} does not fit in a cpio header")
    return epoch


def plan_ramdisk(
    src_dir: Path,
    *,
    extra: str | Iterable[str] | None = None,
    extra_base: Path | None = None,
    mtime: int | None = None,
    add_console: bool = True,
) -> tuple[list[Member], list[str]]:
    """The sorted members :func:`pack_ramdisk` would write, and its warnings."""
    if mtime is None:
        mtime = source_date_epoch() or 0
    scan = _scan_tree(src_dir, mtime)
    members = scan.members
    warnings = scan.warnings
    if extra is not None:
        for m in parse_special_entries(extra, base=extra_base):
            old = members.get(m.name)
            if old is not None and stat.S_IFMT(old.mode) != stat.S_IFMT(m.mode):
                warnings.append(
                    f"special entry {m.name} replaces a different kind of file from the tree"
                )
            members[m.name] = replace(m, mtime=mtime)
    if add_console:
        dev = members.get("dev")
        if dev is None:
            members["dev"] = Member("dev", stat.S_IFDIR | 0o755, mtime=mtime)
            dev = members["dev"]
        if not stat.S_ISDIR(dev.mode):
            warnings.append(
                "dev is not a directory: dev/console not added (init will have no console)"
            )
        elif "dev/console" not in members:
            members["dev/console"] = Member(
                "dev/console", stat.S_IFCHR | 0o600, mtime=mtime, rdev=(5, 1)
            )
    for name in members:
        parent = name.rpartition("/")[0]
        if parent and parent not in members:
            warnings.append(f"{name}: parent directory {parent} is not in the archive")
    init = _resolve("init", members)
    if init is None:
        warnings.append(
            "no /init at the root of the tree: the kernel runs /init from an initramfs "
            "(or the program named by rdinit=) and falls back to a root= device otherwise"
        )
    elif not (stat.S_ISREG(init.mode) and init.mode & 0o111):
        warnings.append("/init is not an executable regular file: the kernel cannot run it")
    ordered = [members[name] for name in sorted(members, key=sort_key)]
    return ordered, warnings


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[BinaryIO]:
    """A file that becomes *out* (mode 0644) only if the block completes without error."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise ImageError(f"cannot write in {out.parent}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise ImageError(f"cannot write {out}: {exc.strerror or exc}") from exc
        raise


def pack_ramdisk(
    src_dir: Path,
    out: Path,
    *,
    compression: str = "gzip",
    progress: Progress | None = None,
    level: int | None = None,
    extra: str | Iterable[str] | None = None,
    extra_base: Path | None = None,
    mtime: int | None = None,
    add_console: bool = True,
) -> RamdiskInfo:
    """Pack *src_dir* into the compressed newc initramfs *out* (see the module docstring).

    *progress* is called with (bytes of file data done, bytes in total).
    *extra* holds gen_init_cpio lines (:func:`parse_special_entries`) whose
    entries are added to, or replace, those of the tree. *mtime* overrides
    ``SOURCE_DATE_EPOCH``. Raises :class:`ImageError`; *out* is only replaced
    once the new image is complete.
    """
    kind = parse_compression(compression)
    used_mtime = mtime if mtime is not None else (source_date_epoch() or 0)
    members, warnings = plan_ramdisk(
        src_dir, extra=extra, extra_base=extra_base, mtime=used_mtime, add_console=add_console
    )
    out = Path(out)
    hasher = hashlib.sha256()
    with atomic_output(out) as f:
        sink = _Counter(f, hasher.update)
        compressor = CompressingWriter(sink, kind, level)
        raw = _Counter(compressor)
        writer = CpioWriter(raw)
        count = write_members(writer, members, progress=progress)
        writer.close()
        compressor.close()
    return RamdiskInfo(
        path=out,
        size=sink.count,
        sha256=hasher.hexdigest(),
        entries=count,
        uncompressed_size=raw.count,
        compression=str(kind),
        mtime=used_mtime,
        warnings=tuple(warnings),
    )


__all__ = [
    "Member",
    "RamdiskInfo",
    "atomic_output",
    "pack_ramdisk",
    "parse_special_entries",
    "plan_ramdisk",
    "write_members",
]
