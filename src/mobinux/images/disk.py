"""Disk images: import a raw, qcow2, vmdk, vdi (...) file as a raw disk Mobinux can export.

Foreign formats are read by ``qemu-img`` (qemu-utils), which knows them all
and their corner cases better than anything we would write. The copy is raw
and sparse, so the iSCSI target can ``preadv`` it directly and holes cost
nothing.

Untrusted images are dangerous to convert blindly: a qcow2 file may name a
*backing file* anywhere on this machine (``/etc/shadow``), which qemu-img
would read into the copy. Images with a backing file are refused, and the
format is always passed explicitly (``-f``) so a raw file can never be
re-probed as something else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mobinux.errors import ImageError

# Formats qemu-img reads that people bring disks in (QEMU/KVM, VMware, VirtualBox, Hyper-V).
IMPORT_FORMATS = ("raw", "qcow2", "qcow", "vmdk", "vdi", "vhdx", "vpc", "qed")
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
SECTOR = 512


@dataclass(frozen=True)
class DiskInfo:
    format: str
    virtual_size: int


def _qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise ImageError("qemu-img is needed to import disk images: apt-get install qemu-utils")
    return path


def inspect(path: Path, fmt: str | None = None) -> DiskInfo:
    """Format and virtual size of *path*, refusing images that reference other files."""
    if not path.is_file():
        raise ImageError(f"{path} is not a file")
    cmd = [_qemu_img(), "info", "--output=json"]
    if fmt:
        cmd += ["-f", fmt]
    cmd.append(str(path))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1:] or ["unknown error"]
        raise ImageError(f"qemu-img cannot read {path}: {detail[0]}")
    info = json.loads(proc.stdout)
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageError(f"{path} has a backing file ({info.get('backing-filename')}); import a "
                         "flattened copy (qemu-img convert -O qcow2 IN OUT)")
    detected = str(info.get("format", ""))
    if detected not in IMPORT_FORMATS:
        raise ImageError(f"{path}: unsupported disk format {detected!r}; "
                         f"supported: {', '.join(IMPORT_FORMATS)}")
    size = int(info.get("virtual-size", 0))
    if size <= 0:
        raise ImageError(f"{path} is an empty disk image")
    return DiskInfo(detected, size)


def convert_to_raw(source: Path, dest: Path, info: DiskInfo,
                   progress: Callable[[int, int], None] | None = None) -> int:
    """Write *source* as a sparse raw file *dest* (made durable); returns its size in bytes.

    The size is rounded up to whole 512-byte blocks, since SCSI exports whole blocks.
    """
    cmd = [_qemu_img(), "convert", "-p", "-f", info.format, "-O", "raw", str(source), str(dest)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    total = info.virtual_size
    pending = b""
    # qemu-img -p rewrites one "(12.34/100%)" line with carriage returns.
    while chunk := os.read(proc.stdout.fileno(), 4096):
        pending += chunk
        matches = list(_PROGRESS.finditer(pending))
        if matches and progress is not None:
            percent = float(matches[-1].group(1))
            progress(min(total, int(total * percent / 100)), total)
        pending = pending[-64:]
    err = proc.stderr.read().decode(errors="replace").strip()
    if proc.wait() != 0:
        raise ImageError(f"qemu-img could not convert {source}: {err.splitlines()[-1] if err else 'failed'}")
    size = dest.stat().st_size
    if size % SECTOR:
        size += SECTOR - size % SECTOR
        os.truncate(dest, size)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if progress is not None:
        progress(total, total)
    return size
