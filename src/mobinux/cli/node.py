"""``mobinux node``: register the machines that boot from this server."""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import replace
from ipaddress import IPv4Address

from mobinux.bootcfg.cmdline import check_template
from mobinux.cli.common import data_dir, print_json, print_table
from mobinux.errors import InventoryError
from mobinux.inventory.db import BOOT_MODES, LOADERS, Inventory, Node
from mobinux.service.boot import (
    BootService,
    Endpoint,
    default_node_name,
    normalise_mac,
)
from mobinux.service.steps import StepLog

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NOT_YET = ("kernel",)  # boot modes that arrive with diskless iSCSI roots


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
                       help="what to boot: ramdisk (kernel + RAM-disk root), iscsi (iPXE sanboots a "
                       "disk image from the node's own iSCSI target), local (the machine's "
                       "next boot device); kernel arrives with diskless iSCSI roots"
                       + (" (default: ramdisk)" if adding else ""))
        p.add_argument("--loader", choices=LOADERS, default="ipxe" if adding else None,
                       help="BIOS boot loader: ipxe, or pxelinux (pxelinux.0 + pxelinux.cfg); "
                       "UEFI clients always use iPXE" + (" (default: ipxe)" if adding else ""))
        p.add_argument("--cmdline", metavar="ARGS", help="extra kernel arguments; placeholders {mac} {ip} "
                       "{hostname} {server} {ipconfig}")

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
    p = nsub.add_parser("remove", help="forget a node")
    p.add_argument("name", help="node name or MAC")


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
    if node.boot in NOT_YET:
        raise InventoryError(f"--boot {node.boot} needs diskless iSCSI roots, which this version "
                             "does not have yet; use --boot ramdisk, iscsi or local")
    if node.boot == "iscsi":
        _check_iscsi(node, inv)
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
    for other in inv.nodes():
        if other.mac != node.mac and other.boot == "iscsi" and image.name in other.images:
            # Each node writes to its disk directly until per-node overlays exist; two
            # machines writing one file system would corrupt it.
            raise InventoryError(f"image {image.name!r} is already the iSCSI disk of node "
                                 f"{other.name!r}; one disk image boots one node (import "
                                 "another copy for this node)")


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
        for key in ("boot", "loader", "cmdline"):
            if getattr(args, key) is not None:
                changes[key] = getattr(args, key)
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
        print(f"removed node {node.name} ({node.mac})")
        return 0
    raise AssertionError(cmd)
