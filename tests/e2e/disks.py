"""Bootable disk images for sanboot tests, built without root or loop devices.

:func:`make_sanboot_disk` writes an MBR disk with two FAT partitions:

1. a BIOS boot partition (type 0x0c, active) with syslinux installed in its
   boot sector and syslinux.cfg, the kernel and the initrd; syslinux's mbr.bin
   in the MBR chains to it;
2. an EFI system partition (type 0xef) with syslinux.efi as the removable-media
   loader ``EFI/BOOT/BOOTX64.EFI`` (UEFI 2.x §3.5.1.1), its ldlinux.e64 and the
   same configuration, kernel and initrd.

Both boot the same kernel with the same command line, so a test tells BIOS
and UEFI apart only by the firmware it runs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

MIB = 1 << 20
SECTOR = 512
MBR_BIN = Path("/usr/lib/SYSLINUX/mbr.bin")
SYSLINUX_EFI = Path("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi")
LDLINUX_E64 = Path("/usr/lib/syslinux/modules/efi64/ldlinux.e64")
TOOLS = ("mkfs.vfat", "mcopy", "mmd", "syslinux", "sfdisk")


def skip_unless_disk_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    missing += [str(p) for p in (MBR_BIN, SYSLINUX_EFI, LDLINUX_E64) if not p.is_file()]
    if missing:
        pytest.skip(f"cannot build a bootable disk, missing: {', '.join(missing)} "
                    "(apt-get install dosfstools mtools fdisk syslinux syslinux-efi)")


def _run(*argv: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")


def _syslinux_cfg(cmdline: str) -> str:
    return "\n".join(["SERIAL 0 115200", "DEFAULT linux", "PROMPT 0", "TIMEOUT 1",
                      "LABEL linux", "  KERNEL vmlinuz", "  INITRD initrd.gz",
                      f"  APPEND {cmdline}", ""])


def _fat(path: Path, size: int, label: str) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    _run("mkfs.vfat", "-n", label, str(path))


def make_sanboot_disk(path: Path, kernel: Path, initrd: Path, cmdline: str,
                      *, part_mib: int = 40) -> Path:
    work = path.parent / f"{path.name}.parts"
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "syslinux.cfg"
    cfg.write_text(_syslinux_cfg(cmdline))
    part_size = part_mib * MIB

    bios = work / "bios.img"
    _fat(bios, part_size, "MBXBIOS")
    _run("mcopy", "-i", str(bios), str(kernel), "::/vmlinuz")
    _run("mcopy", "-i", str(bios), str(initrd), "::/initrd.gz")
    _run("mcopy", "-i", str(bios), str(cfg), "::/syslinux.cfg")
    _run("syslinux", "--install", str(bios))

    esp = work / "esp.img"
    _fat(esp, part_size, "MBXESP")
    _run("mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT")
    _run("mcopy", "-i", str(esp), str(SYSLINUX_EFI), "::/EFI/BOOT/BOOTX64.EFI")
    _run("mcopy", "-i", str(esp), str(LDLINUX_E64), "::/EFI/BOOT/ldlinux.e64")
    _run("mcopy", "-i", str(esp), str(cfg), "::/EFI/BOOT/syslinux.cfg")
    _run("mcopy", "-i", str(esp), str(kernel), "::/EFI/BOOT/vmlinuz")
    _run("mcopy", "-i", str(esp), str(initrd), "::/EFI/BOOT/initrd.gz")

    start = MIB // SECTOR  # first partition at 1 MiB, as partitioning tools align
    sectors = part_size // SECTOR
    with open(path, "wb") as f:
        f.truncate(MIB + 2 * part_size + MIB)
    table = (f"label: dos\n"
             f"start={start}, size={sectors}, type=c, bootable\n"
             f"start={start + sectors}, size={sectors}, type=ef\n")
    res = subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", str(path)], input=table,
                         capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"sfdisk failed: {res.stderr.strip()}")
    with open(path, "r+b") as disk:
        disk.write(MBR_BIN.read_bytes()[:440])  # boot code only: keep the partition table
        for index, part in enumerate((bios, esp)):
            disk.seek(MIB + index * part_size)
            with open(part, "rb") as src:
                shutil.copyfileobj(src, disk, MIB)
    shutil.rmtree(work)
    return path
