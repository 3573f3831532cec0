"""``mobinux node``: register the machines that boot from this server."""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import replace
from ipaddress import IPv4Address

from mobinux.app import server_pid
from mobinux.bootcfg.cmdline import check_template
from mobinux.cli.common import data_dir, print_json, print_table
from mobinux.cli.target import parse_size
from mobinux.errors import InventoryError, LocalError
from mobinux.inventory.db import BOOT_MODES, LOADERS, Inventory, Node
from mobinux.service.boot import (
    BootService,
    Endpoint,
    default_node_name,
    normalise_mac,
)
from mobinux.service.node_disks import node_base, overlay_usage, remove_overlay
from mobinux.service.steps import StepLog

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
RESET_WAIT = 10.0  # seconds `node reset` waits for a running server to carry it out


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = sub.add_parser("node", help="add, change, list and remove nodes (booting machines)",
                          description="Nodes are the machines that boot from Mobinux, "
                          "known by their MAC address.")
    nsub = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")

    def options(p: argparse.ArgumentParser, adding: bool) -> None:
        if adding:
            p.add_argument("--name", help="host name (default: node-<mac without colons>)")
        else:
            p.add_argument("--name", dest="new_name", help="rename the node")
        p.add_argument("--ip", help="fixed address handed out by full DHCP"
                       + ("" if adding else " ('none' to remove it)"))
        p.add_argument("--image", action="append", metavar="NAME",
                       help="image to boot; repeat for a boot menu (the first is the default)")
        p.add_argument("--boot", choices=BOOT_MODES, default="ramdisk" if adding else None,
                       help="what to boot: ramdisk (kernel + RAM-disk root), kernel (kernel + initrd "
                       "over the network, root on the node's iSCSI disk), iscsi (iPXE sanboots the "
                       "node's iSCSI disk), local (the machine's next boot device)"
                       + (" (default: ramdisk)" if adding else ""))
        p.add_argument("--disk", metavar="IMAGE",
                       help="disk image served as the node's own iSCSI disk, through its private "
                       "copy-on-write overlay (default: the --boot iscsi/kernel image itself)"
                       + ("" if adding else "; 'none' to remove it"))
        p.add_argument("--persistent", action=argparse.BooleanOptionalAction, default=None,
                       help="keep the node's disk changes across boots (default: every boot "
                       "starts from the clean base image)")
        p.add_argument("--overlay-limit", metavar="SIZE",
                       help="most the node may write to its disk, like 2G; writes past it fail "
                       "with a SCSI space-allocation error" + ("" if adding else " ('none': no cap)"))
        p.add_argument("--loader", choices=LOADERS, default="ipxe" if adding else None,
                       help="BIOS boot loader: ipxe, or pxelinux (pxelinux.0 + pxelinux.cfg); "
                       "UEFI clients always use iPXE" + (" (default: ipxe)" if adding else ""))
        p.add_argument("--login", action=argparse.BooleanOptionalAction, default=None,
                       help="ask for a user name and password at boot (iPXE login) and attach that "
                       "user's disk as LUN 1 for the boot, wherever they sit")
        p.add_argument("--user", metavar="NAME",
                       help="attach this user's persistent disk as the node's LUN 1 (one node at a "
                       "time)" + ("" if adding else "; 'none' to detach it"))
        p.add_argument("--cmdline", metavar="ARGS", help="extra kernel arguments; placeholders {mac} {ip} "
                       "{hostname} {server} {ipconfig} {target} {portal} {initiator}")

    p = nsub.add_parser("add", help="register a node", description="Register a machine by its MAC.")
    p.add_argument("mac", help="the machine's MAC address, e.g. 52:54:00:12:34:56")
    options(p, adding=True)
    p = nsub.add_parser("set", help="change a node (only the options given)")
    p.add_argument("name", help="node name or MAC")
    p.add_argument("--mac", help="new MAC address")
    options(p, adding=False)
    p = nsub.add_parser("list", help="list nodes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = nsub.add_parser("show", help="show one node with its generated boot command line")
    p.add_argument("name", help="node name or MAC")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = nsub.add_parser("remove", help="forget a node (and its disk overlay)")
    p.add_argument("name", help="node name or MAC")
    p = nsub.add_parser(
        "reset", help="throw away a node's disk changes now (as its next boot would)",
        description="Empty the node's copy-on-write overlay, so its disk is the clean base image "
        "again; a --persistent node's too. Refused while the node has iSCSI sessions (it is up) "
        "unless --force, which first ends them.")
    p.add_argument("name", help="node name or MAC")
    p.add_argument("--force", action="store_true", help="reset even while the node is up")


def _mac(text: str) -> str:
    mac = normalise_mac(text)
    if mac is None:
        raise InventoryError(f"{text!r} is not a MAC address (like 52:54:00:12:34:56)")
    return mac


def _ip(text: str) -> str:
    try:
        return str(IPv4Address(text))
    except ValueError:
        raise InventoryError(f"--ip {text!r} is not an IPv4 address") from None


def _check(node: Node, inv: Inventory) -> None:
    """Refuse a combination that cannot work, saying why."""
    if not _NAME.match(node.name):
        raise InventoryError(f"node name {node.name!r}: use letters, digits, '-', '_' and '.' "
                             "(at most 63, starting with a letter or digit)")
    if node.disk is not None:
        disk = inv.get_image(node.disk)
        if disk is None:
            raise InventoryError(f"no image named {node.disk!r} (see: mobinux image list)")
        if disk.disk is None:
            raise InventoryError(f"--disk {node.disk}: a {disk.kind} image, not a disk image "
                                 "(import one with: mobinux image import FILE --name NAME)")
    if node.boot == "iscsi":
        _check_iscsi(node, inv)
    if node.boot == "kernel":
        _check_kernel(node, inv)
    if node.login and node.user is not None:
        raise InventoryError("--login attaches the disk of whoever logs in; a node with --login has "
                             "no fixed --user (give --user none)")
    if node.login and node.loader == "pxelinux":
        raise InventoryError("--login needs the iPXE loader (the login prompt is iPXE's)")
    if (node.user is not None or node.login) and \
            node_base(node, {i.name: i for i in inv.images()}) is None:
        raise InventoryError("--user attaches the user's disk as LUN 1 of the node's own target, "
                             "and this node has no disk for LUN 0: give --disk IMAGE (or --boot "
                             "iscsi/kernel on a disk image)")
    if (node.persistent or node.overlay_limit is not None) and \
            node_base(node, {i.name: i for i in inv.images()}) is None:
        raise InventoryError("--persistent and --overlay-limit apply to a node's disk, and this "
                             "node has none: give --disk IMAGE (or --boot iscsi/kernel on a disk image)")
    if node.boot == "ramdisk":
        if not node.images:
            raise InventoryError("--boot ramdisk needs an image: --image NAME (see: mobinux image list)")
        for name in node.images:
            image = inv.get_image(name)
            if image is None:
                raise InventoryError(f"no image named {name!r} (see: mobinux image list)")
            if image.kind != "ramdisk":
                raise InventoryError(f"image {name!r} is a {image.kind} image, not a RAM-disk "
                                     "image; it cannot boot with --boot ramdisk")
    if len(set(node.images)) != len(node.images):
        raise InventoryError("the same --image is given twice")
    check_template(node.cmdline)


def _check_iscsi(node: Node, inv: Inventory) -> None:
    if len(node.images) != 1:
        raise InventoryError("--boot iscsi needs exactly one disk image: --image NAME "
                             "(import one with: mobinux image import FILE --name NAME)")
    image = inv.get_image(node.images[0])
    if image is None:
        raise InventoryError(f"no image named {node.images[0]!r} (see: mobinux image list)")
    if image.kind != "disk":
        raise InventoryError(f"image {image.name!r} is a {image.kind} image; --boot iscsi boots a "
                             "disk image (mobinux image import FILE --name NAME)")
    if node.loader == "pxelinux":
        raise InventoryError("--boot iscsi needs the iPXE loader (pxelinux cannot boot from "
                             "iSCSI); use --loader ipxe")
    if node.disk is not None and node.disk != image.name:
        raise InventoryError("--boot iscsi sanboots the node's disk, which is its --image; "
                             "drop --disk (or give the same image)")


def _check_kernel(node: Node, inv: Inventory) -> None:
    if not node.images:
        raise InventoryError("--boot kernel needs an image with a kernel: --image NAME")
    for name in node.images:
        image = inv.get_image(name)
        if image is None:
            raise InventoryError(f"no image named {name!r} (see: mobinux image list)")
        if not image.kernel:
            raise InventoryError(f"image {name!r} has no kernel to boot; --boot kernel needs a "
                                 "RAM-disk image or an imported installed system")
    if node_base(node, {i.name: i for i in inv.images()}) is None:
        raise InventoryError("--boot kernel puts the root file system on the node's iSCSI disk, "
                             "and this node has none: give --disk IMAGE (a disk image)")


def find_node(inv: Inventory, key: str) -> Node:
    node = inv.get_node(key)
    if node is None:
        mac = normalise_mac(key)
        node = inv.node_by_mac(mac) if mac else None
    if node is None:
        raise InventoryError(f"no node named {key!r} (see: mobinux node list)")
    return node


def describe(inv: Inventory, node: Node) -> dict[str, object]:
    # The address the server last ran with fills {server} and {ipconfig}, as it will at boot.
    service = BootService(inv, Endpoint.saved(inv), StepLog())
    info = service.describe_node(node)
    info.pop("script_url", None)
    if "iscsi" in info:
        info["overlay_bytes"] = overlay_usage(inv.data_dir, node.mac)
    return info


def run(args: argparse.Namespace) -> int:
    inv = Inventory(data_dir(args))
    try:
        return _run(args, inv)
    finally:
        inv.close()


def _run(args: argparse.Namespace, inv: Inventory) -> int:
    cmd = args.node_command
    if cmd == "add":
        mac = _mac(args.mac)
        node = Node(
            name=args.name or default_node_name(mac),
            mac=mac,
            ip=_ip(args.ip) if args.ip else None,
            images=tuple(args.image or ()),
            boot=args.boot,
            loader=args.loader,
            cmdline=args.cmdline or "",
            created=time.time(),
            disk=args.disk,
            persistent=bool(args.persistent),
            overlay_limit=_limit(args.overlay_limit) if args.overlay_limit else None,
            user=args.user,
            login=bool(args.login),
        )
        _check(node, inv)
        inv.add_node(node)
        print(f"added node {node.name} ({node.mac})")
        return 0
    if cmd == "set":
        old = find_node(inv, args.name)
        changes: dict[str, object] = {}
        if args.mac is not None:
            changes["mac"] = _mac(args.mac)
        if args.ip is not None:
            changes["ip"] = None if args.ip.lower() in ("none", "") else _ip(args.ip)
        if args.image is not None:
            changes["images"] = tuple(args.image)
        for key in ("boot", "loader", "cmdline", "persistent", "login"):
            if getattr(args, key) is not None:
                changes[key] = getattr(args, key)
        if args.disk is not None:
            changes["disk"] = None if args.disk.lower() in ("none", "") else args.disk
        if args.user is not None:
            changes["user"] = None if args.user.lower() in ("none", "") else args.user
        if args.overlay_limit is not None:
            changes["overlay_limit"] = (None if args.overlay_limit.lower() in ("none", "")
                                        else _limit(args.overlay_limit))
        if args.new_name is not None:
            changes["name"] = args.new_name
        new = replace(old, **changes)  # type: ignore[arg-type]
        _check(new, inv)
        inv.replace_node(old.name, new)
        print(f"changed node {new.name}")
        return 0
    if cmd == "list":
        nodes = inv.nodes()
        if args.json:
            print_json([describe(inv, n) for n in nodes])
        else:
            print_table(["name", "mac", "ip", "boot", "loader", "image"],
                        [[n.name, n.mac, n.ip, n.boot, n.loader, ",".join(n.images)] for n in nodes])
        return 0
    if cmd == "show":
        info = describe(inv, find_node(inv, args.name))
        if args.json:
            print_json(info)
        else:
            width = max(len(k) for k in info)
            for key, value in info.items():
                shown = ",".join(map(str, value)) if isinstance(value, list) else value
                print(f"{key.ljust(width)}  {'-' if shown in (None, '') else shown}")
        return 0
    if cmd == "remove":
        node = inv.remove_node(find_node(inv, args.name).name)
        if server_pid(inv.data_dir) is None:
            remove_overlay(inv.data_dir, node.mac)  # a running server removes it itself
            _collect_versions(inv)
        print(f"removed node {node.name} ({node.mac})")
        return 0
    if cmd == "reset":
        return _reset(inv, find_node(inv, args.name), args.force)
    raise AssertionError(cmd)


def _collect_versions(inv: Inventory) -> None:
    """Free image versions no node uses any more (a removed overlay may have held the last)."""
    from mobinux.images.versions import collect_unused

    collect_unused(inv.data_dir, {i.disk for i in inv.images() if i.disk is not None})


def _limit(text: str) -> int:
    try:
        return parse_size(text)
    except InventoryError:
        raise InventoryError(f"--overlay-limit {text!r}: give a size like 500M or 2G") from None


def _reset(inv: Inventory, node: Node, force: bool) -> int:
    if node_base(node, {i.name: i for i in inv.images()}) is None:
        raise InventoryError(f"node {node.name} has no disk to reset")
    if server_pid(inv.data_dir) is None:
        remove_overlay(inv.data_dir, node.mac)  # no server holds it: the next login starts empty
        _collect_versions(inv)
        print(f"reset node {node.name}: its disk is the clean base image again")
        return 0
    sessions = [s for s in inv.iscsi_sessions() if s.node == node.name]
    if sessions and not force:
        raise InventoryError(f"node {node.name} is up ({len(sessions)} iSCSI session(s) since "
                             f"{time.strftime('%H:%M:%S', time.localtime(sessions[0].since))}); "
                             "shut it down first, or give --force to end its sessions")
    inv.request_node_reset(node.mac)
    deadline = time.monotonic() + RESET_WAIT
    while time.monotonic() < deadline:
        if node.mac not in inv.node_reset_requests():
            print(f"reset node {node.name}: its disk is the clean base image again"
                  + (f" ({len(sessions)} session(s) ended)" if sessions else ""))
            return 0
        time.sleep(0.1)
    raise LocalError(f"the server has not carried out the reset of {node.name} within "
                     f"{RESET_WAIT:.0f} s; it will when it can (see: mobinux status)")
