"""TftpService against real TFTP clients on 127.0.0.1 (tftp-hpa, atftp, curl)
and against a raw-socket client for what the tools cannot send.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mobinux.tftp.constants import ErrorCode
from mobinux.tftp.packet import Ack, Data, Error, OptionAck, ReadRequest, WriteRequest, encode
from tests.interop.tftp_helpers import (
    DirResolver,
    ServerThread,
    raw_download,
    recv_packet,
    udp_client,
)

pytestmark = pytest.mark.interop

SECRET = b"TOP-SECRET-OUTSIDE-THE-ROOT\n"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package: "
                    f"{ {'tftp': 'tftp-hpa', 'atftp': 'atftp', 'curl': 'curl'}[tool] })")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tftp")
    root = base / "root"
    (root / "boot" / "pxelinux.cfg").mkdir(parents=True)
    (root / "small.bin").write_bytes(os.urandom(100_000))
    (root / "exact.bin").write_bytes(os.urandom(1468 * 8))  # multiple of the block size
    (root / "empty.bin").write_bytes(b"")
    (root / "boot" / "vmlinuz").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "text.cfg").write_bytes(b"DEFAULT linux\nLABEL linux\n  KERNEL vmlinuz\n" * 50)
    # > 32 MiB so that 512-byte blocks roll over past 65535.
    (root / "big.img").write_bytes(os.urandom(33 * 1024 * 1024 + 300))
    (base / "secret").write_bytes(SECRET)
    (root / "escape").symlink_to(base / "secret")
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "inside").symlink_to(root / "small.bin")
    return root


@pytest.fixture(scope="module")
def server(tree: Path) -> Iterator[ServerThread]:
    generated = {"boot/pxelinux.cfg/default": b"DEFAULT menu\n" * 100}
    with ServerThread(DirResolver(tree, generated)) as srv:
        yield srv


def run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


# -- tftp-hpa ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["small.bin", "exact.bin", "empty.bin", "boot/vmlinuz", "inside"])
def test_tftp_hpa_get(server: ServerThread, tree: Path, tmp_path: Path, name: str) -> None:
    tftp = need("tftp")
    out = tmp_path / "out"
    r = run([tftp, "-m", "binary", "127.0.0.1", str(server.port), "-c", "get", name, str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert sha(out) == sha(tree / name)


def test_tftp_hpa_verbose_and_generated_file(server: ServerThread, tmp_path: Path) -> None:
    # tftp-hpa 5.2's client has no blksize/tsize options: lock-step 512 only.
    tftp = need("tftp")
    out = tmp_path / "default"
    r = run([tftp, "-v", "-m", "binary", "127.0.0.1", str(server.port),
             "-c", "get", "/boot/pxelinux.cfg/default", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Received" in r.stdout + r.stderr
    assert out.read_bytes() == b"DEFAULT menu\n" * 100


def test_tftp_hpa_netascii_text(server: ServerThread, tree: Path, tmp_path: Path) -> None:
    # netascii is served as octet; for text without CR the bytes are identical.
    tftp = need("tftp")
    out = tmp_path / "t"
    r = run([tftp, "-m", "ascii", "127.0.0.1", str(server.port), "-c", "get", "text.cfg", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (tree / "text.cfg").read_bytes()


def test_tftp_hpa_missing_file(server: ServerThread, tmp_path: Path) -> None:
    tftp = need("tftp")
    r = run([tftp, "-m", "binary", "127.0.0.1", str(server.port), "-c", "get", "nope.bin", "o"], tmp_path)
    assert "Error code 1" in r.stdout + r.stderr


def test_tftp_hpa_put_is_refused(server: ServerThread, tree: Path, tmp_path: Path) -> None:
    tftp = need("tftp")
    (tmp_path / "upload.bin").write_bytes(b"x" * 1000)
    r = run([tftp, "-m", "binary", "127.0.0.1", str(server.port), "-c", "put", "upload.bin"], tmp_path)
    assert "Error code 2" in r.stdout + r.stderr
    assert not (tree / "upload.bin").exists()


# -- atftp -------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["blksize 1468", "tsize 0", "windowsize 16"],
        ["blksize 8192"],
        ["blksize 512", "windowsize 4"],
        ["blksize 65464", "timeout 2"],
    ],
    ids=["plain", "1468-tsize-w16", "8192", "512-w4", "max-blksize"],
)
@pytest.mark.parametrize("name", ["boot/vmlinuz", "exact.bin", "empty.bin"])
def test_atftp_get(server: ServerThread, tree: Path, tmp_path: Path, options: list[str], name: str) -> None:
    atftp = need("atftp")
    out = tmp_path / "out"
    opts = [a for o in options for a in ("--option", o)]
    r = run([atftp, *opts, "-g", "-r", name, "-l", str(out), "127.0.0.1", str(server.port)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sha(out) == sha(tree / name)


@pytest.mark.slow
def test_atftp_rollover_over_32_mib_at_512(server: ServerThread, tree: Path, tmp_path: Path) -> None:
    atftp = need("atftp")
    out = tmp_path / "big"
    r = run([atftp, "--option", "blksize 512", "--option", "tsize 0", "-g", "-r", "big.img",
             "-l", str(out), "127.0.0.1", str(server.port)], tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tree / "big.img").stat().st_size // 512 + 1 > 65536  # it did roll over
    assert sha(out) == sha(tree / "big.img")


# -- curl --------------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--tftp-blksize", "1468"], ["--tftp-no-options"], []])
def test_curl_get(server: ServerThread, tree: Path, tmp_path: Path, flags: list[str]) -> None:
    curl = need("curl")
    out = tmp_path / "out"
    r = run([curl, "-s", "-S", f"tftp://127.0.0.1:{server.port}/boot/vmlinuz", *flags, "-o", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert sha(out) == sha(tree / "boot" / "vmlinuz")


def test_curl_missing_file(server: ServerThread, tmp_path: Path) -> None:
    curl = need("curl")
    r = run([curl, "-s", f"tftp://127.0.0.1:{server.port}/nope", "-o", str(tmp_path / "o")], tmp_path)
    assert r.returncode != 0


# -- path escapes --------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "/../x",
        "../../../../../../etc/passwd",
        "boot/../../secret",
        "..\\secret",
        "boot\\..\\..\\secret",
        "/etc/passwd",  # "absolute": relative to the root, where it does not exist
        "escape",  # a symlink in the root pointing outside
        "passwd",  # a symlink to /etc/passwd
        "boot/",
        "",
    ],
)
def test_path_escapes_are_refused(server: ServerThread, name: str) -> None:
    with udp_client() as sock:
        got = raw_download(sock, server.port, name)
    assert isinstance(got, Error), f"served {name!r}"
    assert got.code in (ErrorCode.ACCESS_VIOLATION, ErrorCode.FILE_NOT_FOUND)
    if name in ("escape", "passwd", "../etc/passwd", "..\\secret"):
        assert got.code == ErrorCode.ACCESS_VIOLATION


def test_path_escape_with_tftp_hpa(server: ServerThread, tmp_path: Path) -> None:
    tftp = need("tftp")
    for name in ("../secret", "escape", "passwd"):
        out = tmp_path / "leak"
        r = run([tftp, "-m", "binary", "127.0.0.1", str(server.port), "-c", "get", name, str(out)], tmp_path)
        assert "Error code 2" in r.stdout + r.stderr, (name, r.stdout, r.stderr)
        assert not out.exists() or SECRET not in out.read_bytes()


@pytest.mark.parametrize(
    "wire",
    [
        b"\x00\x01small.bin\x00/../../secret\x00octet\x00",  # NUL then a path: mode is junk
        b"\x00\x01esc\x00ape\x00octet\x00",
        b"\x00\x01../secret\x00\x00",
        b"\x00\x01\x00octet\x00",
        b"\x00\x01bo\x01ot/vmlinuz\x00octet\x00",  # control character
    ],
)
def test_raw_nul_and_control_bytes_are_refused(server: ServerThread, wire: bytes) -> None:
    # Either an ERROR or (for bytes that are not a valid request) silence:
    # never an OACK or DATA.
    with udp_client(timeout=0.5) as sock:
        sock.sendto(wire, ("127.0.0.1", server.port))
        try:
            pkt, _ = recv_packet(sock)
        except TimeoutError:
            return
    assert isinstance(pkt, Error)


def test_raw_write_request_is_refused(server: ServerThread, tree: Path) -> None:
    with udp_client() as sock:
        sock.sendto(encode(WriteRequest("new.bin", "octet")), ("127.0.0.1", server.port))
        pkt, _ = recv_packet(sock)
    assert pkt == Error(ErrorCode.ACCESS_VIOLATION, "read-only server")
    assert not (tree / "new.bin").exists()


# -- UEFI size probe -----------------------------------------------------------


def test_uefi_size_probe_then_download(server: ServerThread, tree: Path) -> None:
    want = (tree / "boot" / "vmlinuz").read_bytes()
    steps_before = len(server.steps)
    with udp_client() as sock:
        sock.sendto(encode(ReadRequest("boot/vmlinuz", "octet", (("tsize", "0"), ("blksize", "1468")))),
                    ("127.0.0.1", server.port))
        pkt, tid = recv_packet(sock)
        assert pkt == OptionAck((("tsize", str(len(want))), ("blksize", "1468")))
        sock.sendto(encode(Error(ErrorCode.OPTION_NEGOTIATION, "User aborted the transfer")), tid)
        got = raw_download(sock, server.port, "boot/vmlinuz", (("blksize", "1468"),))
        assert got == want
        # Nothing else arrives: the probe ended silently (no ERROR reply, no DATA).
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recvfrom(70_000)
    assert server.wait_idle() == 0
    assert server.steps[steps_before:] == [(None, "127.0.0.1", "tftp boot/vmlinuz")]


def test_raw_windowed_resume(server: ServerThread, tree: Path) -> None:
    # RFC 7440 §4: ACK a block in the middle of the window; the next window
    # must start right after it.
    want = (tree / "small.bin").read_bytes()
    with udp_client() as sock:
        sock.sendto(encode(ReadRequest("small.bin", "octet", (("windowsize", "8"),))), ("127.0.0.1", server.port))
        pkt, tid = recv_packet(sock)
        assert isinstance(pkt, OptionAck)
        sock.sendto(encode(Ack(0)), tid)
        first = [recv_packet(sock)[0] for _ in range(8)]
        assert [p.block for p in first] == list(range(1, 9))  # type: ignore[union-attr]
        sock.sendto(encode(Ack(3)), tid)
        again = [recv_packet(sock)[0] for _ in range(8)]
        assert again == [Data(b, want[(b - 1) * 512 : b * 512]) for b in range(4, 12)]
        sock.sendto(encode(Error(0, "done testing")), tid)


# -- load ----------------------------------------------------------------------


def test_50_concurrent_transfers(server: ServerThread, tree: Path, tmp_path: Path) -> None:
    atftp = need("atftp")
    names = ["boot/vmlinuz", "small.bin", "exact.bin", "boot/pxelinux.cfg/default"]
    option_sets = [[], ["blksize 1468"], ["blksize 1468", "windowsize 8"], ["blksize 8192", "tsize 0"]]

    def fetch(i: int) -> tuple[str, bytes, int, str]:
        name = names[i % len(names)]
        out = tmp_path / f"out{i}"
        opts = [a for o in option_sets[(i // 4) % 4] for a in ("--option", o)]
        r = run([atftp, *opts, "-g", "-r", name, "-l", str(out), "127.0.0.1", str(server.port)], tmp_path)
        return name, out.read_bytes() if out.exists() else b"", r.returncode, r.stderr

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(fetch, range(50)))
    assert time.monotonic() - start < 120
    generated = {"boot/pxelinux.cfg/default": b"DEFAULT menu\n" * 100}
    for name, data, rc, err in results:
        assert rc == 0, err
        want = generated.get(name) or (tree / name).read_bytes()
        assert hashlib.sha256(data).digest() == hashlib.sha256(want).digest(), name
    assert server.wait_idle() == 0


def test_50_concurrent_raw_clients_in_flight_together(server: ServerThread, tree: Path) -> None:
    # All 50 requests are sent before any transfer is answered past block 1.
    want = (tree / "small.bin").read_bytes()
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
    try:
        for s in socks:
            s.settimeout(2)
            s.bind(("127.0.0.1", 0))
        for s in socks:
            s.sendto(encode(ReadRequest("small.bin", "octet", (("blksize", "1024"),))), ("127.0.0.1", server.port))
        tids = []
        for s in socks:
            pkt, tid = recv_packet(s)
            assert isinstance(pkt, OptionAck)
            tids.append(tid)
        assert len(set(tids)) == 50  # one TID (port) per transfer, RFC 1350 §4
        assert server.active_transfers() == 50
        outs = [bytearray() for _ in socks]
        done = [False] * 50
        acks = [0] * 50
        for _ in range(200):
            for i, s in enumerate(socks):
                if done[i]:
                    continue
                s.sendto(encode(Ack(acks[i])), tids[i])
                pkt, _ = recv_packet(s)
                assert isinstance(pkt, Data) and pkt.block == acks[i] + 1
                outs[i] += pkt.data
                acks[i] = pkt.block
                if len(pkt.data) < 1024:
                    done[i] = True
                    s.sendto(encode(Ack(pkt.block)), tids[i])
            if all(done):
                break
        assert all(bytes(o) == want for o in outs)
    finally:
        for s in socks:
            s.close()
    assert server.wait_idle() == 0


# -- path MTU --------------------------------------------------------------------

_PROBE_CLIENT = """
import socket, sys
from mobinux.tftp.packet import ReadRequest, encode, parse
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(encode(ReadRequest("small.bin", "octet", (("blksize", "65464"),))), ("127.0.0.1", 69))
data, _ = s.recvfrom(70000)
print(dict(parse(data).options)["blksize"])
"""


def test_blksize_is_clamped_to_the_path_mtu(tree: Path) -> None:
    # In a private namespace whose loopback has an Ethernet MTU, a request for
    # the largest block gets 1500 - 20 (IP) - 8 (UDP) - 4 (TFTP) = 1468.
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a network namespace")
    ns = f"mbxtftpmtu{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    server = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "mtu", "1500", "up"], check=True)
        repo = Path(__file__).resolve().parents[2]
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.interop.tftp_helpers", str(tree), "69"],
            cwd=repo, stdout=subprocess.PIPE, text=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _PROBE_CLIENT],
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "1468"
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        subprocess.run(["ip", "netns", "del", ns], check=False)
