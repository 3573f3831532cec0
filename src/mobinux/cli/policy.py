"""``mobinux policy``: what machines that are not registered nodes boot."""

from __future__ import annotations

import argparse

from mobinux.cli.common import data_dir, print_json
from mobinux.errors import InventoryError
from mobinux.inventory.db import Inventory, UnknownPolicy


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = sub.add_parser("policy", help="what unknown machines boot",
                            description="Policies for machines that are not registered nodes.")
    psub = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    p = psub.add_parser(
        "unknown",
        help="deny | default IMAGE | enroll IMAGE",
        description="What a machine that is not a node boots: 'deny' gives it no boot file "
        "(the default); 'default IMAGE' boots IMAGE without registering it; 'enroll IMAGE' "
        "registers it as a new node (named node-<mac>) and boots IMAGE. Without arguments, "
        "shows the current policy. Whether unknown machines get an address at all is "
        "'mobinux serve --deny-unknown'.",
    )
    p.add_argument("action", nargs="?", choices=("deny", "default", "enroll"))
    p.add_argument("image", nargs="?", help="image for default / enroll")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    inv = Inventory(data_dir(args))
    try:
        if args.action is None:
            current = inv.unknown_policy()
            if args.json:
                print_json({"action": current.action, "image": current.image})
            else:
                print(current.action + (f" {current.image}" if current.image and
                                        current.action != "deny" else ""))
            return 0
        if args.action == "deny":
            if args.image:
                raise InventoryError("'policy unknown deny' takes no image")
            inv.set_unknown_policy(UnknownPolicy("deny", None))
        else:
            if not args.image:
                raise InventoryError(f"'policy unknown {args.action}' needs an image: "
                                     f"mobinux policy unknown {args.action} IMAGE")
            image = inv.get_image(args.image)
            if image is None:
                raise InventoryError(f"no image named {args.image!r} (see: mobinux image list)")
            inv.set_unknown_policy(UnknownPolicy(args.action, args.image))
        print(f"unknown machines: {args.action}" + (f" {args.image}" if args.image else ""))
        return 0
    finally:
        inv.close()
