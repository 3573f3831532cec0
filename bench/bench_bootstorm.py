"""Boot storm: N concurrent clients do DHCP, then fetch a kernel and an initrd over TFTP.

Compares mobinux with atftpd, tftpd-hpa and dnsmasq on the same load, in one
invocation, and prints one table: seconds, failures, peak RSS of the server
(VmRSS summed over the server's whole process tree, sampled every 0.2 s),
server CPU seconds and the ratio to the fastest peer; then whether mobinux
meets the issue's targets (TFTP storm at least as fast as the fastest peer,
no failures, peak RSS under 200 MB = 200 * 10**6 bytes).

    python bench/bench_bootstorm.py [--clients 100] [--servers mobinux,atftpd,tftpd-hpa,dnsmasq]
        [--kernel-mib 16 --initrd-mib 32] [--blksize 1468] [--tftp-path lo|veth]
        [--rounds 1] [--timeout 600] [--profile-mobinux FILE] [--mobinux-tftp-workers N]

Exit status 0 when mobinux meets the targets, 1 when it does not, 2 on a
usage problem, 130 when interrupted.

Quick smoke run: ``--clients 10 --kernel-mib 2 --initrd-mib 4``.

Needs root (network namespaces), ``atftp`` (the load generator), ``nsenter``
and the peers: ``atftpd``, ``dnsmasq``, and tftpd-hpa's ``in.tftpd`` (it
conflicts with atftpd in apt, so unless ``--tftpd-hpa PATH`` is given the
script unpacks it once with ``apt-get download tftpd-hpa && dpkg -x`` into
``~/.cache/mobinux/peers``). A peer that cannot be run is shown as SKIPPED.

How the load is made, and the choices behind it
------------------------------------------------
* Network. Each server gets a pair of fresh namespaces, ``mbxstorm<hex>s``
  (server) and ``mbxstorm<hex>c`` (clients), joined by a veth pair
  (``vsrv`` 10.250.0.1/20 <-> ``vcli`` 10.250.0.2/20). Nothing else is ever
  addressed; the namespaces are deleted at the end, on failure and on
  Ctrl-C/SIGTERM.
* Two phases, timed separately. atftpd and tftpd-hpa have no DHCP, so the
  honest comparison is: the DHCP phase for mobinux and dnsmasq only, the
  TFTP phase for all four. The TFTP total is the figure the issue compares
  (its 55/63/69 s were measured with 100 atftp clients over loopback).
  Each phase runs against a freshly started server, and its memory is
  sampled only during that phase.
* DHCP phase. The clients act as one DHCP relay, as perfdhcp does: this
  script re-runs itself inside the client namespace, binds 10.250.0.2:67,
  and sends every client's DISCOVER, then REQUEST, unicast to the server
  with giaddr = 10.250.0.2 and a distinct MAC (02:4d:42:xx:xx:xx), all
  clients at once; replies come back to giaddr:67. A relay needs neither raw
  sockets nor broadcast tricks, and exercises the same allocation and
  lease-commit path as a broadcast client. The messages carry the vendor
  class of a PXE BIOS (``PXEClient:Arch:00000:UNDI:002001``), like a real
  boot storm. A client retransmits after 1 s (at most 6 times a step),
  restarts after a NAK (at most 3 times) and fails after that or at the
  phase deadline. Duplicate addresses count as failures. dnsmasq runs with
  ``--no-ping`` (mobinux does no ICMP conflict check; the ping would time
  an ICMP timeout, not the server).
* TFTP phase. Every client is one coroutine that runs
  ``atftp --option "blksize B" -g -r vmlinuz -l /dev/null HOST 69`` and,
  if that succeeded, the same for ``initrd.img``; all clients start together.
  A client fails on a non-zero exit code (its last stderr line is kept) or
  at the phase deadline (``--timeout``, 600 s by default). With
  ``--tftp-path lo`` (the default, comparable to the issue's figures) the
  clients run inside the server's namespace and fetch from 127.0.0.1; with
  ``--tftp-path veth`` they run in the client namespace and fetch from
  10.250.0.1 across the veth (MTU 1500, so blksize 1468 is the largest that
  fits). mobinux's TFTP follows ``--interface`` (it binds to that
  interface's address and device), so over loopback it runs as
  ``serve --dhcp off --address 127.0.0.1 --tftp-root ROOT`` and over the veth
  as in the DHCP phase (``--dhcp full --interface vsrv``).
* Servers. Everything serves the same temp root holding a random ``vmlinuz``
  and ``initrd.img`` (plus a tiny ``ready.txt`` for the readiness probe).
  Before the storm, one fetch of each file is checked against its SHA-256.
  Peers get limits that do not reject the load: atftpd ``--maxthread`` and
  dnsmasq ``--tftp-max`` at twice the client count (at least 200).
  tftpd-hpa runs as ``in.tftpd -L -u root -a :69 -s ROOT`` (it forks one
  process per transfer: its RSS is the sum over those processes, shared
  pages counted once per process, as VmRSS does).

The machine has 2 cores that the clients (100 atftp processes) and the
server share, and anything else running on it skews the figures (runs of the
same server have differed by 1.5x on a busy machine). So each phase also
prints the load average before and after, and where the CPU went: the
server's (summed per process from /proc, sampled), the load generator's (this
script and its reaped children), everything else's (the machine's busy time
in /proc/stat less those two) and idle. ``--rounds N`` runs every server N
times, interleaved, and keeps the best time. ``--profile-mobinux FILE``
records mobinux's TFTP phase with py-spy (raw collapsed stacks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[1]
PEERS_CACHE = Path.home() / ".cache" / "mobinux" / "peers"
ALL_SERVERS = ("mobinux", "atftpd", "tftpd-hpa", "dnsmasq")
DHCP_SERVERS = ("mobinux", "dnsmasq")

SERVER_IP = "10.250.0.1"
RELAY_IP = "10.250.0.2"
PREFIX_LEN = 20
NETMASK = "255.255.240.0"
POOL_FIRST = "10.250.1.1"
POOL_LAST = "10.250.15.254"
SRV_IF = "vsrv"
CLI_IF = "vcli"

KERNEL = "vmlinuz"
INITRD = "initrd.img"
READY = "ready.txt"
MAX_CLIENTS = 1000
RSS_LIMIT = 200 * 10**6  # bytes: the "under 200 MB"
SAMPLE_INTERVAL = 0.2
DHCP_TIMEOUT = 120.0
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

# -- cleanup: everything started or created is registered here ----------------------------

_live_pids: set[int] = set()  # process-group leaders (started with start_new_session)
_namespaces: list[str] = []
_tempdirs: list[Path] = []


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def cleanup() -> None:
    for pid in list(_live_pids):
        _kill_group(pid, signal.SIGKILL)
    _live_pids.clear()
    for ns in list(_namespaces):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        _namespaces.remove(ns)
    for d in list(_tempdirs):
        shutil.rmtree(d, ignore_errors=True)
        _tempdirs.remove(d)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- small helpers ------------------------------------------------------------------------


def sh(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_random(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left > 0:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    path.chmod(0o644)
    return h.hexdigest()


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


@dataclass(frozen=True)
class Netns:
    server: str
    client: str


def make_netns() -> Netns:
    tag = secrets.token_hex(3)
    ns = Netns(f"mbxstorm{tag}s", f"mbxstorm{tag}c")
    for name in (ns.server, ns.client):
        sh("ip", "netns", "add", name)
        _namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
    sh("ip", "link", "add", SRV_IF, "netns", ns.server, "type", "veth",
       "peer", "name", CLI_IF, "netns", ns.client)
    sh("ip", "-n", ns.server, "addr", "add", f"{SERVER_IP}/{PREFIX_LEN}", "dev", SRV_IF)
    sh("ip", "-n", ns.client, "addr", "add", f"{RELAY_IP}/{PREFIX_LEN}", "dev", CLI_IF)
    sh("ip", "-n", ns.server, "link", "set", SRV_IF, "up")
    sh("ip", "-n", ns.client, "link", "set", CLI_IF, "up")
    return ns


def drop_netns(ns: Netns) -> None:
    for name in (ns.server, ns.client):
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        if name in _namespaces:
            _namespaces.remove(name)


def in_netns(ns: str, argv: list[str]) -> list[str]:
    """argv run inside network namespace *ns* (nsenter execs: same pid, no extra process)."""
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


# -- memory: VmRSS summed over a process tree ---------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        out.extend(int(x) for x in text.split())
    return out


def _vmrss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0  # gone, or a zombie


def _stat(pid: int) -> tuple[int, int] | None:
    """(start time, utime + stime) of *pid* in clock ticks, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[19]), int(fields[11]) + int(fields[12])


def tree_pids(root: int) -> list[int]:
    """*root* and its descendants."""
    todo: list[int] = [root]
    seen: set[int] = set()
    while todo and len(seen) < 10_000:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(_children(pid))
    return list(seen)


class RssSampler(threading.Thread):
    """Every SAMPLE_INTERVAL: VmRSS summed over the tree (peak kept), and each process's CPU.

    CPU is utime + stime per process as last seen, so a short-lived child (tftpd-hpa
    forks one per transfer) loses at most its last interval: a slight undercount.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.peak = 0
        self.peak_procs = 0
        self.samples = 0
        self._first: dict[tuple[int, int], int] = {}  # (pid, start time) -> ticks
        self._last: dict[tuple[int, int], int] = {}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        total, procs = 0, 0
        for pid in tree_pids(self.pid):
            stat = _stat(pid)
            rss = _vmrss(pid)
            if stat is None or not rss:
                continue
            total += rss
            procs += 1
            key = (pid, stat[0])
            self._first.setdefault(key, stat[1] if self.samples == 0 else 0)
            self._last[key] = stat[1]
        self.samples += 1
        self.peak = max(self.peak, total)
        self.peak_procs = max(self.peak_procs, procs)

    @property
    def cpu(self) -> float:
        ticks = sum(self._last[k] - self._first[k] for k in self._last)
        return ticks / os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_INTERVAL):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.sample()


# -- the servers ----------------------------------------------------------------------------


@dataclass
class Env:
    root: Path
    work: Path
    clients: int
    path: str  # "lo" or "veth": where the TFTP phase runs
    mobinux_python: str
    tftpd_hpa: str | None
    mobinux_tftp_workers: int | None = None


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    tftp_host: str  # where clients fetch from
    client_ns: str  # namespace the clients run in


def launch(name: str, phase: str, env: Env, ns: Netns, work: Path) -> Launch:
    """How to start *name* for *phase* ("dhcp" or "tftp")."""
    on_veth = phase == "dhcp" or env.path == "veth"
    host = SERVER_IP if on_veth else "127.0.0.1"
    client_ns = ns.client if on_veth else ns.server
    root = str(env.root)
    many = str(max(200, 2 * env.clients))
    argv: list[str]
    if name == "mobinux":
        argv = [env.mobinux_python, "-m", "mobinux", "--data-dir", str(work / "data"), "serve"]
        if on_veth:
            argv += ["--dhcp", "full", "--interface", SRV_IF,
                     "--dhcp-range", f"{POOL_FIRST}-{POOL_LAST}"]
        else:
            argv += ["--dhcp", "off", "--address", "127.0.0.1"]
        argv += ["--tftp-root", root, "--http-port", "8080"]
        if env.mobinux_tftp_workers is not None:
            argv += ["--tftp-workers", str(env.mobinux_tftp_workers)]
    elif name == "dnsmasq":
        argv = ["dnsmasq", "--no-daemon", "--port=0", "--conf-file=/dev/null", "--pid-file=",
                "--user=root", "--group=root", "--bind-interfaces",
                f"--log-facility={work / 'dnsmasq.log'}",
                "--enable-tftp", f"--tftp-root={root}", f"--tftp-max={many}"]
        if on_veth:
            argv += [f"--interface={SRV_IF}",
                     f"--dhcp-range={POOL_FIRST},{POOL_LAST},{NETMASK},1h",
                     f"--dhcp-lease-max={env.clients + 100}", "--no-ping",
                     f"--dhcp-leasefile={work / 'dnsmasq.leases'}"]
        else:
            argv += ["--interface=lo"]
    elif name == "atftpd":
        argv = ["atftpd", "--daemon", "--no-fork", "--user", "root", "--group", "root",
                "--port", "69", "--bind-address", host, "--maxthread", many,
                "--logfile", str(work / "atftpd.log"), root]
    elif name == "tftpd-hpa":
        assert env.tftpd_hpa is not None
        argv = [env.tftpd_hpa, "-L", "-u", "root", "-a", ":69", "-s", root]
    else:
        raise ValueError(name)
    return Launch(argv, host, client_ns)


def find_tftpd_hpa(given: str | None) -> tuple[str | None, str]:
    """Path of tftpd-hpa's in.tftpd, or None and why not."""
    candidates = [given] if given else [
        str(PEERS_CACHE / "tftpd-hpa" / "usr" / "sbin" / "in.tftpd"), "/usr/sbin/in.tftpd"]

    def is_hpa(path: str) -> bool:
        try:
            r = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=5, check=False)
        except OSError:
            return False
        return "tftp-hpa" in (r.stdout + r.stderr)

    for path in candidates:
        if Path(path).is_file() and is_hpa(path):
            return path, ""
    if given:
        return None, f"{given} is not tftpd-hpa's in.tftpd"
    # atftpd (installed) and tftpd-hpa conflict in apt: unpack the .deb next to it.
    dest = PEERS_CACHE / "tftpd-hpa"
    PEERS_CACHE.mkdir(parents=True, exist_ok=True)
    print(f"unpacking tftpd-hpa into {dest} (apt-get download tftpd-hpa && dpkg -x)", flush=True)
    try:
        subprocess.run(["apt-get", "download", "tftpd-hpa"], cwd=PEERS_CACHE, capture_output=True,
                       timeout=120, check=True)
        debs = sorted(PEERS_CACHE.glob("tftpd-hpa_*.deb"))
        if not debs:
            return None, "apt-get download tftpd-hpa gave no .deb"
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(dest)], capture_output=True, timeout=60,
                       check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot unpack tftpd-hpa: {exc}"
    path = str(dest / "usr" / "sbin" / "in.tftpd")
    return (path, "") if is_hpa(path) else (None, "unpacked tftpd-hpa has no usable in.tftpd")


class Server:
    """One running server process (a process group) with its log."""

    def __init__(self, name: str, how: Launch, ns: str, log: Path) -> None:
        self.name = name
        self.how = how
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *how.argv],  # execs: the pid is the server's
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=log.parent, start_new_session=True,
            )
        _live_pids.add(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL; the exit status (None if it had to be killed)."""
        status: int | None = None
        if self.proc.poll() is None:
            _kill_group(self.proc.pid, signal.SIGTERM)
            try:
                status = self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        else:
            status = self.proc.returncode
            _kill_group(self.proc.pid, signal.SIGKILL)  # leftover children (tftpd-hpa forks)
        _live_pids.discard(self.proc.pid)
        return status


def atftp_argv(ns: str, host: str, remote: str, local: str, blksize: int | None,
               timeout: int | None = None) -> list[str]:
    argv = ["atftp"]
    if blksize is not None:
        argv += ["--option", f"blksize {blksize}"]
    if timeout is not None:
        argv += ["--tftp-timeout", str(timeout)]
    return in_netns(ns, [*argv, "-g", "-r", remote, "-l", local, host, "69"])


def wait_ready(server: Server, work: Path) -> str | None:
    """None once the server answers a TFTP read, else why not."""
    deadline = time.monotonic() + READY_TIMEOUT
    out = work / "ready.out"
    last = ""
    while time.monotonic() < deadline:
        if not server.alive():
            return f"{server.name} exited with {server.proc.returncode}: {tail(server.log)}"
        try:
            r = subprocess.run(atftp_argv(server.how.client_ns, server.how.tftp_host, READY,
                                          str(out), None, timeout=1),
                               capture_output=True, text=True, timeout=15, check=False)
        except subprocess.TimeoutExpired:
            last = "atftp hung for 15 s"
            continue
        if r.returncode == 0:
            return None
        lines = (r.stderr or r.stdout).strip().splitlines()
        last = lines[-1] if lines else f"exit {r.returncode}"
        time.sleep(0.2)
    return f"{server.name} did not answer TFTP within {READY_TIMEOUT:.0f} s ({last})"


def check_files(server: Server, work: Path, blksize: int, digests: dict[str, str]) -> str | None:
    """One fetch of each file, compared with its SHA-256; None if all good."""
    for remote, digest in digests.items():
        out = work / "check.bin"
        out.unlink(missing_ok=True)
        try:
            r = subprocess.run(atftp_argv(server.how.client_ns, server.how.tftp_host, remote,
                                          str(out), blksize),
                               capture_output=True, text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired:
            return f"check fetch of {remote}: no answer within 120 s"
        if r.returncode != 0:
            return f"check fetch of {remote}: exit {r.returncode}: {r.stderr.strip()}"
        got = sha256(out)
        out.unlink(missing_ok=True)
        if got != digest:
            return f"check fetch of {remote}: SHA-256 mismatch"
    return None


# -- phases -----------------------------------------------------------------------------------


@dataclass
class Phase:
    seconds: float | None = None
    ok: int = 0
    failed: int = 0
    peak_rss: int = 0
    peak_procs: int = 0
    idle_rss: int = 0
    cpu: float = 0.0
    client_p50: float | None = None
    client_max: float | None = None
    errors: Counter[str] = field(default_factory=Counter)
    extra: str = ""
    load: str = ""
    cpu_note: str = ""
    problem: str = ""  # the server could not be measured at all
    rounds: list[float | None] = field(default_factory=list)  # seconds of every round


@dataclass
class Row:
    name: str
    dhcp_rounds: list[Phase] = field(default_factory=list)
    tftp_rounds: list[Phase] = field(default_factory=list)
    skipped: str = ""

    @property
    def dhcp(self) -> Phase | None:
        return combine(self.dhcp_rounds)

    @property
    def tftp(self) -> Phase | None:
        return combine(self.tftp_rounds)


def combine(phases: list[Phase]) -> Phase | None:
    """The best round's figures, with failures summed and memory maxed over all rounds."""
    if not phases:
        return None
    good = [p for p in phases if not p.problem and p.seconds is not None]
    best = min(good, key=lambda p: p.seconds or 0.0) if good else phases[-1]
    out = dataclasses.replace(best)
    out.failed = sum(p.failed for p in phases)
    out.peak_rss = max(p.peak_rss for p in phases)
    out.peak_procs = max(p.peak_procs for p in phases)
    out.errors = sum((p.errors for p in phases), Counter())
    out.problem = "; ".join(p.problem for p in phases if p.problem)
    out.rounds = [None if p.problem else p.seconds for p in phases]
    return out


class CpuMeter:
    """Where the machine's CPU went during a phase: server, load generator, everything else."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = self._busy()
        self.own0 = self._own()

    @staticmethod
    def _busy() -> float:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        except (OSError, ValueError):
            return 0.0
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped clients (atftp, nsenter)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def note(self, server_cpu: float) -> str:
        wall = time.perf_counter() - self.t0
        busy = self._busy() - self.busy0
        own = self._own() - self.own0
        other = max(0.0, busy - own - server_cpu)
        cores = os.cpu_count() or 1
        return (f"CPU over {wall:.1f} s x {cores} cores: server {server_cpu:.1f} s, load generator "
                f"{own:.1f} s, other processes ~{other:.1f} s, idle {max(0.0, cores * wall - busy):.1f} s")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _tftp_storm(ns: str, host: str, files: list[str], blksize: int, clients: int,
                      timeout: float) -> tuple[float, list[float], Counter[str]]:
    start = time.perf_counter()
    deadline = start + timeout
    done: list[float] = []
    errors: Counter[str] = Counter()

    async def client() -> None:
        for remote in files:
            left = deadline - time.perf_counter()
            if left <= 0:
                errors["timed out (phase deadline)"] += 1
                return
            proc = await asyncio.create_subprocess_exec(
                *atftp_argv(ns, host, remote, "/dev/null", blksize),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
            )
            _live_pids.add(proc.pid)
            try:
                _, err = await asyncio.wait_for(proc.communicate(), left)
            except TimeoutError:
                _kill_group(proc.pid, signal.SIGKILL)
                await proc.wait()
                _live_pids.discard(proc.pid)
                errors[f"{remote}: timed out (phase deadline)"] += 1
                return
            except asyncio.CancelledError:  # Ctrl-C/SIGTERM: asyncio.run cancels us
                _kill_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(proc.wait(), 5)
                raise
            _live_pids.discard(proc.pid)
            if proc.returncode != 0:
                lines = err.decode(errors="replace").strip().splitlines()
                errors[f"{remote}: atftp exit {proc.returncode}: "
                       f"{' | '.join(lines[-2:]) or 'no message'}"] += 1
                return
        done.append(time.perf_counter() - start)

    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start, done, errors


def start_profiler(pid: int, out: str) -> subprocess.Popen[bytes] | None:
    spy = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if spy is None:
        print("  --profile-mobinux: py-spy not found (PATH or $PY_SPY): not profiling", flush=True)
        return None
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--idle",
                             "--nonblocking", "--output", out], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _live_pids.add(proc.pid)
    return proc


def stop_profiler(proc: subprocess.Popen[bytes] | None, out: str) -> None:
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait(5)
    _live_pids.discard(proc.pid)
    print(f"  py-spy stacks (raw, idle included) written to {out}", flush=True)


def run_tftp_phase(server: Server, args: argparse.Namespace, profile: str | None) -> Phase:
    phase = Phase(load=loadavg())
    sampler = RssSampler(server.pid)
    sampler.sample()  # before the load: the idle figure, and every process's CPU baseline
    phase.idle_rss = sampler.peak
    spy = start_profiler(server.pid, profile) if profile else None
    meter = CpuMeter()
    sampler.start()
    try:
        seconds, done, errors = asyncio.run(_tftp_storm(
            server.how.client_ns, server.how.tftp_host, [KERNEL, INITRD], args.blksize,
            args.clients, args.timeout))
    finally:
        sampler.stop()
        if profile:
            stop_profiler(spy, profile)
    phase.cpu = sampler.cpu
    phase.cpu_note = meter.note(phase.cpu)
    phase.seconds = seconds
    phase.ok = len(done)
    phase.failed = args.clients - len(done)
    phase.errors = errors
    phase.client_p50 = _percentile(done, 0.5)
    phase.client_max = max(done) if done else None
    phase.peak_rss, phase.peak_procs = sampler.peak, sampler.peak_procs
    phase.load += f" -> {loadavg()}"
    if not server.alive():
        phase.problem = f"server died during the storm (exit {server.proc.returncode})"
    payload = args.clients * (args.kernel_mib + args.initrd_mib) * 2**20
    phase.extra = f"{payload / seconds / 1e6:.0f} MB/s aggregate"
    return phase


def run_dhcp_phase(server: Server, ns: Netns, args: argparse.Namespace) -> Phase:
    phase = Phase(load=loadavg())
    sampler = RssSampler(server.pid)
    sampler.sample()  # before the load: the idle figure, and every process's CPU baseline
    phase.idle_rss = sampler.peak
    argv = in_netns(ns.client, [sys.executable, str(Path(__file__).resolve()), "_dhcp-client",
                                "--server", SERVER_IP, "--relay", RELAY_IP,
                                "--clients", str(args.clients), "--timeout", str(DHCP_TIMEOUT)])
    meter = CpuMeter()
    sampler.start()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _live_pids.add(proc.pid)
    try:
        out, err = proc.communicate(timeout=DHCP_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    finally:
        _live_pids.discard(proc.pid)
        sampler.stop()
    phase.cpu = sampler.cpu
    phase.cpu_note = meter.note(phase.cpu)
    phase.peak_rss, phase.peak_procs = sampler.peak, sampler.peak_procs
    phase.load += f" -> {loadavg()}"
    try:
        res = json.loads(out)
    except json.JSONDecodeError:
        phase.problem = f"DHCP client gave no result (exit {proc.returncode}): {err.strip()[-300:]}"
        phase.failed = args.clients
        return phase
    phase.seconds = res["elapsed"]
    phase.ok = res["ok"]
    phase.failed = res["failed"]
    phase.errors = Counter(res["errors"])
    phase.client_p50, phase.client_max = res["p50"], res["max"]
    phase.extra = (f"{res['ok'] / res['elapsed']:.0f} leases/s, {res['retransmits']} retransmits, "
                   f"{res['naks']} NAKs, {res['distinct']} distinct addresses")
    return phase


def measure(name: str, phase_name: str, env: Env, ns: Netns, args: argparse.Namespace,
            digests: dict[str, str], round_no: int) -> Phase:
    work = env.work / f"{name}-{phase_name}-{round_no}"
    work.mkdir()
    how = launch(name, phase_name, env, ns, work)
    server = Server(name, how, ns.server, work / "server.log")
    try:
        problem = wait_ready(server, work)
        if problem is None and phase_name == "tftp":
            problem = check_files(server, work, args.blksize, digests)
        if problem is not None:
            return Phase(problem=problem, failed=args.clients)
        if phase_name == "dhcp":
            result = run_dhcp_phase(server, ns, args)
        else:
            profile: str | None = None
            if name == "mobinux" and args.profile_mobinux:
                profile = args.profile_mobinux
                if args.rounds > 1:
                    profile += f".round{round_no}"
            result = run_tftp_phase(server, args, profile)
        if result.failed or result.problem:
            log = tail(server.log, 6)
            if log:
                result.extra += "\n      server log tail:\n        " + log.replace("\n", "\n        ")
        return result
    finally:
        status = server.stop()
        if name == "mobinux" and status is None:
            print(f"  note: mobinux did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM: killed",
                  flush=True)
        elif name == "mobinux" and status not in (0, -signal.SIGTERM):
            print(f"  note: mobinux exited with status {status} on SIGTERM", flush=True)


def run_server(row: Row, env: Env, args: argparse.Namespace, digests: dict[str, str],
               round_no: int) -> None:
    name = row.name
    tag = f"[{name}]" if args.rounds == 1 else f"[{name}, round {round_no}/{args.rounds}]"
    ns = make_netns()
    try:
        if name in DHCP_SERVERS:
            print(f"{tag} DHCP phase: {args.clients} clients ...", flush=True)
            row.dhcp_rounds.append(measure(name, "dhcp", env, ns, args, digests, round_no))
            _print_phase(row.dhcp_rounds[-1])
        print(f"{tag} TFTP phase: {args.clients} clients x ({KERNEL} {args.kernel_mib} MiB + "
              f"{INITRD} {args.initrd_mib} MiB) over {env.path} ...", flush=True)
        row.tftp_rounds.append(measure(name, "tftp", env, ns, args, digests, round_no))
        _print_phase(row.tftp_rounds[-1])
    finally:
        drop_netns(ns)


def _print_phase(p: Phase) -> None:
    if p.problem:
        print(f"  PROBLEM: {p.problem}", flush=True)
    if p.seconds is not None:
        print(f"  {p.seconds:.2f} s, {p.ok} ok, {p.failed} failed, peak RSS {p.peak_rss / 1e6:.1f} MB "
              f"({p.peak_procs} procs), server CPU {p.cpu:.1f} s, load {p.load}", flush=True)
    if p.cpu_note:
        print(f"  {p.cpu_note}", flush=True)
    for msg, n in p.errors.most_common(5):
        print(f"  error x{n}: {msg}", flush=True)


# -- the report -------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(rows: list[Row], args: argparse.Namespace) -> int:
    def tftp_s(r: Row) -> float | None:
        ok = r.tftp is not None and r.tftp.seconds is not None and not r.tftp.problem
        return r.tftp.seconds if ok and r.tftp is not None else None

    peers = [r for r in rows if r.name != "mobinux" and tftp_s(r) is not None and r.tftp
             and r.tftp.failed == 0]
    fastest = min(peers, key=lambda r: tftp_s(r) or 0.0) if peers else None
    fast_s = tftp_s(fastest) if fastest else None

    print()
    print(f"Boot storm: {args.clients} concurrent clients, {KERNEL} {args.kernel_mib} MiB + "
          f"{INITRD} {args.initrd_mib} MiB, blksize {args.blksize}; TFTP over "
          f"{'loopback (127.0.0.1 in the server namespace)' if args.tftp_path == 'lo' else 'a veth pair'}"
          f"; DHCP over a veth pair (relay, giaddr {RELAY_IP}). {os.cpu_count()} cores, shared.")
    head = (f"{'server':<10} {'TFTP s':>8} {'fail':>5} {'vs fastest':>10} {'peak RSS MB':>11} "
            f"{'procs':>5} {'srv CPU s':>9} {'client p50/max s':>16} | {'DHCP s':>7} {'fail':>5} "
            f"{'peak RSS MB':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.skipped:
            print(f"{r.name:<10} SKIPPED: {r.skipped}")
            continue
        t = r.tftp
        secs = tftp_s(r)
        ratio = f"{secs / fast_s:.2f}x" if secs is not None and fast_s else "-"
        cols = f"{r.name:<10} "
        if t is None or t.problem:
            cols += f"{'FAILED':>8} {args.clients:>5} {'-':>10} {'-':>11} {'-':>5} {'-':>9} {'-':>16}"
        else:
            cols += (f"{_fmt(secs, '.2f'):>8} {t.failed:>5} {ratio:>10} {t.peak_rss / 1e6:>11.1f} "
                     f"{t.peak_procs:>5} {t.cpu:>9.1f} "
                     f"{_fmt(t.client_p50, '.1f') + '/' + _fmt(t.client_max, '.1f'):>16}")
        d = r.dhcp
        if d is None:
            cols += f" | {'n/a':>7} {'':>5} {'':>11}"
        elif d.problem or d.seconds is None:
            cols += f" | {'FAILED':>7} {d.failed:>5} {'-':>11}"
        else:
            cols += f" | {d.seconds:>7.3f} {d.failed:>5} {d.peak_rss / 1e6:>11.1f}"
        print(cols)
    print()
    for r in rows:
        for label, p in (("DHCP", r.dhcp), ("TFTP", r.tftp)):
            if p is None:
                continue
            notes = []
            if len(p.rounds) > 1:
                notes.append("rounds " + ", ".join(_fmt(x, ".2f") for x in p.rounds)
                             + " s (the best counts)")
            notes += [f"load {p.load}", f"idle RSS {p.idle_rss / 1e6:.1f} MB"]
            if p.cpu_note:
                notes.append(p.cpu_note)
            if p.extra:
                notes.append(p.extra)
            if p.problem:
                notes.append(f"PROBLEM: {p.problem}")
            print(f"  {r.name} {label}: " + "; ".join(notes))
            for msg, n in p.errors.most_common(5):
                print(f"    x{n}: {msg}")

    mob = next((r for r in rows if r.name == "mobinux"), None)
    if mob is None:
        return 0
    secs = tftp_s(mob)
    if secs is None or mob.tftp is None:
        print("\nmobinux targets: NOT MET (mobinux could not be measured)")
        return 1
    rss = max(mob.tftp.peak_rss, mob.dhcp.peak_rss if mob.dhcp else 0)
    mem_ok = rss < RSS_LIMIT
    fails = mob.tftp.failed + (mob.dhcp.failed if mob.dhcp else 0)
    if fast_s is None or fastest is None:
        speed = "no peer finished without failures, so speed is not compared"
        speed_ok = None
    else:
        speed_ok = secs <= fast_s
        speed = (f"TFTP {secs:.2f} s vs fastest peer {fastest.name} {fast_s:.2f} s "
                 f"({secs / fast_s:.2f}x) -> {'MET' if speed_ok else 'MISSED'}")
    if not mem_ok or fails or speed_ok is False:
        verdict = "NOT MET"
    else:
        verdict = "MET" if speed_ok else "UNDECIDED"
    print(f"\nmobinux targets: {verdict}: {speed}; peak RSS {rss / 1e6:.1f} MB "
          f"{'<' if mem_ok else '>='} 200 MB -> {'MET' if mem_ok else 'MISSED'}; "
          f"{fails} failed clients")
    return 0 if verdict == "MET" else 1


# -- the DHCP load generator (runs inside the client namespace) ---------------------------

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK = 1, 2, 3, 4, 5, 6
COOKIE = b"\x63\x82\x53\x63"
PXE_VENDOR = b"PXEClient:Arch:00000:UNDI:002001"
RETRY_S = 1.0
MAX_TRIES = 6
MAX_RESTARTS = 3


def dhcp_message(kind: int, xid: int, mac: bytes, relay: bytes,
                 requested: bytes | None = None, server_id: bytes | None = None) -> bytes:
    zero = b"\0\0\0\0"
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 1, xid, 0, 0,
                       zero, zero, zero, relay, mac, b"", b"")
    opts = bytearray(COOKIE)
    opts += bytes([53, 1, kind])
    opts += bytes([61, 7, 1]) + mac
    if requested is not None:
        opts += bytes([50, 4]) + requested
    if server_id is not None:
        opts += bytes([54, 4]) + server_id
    opts += bytes([57, 2]) + struct.pack("!H", 1260)
    opts += bytes([60, len(PXE_VENDOR)]) + PXE_VENDOR
    opts += bytes([93, 2, 0, 0])
    opts += bytes([55, 6, 1, 3, 6, 51, 54, 67])
    opts.append(255)
    return (head + bytes(opts)).ljust(300, b"\0")


def parse_reply(data: bytes) -> tuple[int, bytes, int, bytes | None] | None:
    """(xid, yiaddr, message type, server id) of a BOOTREPLY, or None."""
    if len(data) < 241 or data[0] != 2 or data[236:240] != COOKIE:
        return None
    xid = struct.unpack_from("!I", data, 4)[0]
    yiaddr = data[16:20]
    kind, server_id = 0, None
    i = 240
    while i < len(data):
        code = data[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(data):
            break
        size = data[i + 1]
        value = data[i + 2:i + 2 + size]
        if code == 53 and size == 1:
            kind = value[0]
        elif code == 54 and size == 4:
            server_id = bytes(value)
        i += 2 + size
    return xid, yiaddr, kind, server_id


@dataclass
class _DhcpClient:
    mac: bytes
    xid: int
    state: str = "discover"
    tries: int = 0
    restarts: int = 0
    sent_at: float = 0.0
    offered: bytes = b""
    server_id: bytes = b""
    done_at: float | None = None
    address: bytes = b""
    failed: str = ""


def dhcp_client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_bootstorm.py _dhcp-client")
    p.add_argument("--server", required=True)
    p.add_argument("--relay", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--timeout", type=float, required=True)
    a = p.parse_args(argv)
    relay = socket.inet_aton(a.relay)
    dest = (a.server, 67)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((a.relay, 67))
    sock.setblocking(False)

    clients: dict[int, _DhcpClient] = {}
    base = secrets.randbits(32) & 0xFFFF0000
    for i in range(a.clients):
        mac = bytes([0x02, 0x4D, 0x42, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])
        xid = (base + i) & 0xFFFFFFFF
        clients[xid] = _DhcpClient(mac, xid)
    counters = Counter[str]()

    def send(c: _DhcpClient, now: float) -> None:
        if c.state == "discover":
            msg = dhcp_message(DISCOVER, c.xid, c.mac, relay)
        else:
            msg = dhcp_message(REQUEST, c.xid, c.mac, relay, c.offered, c.server_id)
        for _ in range(100):  # bounded retry on a full send buffer
            try:
                sock.sendto(msg, dest)
                break
            except BlockingIOError:
                select.select([], [sock], [], 0.01)
        c.sent_at = now
        c.tries += 1
        counters["sent"] += 1
        if c.tries > 1:
            counters["retransmits"] += 1

    start = time.perf_counter()
    deadline = start + a.timeout
    for c in clients.values():
        send(c, time.perf_counter())
    pending = len(clients)
    last_scan = start
    while pending and time.perf_counter() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.05)
        now = time.perf_counter()
        if readable:
            for _ in range(1024):
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                parsed = parse_reply(data)
                if parsed is None:
                    continue
                xid, yiaddr, kind, server_id = parsed
                hit = clients.get(xid)
                if hit is None or hit.done_at is not None or hit.failed:
                    continue
                c = hit
                if kind == OFFER and c.state == "discover":
                    c.offered, c.server_id = yiaddr, server_id or socket.inet_aton(a.server)
                    c.state, c.tries = "request", 0
                    send(c, now)
                elif kind == ACK and c.state == "request":
                    c.done_at, c.address = now - start, yiaddr
                    pending -= 1
                elif kind == NAK and c.state == "request":
                    counters["naks"] += 1
                    c.restarts += 1
                    if c.restarts > MAX_RESTARTS:
                        c.failed = "NAKed too often"
                        pending -= 1
                    else:
                        c.state, c.tries = "discover", 0
                        send(c, now)
        if now - last_scan >= 0.05:
            last_scan = now
            for c in clients.values():
                if c.done_at is None and not c.failed and now - c.sent_at >= RETRY_S:
                    if c.tries >= MAX_TRIES:
                        c.failed = f"no {'OFFER' if c.state == 'discover' else 'ACK'} after {MAX_TRIES} tries"
                        pending -= 1
                    else:
                        send(c, now)
    end = time.perf_counter()
    errors: Counter[str] = Counter()
    times: list[float] = []
    seen: Counter[bytes] = Counter()
    for c in clients.values():
        if c.done_at is not None:
            times.append(c.done_at)
            seen[c.address] += 1
        elif c.failed:
            errors[c.failed] += 1
        else:
            errors[f"unfinished at the {a.timeout:.0f} s deadline ({c.state})"] += 1
    dupes = sum(n - 1 for n in seen.values() if n > 1)
    if dupes:
        errors["address handed to more than one client"] += dupes
    ok = len(times) - dupes
    result = {
        "clients": a.clients, "ok": ok, "failed": a.clients - ok,
        "elapsed": (max(times) if times and not pending else end - start),
        "p50": _percentile(times, 0.5), "max": max(times) if times else None,
        "sent": counters["sent"], "retransmits": counters["retransmits"],
        "naks": counters["naks"], "distinct": len(seen), "errors": dict(errors),
    }
    print(json.dumps(result))
    return 0


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=100, help="concurrent clients (default 100)")
    p.add_argument("--servers", default=",".join(ALL_SERVERS),
                   help="comma-separated, in run order (default: %(default)s)")
    p.add_argument("--kernel-mib", type=int, default=16, help="size of vmlinuz (default 16)")
    p.add_argument("--initrd-mib", type=int, default=32, help="size of initrd.img (default 32)")
    p.add_argument("--blksize", type=int, default=1468, help="TFTP blksize option (default 1468)")
    p.add_argument("--tftp-path", choices=("lo", "veth"), default="lo",
                   help="TFTP phase over the server namespace's loopback (default, as the issue's "
                        "figures) or across the veth pair")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="deadline of one TFTP storm in seconds (default 600)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every server this many times, interleaved; the best time counts, "
                        "failures add up, memory is the peak over all rounds (default 1)")
    p.add_argument("--profile-mobinux", metavar="FILE",
                   help="record mobinux's TFTP phase with py-spy (PATH or $PY_SPY) into FILE "
                        "(raw collapsed stacks, idle included); slows mobinux a little")
    p.add_argument("--tftpd-hpa", help="path of tftpd-hpa's in.tftpd (default: unpacked into "
                                       f"{PEERS_CACHE})")
    p.add_argument("--mobinux-python", default=str(REPO / ".venv" / "bin" / "python"),
                   help="python that can import mobinux (default: the repo's .venv)")
    p.add_argument("--mobinux-tftp-workers", type=int, metavar="N",
                   help="pass --tftp-workers N to mobinux serve (default: its own default)")
    a = p.parse_args(argv)
    if not 1 <= a.clients <= MAX_CLIENTS:
        p.error(f"--clients must be 1..{MAX_CLIENTS}")
    if not 8 <= a.blksize <= 65464:
        p.error("--blksize must be 8..65464")
    if a.kernel_mib < 1 or a.initrd_mib < 1 or a.kernel_mib + a.initrd_mib > 1024:
        p.error("--kernel-mib/--initrd-mib: 1 MiB or more each, 1 GiB at most together")
    if not 1 <= a.rounds <= 10:
        p.error("--rounds must be 1..10")
    if not 1 <= a.timeout <= 3600:
        p.error("--timeout must be 1..3600 s")
    names = [s.strip() for s in a.servers.split(",") if s.strip()]
    unknown = [s for s in names if s not in ALL_SERVERS]
    if unknown or not names:
        p.error(f"--servers: unknown {unknown}; choose from {', '.join(ALL_SERVERS)}")
    a.server_list = names
    return a


def main(argv: list[str]) -> int:
    if argv[:1] == ["_dhcp-client"]:
        return dhcp_client_main(argv[1:])
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("atftp", "nsenter", "ip"):
        if shutil.which(tool) is None:
            print(f"needs {tool} on PATH", file=sys.stderr)
            return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN:  # nohup
            signal.signal(sig, _on_signal)

    rows: list[Row] = []
    try:
        base = Path(tempfile.mkdtemp(prefix="mbxstorm-"))
        _tempdirs.append(base)
        root = base / "root"
        root.mkdir()
        work = base / "work"
        work.mkdir()
        for d in (base, root):
            d.chmod(0o755)
        print(f"writing {KERNEL} ({args.kernel_mib} MiB) and {INITRD} ({args.initrd_mib} MiB) "
              f"into {root}", flush=True)
        digests = {KERNEL: write_random(root / KERNEL, args.kernel_mib * 2**20),
                   INITRD: write_random(root / INITRD, args.initrd_mib * 2**20)}
        (root / READY).write_text("ready\n")
        (root / READY).chmod(0o644)

        tftpd_hpa, why = (find_tftpd_hpa(args.tftpd_hpa) if "tftpd-hpa" in args.server_list
                          else (None, ""))
        env = Env(root=root, work=work, clients=args.clients, path=args.tftp_path,
                  mobinux_python=args.mobinux_python, tftpd_hpa=tftpd_hpa,
                  mobinux_tftp_workers=args.mobinux_tftp_workers)
        missing: dict[str, str] = {}
        if "tftpd-hpa" in args.server_list and tftpd_hpa is None:
            missing["tftpd-hpa"] = why
        for name, binary in (("atftpd", "atftpd"), ("dnsmasq", "dnsmasq")):
            if name in args.server_list and shutil.which(binary) is None:
                missing[name] = f"{binary} is not installed"
        if "mobinux" in args.server_list and not Path(args.mobinux_python).exists():
            missing["mobinux"] = f"{args.mobinux_python} does not exist"

        rows = [Row(name, skipped=missing.get(name, "")) for name in args.server_list]
        for row in rows:
            if row.skipped:
                print(f"[{row.name}] SKIPPED: {row.skipped}", flush=True)
        for round_no in range(1, args.rounds + 1):  # interleaved: every server once per round
            for row in rows:
                if not row.skipped:
                    run_server(row, env, args, digests, round_no)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'Ctrl-C'}): cleaning up", file=sys.stderr)
        return 130
    finally:
        cleanup()
    return report(rows, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

