"""Build an inventory with images for tests without packing real initramfs files."""

from __future__ import annotations

import time

from mobinux.inventory.db import Image, Inventory


def add_fake_image(inv: Inventory, name: str, cmdline: str = "console=ttyS0") -> Image:
    directory = inv.data_dir / "images" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vmlinuz").write_bytes(b"KERNEL-" + name.encode())
    (directory / "initrd.img").write_bytes(b"INITRD-" + name.encode())
    image = Image(name=name, kind="ramdisk", kernel=f"images/{name}/vmlinuz",
                  initrd=f"images/{name}/initrd.img", cmdline=cmdline, size=20, sha256="",
                  created=time.time())
    inv.add_image(image)
    return image
