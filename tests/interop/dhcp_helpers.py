"""Helpers for the DHCP interop tests and benchmark.

* ``Topology``: network namespaces named ``mbxdhcp*`` joined by veth pairs,
  created and deleted by the tests (nothing outside them is touched).
* ``python dhcp_helpers.py serve ...``: runs :class:`DhcpService` with a tiny
  policy inside a namespace; prints ``READY``, one ``STEP mac ip step`` line
  per boot step and ``STATS {json}`` when it gets SIGTERM.
* ``python dhcp_helpers.py probe ...``: a PXE-like (or plain) client on a raw
  UDP socket: broadcasts one DHCP message from an interface and prints every
  reply as JSON, for a bounded time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from mobinux.boot import BootOffer, BootRequest  # noqa: E402
from mobinux.dhcp.packet import DhcpPacket, parse  # noqa: E402

_counter = itertools.count()


def have_root() -> bool:
    return os.geteuid() == 0


def run(*cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


@dataclass
class Topology:
    """Namespaces joined by veth pairs; every name starts with ``mbxdhcp``."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000}{next(_counter)}")
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    pidfiles: list[Path] = field(default_factory=list)

    def netns(self, role: str) -> str:
        name = f"mbxdhcp{role}{self.tag}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def veth(
        self, ns_a: str, if_a: str, addr_a: str | None, ns_b: str, if_b: str, addr_b: str | None
    ) -> None:
        run(
            "ip",
            "link",
            "add",
            if_a,
            "netns",
            ns_a,
            "type",
            "veth",
            "peer",
            "name",
            if_b,
            "netns",
            ns_b,
        )
        for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
            if addr:
                run("ip", "-n", ns, "addr", "add", addr, "dev", ifname)
            run("ip", "-n", ns, "link", "set", ifname, "up")

    def popen(self, ns: str, *cmd: str, **kw: object) -> subprocess.Popen[str]:
        proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", ns, *cmd],
            text=True,
            stdout=kw.pop("stdout", subprocess.PIPE),
            stderr=kw.pop("stderr", subprocess.PIPE),
            **kw,
        )
        self.procs.append(proc)
        return proc

    def exec(
        self, ns: str, *cmd: str, timeout: float = 20, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", ns, *cmd, timeout=timeout, check=check)

    def close(self) -> None:
        for pidfile in self.pidfiles:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    topo = Topology()
    try:
        yield topo
    finally:
        topo.close()


def missing_tool(*names: str) -> str | None:
    for name in names:
        if shutil.which(name) is None:
            return name
    return None


# -- server runner --------------------------------------------------------------------


class TestPolicy:
    """Boot file for PXE clients (unless --no-boot), fixed addresses from --fixed."""

    def __init__(
        self, filename: str | None, next_server: IPv4Address, fixed: dict[str, IPv4Address]
    ) -> None:
        self.filename = filename
        self.next_server = next_server
        self.fixed = fixed

    def is_known(self, mac: str) -> bool:
        return True

    def fixed_address(self, mac: str) -> IPv4Address | None:
        return self.fixed.get(mac)

    def boot_offer(self, request: BootRequest) -> BootOffer | None:
        if self.filename is None:
            return None
        return BootOffer(self.filename, self.next_server)


class ServerProcess:
    """A ``serve`` subprocess in a namespace, with its output parsed."""

    def __init__(self, topo: Topology, ns: str, args: list[str], ready_timeout: float = 10) -> None:
        self.proc = topo.popen(ns, sys.executable, str(Path(__file__).resolve()), "serve", *args)
        self.steps: list[str] = []
        self.stats: dict[str, int] = {}
        assert self.proc.stdout is not None
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"DHCP server did not start: {err}")
            if line.strip() == "READY":
                return
        raise RuntimeError("DHCP server not ready in time")

    def stop(self) -> dict[str, int]:
        """SIGTERM, then collect STEP lines and STATS."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        for line in out.splitlines():
            if line.startswith("STEP "):
                self.steps.append(line[5:])
            elif line.startswith("STATS "):
                self.stats = json.loads(line[6:])
        return self.stats


def _serve(ns: argparse.Namespace) -> None:
    import logging

    from mobinux.dhcp.aio import DhcpService
    from mobinux.dhcp.server import DhcpConfig

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    first, _, last = (ns.pool or "").partition("-")
    cfg = DhcpConfig(
        mode=ns.mode,
        server_ip=IPv4Address(ns.server_ip),
        subnet=IPv4Network(ns.subnet),
        pool_first=IPv4Address(first) if first else None,
        pool_last=IPv4Address(last) if last else None,
        routers=tuple(IPv4Address(a) for a in ns.router),
        dns_servers=tuple(IPv4Address(a) for a in ns.dns),
        domain=ns.domain,
        lease_time=ns.lease_time,
    )
    fixed = {}
    for item in ns.fixed:
        mac, _, ip = item.partition("=")
        fixed[mac.lower()] = IPv4Address(ip)
    policy = TestPolicy(None if ns.no_boot else ns.filename, IPv4Address(ns.server_ip), fixed)

    def record(mac: str | None, ip: str | None, step: str) -> None:
        if not ns.quiet:
            print(f"STEP {mac} {ip} {step}", flush=True)

    async def main() -> None:
        svc = DhcpService(cfg, ns.interface, policy, Path(ns.db), record, batch=ns.batch)
        await svc.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        print("READY", flush=True)
        await stop.wait()
        await svc.close()
        print("STATS " + json.dumps(svc.stats), flush=True)

    asyncio.run(main())


# -- probe client -----------------------------------------------------------------------


def _probe(ns: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ns.interface.encode())
    sock.bind((ns.bind, ns.port))
    mac = bytes.fromhex(ns.mac.replace(":", ""))
    opts: dict[int, bytes] = {53: bytes([ns.type])}
    if ns.vendor:
        opts[60] = ns.vendor.encode()
    if ns.arch is not None:
        opts[93] = ns.arch.to_bytes(2, "big")
    if ns.user_class:
        opts[77] = ns.user_class.encode()
    opts[55] = bytes([1, 3, 6, 43, 60, 66, 67])
    pkt = DhcpPacket(
        xid=ns.xid,
        flags=0x8000,
        ciaddr=IPv4Address(ns.ciaddr),
        chaddr=mac,
        options=opts,
    )
    sock.sendto(pkt.encode(), (ns.to, ns.to_port))
    deadline = time.monotonic() + ns.wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(4096)
        except TimeoutError:
            break
        try:
            r = parse(data)
        except Exception:
            continue
        if r.op != 2 or r.xid != ns.xid:
            continue
        print(
            json.dumps(
                {
                    "from": list(addr),
                    "type": r.message_type,
                    "yiaddr": str(r.yiaddr),
                    "siaddr": str(r.siaddr),
                    "file": r.file.decode(errors="replace"),
                    "options": {str(k): v.hex() for k, v in r.options.items()},
                }
            ),
            flush=True,
        )


def probe_args(
    interface: str,
    *,
    vendor: str | None = "PXEClient:Arch:00000:UNDI:002001",
    mtype: int = 1,
    to: str = "255.255.255.255",
    to_port: int = 67,
    bind: str = "0.0.0.0",
    port: int = 68,
    ciaddr: str = "0.0.0.0",
    mac: str = "52:54:00:12:34:56",
    wait: float = 2.0,
    user_class: str | None = None,
) -> list[str]:
    args = [
        sys.executable,
        str(Path(__file__).resolve()),
        "probe",
        "--interface", interface,
        "--type", str(mtype),
        "--to", to,
        "--to-port", str(to_port),
        "--bind", bind,
        "--port", str(port),
        "--ciaddr", ciaddr,
        "--mac", mac,
        "--wait", str(wait),
    ]  # fmt: skip
    if vendor:
        args += ["--vendor", vendor]
    if user_class:
        args += ["--user-class", user_class]
    return args


def probe_replies(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--mode", default="full")
    s.add_argument("--interface", required=True)
    s.add_argument("--server-ip", required=True)
    s.add_argument("--subnet", required=True)
    s.add_argument("--pool")
    s.add_argument("--router", action="append", default=[])
    s.add_argument("--dns", action="append", default=[])
    s.add_argument("--domain")
    s.add_argument("--lease-time", type=int, default=3600)
    s.add_argument("--db", required=True)
    s.add_argument("--filename", default="pxelinux.0")
    s.add_argument("--no-boot", action="store_true")
    s.add_argument("--fixed", action="append", default=[])
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--batch", type=int, default=256)
    p = sub.add_parser("probe")
    p.add_argument("--interface", required=True)
    p.add_argument("--type", type=int, default=1)
    p.add_argument("--vendor")
    p.add_argument("--arch", type=int)
    p.add_argument("--user-class")
    p.add_argument("--to", default="255.255.255.255")
    p.add_argument("--to-port", type=int, default=67)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, default=68)
    p.add_argument("--ciaddr", default="0.0.0.0")
    p.add_argument("--mac", default="52:54:00:12:34:56")
    p.add_argument("--xid", type=int, default=0x4D42584E)
    p.add_argument("--wait", type=float, default=2.0)
    ns = ap.parse_args(argv)
    if ns.cmd == "serve":
        _serve(ns)
    else:
        _probe(ns)


if __name__ == "__main__":
    main()
