"""Versions of a disk image: a node's overlay committed into a new base file, and old
versions freed when nothing uses them.

A disk image ``NAME`` keeps its versions in ``disks/NAME/``: the first is
``disk.raw``, later ones ``v<N>.raw``. The inventory names the current one
(``images.disk``); new boots get it. A node keeps the version it booted until
it boots again, because its overlay directory records its base
(``overlays/<mac>/<key>/base``). So a version file is *in use* while it is
current or named by some overlay's ``base`` file; :func:`collect_unused`
removes every other one. Nothing else decides, so the CLI and the server can
both collect: the server never creates an overlay on a version that is not
current.

:func:`build_version` writes a new version from a base and (optionally) an
overlay's flushed state: the base is copied sparsely (``SEEK_DATA`` /
``SEEK_HOLE`` and ``copy_file_range``, so holes stay holes and the kernel
does the copying), the overlay's ``DATA`` chunks are copied over it and its
``ZERO`` chunks punched, then the file is fsynced and renamed into place.
An interrupted build leaves only a hidden ``disks/.NAME.vN.raw.tmp`` file.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from mobinux.storage.file import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from mobinux.storage.overlay_reader import DATA, ZERO, OverlayMap

DISKS_DIR = "disks"  # not under images/: disks are never served over TFTP or HTTP
FIRST_VERSION = "disk.raw"
_VERSION_FILE = re.compile(r"^(?:disk\.raw|v(\d+)\.raw)$")
_COPY_STEP = 64 << 20

Progress = Callable[[int, int], None]


def version_file(version: int) -> str:
    return FIRST_VERSION if version <= 1 else f"v{version}.raw"


def _data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data (non-hole) ranges of a file."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, min(end, size) - start))
        pos = end
    return out


def _copy_range(src: int, dst: int, offset: int, length: int, done: list[int],
                total: int, progress: Progress | None) -> None:
    while length > 0:
        n = os.copy_file_range(src, dst, min(length, _COPY_STEP), offset, offset)
        if n <= 0:
            raise OSError(f"copy_file_range copied nothing at offset {offset}")
        offset += n
        length -= n
        done[0] += n
        if progress is not None:
            progress(done[0], total)


def build_version(base: Path, overlay: OverlayMap | None, dest: Path,
                  progress: Progress | None = None) -> int:
    """Write *base* with *overlay* applied to *dest* (atomically); returns its size."""
    # Beside the image directories, hidden: collect_unused never takes it for a stale version.
    tmp = dest.parent.parent / f".{dest.parent.name}.{dest.name}.tmp"
    src = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        if overlay is not None and overlay.base_size != size:
            raise ValueError(f"the overlay was made over a base of {overlay.base_size} bytes, "
                             f"not {size}")
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(dst, size)
            segments = _data_segments(src, size)
            data_runs = [] if overlay is None else overlay.runs(DATA)
            zero_runs = [] if overlay is None else overlay.runs(ZERO)
            chunk = 0 if overlay is None else overlay.chunk_size
            total = sum(n for _, n in segments) + sum(n * chunk for _, n in data_runs)
            done = [0]
            for offset, length in segments:
                _copy_range(src, dst, offset, length, done, total, progress)
            if overlay is not None:
                for first, count in zero_runs:
                    start = first * chunk
                    _zero_range(dst, start, min(count * chunk, size - start))
                for first, count in data_runs:
                    start = first * chunk
                    _copy_range_between(overlay.data_fd, dst, start, min(count * chunk, size - start),
                                        done, total, progress)
            os.fsync(dst)
        finally:
            os.close(dst)
        os.replace(tmp, dest)
        dirfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        return size
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.close(src)


def _zero_range(fd: int, offset: int, length: int) -> None:
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError:  # no hole punching here: write the zeros
        zeros = bytes(min(length, 1 << 20))
        while length > 0:
            n = os.pwrite(fd, zeros[: min(length, len(zeros))], offset)
            offset += n
            length -= n


def _copy_range_between(src: int, dst: int, offset: int, length: int, done: list[int],
                        total: int, progress: Progress | None) -> None:
    # Same offsets in both files: the overlay's data file is direct-mapped.
    _copy_range(src, dst, offset, length, done, total, progress)


def referenced_bases(data_dir: Path) -> set[str]:
    """Base files (relative to the data dir) some node's overlay sits on."""
    found: set[str] = set()
    root = data_dir / "overlays"
    with contextlib.suppress(FileNotFoundError):
        for node in root.iterdir():
            with contextlib.suppress(OSError):
                for sub in node.iterdir():
                    with contextlib.suppress(OSError):
                        found.add((sub / "base").read_text().strip())
    return found


def collect_unused(data_dir: Path, current: set[str]) -> list[str]:
    """Remove version files that are neither current nor under an overlay; returns them."""
    keep = current | referenced_bases(data_dir)
    removed: list[str] = []
    disks = data_dir / DISKS_DIR
    with contextlib.suppress(FileNotFoundError):
        for image_dir in disks.iterdir():
            if not image_dir.is_dir() or image_dir.name.startswith("."):
                continue
            for f in image_dir.iterdir():
                rel = f"{DISKS_DIR}/{image_dir.name}/{f.name}"
                if _VERSION_FILE.match(f.name) and rel not in keep:
                    with contextlib.suppress(OSError):
                        f.unlink()
                        removed.append(rel)
    return removed
