"""TFTP throughput: mobinux against tftpd-hpa, atftpd and dnsmasq, side by side.

Each server runs alone in its own network namespace (``mbxtftpbench-*``) on
that namespace's loopback, port 69; the atftp client fetches one file
(64 MiB by default) from it, in lock-step at blksize 512, 1468 and 8192 and at
1468 with windowsize 16 (RFC 7440). Rounds are interleaved (every server and
row once, then again) and the best of the rounds counts. Every download is
checked against the file's SHA-256 (outside the timed part).

mobinux runs as ``mobinux serve`` would: with its default number of TFTP
data-pump workers (``--mobinux-workers N`` to choose; 0 serves everything
from the main process, as this benchmark did before the workers existed).

Needs root (network namespaces), atftp, and any of the peers that are present:
``in.tftpd`` (tftpd-hpa; unpack it with ``apt-get download tftpd-hpa && dpkg -x``
and pass ``--tftpd-hpa DIR/usr/sbin/in.tftpd`` if atftpd is installed),
``atftpd``, ``dnsmasq``. Missing peers are skipped.

    python bench/bench_tftp.py [--size-mib 64] [--rounds 2] [--mobinux-workers N] [--profile OUT]

MB/s is 10**6 bytes per second of payload, measured as the wall time of the
client process (start-up included, ~1 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROWS: list[tuple[str, list[str]]] = [
    ("512", ["blksize 512"]),
    ("1468", ["blksize 1468"]),
    ("8192", ["blksize 8192"]),
    ("1468 w16", ["blksize 1468", "windowsize 16"]),
]
FILE = "bench.img"
CLIENT_TIMEOUT = 180.0  # seconds for one download, then the row counts as failed


# -- the mobinux server, run as a child process -------------------------------------


def serve(root: str, port: int, workers: int, profile: str | None) -> None:
    from mobinux.boot import ResolvedFile
    from mobinux.paths import contained_file
    from mobinux.tftp.aio import TftpService

    class Resolver:
        def resolve(self, name: str, client_ip: str, query: str = "") -> ResolvedFile | None:
            path = contained_file(Path(root), name)
            return None if path is None else ResolvedFile(name=name, path=path)

    async def main() -> None:
        svc = TftpService(Resolver(), host="0.0.0.0", port=port, logger=logging.getLogger("bench"), workers=workers)
        await svc.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await svc.close()

    logging.basicConfig(level=logging.WARNING)
    if profile:
        import cProfile

        cProfile.runctx("asyncio.run(main())", globals(), {"asyncio": asyncio, "main": main}, profile)
    else:
        asyncio.run(main())


# -- harness ---------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    argv: list[str]
    netns: str = ""
    proc: subprocess.Popen[bytes] | None = None
    best: dict[str, float] = field(default_factory=dict)  # row -> seconds
    cpu: dict[str, float] = field(default_factory=dict)  # row -> least server CPU seconds


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def start(server: Server, index: int) -> None:
    server.netns = f"mbxtftpbench{index}"
    subprocess.run(["ip", "netns", "del", server.netns], capture_output=True, check=False)
    sh("ip", "netns", "add", server.netns)
    sh("ip", "-n", server.netns, "link", "set", "lo", "up")
    server.proc = subprocess.Popen(
        ["ip", "netns", "exec", server.netns, *server.argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(server: Server) -> None:
    if server.proc is not None and server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(5)
    if server.netns:
        subprocess.run(["ip", "netns", "del", server.netns], capture_output=True, check=False)


def fetch(server: Server, options: list[str], out: Path, atftp: str) -> float | None:
    out.unlink(missing_ok=True)
    opts = [a for o in options for a in ("--option", o)]
    argv = ["ip", "netns", "exec", server.netns, atftp, *opts, "-g", "-r", FILE, "-l", str(out), "127.0.0.1", "69"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, capture_output=True, timeout=CLIENT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return None
    elapsed = time.perf_counter() - t0
    return elapsed if r.returncode == 0 else None


def wait_ready(server: Server, atftp: str, out: Path) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out.unlink(missing_ok=True)
        argv = ["ip", "netns", "exec", server.netns, atftp, "-g", "-r", "ready", "-l", str(out), "127.0.0.1", "69"]
        try:
            r = subprocess.run(argv, capture_output=True, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            continue
        if r.returncode == 0:
            return True
        time.sleep(0.2)
    return False


def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def server_cpu(server: Server) -> float:
    """CPU seconds used by the server process, its threads, its live descendants
    (mobinux's TFTP workers) and its reaped children (tftpd-hpa forks one child
    per transfer)."""
    assert server.proc is not None
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _proc_stat(int(entry))) is not None:
            stats[int(entry)] = fields
    # Fields after the command name: [1] is the parent pid; utime, stime,
    # cutime, cstime (fields 14-17 of /proc/PID/stat) are [11:15].
    family = {server.proc.pid}
    grew = True
    while grew:
        grew = False
        for pid, fields in stats.items():
            if pid not in family and int(fields[1]) in family:
                family.add(pid)
                grew = True
    ticks = sum(int(x) for pid in family if pid in stats for x in stats[pid][11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", nargs=3, metavar=("ROOT", "PORT", "WORKERS"), help=argparse.SUPPRESS)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="best of this many (default 2)")
    ap.add_argument("--only", default="", help="comma-separated servers to run")
    ap.add_argument("--tftpd-hpa", default="", help="path to tftpd-hpa's in.tftpd")
    ap.add_argument("--mobinux-workers", type=int, default=None, metavar="N",
                    help="mobinux TFTP worker processes (default: what mobinux serve uses here)")
    ap.add_argument("--profile", default="",
                    help="write a cProfile of the mobinux main process here (use with --mobinux-workers 0)")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), int(args.serve[2]), args.profile or None)
        return 0

    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    atftp = shutil.which("atftp")
    if atftp is None:
        print("needs the atftp client (Debian package atftp)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="mbxtftpbench-"))
    os.chmod(work, 0o755)  # dnsmasq and atftpd may read as nobody
    root = work / "root"
    root.mkdir(mode=0o755)
    size = args.size_mib * 1024 * 1024
    with (root / FILE).open("wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(1 << 20))
    (root / "ready").write_bytes(b"ok\n")
    for p in root.iterdir():
        os.chmod(p, 0o644)
    want = sha256(root / FILE)  # also pulls the file into the page cache
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    out = Path(tempfile.mkdtemp(prefix="mbxtftpbench-out-", dir=shm)) / "out"

    here = Path(__file__).resolve()
    prof = ["--profile", args.profile] if args.profile else []
    if args.mobinux_workers is None:
        from mobinux.config import default_tftp_workers

        args.mobinux_workers = default_tftp_workers()
    workers = str(args.mobinux_workers)
    servers = [Server("mobinux", [sys.executable, str(here), "--serve", str(root), "69", workers, *prof])]
    # tftpd-hpa conflicts with atftpd in apt (whose /usr/sbin/in.tftpd is a
    # link to atftpd): find or unpack the real one like bench_bootstorm does.
    sys.path.insert(0, str(here.parent))
    from bench_bootstorm import find_tftpd_hpa

    hpa, why = find_tftpd_hpa(args.tftpd_hpa or None)
    if hpa is None:
        print(f"tftpd-hpa: {why}, skipped", file=sys.stderr)
    else:
        servers.append(Server("tftpd-hpa", [hpa, "-L", "-u", "root", "-a", ":69", "-s", str(root)]))
    if shutil.which("atftpd"):
        servers.append(Server("atftpd", ["atftpd", "--daemon", "--no-fork", "--port", "69", "--user", "root",
                                         "--group", "root", "--logfile", "/dev/null", str(root)]))
    if shutil.which("dnsmasq"):
        servers.append(Server("dnsmasq", ["dnsmasq", "--no-daemon", "--port=0", "--conf-file=/dev/null",
                                          "--pid-file=", "--enable-tftp", f"--tftp-root={root}",
                                          "--user=root", "--group=root", "--quiet-tftp", "--log-facility=-"]))
    if args.only:
        keep = set(args.only.split(","))
        servers = [s for s in servers if s.name in keep]

    load_before = f"{os.getloadavg()[0]:.2f}"
    try:
        for i, server in enumerate(servers):
            start(server, i)
        for server in servers:
            if not wait_ready(server, atftp, out):
                print(f"{server.name}: did not come up, skipped", file=sys.stderr)
                stop(server)
        servers = [s for s in servers if s.proc is not None and s.proc.poll() is None]
        for rnd in range(args.rounds):
            for row, options in ROWS:
                for server in servers:
                    cpu0 = server_cpu(server)
                    t = fetch(server, options, out, atftp)
                    time.sleep(0.05)  # let a forking server reap its child
                    cpu = server_cpu(server) - cpu0
                    ok = t is not None and out.exists() and out.stat().st_size == size and sha256(out) == want
                    if not ok:
                        print(f"round {rnd + 1}: {server.name} {row}: FAILED", file=sys.stderr)
                        continue
                    assert t is not None
                    if t < server.best.get(row, float("inf")):
                        server.best[row] = t
                    if cpu < server.cpu.get(row, float("inf")):
                        server.cpu[row] = cpu
    finally:
        for server in servers:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out.parent, ignore_errors=True)

    def rate(server: Server, row: str) -> float | None:
        t = server.best.get(row)
        return None if t is None else size / t / 1e6

    names = [s.name for s in servers]
    print(f"load average before: {load_before}, after: {os.getloadavg()[0]:.2f} (2-core machine)")
    print(f"TFTP download of {args.size_mib} MiB over loopback with atftp, best of {args.rounds}, MB/s"
          f" (mobinux with {args.mobinux_workers} TFTP workers)")
    print(f"{'row':<10}" + "".join(f"{n:>11}" for n in names) + f"{'mbx/best':>10}")
    for row, _ in ROWS:
        cells = [rate(s, row) for s in servers]
        line = f"{row:<10}" + "".join(f"{c:>11.1f}" if c else f"{'-':>11}" for c in cells)
        mine = cells[0] if names and names[0] == "mobinux" else None
        peers = [c for n, c in zip(names, cells, strict=True) if n != "mobinux" and c]
        ratio = f"{mine / max(peers):>10.2f}" if mine and peers else f"{'-':>10}"
        print(line + ratio)
    # tftpd-hpa's per-transfer children are reaped without being accounted
    # to it (SIGCHLD ignored), so its CPU cannot be read this way.
    counted = [s for s in servers if s.name != "tftpd-hpa"]
    print("server CPU seconds per download (least of the rounds; 10 ms resolution)")
    print(f"{'row':<10}" + "".join(f"{s.name:>11}" for s in counted))
    for row, _ in ROWS:
        print(f"{row:<10}" + "".join(f"{s.cpu[row]:>11.2f}" if row in s.cpu else f"{'-':>11}" for s in counted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
