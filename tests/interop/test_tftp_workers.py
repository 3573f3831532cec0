"""TftpService with data-pump worker processes (``workers=N``) against real clients."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mobinux.tftp.packet import Ack, Data, OptionAck, ReadRequest, encode
from tests.interop.tftp_helpers import DirResolver, ServerThread, recv_packet, udp_client

pytestmark = pytest.mark.interop

BIG = 3 * 1024 * 1024 + 1234


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def children(pid: int) -> set[int]:
    """The live (not zombie) child processes of *pid*, from /proc."""
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry))
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tftpw")
    (root / "big.img").write_bytes(os.urandom(BIG))
    (root / "small.bin").write_bytes(os.urandom(100_000))
    return root


@pytest.fixture
def server(tree: Path) -> Iterator[ServerThread]:
    generated = {"boot.cfg": b"DEFAULT menu\n" * 1000}
    with ServerThread(DirResolver(tree, generated), workers=2) as srv:
        assert len(srv.service.worker_pids) == 2
        yield srv


def atftp(port: int, name: str, dest: Path, *options: str) -> subprocess.CompletedProcess[str]:
    cmd = [need("atftp")]
    for opt in options:
        cmd += ["--option", opt]
    cmd += ["-g", "-r", name, "-l", str(dest), "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def handed_off(srv: ServerThread) -> int:
    return sum(w.load for w in srv.service._workers)


def test_concurrent_downloads_through_workers(server: ServerThread, tree: Path, tmp_path: Path) -> None:
    want = sha((tree / "big.img").read_bytes())

    def fetch(i: int) -> str:
        dest = tmp_path / f"out{i}"
        opts = ("blksize 1468", "windowsize 8") if i % 2 else ("blksize 1468",)
        proc = atftp(server.port, "big.img", dest, *opts)
        assert proc.returncode == 0, proc.stderr
        return sha(dest.read_bytes())

    with ThreadPoolExecutor(20) as pool:
        sums = list(pool.map(fetch, range(20)))
    assert sums == [want] * 20
    assert server.wait_idle() == 0
    # record_step once per transfer, in the main process, from the workers' reports.
    assert sum(1 for s in server.steps if s[2] == "tftp big.img") == 20


def test_transfers_really_run_in_workers(server: ServerThread) -> None:
    """A raw client sees an OACK from a transfer the main process no longer holds."""
    with udp_client() as sock:
        rrq = ReadRequest("big.img", "octet", (("blksize", "1024"), ("tsize", "0"), ("windowsize", "4")))
        sock.sendto(encode(rrq), ("127.0.0.1", server.port))
        pkt, tid = recv_packet(sock)
        assert isinstance(pkt, OptionAck)
        assert dict(pkt.options) == {"blksize": "1024", "tsize": str(BIG), "windowsize": "4"}
        assert server.service._transfers == set()  # nothing served by the main process
        assert handed_off(server) == 1
        sock.sendto(encode(Ack(0)), tid)
        got = []
        for _ in range(4):
            data, _ = recv_packet(sock)
            assert isinstance(data, Data)
            assert len(data.data) == 1024
            got.append(data.block)
        assert got == [1, 2, 3, 4]
        sock.sendto(encode(Ack(4)), tid)
        data, _ = recv_packet(sock)
        assert isinstance(data, Data) and data.block == 5


def test_small_and_generated_files_stay_in_main_process(server: ServerThread, tree: Path,
                                                        tmp_path: Path) -> None:
    for name in ("small.bin", "boot.cfg"):
        with udp_client() as sock:
            sock.sendto(encode(ReadRequest(name, "octet")), ("127.0.0.1", server.port))
            pkt, _tid = recv_packet(sock)
            assert isinstance(pkt, Data) and pkt.block == 1
            assert len(server.service._transfers) == 1
            assert handed_off(server) == 0
        server.service._loop.call_soon_threadsafe(  # type: ignore[union-attr]
            lambda: [t.cancel() for t in list(server.service._transfers)]
        )
        assert server.wait_idle() == 0
    proc = atftp(server.port, "small.bin", tmp_path / "small")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "small").read_bytes() == (tree / "small.bin").read_bytes()


def test_tftp_hpa_through_workers(server: ServerThread, tree: Path, tmp_path: Path) -> None:
    tftp = need("tftp")
    proc = subprocess.run([tftp, "127.0.0.1", str(server.port), "-m", "binary", "-c", "get", "big.img"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sha((tmp_path / "big.img").read_bytes()) == sha((tree / "big.img").read_bytes())


def test_killed_worker_does_not_hang_the_service(server: ServerThread, tree: Path, tmp_path: Path) -> None:
    service = server.service
    victim = service.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while victim in service.worker_pids and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim not in service.worker_pids
    want = sha((tree / "big.img").read_bytes())
    for i in range(4):
        proc = atftp(server.port, "big.img", tmp_path / f"after{i}", "blksize 1468")
        assert proc.returncode == 0, proc.stderr
        assert sha((tmp_path / f"after{i}").read_bytes()) == want
    # Restarted: two workers again, and the dead one reaped.
    assert len(service.worker_pids) == 2
    assert victim not in children(os.getpid())


def test_close_leaves_no_child_process(tree: Path) -> None:
    before = children(os.getpid())
    with ServerThread(DirResolver(tree), workers=3) as srv:
        pids = set(srv.service.worker_pids)
        assert len(pids) == 3
        assert pids <= children(os.getpid())
        # A transfer in flight at close time.
        with udp_client() as sock:
            sock.sendto(encode(ReadRequest("big.img", "octet")), ("127.0.0.1", srv.port))
            pkt, _ = recv_packet(sock)
            assert isinstance(pkt, Data)
    assert children(os.getpid()) == before
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


def test_worker_exits_when_parent_dies(tree: Path, tmp_path: Path) -> None:
    """A worker whose main process is SIGKILLed goes away on its own."""
    script = (
        "import asyncio, sys, pathlib\n"
        "from tests.interop.tftp_helpers import DirResolver\n"
        "from mobinux.tftp.aio import TftpService\n"
        "async def main():\n"
        f"    s = TftpService(DirResolver(pathlib.Path({str(tree)!r})), host='127.0.0.1', port=0, workers=2)\n"
        "    await s.start()\n"
        "    print(*s.worker_pids, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([os.environ.get("PYTHON", __import__("sys").executable), "-c", script],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
