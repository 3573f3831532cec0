"""``mobinux serve``: DHCP, TFTP and HTTP boot in one process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from mobinux import app
from mobinux.cli.common import data_dir
from mobinux.config import DHCP_MODES, build, load_toml


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the boot server (DHCP, TFTP, HTTP, iSCSI)",
        description="Serve DHCP (proxy by default: safe next to an existing DHCP server), TFTP, "
        "HTTP boot and the iSCSI target on one interface. Every option can also be set in a TOML file given with "
        "--config (same names, e.g. dhcp-range = \"10.0.0.100-10.0.0.200\"); flags win.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML file with any of these settings")
    p.add_argument("--interface", metavar="IF", help="interface DHCP listens and answers on, e.g. eth1")
    p.add_argument("--address", metavar="IP", help="address clients reach this server at "
                   "(default: the interface's address)")
    p.add_argument("--dhcp", choices=DHCP_MODES, help="off, proxy (default: boot information "
                   "only, next to an existing DHCP server) or full (also hands out addresses)")
    p.add_argument("--dhcp-range", metavar="FIRST-LAST", help="address pool for --dhcp full")
    p.add_argument("--router", metavar="IP[,IP]", help="default gateway(s) (DHCP option 3)")
    p.add_argument("--dns", metavar="IP[,IP]", help="DNS servers (DHCP option 6)")
    p.add_argument("--domain", help="domain name (DHCP option 15)")
    p.add_argument("--lease-time", type=int, metavar="SECONDS", help="lease time (default 3600)")
    p.add_argument("--deny-unknown", action="store_true", default=None,
                   help="full DHCP: give addresses only to registered nodes")
    p.add_argument("--tftp-root", metavar="DIR", help="extra static files served over TFTP and HTTP")
    p.add_argument("--tftp-port", type=int, metavar="PORT", help="TFTP port (default 69)")
    p.add_argument("--tftp-workers", type=int, metavar="N",
                   help="TFTP data-pump worker processes for large files; 0: serve everything "
                   "in the main process (default: one per core up to 4, 0 on a single core)")
    p.add_argument("--http-port", type=int, metavar="PORT", help="HTTP port (default 8080)")
    p.add_argument("--iscsi-port", type=int, metavar="PORT",
                   help="iSCSI target port (default 3260; 0: no iSCSI target)")
    p.add_argument("--iqn-prefix", metavar="IQN",
                   help="target names become IQNs under this prefix "
                   "(default iqn.2026-11.org.mobinux:)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="log verbosity (default info: one line per boot step)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    file_values: dict[str, Any] = load_toml(args.config) if args.config else {}
    flags = {
        "interface": args.interface, "address": args.address, "dhcp": args.dhcp,
        "dhcp_range": args.dhcp_range, "router": args.router, "dns": args.dns,
        "domain": args.domain, "lease_time": args.lease_time, "deny_unknown": args.deny_unknown,
        "tftp_root": args.tftp_root, "tftp_port": args.tftp_port, "http_port": args.http_port,
        "tftp_workers": args.tftp_workers, "iscsi_port": args.iscsi_port,
        "iqn_prefix": args.iqn_prefix,
    }
    config = build(file_values, flags)
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT is handled in app.run; a second one lands here
        asyncio.run(app.run(config, data_dir(args)))
    return 0
