"""A classroom: one base image with one overlay per client (mobinux) against one full copy
of the image per client (tgt, what plain iSCSI needs).

Setup, in a private namespace on loopback (``mbxiscsibench``):

- a base image of ``--base-mib`` (default 2048 MiB; its first half data, the
  rest a hole, like an installed system with free space);
- mobinux: ``image import`` it once, ``node add`` one ``--boot iscsi`` node
  per client (``mobinux serve`` on port 3260);
- tgt: one copy of the image per client (``cp``, keeping holes) and one target
  per copy (``tgtd`` on 3261).

Then, for each server in turn, ``--clients`` (default 40) simulated clients run
at once, each with its own initiator name and its own target: ``qemu-img bench``
reads the same ``--read-mib`` (200) working set at the start of the disk in
128 KiB requests, then writes ``--write-mib`` (20) elsewhere. The page cache is
dropped before each run, as after a server boot. Printed: setup time, disk
space (allocated bytes of everything each server stores), the run's wall time
and aggregate throughput, and the ratio mobinux/tgt (goal >= 0.8).

Needs root, qemu-utils with qemu-block-extra, tgt, and free disk space for
``clients`` copies of the base's data (40 GiB at the defaults).

    python bench/bench_classroom.py [--clients 40] [--base-mib 2048] [--read-mib 200] [--write-mib 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from bench_iscsi import (  # the sibling script, found through sys.path
    MOBINUX_PORT,
    NS,
    TGT_CONTROL,
    TGT_PORT,
    in_ns,
    sh,
    wait_port,
)

PREFIX = "iqn.2026-11.org.mobinux:"
TGT_PREFIX = "iqn.2026-11.org.mobinux.bench:class"
REQUEST = 128 * 1024
GOAL = 0.8


def mac(i: int) -> str:
    return f"52:54:00:c1:{i // 256:02x}:{i % 256:02x}"


def allocated(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def make_base(path: Path, size_mib: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size_mib // 2):
            f.write(chunk)
        f.truncate(size_mib << 20)
        os.fsync(f.fileno())


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mobinux(data: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    res = subprocess.run([sys.executable, "-m", "mobinux", "--data-dir", str(data), *args],
                         capture_output=True, text=True, timeout=1800, env=env)
    if res.returncode != 0:
        raise SystemExit(f"mobinux {' '.join(args)}: {res.stderr}")
    return res.stdout


def client(port: int, iqn: str, lun: int, initiator: str, read_mib: int, write_mib: int,
           base_mib: int) -> list[str]:
    opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{port},target={iqn},lun={lun},"
            f"initiator-name={initiator}")
    reads = read_mib * (1 << 20) // REQUEST
    writes = write_mib * (1 << 20) // REQUEST
    write_at = (base_mib // 2) << 20  # in the image's free space, away from the working set
    script = (f"qemu-img bench -c {reads} -d 4 -s {REQUEST} --image-opts '{opts}' >/dev/null && "
              f"qemu-img bench -w -c {writes} -d 4 -s {REQUEST} -o {write_at} --image-opts '{opts}' "
              ">/dev/null")
    return in_ns("sh", "-c", script)


def run_clients(argvs: list[list[str]]) -> tuple[float, int]:
    start = time.monotonic()
    procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for a in argvs]
    failed = 0
    for p in procs:
        _, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            failed += 1
            sys.stderr.write(err.decode(errors="replace")[-400:])
    return time.monotonic() - start, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--base-mib", type=int, default=2048)
    parser.add_argument("--read-mib", type=int, default=200)
    parser.add_argument("--write-mib", type=int, default=20)
    args = parser.parse_args()
    for tool in ("qemu-img", "tgtd", "tgtadm"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install qemu-utils qemu-block-extra tgt")
    work = Path(tempfile.mkdtemp(prefix="mbxclassroom-", dir="/var/tmp"))
    need = args.clients * (args.base_mib // 2) * (1 << 20) * 1.1
    if shutil.disk_usage(work).free < need:
        shutil.rmtree(work)
        raise SystemExit(f"{need / 2**30:.0f} GiB free needed in /var/tmp for tgt's copies; "
                         "lower --clients or --base-mib")
    subprocess.run(["ip", "netns", "del", NS], capture_output=True, check=False)
    sh("ip", "netns", "add", NS)
    sh("ip", "-n", NS, "link", "set", "lo", "up")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        base = work / "base.raw"
        make_base(base, args.base_mib)
        total_bytes = args.clients * (args.read_mib + args.write_mib) * (1 << 20)

        # -- mobinux: one import, one node per client
        data = work / "mobinux-data"
        t0 = time.monotonic()
        mobinux(data, "image", "import", str(base), "--name", "class", "--format", "raw")
        for i in range(args.clients):
            mobinux(data, "node", "add", mac(i), "--name", f"pc{i:02d}", "--image", "class",
                    "--boot", "iscsi")
        mobinux_setup = time.monotonic() - t0
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
        log = open(work / "mobinux.log", "wb")  # noqa: SIM115 - lives as long as the server
        procs.append(subprocess.Popen(in_ns(sys.executable, "-m", "mobinux", "--data-dir", str(data),
                                            "serve", "--dhcp", "off", "--address", "127.0.0.1",
                                            "--iscsi-port", str(MOBINUX_PORT), "--log-level", "warning"),
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
        wait_port(MOBINUX_PORT, procs[-1])
        drop_caches()
        argvs = [client(MOBINUX_PORT, f"{PREFIX}node.{mac(i).replace(':', '')}", 0,
                        f"{PREFIX}initiator.{mac(i).replace(':', '')}", args.read_mib, args.write_mib,
                        args.base_mib) for i in range(args.clients)]
        mobinux_time, mobinux_failed = run_clients(argvs)
        mobinux_space = allocated(data)
        procs[-1].send_signal(signal.SIGTERM)
        procs[-1].wait(timeout=30)

        # -- tgt: a full copy and a target per client
        copies = work / "tgt-copies"
        copies.mkdir()
        log = open(work / "tgtd.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(in_ns("tgtd", "-f", "--iscsi", f"portal=127.0.0.1:{TGT_PORT}",
                                            "--control-port", str(TGT_CONTROL)),
                                      stdout=log, stderr=subprocess.STDOUT))
        time.sleep(1.0)
        adm = ("tgtadm", "-C", str(TGT_CONTROL), "--lld", "iscsi")
        t0 = time.monotonic()
        for i in range(args.clients):
            copy = copies / f"pc{i:02d}.raw"
            sh("cp", "--sparse=always", str(base), str(copy), timeout=600)
            sh(*in_ns(*adm, "--op", "new", "--mode", "target", "--tid", str(i + 1), "-T",
                      f"{TGT_PREFIX}{i:02d}"))
            sh(*in_ns(*adm, "--op", "new", "--mode", "logicalunit", "--tid", str(i + 1), "--lun", "1",
                      "-b", str(copy)))
            sh(*in_ns(*adm, "--op", "bind", "--mode", "target", "--tid", str(i + 1), "-I", "ALL"))
        os.sync()
        tgt_setup = time.monotonic() - t0
        wait_port(TGT_PORT, procs[-1])
        drop_caches()
        argvs = [client(TGT_PORT, f"{TGT_PREFIX}{i:02d}", 1, f"iqn.2026-11.org.mobinux.bench:pc{i:02d}",
                        args.read_mib, args.write_mib, args.base_mib) for i in range(args.clients)]
        tgt_time, tgt_failed = run_clients(argvs)
        tgt_space = allocated(copies)

        print()
        print(f"{args.clients} clients, base {args.base_mib} MiB, each reads {args.read_mib} MiB "
              f"and writes {args.write_mib} MiB")
        print(f"{'':10s} {'setup':>9s} {'disk space':>12s} {'run':>9s} {'throughput':>13s} failed")
        for name, setup, space, took, failed in (
                ("mobinux", mobinux_setup, mobinux_space, mobinux_time, mobinux_failed),
                ("tgt", tgt_setup, tgt_space, tgt_time, tgt_failed)):
            print(f"{name:10s} {setup:8.1f}s {space / 2**30:10.2f} GiB {took:8.1f}s "
                  f"{total_bytes / took / 1e6:9.1f} MB/s {failed:6d}")
        ratio = tgt_time / mobinux_time
        print(f"throughput mobinux/tgt: {ratio:.2f} (goal >= {GOAL}: {'met' if ratio >= GOAL else 'MISSED'})")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        subprocess.run(["ip", "netns", "del", NS], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
