"""Safe resolution of client-supplied file paths (TFTP and HTTP).

A client path is normalised to a relative POSIX path ("images/x/vmlinuz").
Refused outright: NUL bytes, backslashes, ".." components, control
characters, over-long names. A leading "/" is tolerated and stripped (pxelinux
and iPXE send absolute-looking names relative to the TFTP root, as tftp-hpa
accepts them). Real files are then checked again after following symlinks so a
link cannot lead out of its root.
"""

from __future__ import annotations

import os
from pathlib import Path

from mobinux.errors import PathRefused

MAX_PATH_LEN = 1024


def normalise(raw: str) -> str:
    """Return the canonical relative form of *raw* or raise :class:`PathRefused`."""
    if not raw:
        raise PathRefused("empty path")
    if len(raw) > MAX_PATH_LEN:
        raise PathRefused("path too long")
    if "\x00" in raw:
        raise PathRefused("NUL in path")
    if "\\" in raw:
        raise PathRefused("backslash in path")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise PathRefused("control character in path")
    parts: list[str] = []
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise PathRefused("'..' in path")
        parts.append(part)
    if not parts:
        raise PathRefused("path names a directory")
    return "/".join(parts)


def contained_file(root: Path, rel: str) -> Path | None:
    """The regular file *rel* under *root*, following symlinks only inside *root*.

    Returns None when no such file exists; raises :class:`PathRefused` when the
    resolved target lies outside *root* (a symlink escape).
    """
    root_real = Path(os.path.realpath(root))
    candidate = root_real / rel
    real = Path(os.path.realpath(candidate))
    if real != root_real and root_real not in real.parents:
        raise PathRefused("path resolves outside the root")
    if not real.is_file():
        return None
    return real
