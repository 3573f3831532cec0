"""The ``mobinux`` command: one subcommand module per group."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mobinux import __version__
from mobinux.cli import image, node, policy, serve, status, target, user
from mobinux.cli.common import CliParser
from mobinux.errors import MobinuxError

GROUPS = {"serve": serve, "status": status, "node": node, "image": image, "policy": policy,
          "target": target, "user": user, "snapshot": user}


def build_parser() -> CliParser:
    parser = CliParser(
        prog="mobinux",
        description="Mobinux boots diskless machines from the network: DHCP (full or proxy), "
        "TFTP, HTTP boot, generated pxelinux/iPXE configurations and RAM-disk roots.",
        epilog="Start with: mobinux image ramdisk ROOTDIR --kernel VMLINUZ --name NAME; "
        "mobinux node add MAC --image NAME; mobinux serve --interface IF.",
    )
    parser.add_argument("--version", action="version", version=f"mobinux {__version__}")
    parser.add_argument("--data-dir", metavar="DIR", help="all state lives here "
                        "(default: $MOBINUX_DATA_DIR, else ./mobinux-data)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=CliParser)
    for module in dict.fromkeys(GROUPS.values()):  # a module may add several groups
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = GROUPS[args.command].run(args)
        return result
    except MobinuxError as exc:
        print(f"mobinux: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
