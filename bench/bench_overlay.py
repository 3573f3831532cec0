"""Overlay cost: a node's copy-on-write disk against the raw export of the same bytes.

One ``mobinux serve`` in a private namespace (``mbxiscsibench``, loopback)
exports the same 256 MiB of data twice: as a plain target (``mobinux target
add``, the raw file) and as a node's own disk (``image import`` +
``node add --boot iscsi``: the node's overlay over the read-only base). Rows
are those of ``bench_iscsi.py`` (iscsi-perf reads, qemu-img bench writes),
run against:

- ``raw``: the plain export;
- ``overlay``: the node's disk. Reads of the read rows fall through to the
  base (what a classroom does most); then every write row runs twice, first on
  an emptied overlay (``fresh``: each first write to a 64 KiB chunk copies it
  up) and again at once (``written``: the chunks are the overlay's own);
- a last read pass (``overlay, written``) after the whole disk was written,
  when every read comes from the overlay's data file.

Rounds are interleaved; the best round counts. Prints each row's ratio
overlay/raw (the issue's goal: the overlay costs at most 10%, ratio >= 0.9).

Needs root, libiscsi-bin, qemu-utils with qemu-block-extra.

    python bench/bench_overlay.py [--rounds 2] [--seconds 5] [--size-mib 256]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_iscsi import (  # the sibling script, found through sys.path
    MOBINUX_PORT,
    NS,
    ROWS,
    Row,
    fmt,
    make_file,
    sh,
    wait_port,
    warm,
)
from bench_iscsi import in_ns as _in_ns

MAC = "52:54:00:be:0c:01"
PREFIX = "iqn.2026-11.org.mobinux:"
RAW_IQN = PREFIX + "raw"
NODE_IQN = PREFIX + "node." + MAC.replace(":", "")
NODE_INITIATOR = PREFIX + "initiator." + MAC.replace(":", "")
OTHER_INITIATOR = "iqn.2026-11.org.mobinux.bench:initiator"
GOAL = 0.9

_IOPS_RE = re.compile(r"iops average (\d+)")
_RUN_RE = re.compile(r"Run completed in ([\d.]+) seconds")


def mobinux(data: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    res = subprocess.run([sys.executable, "-m", "mobinux", "--data-dir", str(data), *args],
                         capture_output=True, text=True, timeout=600, env=env)
    if res.returncode != 0:
        raise SystemExit(f"mobinux {' '.join(args)}: {res.stderr}")
    return res.stdout


def run_row(row: Row, iqn: str, initiator: str, seconds: int) -> float:
    if row.kind == "read":
        argv = ["iscsi-perf", "-i", initiator, "-m", str(row.depth), "-b", str(row.blocks),
                "-t", str(seconds)]
        if row.random:
            argv.append("-r")
        argv.append(f"iscsi://127.0.0.1:{MOBINUX_PORT}/{iqn}/0")
        res = sh(*_in_ns(*argv), check=False, timeout=seconds + 60)
        found = _IOPS_RE.findall(res.stdout + res.stderr)
        return float(found[-1]) if found else 0.0
    opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{MOBINUX_PORT},target={iqn},lun=0,"
            f"initiator-name={initiator}")
    res = sh(*_in_ns("qemu-img", "bench", "-w", "-c", str(row.count), "-d", str(row.depth),
                     "-s", str(row.bytes), "--image-opts", opts), check=False, timeout=600)
    match = _RUN_RE.search(res.stdout + res.stderr)
    return row.count / float(match.group(1)) if match else 0.0


def fill_disk(size_mib: int) -> None:
    """Write the node's whole disk, so that later reads all come from its overlay."""
    opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{MOBINUX_PORT},target={NODE_IQN},lun=0,"
            f"initiator-name={NODE_INITIATOR}")
    sh(*_in_ns("qemu-img", "bench", "-w", "-c", str(size_mib * 8), "-d", "8", "-s", "131072",
               "--image-opts", opts), timeout=600)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=256)
    args = parser.parse_args()
    for tool in ("iscsi-perf", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install libiscsi-bin qemu-utils qemu-block-extra")
    work = Path(tempfile.mkdtemp(prefix="mbxoverlaybench-"))
    data = work / "data"
    subprocess.run(["ip", "netns", "del", NS], capture_output=True, check=False)
    sh("ip", "netns", "add", NS)
    sh("ip", "-n", NS, "link", "set", "lo", "up")
    proc: subprocess.Popen[bytes] | None = None
    try:
        raw = work / "raw.img"
        make_file(raw, args.size_mib << 20)
        mobinux(data, "target", "add", "raw", "--file", str(raw))
        mobinux(data, "image", "import", str(raw), "--name", "base", "--format", "raw")
        mobinux(data, "node", "add", MAC, "--name", "bench", "--image", "base", "--boot", "iscsi")
        base = data / "disks" / "base" / "disk.raw"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
        log = open(work / "mobinux.log", "wb")  # noqa: SIM115 - lives as long as the server
        proc = subprocess.Popen(_in_ns(sys.executable, "-m", "mobinux", "--data-dir", str(data),
                                       "serve", "--dhcp", "off", "--address", "127.0.0.1",
                                       "--iscsi-port", str(MOBINUX_PORT), "--log-level", "warning"),
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_port(MOBINUX_PORT, proc)
        best: dict[tuple[str, str], float] = {}

        def measure(label: str, row: Row, iqn: str, initiator: str, round_no: int) -> None:
            rate = run_row(row, iqn, initiator, args.seconds)
            best[(label, row.name)] = max(best.get((label, row.name), 0.0), rate)
            print(f"round {round_no}: {label:18s} {row.name:20s} {rate:10.0f} IOPS "
                  f"{rate * row.bytes / 1e6:8.1f} MB/s", flush=True)

        for round_no in range(1, args.rounds + 1):
            mobinux(data, "node", "reset", "bench", "--force")
            for row in ROWS:
                warm(raw)
                warm(base)
                measure("raw", row, RAW_IQN, OTHER_INITIATOR, round_no)
                if row.kind == "write":
                    mobinux(data, "node", "reset", "bench", "--force")
                    measure("overlay, fresh", row, NODE_IQN, NODE_INITIATOR, round_no)
                    measure("overlay, written", row, NODE_IQN, NODE_INITIATOR, round_no)
                else:
                    measure("overlay, base", row, NODE_IQN, NODE_INITIATOR, round_no)
            fill_disk(args.size_mib)
            for row in ROWS:
                if row.kind == "read":
                    measure("overlay, written", row, NODE_IQN, NODE_INITIATOR, round_no)
        print()
        print(f"{'row':22s} {'raw':>14s} {'overlay':>30s} {'ratio':>7s} goal >= {GOAL}")
        for row in ROWS:
            ours = best[("raw", row.name)]
            for label in ("overlay, base", "overlay, fresh", "overlay, written"):
                rate = best.get((label, row.name))
                if rate is None:
                    continue
                ratio = rate / ours if ours else float("inf")
                print(f"{row.name:22s} {fmt(row, ours):>14s} {label + ' ' + fmt(row, rate):>30s} "
                      f"{ratio:7.2f} {'met' if ratio >= GOAL else 'MISSED'}")
    finally:
        if proc is not None and proc.poll() is None:
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
