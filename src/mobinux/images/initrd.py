"""Unpack and repack multi-segment initrds without root.

What the kernel accepts as an initrd (``unpack_to_rootfs`` in
init/initramfs.c) is a sequence of *streams*: NUL padding is skipped, a
``0707`` magic starts an uncompressed newc archive, any other magic starts a
compressed stream whose content is itself one or more newc archives (NUL
padding allowed between them). Distributions ship an uncompressed
early-microcode archive (kernel/x86/microcode/...) followed by a gzip, xz or
zstd compressed main archive.

``unpack_initrd(FILE, DIR)`` writes archive number N (counting from 0) into
``DIR/segment-N/`` and everything a non-root user cannot put in a tree into
``DIR/mobinux-initrd.json`` (:class:`InitrdManifest`): the order of segments,
their compression and stream grouping, and for every entry its kind, mode,
owner, mtime and, for devices, numbers. Device nodes, FIFOs and sockets live
only in the manifest; regular files, directories, symlinks and hard links are
created for real, with their modes and mtimes (a non-root user gets at least
``u+rwx`` on directories and ``u+r`` on files, so the tree stays readable and
removable; the manifest keeps the real modes). Names with ``..``, absolute
names and names that lead through a symlink are refused.

``repack_initrd(DIR, FILE)`` rebuilds the segments in the same order with
the same compression. For each segment it emits the manifest's entries in
their original order, taking content, kind, mode and mtime from the tree
(so edits count) and owner and special files from the manifest; files added
to the tree are appended in sorted order with owner 0:0. A permission the
tree could not hold (see ``disk_mode``) is restored from the manifest. The
result is reproducible: inode numbers are assigned in archive order, and
repacking the same DIR twice gives the same bytes.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobinux.errors import ImageError
from mobinux.images.compress import (
    MAGIC_SIZE,
    SUPPORTED,
    ByteSource,
    CompressingWriter,
    Compression,
    DecompressingReader,
    detect,
)
from mobinux.images.cpio import CpioHeader, CpioReader, CpioWriter, SupportsWrite, decode_name
from mobinux.images.ramdisk import Member, atomic_output, sort_key, write_members

MANIFEST_NAME = "mobinux-initrd.json"
MANIFEST_FORMAT = "mobinux-initrd"
MANIFEST_VERSION = 1
#: Longest symlink target accepted (PATH_MAX without its NUL).
SYMLINK_MAX = 4095
ROOT = "."

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class EntryKind(enum.StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"

    @property
    def type_bits(self) -> int:
        return _TYPE_OF_KIND[self]

    @property
    def on_disk(self) -> bool:
        """Whether unpacking creates it in the tree (the others live in the manifest only)."""
        return self in (EntryKind.FILE, EntryKind.DIR, EntryKind.SYMLINK)


_TYPE_OF_KIND = {
    EntryKind.FILE: stat.S_IFREG,
    EntryKind.DIR: stat.S_IFDIR,
    EntryKind.SYMLINK: stat.S_IFLNK,
    EntryKind.CHAR: stat.S_IFCHR,
    EntryKind.BLOCK: stat.S_IFBLK,
    EntryKind.FIFO: stat.S_IFIFO,
    EntryKind.SOCKET: stat.S_IFSOCK,
}
_KIND_OF_TYPE = {bits: kind for kind, bits in _TYPE_OF_KIND.items()}


def kind_of_mode(mode: int) -> EntryKind | None:
    return _KIND_OF_TYPE.get(stat.S_IFMT(mode))


@dataclass(frozen=True)
class ManifestEntry:
    """One archive entry as recorded at unpack time."""

    #: Normalised relative path inside the segment directory; "." for the directory itself.
    name: str
    kind: EntryKind
    #: Permission bits (0o7777) as in the archive.
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    #: (major, minor) of a character or block device.
    rdev: tuple[int, int] | None = None
    #: The name as spelled in the archive, when that is not *name* ("./bin", "a//b").
    archive_name: str | None = None
    #: Permissions the extracted copy really has when the file system refused *mode*.
    disk_mode: int | None = None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "name": self.name,
            "kind": str(self.kind),
            "mode": f"{self.mode:04o}",
        }
        obj["uid"] = self.uid
        obj["gid"] = self.gid
        obj["mtime"] = self.mtime
        if self.rdev is not None:
            obj["rdev"] = list(self.rdev)
        if self.archive_name is not None:
            obj["archive_name"] = self.archive_name
        if self.disk_mode is not None:
            obj["disk_mode"] = f"{self.disk_mode:04o}"
        return obj

    @classmethod
    def from_json(cls, obj: object) -> ManifestEntry:
        d = _as_dict(obj, "entry")
        name = _as_str(d.get("name"), "entry name")
        where = f"entry {name!r}"
        if name != ROOT:
            _check_relative(name, where)
        try:
            kind = EntryKind(_as_str(d.get("kind"), f"{where} kind"))
        except ValueError:
            raise ImageError(f"manifest: {where} has an unknown kind {d.get('kind')!r}") from None
        rdev: tuple[int, int] | None = None
        if "rdev" in d:
            pair = d["rdev"]
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ImageError(f"manifest: {where} rdev must be [major, minor]")
            rdev = (_as_u32(pair[0], f"{where} major"), _as_u32(pair[1], f"{where} minor"))
        archive_name = d.get("archive_name")
        return cls(
            name=name,
            kind=kind,
            mode=_as_mode(d.get("mode"), f"{where} mode"),
            uid=_as_u32(d.get("uid", 0), f"{where} uid"),
            gid=_as_u32(d.get("gid", 0), f"{where} gid"),
            mtime=_as_u32(d.get("mtime", 0), f"{where} mtime"),
            rdev=rdev,
            archive_name=None
            if archive_name is None
            else _as_str(archive_name, f"{where} archive_name"),
            disk_mode=None
            if d.get("disk_mode") is None
            else _as_mode(d["disk_mode"], f"{where} disk_mode"),
        )


@dataclass(frozen=True)
class InitrdSegment:
    """One cpio archive of the initrd and where its tree is."""

    #: Directory (one path component) under the unpack directory.
    directory: str
    compression: Compression
    #: Segments with the same stream number shared one compressed stream.
    stream: int
    #: Where the stream holding this segment started in the original file.
    offset: int
    #: True for the "070702" (checksummed) variant of newc.
    crc: bool
    entries: tuple[ManifestEntry, ...]
    #: Parent directories unpack had to create because the archive did not list them.
    implicit_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class InitrdManifest:
    """Everything about an unpacked initrd that its directory tree cannot hold."""

    segments: tuple[InitrdSegment, ...]

    def to_json(self) -> str:
        """Stable JSON, one entry per line so that diffs stay readable."""
        lines = [
            "{",
            f'  "format": "{MANIFEST_FORMAT}",',
            f'  "version": {MANIFEST_VERSION},',
            '  "segments": [',
        ]
        for si, seg in enumerate(self.segments):
            head = {
                "directory": seg.directory,
                "compression": str(seg.compression),
                "stream": seg.stream,
                "offset": seg.offset,
                "format": "crc" if seg.crc else "newc",
                "implicit_dirs": list(seg.implicit_dirs),
            }
            lines.append("    {")
            for key, value in head.items():
                lines.append(f"      {json.dumps(key)}: {json.dumps(value)},")
            lines.append('      "entries": [')
            for ei, entry in enumerate(seg.entries):
                comma = "," if ei < len(seg.entries) - 1 else ""
                lines.append(f"        {json.dumps(entry.to_json())}{comma}")
            lines.append("      ]")
            lines.append("    }" + ("," if si < len(self.segments) - 1 else ""))
        lines += ["  ]", "}", ""]
        return "\n".join(lines)

    @classmethod
    def from_json(cls, text: str) -> InitrdManifest:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ImageError(f"manifest is not valid JSON: {exc}") from None
        d = _as_dict(obj, "manifest")
        if d.get("format") != MANIFEST_FORMAT or d.get("version") != MANIFEST_VERSION:
            raise ImageError(f"not a {MANIFEST_FORMAT} version {MANIFEST_VERSION} manifest")
        raw_segments = d.get("segments")
        if not isinstance(raw_segments, list) or not raw_segments:
            raise ImageError("manifest has no segments")
        segments = []
        seen: set[str] = set()
        for raw in raw_segments:
            s = _as_dict(raw, "segment")
            directory = _as_str(s.get("directory"), "segment directory")
            if "/" in directory or directory in ("", ".", "..") or directory in seen:
                raise ImageError(f"manifest: bad segment directory {directory!r}")
            seen.add(directory)
            try:
                compression = Compression(_as_str(s.get("compression"), "compression"))
            except ValueError:
                raise ImageError(
                    f"manifest: unknown compression {s.get('compression')!r}"
                ) from None
            if compression not in SUPPORTED:
                raise ImageError(f"manifest: {compression} compression is not supported")
            fmt = s.get("format", "newc")
            if fmt not in ("newc", "crc"):
                raise ImageError(f"manifest: unknown cpio format {fmt!r}")
            entries = s.get("entries")
            implicit = s.get("implicit_dirs", [])
            if not isinstance(entries, list) or not isinstance(implicit, list):
                raise ImageError(f"manifest: segment {directory!r} lacks an entry list")
            implicit_dirs = tuple(_as_str(x, "implicit dir") for x in implicit)
            for name in implicit_dirs:
                _check_relative(name, "implicit dir")
            segments.append(
                InitrdSegment(
                    directory=directory,
                    compression=compression,
                    stream=_as_u32(s.get("stream"), "stream"),
                    offset=_as_int(s.get("offset", 0), "offset"),
                    crc=fmt == "crc",
                    entries=tuple(ManifestEntry.from_json(e) for e in entries),
                    implicit_dirs=implicit_dirs,
                )
            )
        return cls(tuple(segments))

    @classmethod
    def load(cls, directory: Path) -> InitrdManifest:
        path = Path(directory) / MANIFEST_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ImageError(f"cannot read {path}: {exc.strerror}") from exc
        return cls.from_json(text)

    def save(self, directory: Path) -> None:
        path = Path(directory) / MANIFEST_NAME
        try:
            path.write_text(self.to_json(), encoding="utf-8")
        except OSError as exc:
            raise ImageError(f"cannot write {path}: {exc.strerror}") from exc


# ------------------------------------------------------------------ JSON checks


def _as_dict(obj: object, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ImageError(f"manifest: {what} must be an object")
    return obj


def _as_str(obj: object, what: str) -> str:
    if not isinstance(obj, str):
        raise ImageError(f"manifest: {what} must be a string")
    return obj


def _as_int(obj: object, what: str) -> int:
    if not isinstance(obj, int) or isinstance(obj, bool) or obj < 0:
        raise ImageError(f"manifest: {what} must be a non-negative integer")
    return obj


def _as_u32(obj: object, what: str) -> int:
    value = _as_int(obj, what)
    if value > 0xFFFFFFFF:
        raise ImageError(f"manifest: {what} does not fit in 32 bits")
    return value


def _as_mode(obj: object, what: str) -> int:
    text = _as_str(obj, what)
    try:
        value = int(text, 8)
    except ValueError:
        raise ImageError(f"manifest: {what} {text!r} is not octal") from None
    if not 0 <= value <= 0o7777:
        raise ImageError(f"manifest: {what} {text!r} out of range")
    return value


def _check_relative(name: str, what: str) -> None:
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\x00" in name
    ):
        raise ImageError(f"manifest: {what} {name!r} is not a normalised relative path")


def _enc(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


# ------------------------------------------------------------------ unpack


def normalise_entry_name(raw: str, offset: int) -> str:
    """The relative path of an archive entry, "." for the root; refuses escapes."""
    if raw.startswith("/"):
        raise ImageError(f"refusing absolute entry name {raw!r} at offset {offset}")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"refusing entry name {raw!r} with '..' at offset {offset}")
    return "/".join(parts) or ROOT


def _usable_mode(kind: EntryKind, mode: int) -> int:
    """The permissions to give an extracted entry.

    Root gets the archive's mode as is. Anyone else could neither repack
    (read) nor edit or delete a tree holding, say, a 0555 ``proc`` directory
    or a 0000 file, so directories get at least ``u+rwx`` and files ``u+r``;
    the manifest keeps the real mode (``disk_mode`` records the difference)
    and repack restores it.
    """
    if os.geteuid() == 0:
        return mode
    if kind is EntryKind.DIR:
        return mode | stat.S_IRWXU
    if kind is EntryKind.FILE:
        return mode | stat.S_IRUSR
    return mode


class _Extractor:
    """Creates one segment's tree under *root*, never following a symlink."""

    def __init__(self, root: bytes) -> None:
        os.mkdir(root, 0o700)
        self._root_fd = os.open(root, _DIR_FLAGS)
        self._entries: dict[str, ManifestEntry] = {}
        self._fixups: dict[str, tuple[EntryKind, int, int]] = {}
        self._implicit: dict[str, None] = {}
        self._links: dict[tuple[int, int, int], str] = {}
        self._link_of: dict[str, tuple[int, int, int]] = {}
        self._cache: tuple[tuple[str, ...], int] | None = None

    def close(self) -> None:
        self._drop_cache()
        os.close(self._root_fd)

    def _drop_cache(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None

    def _parent(
        self, parts: tuple[str, ...], name: str, offset: int, *, create: bool = True
    ) -> int:
        """An fd of the directory *parts*, created as needed; never through a symlink."""
        if self._cache is not None and self._cache[0] == parts:
            return self._cache[1]
        fd = os.dup(self._root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(_enc(part), _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(_enc(part), 0o700, dir_fd=fd)
                    rel = "/".join(parts[: i + 1])
                    self._implicit[rel] = None
                    self._fixups[rel] = (EntryKind.DIR, 0o755, 0)
                    nfd = os.open(_enc(part), _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        where = "/".join(parts[: i + 1])
                        raise ImageError(
                            f"entry {name!r} at offset {offset} lies under {where!r}, which is not a directory"
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self._drop_cache()
        self._cache = (parts, fd)
        return fd

    def _forget(self, name: str) -> None:
        self._entries.pop(name, None)
        self._fixups.pop(name, None)
        self._implicit.pop(name, None)
        key = self._link_of.pop(name, None)
        if key is not None and self._links.get(key) == name:
            del self._links[key]

    def _clear(self, pfd: int, base: bytes, name: str, new_kind: EntryKind, offset: int) -> bool:
        """Make room for *name*; True if a directory is there and the new entry is one too."""
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if new_kind is EntryKind.DIR:
                return True
            try:
                os.rmdir(base, dir_fd=pfd)
            except OSError:
                raise ImageError(
                    f"entry {name!r} at offset {offset} would replace a non-empty directory"
                ) from None
            self._drop_cache()
        else:
            os.unlink(base, dir_fd=pfd)
        self._forget(name)
        return False

    def add(self, header: CpioHeader, reader: CpioReader, offset: int) -> None:
        name = normalise_entry_name(header.name, offset)
        kind = kind_of_mode(header.mode)
        if kind is None:
            raise ImageError(
                f"entry {header.name!r} at offset {offset} has unknown file type {header.mode:#o}"
            )
        entry = ManifestEntry(
            name=name,
            kind=kind,
            mode=header.permissions,
            uid=header.uid,
            gid=header.gid,
            mtime=header.mtime,
            rdev=(header.rdev_major, header.rdev_minor)
            if kind in (EntryKind.CHAR, EntryKind.BLOCK)
            else None,
            archive_name=None if header.name == name else header.name,
        )
        if name == ROOT:
            if kind is not EntryKind.DIR:
                raise ImageError(
                    f"root entry {header.name!r} at offset {offset} is not a directory"
                )
            self._entries[ROOT] = entry
            self._fixups[ROOT] = (kind, entry.mode, entry.mtime)
            return
        parts = tuple(name.split("/"))
        pfd = self._parent(parts[:-1], name, offset)
        base = _enc(parts[-1])
        same_dir = self._clear(pfd, base, name, kind, offset)
        if kind is EntryKind.FILE:
            self._write_file(pfd, base, name, header, reader)
        elif kind is EntryKind.DIR:
            if not same_dir:
                os.mkdir(base, 0o700, dir_fd=pfd)
            self._implicit.pop(name, None)
        elif kind is EntryKind.SYMLINK:
            target = reader.read_all(SYMLINK_MAX)
            if not target or b"\x00" in target:
                raise ImageError(
                    f"symlink {header.name!r} at offset {offset} has an invalid target"
                )
            os.symlink(target, base, dir_fd=pfd)
        if same_dir and name in self._entries:
            # A directory listed twice keeps its first place: its contents follow it.
            self._entries[name] = entry
        else:
            self._entries.pop(name, None)
            self._entries[name] = entry
        if kind.on_disk:
            self._fixups[name] = (kind, entry.mode, entry.mtime)

    def _write_file(
        self, pfd: int, base: bytes, name: str, header: CpioHeader, reader: CpioReader
    ) -> None:
        key = (header.ino, header.dev_major, header.dev_minor) if header.nlink >= 2 else None
        first = self._links.get(key) if key is not None else None
        if key is not None and first is not None:
            os.link(
                _enc(first), base, src_dir_fd=self._root_fd, dst_dir_fd=pfd, follow_symlinks=False
            )
            self._link_of[name] = key
            if header.filesize == 0:
                return
            flags = os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(base, flags, dir_fd=pfd)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(base, flags, 0o600, dir_fd=pfd)
            if key is not None:
                self._links[key] = name
                self._link_of[name] = key
        with os.fdopen(fd, "wb") as f:
            for chunk in reader.iter_data():
                f.write(chunk)

    def finish(self) -> tuple[tuple[ManifestEntry, ...], tuple[str, ...]]:
        """Apply modes and mtimes (directories last, deepest first); return the records."""
        self._drop_cache()
        disk_modes: dict[str, int] = {}
        order = [n for n, fix in self._fixups.items() if fix[0] is not EntryKind.DIR]
        dirs = [n for n, fix in self._fixups.items() if fix[0] is EntryKind.DIR and n != ROOT]
        order += sorted(dirs, key=lambda n: -n.count("/"))
        for name in order:
            kind, mode, mtime = self._fixups[name]
            parts = tuple(name.split("/"))
            pfd = self._parent(parts[:-1], name, 0, create=False)
            base = _enc(parts[-1])
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if kind_of_mode(st.st_mode) is not kind:
                continue
            if kind is not EntryKind.SYMLINK:
                os.chmod(base, _usable_mode(kind, mode), dir_fd=pfd)
                got = stat.S_IMODE(os.stat(base, dir_fd=pfd, follow_symlinks=False).st_mode)
                if got != mode:
                    disk_modes[name] = got
            ns = mtime * 1_000_000_000
            os.utime(base, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
        self._drop_cache()
        _, mode, mtime = self._fixups.get(ROOT, (EntryKind.DIR, 0o755, 0))
        os.fchmod(self._root_fd, _usable_mode(EntryKind.DIR, mode))
        got = stat.S_IMODE(os.fstat(self._root_fd).st_mode)
        if got != mode and ROOT in self._entries:
            disk_modes[ROOT] = got
        os.utime(self._root_fd, ns=(mtime * 1_000_000_000,) * 2)
        entries = tuple(
            ManifestEntry(
                e.name,
                e.kind,
                e.mode,
                e.uid,
                e.gid,
                e.mtime,
                e.rdev,
                e.archive_name,
                disk_modes.get(e.name),
            )
            for e in self._entries.values()
        )
        return entries, tuple(self._implicit)


def _extract_archive(
    source: ByteSource, seg_dir: bytes, context: str
) -> tuple[tuple[ManifestEntry, ...], tuple[str, ...], bool]:
    reader = CpioReader(source, base_offset=source.offset)
    extractor = _Extractor(seg_dir)
    crc = False
    try:
        while True:
            offset = reader.offset
            header = reader.next()
            if header is None:
                break
            crc = crc or reader.crc_format
            extractor.add(header, reader, offset)
        entries, implicit = extractor.finish()
    except ImageError as exc:
        raise ImageError(f"{context}: {exc}") from exc
    finally:
        extractor.close()
    return entries, implicit, crc


def _archives(
    src: ByteSource, file: Path
) -> Iterator[tuple[Compression, int, int, ByteSource, str]]:
    """Walk the segments of an initrd: (compression, stream number, stream offset,
    source positioned at a cpio archive, context for messages) for every archive.

    The caller reads each archive to its trailer before asking for the next.
    NUL padding between segments is skipped, as the kernel does; a compressed
    stream may hold several archives and must hold at least one.
    """
    stream = 0
    while True:
        src.skip_nuls()
        head = src.peek(MAGIC_SIZE)
        if not head:
            return
        start = src.offset
        kind = detect(head)
        if kind is None:
            raise ImageError(f"{file}: unrecognised data at offset {start} ({head.hex()})")
        if kind not in SUPPORTED:
            raise ImageError(f"{file}: {kind}-compressed data at offset {start} is not supported")
        if kind is Compression.NONE:
            yield kind, stream, start, src, f"{file}"
        else:
            inner = ByteSource(DecompressingReader(src, kind))
            context = f"{file}: {kind} stream at offset {start}"
            found = False
            while True:
                inner.skip_nuls()
                head = inner.peek(MAGIC_SIZE)
                if not head:
                    break
                if detect(head) is not Compression.NONE:
                    raise ImageError(
                        f"{context}: junk at offset {inner.offset} of its data ({head.hex()})"
                    )
                found = True
                yield kind, stream, start, inner, context
            if not found:
                raise ImageError(f"{context} holds no cpio archive")
        stream += 1


def unpack_initrd(file: Path, dest: Path) -> InitrdManifest:
    """Unpack every archive of the initrd *file* into ``dest/segment-N/``.

    *dest* must be absent or empty. Writes ``dest/mobinux-initrd.json`` and
    returns the same manifest. On error, the segment directories created so
    far are removed and :class:`ImageError` is raised.
    """
    file, dest = Path(file), Path(dest)
    try:
        if dest.exists():
            if not dest.is_dir() or any(dest.iterdir()):
                raise ImageError(f"{dest} exists and is not an empty directory")
        else:
            dest.mkdir(parents=True)
        f = open(file, "rb")  # noqa: SIM115 - closed below, after the loop
    except OSError as exc:
        raise ImageError(f"cannot unpack {file} into {dest}: {exc.strerror}") from exc
    created: list[Path] = []
    segments: list[InitrdSegment] = []
    try:
        with f:
            for kind, stream, start, source, context in _archives(ByteSource(f), file):
                directory = f"segment-{len(segments)}"
                path = dest / directory
                created.append(path)
                entries, implicit, crc = _extract_archive(source, os.fsencode(path), context)
                segments.append(
                    InitrdSegment(directory, kind, stream, start, crc, entries, implicit)
                )
        if not segments:
            raise ImageError(f"{file} holds no cpio archive")
        manifest = InitrdManifest(tuple(segments))
        manifest.save(dest)
    except BaseException as exc:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ImageError(
                f"cannot unpack {file}: {exc.strerror or exc} ({exc.filename or ''})"
            ) from exc
        raise
    return manifest


# ------------------------------------------------------------------ repack


def _scan(root: bytes) -> dict[str, tuple[bytes, os.stat_result]]:
    """Every path under *root* (not following symlinks), in archive order."""
    found: dict[str, tuple[bytes, os.stat_result]] = {}

    def walk(dir_b: bytes, prefix: str) -> None:
        with os.scandir(dir_b) as it:
            children = list(it)
        for child in children:
            name = prefix + decode_name(child.name)
            st = child.stat(follow_symlinks=False)
            found[name] = (child.path, st)
            if stat.S_ISDIR(st.st_mode):
                walk(child.path, name + "/")

    walk(root, "")
    return {name: found[name] for name in sorted(found, key=sort_key)}


def _member(name: str, path: bytes, st: os.stat_result, recorded: ManifestEntry | None) -> Member:
    kind = kind_of_mode(st.st_mode)
    perms = stat.S_IMODE(st.st_mode)
    uid = gid = 0
    if recorded is not None:
        uid, gid = recorded.uid, recorded.gid
        if recorded.kind is kind:
            if kind is EntryKind.SYMLINK:
                perms = recorded.mode  # Linux symlinks are always 0777 on disk
            elif perms == (recorded.disk_mode if recorded.disk_mode is not None else recorded.mode):
                perms = recorded.mode
    mtime = st.st_mtime_ns // 1_000_000_000
    mode = stat.S_IFMT(st.st_mode) | perms
    if kind is EntryKind.FILE:
        key = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
        return Member(name, mode, uid, gid, mtime, size=st.st_size, source=path, link_key=key)
    if kind is EntryKind.SYMLINK:
        target = os.readlink(path)
        return Member(name, mode, uid, gid, mtime, size=len(target), data=target)
    if kind in (EntryKind.CHAR, EntryKind.BLOCK):
        return Member(
            name, mode, uid, gid, mtime, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))
        )
    return Member(name, mode, uid, gid, mtime)


def segment_members(src: Path, segment: InitrdSegment) -> list[Member]:
    """The entries ``repack_initrd`` writes for *segment*, in order."""
    root = os.fsencode(Path(src) / segment.directory)
    try:
        root_st = os.stat(root, follow_symlinks=False)
        if not stat.S_ISDIR(root_st.st_mode):
            raise ImageError(f"{decode_name(root)} is not a directory")
        disk = _scan(root)
    except OSError as exc:
        raise ImageError(f"cannot read {decode_name(root)}: {exc.strerror}") from exc
    members: list[Member] = []
    emitted: set[str] = set()
    for entry in segment.entries:
        spelled = entry.archive_name or entry.name
        if entry.name == ROOT:
            members.append(_member(spelled, root, root_st, entry))
            continue
        found = disk.get(entry.name)
        if found is None:
            if not entry.kind.on_disk:
                members.append(
                    Member(
                        spelled,
                        entry.kind.type_bits | entry.mode,
                        entry.uid,
                        entry.gid,
                        entry.mtime,
                        rdev=entry.rdev or (0, 0),
                    )
                )
            continue  # a file, directory or link deleted from the tree
        if entry.name in emitted:
            continue
        emitted.add(entry.name)
        try:
            members.append(_member(spelled, found[0], found[1], entry))
        except OSError as exc:
            raise ImageError(f"cannot read {decode_name(found[0])}: {exc.strerror}") from exc
    added = [name for name in disk if name not in emitted]
    implicit = set(segment.implicit_dirs)
    needed: set[str] = set()
    for name in added:
        if name not in implicit:
            parts = name.split("/")
            needed.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for name in added:
        if name in implicit and name not in needed:
            continue
        path, st = disk[name]
        try:
            members.append(_member(name, path, st, None))
        except OSError as exc:
            raise ImageError(f"cannot read {decode_name(path)}: {exc.strerror}") from exc
    return members


def _groups(segments: tuple[InitrdSegment, ...]) -> Iterator[list[InitrdSegment]]:
    """Consecutive segments that shared one compressed stream."""
    group: list[InitrdSegment] = []
    for seg in segments:
        if group and (
            seg.compression is Compression.NONE
            or seg.stream != group[0].stream
            or seg.compression is not group[0].compression
        ):
            yield group
            group = []
        group.append(seg)
    if group:
        yield group


class _Offset:
    def __init__(self, inner: SupportsWrite) -> None:
        self._inner = inner
        self.count = 0

    def write(self, data: bytes) -> int:
        self._inner.write(data)
        self.count += len(data)
        return len(data)


def repack_initrd(src: Path, out: Path, *, level: int | None = None) -> None:
    """Rebuild the initrd unpacked in *src* into *out* (replaced only on success).

    A stream followed by another is padded with NULs to a multiple of 4 bytes,
    so the next archive starts aligned, as the kernel requires of a cpio header.
    """
    src, out = Path(src), Path(out)
    manifest = InitrdManifest.load(src)
    plans = [(seg, segment_members(src, seg)) for seg in manifest.segments]
    by_segment = {seg.directory: members for seg, members in plans}
    with atomic_output(out) as f:
        sink = _Offset(f)
        for group in _groups(manifest.segments):
            # Align what follows a compressed stream; nothing trails the last one, so
            # plain decompressors (zstd -d, xz -d) accept the final stream as it is.
            sink.write(b"\x00" * ((-sink.count) & 3))
            kind = group[0].compression
            compressor = (
                CompressingWriter(sink, kind, level) if kind is not Compression.NONE else None
            )
            target: SupportsWrite = compressor if compressor is not None else sink
            for seg in group:
                writer = CpioWriter(target, crc=seg.crc)
                write_members(writer, by_segment[seg.directory])
                writer.close()
            if compressor is not None:
                compressor.close()


def iter_segments(file: Path) -> Iterator[tuple[int, Compression, int, CpioHeader]]:
    """(segment number, compression, stream offset, header) for every entry of *file*.

    A listing without extraction (``cpio -t`` for multi-segment initrds).
    """
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(open(file, "rb"))
        except OSError as exc:
            raise ImageError(f"cannot read {file}: {exc.strerror}") from exc
        for number, (kind, _stream, start, source, _context) in enumerate(
            _archives(ByteSource(f), file)
        ):
            reader = CpioReader(source, base_offset=source.offset)
            for header in reader:
                yield number, kind, start, header


__all__ = [
    "MANIFEST_NAME",
    "EntryKind",
    "InitrdManifest",
    "InitrdSegment",
    "ManifestEntry",
    "iter_segments",
    "repack_initrd",
    "segment_members",
    "unpack_initrd",
]
