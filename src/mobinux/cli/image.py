"""``mobinux image``: build, list and remove the images nodes boot; edit initrds."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from mobinux.bootcfg.cmdline import check_template
from mobinux.cli.common import data_dir, print_json, print_table
from mobinux.cli.progress import ProgressBar
from mobinux.errors import ImageError, InventoryError
from mobinux.images.versions import DISKS_DIR, version_file
from mobinux.inventory.db import Image, Inventory

_COMPRESSIONS = ("gzip", "xz", "zstd")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    image = sub.add_parser("image", help="build, list and remove boot images; edit initrds",
                           description="Images are what nodes boot. A RAM-disk image is a kernel "
                           "plus a compressed root file system loaded into memory.")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="COMMAND")
    p = isub.add_parser(
        "ramdisk",
        help="pack a directory as a RAM-disk root image and register it",
        description="Pack DIR (a root file system tree with an executable /init) as a compressed "
        "newc initramfs, without root privileges, reproducibly (same input, same bytes), and "
        "register it with KERNEL as image NAME. dev/console is added when DIR lacks it.",
    )
    p.add_argument("dir", type=Path, help="root file system tree (must contain /init)")
    p.add_argument("--kernel", type=Path, required=True, metavar="VMLINUZ", help="Linux kernel to boot")
    p.add_argument("--name", required=True, help="image name")
    p.add_argument("--cmdline", default="", help="kernel arguments for every node booting it; "
                   "placeholders {mac} {ip} {hostname} {server} {ipconfig}")
    p.add_argument("--compression", choices=_COMPRESSIONS, default="gzip",
                   help="initramfs compression (default gzip; every kernel reads it)")
    p.add_argument("--special", type=Path, metavar="FILE",
                   help="extra entries in gen_init_cpio syntax, e.g. 'nod /dev/null 0666 0 0 c 1 3' "
                   "(device nodes a non-root user cannot create in DIR)")
    p = isub.add_parser(
        "import",
        help="import a disk image (raw, qcow2, vmdk, vdi, ...) for nodes to boot over iSCSI",
        description="Store a raw, sparse copy of FILE in the data directory (converted by "
        "qemu-img, with a progress bar) and register it as disk image NAME. Nodes boot it with "
        "mobinux node add MAC --image NAME --boot iscsi. The original file is not changed.",
    )
    p.add_argument("file", type=Path, help="disk image file")
    p.add_argument("--name", required=True, help="image name")
    p.add_argument("--format", dest="disk_format", metavar="FORMAT",
                   help="the file's format when qemu-img cannot tell (default: detected)")
    p.add_argument("--update", action="store_true",
                   help="install FILE as the next version of the existing disk image NAME: nodes "
                   "get it at their next boot, running ones keep theirs until then")
    p = isub.add_parser(
        "commit",
        help="make a node's disk changes the next version of its disk image",
        description="Install software on one node, shut it down, then commit: the node's "
        "overlay (its changes since it booted) is applied to a copy of its base image, which "
        "becomes the image's next version (or the new image --name). Every node gets it at its "
        "next boot; running nodes keep the version they booted until then, and old versions are "
        "removed once no node uses them. Writes the node never flushed are not included.",
    )
    p.add_argument("node", help="node name or MAC")
    p.add_argument("--name", help="image to commit into: the node's own disk image (default), "
                   "or a new image of this name")
    p.add_argument("--force", action="store_true",
                   help="commit while the node is up (its unflushed writes are left out)")
    p = isub.add_parser("list", help="list images")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = isub.add_parser("remove", help="remove an image no node uses")
    p.add_argument("name")
    p = isub.add_parser("initrd", help="unpack and repack a distribution initrd",
                        description="Edit an existing initrd: several concatenated segments "
                        "(an uncompressed early-microcode cpio, then a gzip, xz or zstd one).")
    rsub = p.add_subparsers(dest="initrd_command", required=True, metavar="COMMAND")
    q = rsub.add_parser("unpack", help="unpack FILE into DIR (one segment-N directory per segment)")
    q.add_argument("file", type=Path)
    q.add_argument("dir", type=Path)
    q = rsub.add_parser("repack", help="rebuild an initrd from a directory made by unpack")
    q.add_argument("dir", type=Path)
    q.add_argument("file", type=Path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()



def _new_image_name(inv: Inventory, name: str) -> str:
    if not name or "/" in name or name.startswith(".") or len(name) > 64:
        raise InventoryError(f"image name {name!r}: use letters, digits, '-', '_' and '.'")
    if inv.get_image(name) is not None:
        raise InventoryError(f"image {name!r} already exists; remove it first (mobinux image remove {name})")
    return name


def _import(args: argparse.Namespace, inv: Inventory) -> int:
    from mobinux.images.disk import convert_to_raw, inspect

    if args.update:
        return _import_update(args, inv)
    name = _new_image_name(inv, args.name)
    info = inspect(args.file, args.disk_format)
    disks = inv.data_dir / DISKS_DIR
    disks.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = disks / name
    if final.exists():  # left over by an interrupted import that never registered it
        shutil.rmtree(final)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=disks))
    try:
        size = convert_to_raw(args.file, work / "disk.raw", info,
                              progress=ProgressBar(f"importing {name}"))
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    inv.add_image(Image(
        name=name, kind="disk", kernel="", initrd=None, cmdline="", size=size, sha256="",
        created=time.time(), disk=f"{DISKS_DIR}/{name}/disk.raw",
    ))
    print(f"image {name}: {info.format} disk of {size / 2**20:.1f} MiB imported")
    return 0


def _import_update(args: argparse.Namespace, inv: Inventory) -> int:
    from mobinux.images.disk import convert_to_raw, inspect

    image = inv.get_image(args.name)
    if image is None or image.disk is None:
        raise InventoryError(f"--update needs an existing disk image; there is no disk image "
                             f"{args.name!r} (import it without --update first)")
    info = inspect(args.file, args.disk_format)
    disks = inv.data_dir / DISKS_DIR
    version = image.version + 1
    rel = f"{DISKS_DIR}/{image.name}/{version_file(version)}"
    work = Path(tempfile.mkdtemp(prefix=f".{image.name}.", dir=disks))
    try:
        size = convert_to_raw(args.file, work / "disk.raw", info,
                              progress=ProgressBar(f"importing {image.name} v{version}"))
        os.rename(work / "disk.raw", inv.data_dir / rel)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _install_version(inv, image, rel, size, f"{info.format} disk of {size / 2**20:.1f} MiB")


def _install_version(inv: Inventory, image: Image, rel: str, size: int, what: str) -> int:
    from mobinux.images.versions import collect_unused

    try:
        inv.new_disk_version(image.name, image.version, rel, size)
    except BaseException:
        with contextlib.suppress(OSError):
            (inv.data_dir / rel).unlink()
        raise
    collect_unused(inv.data_dir, {i.disk for i in inv.images() if i.disk is not None})
    print(f"image {image.name}: version {image.version + 1} ({what}); nodes get it at their "
          "next boot")
    return 0


def _commit(args: argparse.Namespace, inv: Inventory) -> int:
    from mobinux.cli.node import find_node
    from mobinux.images.versions import build_version
    from mobinux.service.node_disks import node_base, node_overlay_root
    from mobinux.storage.overlay_reader import read_overlay_map

    node = find_node(inv, args.node)
    images = {i.name: i for i in inv.images()}
    current = node_base(node, images)
    if current is None:
        raise InventoryError(f"node {node.name} has no disk to commit")
    own = images[node.disk_image or ""]
    sessions = [s for s in inv.iscsi_sessions() if s.node == node.name]
    if sessions and not args.force:
        raise InventoryError(f"node {node.name} is up ({len(sessions)} iSCSI session(s)); shut it "
                             "down first so its writes are flushed, or give --force")
    root = node_overlay_root(inv.data_dir, node.mac)
    dirs = [d for d in sorted(root.iterdir()) if (d / "meta").exists()] if root.is_dir() else []
    if not dirs:
        raise InventoryError(f"node {node.name} has written nothing since it booted; nothing to commit")
    base_rel = (dirs[0] / "base").read_text().strip()
    if base_rel != current:
        raise InventoryError(f"node {node.name} runs an older version of image {own.name} "
                             f"({base_rel}); boot it again before committing its changes")
    target = own if args.name in (None, own.name) else None
    if target is None:
        name = _new_image_name(inv, args.name)
        (inv.data_dir / DISKS_DIR / name).mkdir(parents=True, exist_ok=True, mode=0o700)
        rel = f"{DISKS_DIR}/{name}/{version_file(1)}"
    else:
        rel = f"{DISKS_DIR}/{own.name}/{version_file(own.version + 1)}"
    overlay = read_overlay_map(dirs[0])
    try:
        changed = sum(1 for s in overlay.states if s) * overlay.chunk_size
        if not changed:
            raise InventoryError(f"node {node.name} has written nothing since it booted "
                                 "(or never flushed it); nothing to commit")
        size = build_version(inv.data_dir / base_rel, overlay, inv.data_dir / rel,
                             progress=ProgressBar(f"committing {node.name}"))
    finally:
        overlay.close()
    what = f"{node.name}'s changes, {changed / 2**20:.1f} MiB"
    if target is not None:
        return _install_version(inv, target, rel, size, what)
    try:
        inv.add_image(Image(name=args.name, kind="disk", kernel=own.kernel, initrd=own.initrd,
                            cmdline=own.cmdline, size=size, sha256="", created=time.time(),
                            disk=rel))
    except BaseException:
        shutil.rmtree(inv.data_dir / DISKS_DIR / args.name, ignore_errors=True)
        raise
    print(f"image {args.name}: a new disk image from {own.name} with {what}")
    return 0


def _ramdisk(args: argparse.Namespace, inv: Inventory) -> int:
    from mobinux.images.ramdisk import pack_ramdisk

    name = _new_image_name(inv, args.name)
    check_template(args.cmdline)
    if not args.dir.is_dir():
        raise ImageError(f"{args.dir} is not a directory")
    if not args.kernel.is_file():
        raise ImageError(f"kernel {args.kernel} does not exist")
    images = inv.data_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    final = images / name
    if final.exists():  # left over by an interrupted run that never registered it
        shutil.rmtree(final)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=images))
    work.chmod(0o755)  # mkdtemp makes it private; images are served to anyone who boots
    try:
        shutil.copyfile(args.kernel, work / "vmlinuz")
        extra = None
        if args.special is not None:
            try:
                extra = args.special.read_text()
            except OSError as exc:
                raise ImageError(f"cannot read --special {args.special}: {exc.strerror}") from None
        info = pack_ramdisk(args.dir, work / "initrd.img", compression=args.compression,
                            progress=ProgressBar(f"packing {name}"), extra=extra,
                            extra_base=None if args.special is None else args.special.parent)
        for warning in info.warnings:
            print(f"warning: {warning}")
        for f in (work / "vmlinuz", work / "initrd.img"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    kernel, initrd = final / "vmlinuz", final / "initrd.img"
    inv.add_image(Image(
        name=name, kind="ramdisk",
        kernel=f"images/{name}/vmlinuz", initrd=f"images/{name}/initrd.img",
        cmdline=args.cmdline, size=kernel.stat().st_size + initrd.stat().st_size,
        sha256=_sha256(initrd), created=time.time(),
    ))
    print(f"image {name}: kernel {kernel.stat().st_size} bytes, initrd {initrd.stat().st_size} "
          f"bytes ({info.entries} entries, {args.compression})")
    return 0


def run(args: argparse.Namespace) -> int:
    cmd = args.image_command
    if cmd == "initrd":
        from mobinux.images.initrd import repack_initrd, unpack_initrd

        if args.initrd_command == "unpack":
            manifest = unpack_initrd(args.file, args.dir)
            segments = getattr(manifest, "segments", [])
            print(f"unpacked {args.file} into {args.dir} ({len(segments)} segment(s))")
        else:
            repack_initrd(args.dir, args.file)
            print(f"repacked {args.dir} into {args.file}")
        return 0
    inv = Inventory(data_dir(args))
    try:
        if cmd == "ramdisk":
            return _ramdisk(args, inv)
        if cmd == "import":
            return _import(args, inv)
        if cmd == "commit":
            return _commit(args, inv)
        if cmd == "list":
            images = inv.images()
            if args.json:
                print_json([i.to_json() for i in images])
            else:
                print_table(["name", "kind", "version", "size", "cmdline"],
                            [[i.name, i.kind, i.version if i.kind == "disk" else "-",
                              f"{i.size / 2**20:.1f} MiB", i.cmdline] for i in images])
            return 0
        if cmd == "remove":
            image = inv.remove_image(args.name)
            folder = DISKS_DIR if image.kind == "disk" else "images"
            shutil.rmtree(inv.data_dir / folder / image.name, ignore_errors=True)
            print(f"removed image {image.name}")
            return 0
    finally:
        inv.close()
    raise AssertionError(cmd)
