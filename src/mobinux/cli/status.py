"""``mobinux status``: is the server up, DHCP leases, iSCSI sessions, each node's last boot steps."""

from __future__ import annotations

import argparse
import time
from typing import Any

from mobinux.app import LEASES_NAME, server_pid
from mobinux.cli.common import data_dir, print_json, print_table
from mobinux.inventory.db import Inventory

STEPS_SHOWN = 20
_DHCP_STEP_PREFIXES = ("dhcp-", "proxy-")


def last_boot(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps of the client's latest boot: from the start of its last run of DHCP steps."""
    start = 0
    for i in range(len(steps) - 1, -1, -1):
        if steps[i]["step"].startswith(_DHCP_STEP_PREFIXES):
            start = i
            if i > 0 and not steps[i - 1]["step"].startswith(_DHCP_STEP_PREFIXES):
                break
    return steps[start:][-STEPS_SHOWN:]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="server state, DHCP leases, iSCSI sessions and recent boot steps",
                       description="Shows whether a server runs on the data directory, the "
                       "DHCP leases it handed out, the iSCSI sessions logged in (initiator, "
                       "target, node, since when) and the last boot steps of every client.")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _leases(args: argparse.Namespace) -> list[dict[str, Any]]:
    path = data_dir(args) / LEASES_NAME
    if not path.exists():
        return []
    from mobinux.dhcp.leases import read_leases

    out = []
    for lease in read_leases(path):
        out.append({
            "mac": lease.mac,
            "ip": str(lease.ip),
            "hostname": lease.hostname,
            "expires": lease.expires,
            "state": str(getattr(lease.state, "value", lease.state)),
        })
    return out


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def run(args: argparse.Namespace) -> int:
    directory = data_dir(args)
    inv = Inventory(directory)
    try:
        pid = server_pid(directory)
        nodes = {n.mac: n for n in inv.nodes()}
        steps = inv.boot_steps()
        leases = _leases(args)
        # Recorded by the server as sessions come and go; stale once it is gone.
        sessions: list[dict[str, Any]] = [
            {"initiator": r.initiator, "target": r.target, "node": r.node, "peer": r.peer,
             "since": r.since, "type": r.kind}
            for r in (inv.iscsi_sessions() if pid is not None else [])
        ]
    finally:
        inv.close()
    clients: dict[str, list[dict[str, Any]]] = {}
    for step in steps:
        key = step.mac or step.ip or "-"
        clients.setdefault(key, []).append({"time": step.time, "ip": step.ip, "step": step.step})
    for mac in nodes:
        clients.setdefault(mac, [])
    client_list: list[dict[str, Any]] = [
        {"mac": key, "node": nodes[key].name if key in nodes else None,
         "last_steps": last_boot(entries)}
        for key, entries in sorted(clients.items())
    ]
    if args.json:
        print_json({"server": {"running": pid is not None, "pid": pid, "data_dir": str(directory)},
                    "leases": leases, "iscsi_sessions": sessions, "clients": client_list})
        return 0
    print(f"server: {'running (pid ' + str(pid) + ')' if pid is not None else 'not running'}"
          f"  data: {directory}")
    print()
    print_table(["mac", "ip", "hostname", "expires", "state"],
                [[le["mac"], le["ip"], le["hostname"], _when(le["expires"]), le["state"]]
                 for le in leases])
    print()
    if sessions:
        print_table(["initiator", "target", "node", "peer", "since"],
                    [[x["initiator"], x["target"], x["node"], x["peer"], _when(x["since"])]
                     for x in sessions])
        print()
    rows = []
    for client in client_list:
        last = client["last_steps"]
        rows.append([client["mac"], client["node"],
                     _when(last[-1]["time"]) if last else None,
                     " > ".join(s["step"] for s in last)])
    print_table(["mac", "node", "last seen", "last boot steps"], rows)
    return 0
