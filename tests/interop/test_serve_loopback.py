"""The real `mobinux serve` process: path containment over real TFTP and HTTP
clients, generated files, clean SIGTERM shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop.serve_helpers import Server, loopback_server

pytestmark = pytest.mark.interop

SECRET = b"TOP-SECRET-OUTSIDE-THE-ROOT"


@pytest.fixture
def server(tmp_path: Path) -> Server:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello from the tftp root\n")
    (root / "sub" / "inner.bin").write_bytes(os.urandom(5000))
    outside = tmp_path / "secret.txt"
    outside.write_bytes(SECRET)
    (root / "escape-link").symlink_to(outside)
    (root / "dir-link").symlink_to(tmp_path)
    with loopback_server(tmp_path, "--tftp-root", str(root)) as srv:
        yield srv  # type: ignore[misc]


def tftp_rrq(port: int, name: bytes, timeout: float = 3.0) -> tuple[int | None, bytes]:
    """Send one RRQ with exactly *name*; return (opcode, payload) of the first reply,
    (None, b"") when the server stays silent (a malformed request is dropped)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"\x00\x01" + name + b"\x00octet\x00", ("127.0.0.1", port))
        try:
            data, _ = s.recvfrom(65536)
        except TimeoutError:
            return None, b""
        return struct.unpack("!H", data[:2])[0], data[2:]


@pytest.mark.parametrize(
    "name",
    [b"../secret.txt", b"/../secret.txt", b"sub/../../secret.txt", b"..\\secret.txt",
     b"escape-link", b"dir-link/secret.txt", b"hello.txt\x00/../../secret.txt" , b"/etc/passwd",
     b"C:\\windows\\system.ini", b"sub/../../../../../../etc/passwd"],
)
def test_tftp_path_escapes_refused(server: Server, name: bytes) -> None:
    opcode, payload = tftp_rrq(server.tftp_port, name)
    if b"\x00" in name:
        # the NUL ends the file name early and leaves an odd option list: malformed, dropped
        assert opcode in (5, None), f"expected ERROR or silence for {name!r}, got opcode {opcode}"
    else:
        assert opcode == 5, f"expected ERROR for {name!r}, got opcode {opcode}"
    assert SECRET not in payload and b"root:" not in payload


def test_tftp_real_files_and_generated(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "got.txt"
    res = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(server.tftp_port), "-c", "get",
                          "hello.txt", str(out)], capture_output=True, timeout=20)
    assert res.returncode == 0 and out.read_bytes() == b"hello from the tftp root\n"
    # a leading slash is relative to the root, as with tftp-hpa
    opcode, payload = tftp_rrq(server.tftp_port, b"/hello.txt")
    assert opcode == 3 and payload[2:] == b"hello from the tftp root\n"
    # pxelinux's last resort: a generated config that boots locally when nothing is known
    opcode, payload = tftp_rrq(server.tftp_port, b"pxelinux.cfg/default")
    assert opcode == 3 and b"LOCALBOOT 0" in payload


def test_tftp_hpa_client_refused_escape(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "x"
    res = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(server.tftp_port), "-c", "get",
                          "../secret.txt", str(out)], capture_output=True, text=True, timeout=20)
    assert "Error code" in res.stdout + res.stderr
    assert not out.exists() or SECRET not in out.read_bytes()


@pytest.mark.parametrize(
    "path",
    ["/../secret.txt", "/%2e%2e/secret.txt", "/sub/%2e%2e/%2e%2e/secret.txt", "/escape-link",
     "/dir-link/secret.txt", "/hello.txt%00.ipxe", "/..%2fsecret.txt", "/..\\secret.txt",
     "/%5c..%5csecret.txt"],
)
def test_http_path_escapes_refused(server: Server, path: str) -> None:
    res = subprocess.run(["curl", "-s", "--path-as-is", "-o", "-", "-w", "\n%{http_code}",
                          f"http://127.0.0.1:{server.http_port}{path}"],
                         capture_output=True, timeout=20)
    body, _, code = res.stdout.rpartition(b"\n")
    assert code in (b"400", b"403", b"404"), (path, code)
    assert SECRET not in body


def test_http_generated_script_and_range(server: Server) -> None:
    url = f"http://127.0.0.1:{server.http_port}"
    script = subprocess.run(["curl", "-sf", f"{url}/boot.ipxe?mac=52:54:00:00:00:09"],
                            capture_output=True, timeout=20)
    assert script.returncode == 0 and script.stdout.startswith(b"#!ipxe")
    part = subprocess.run(["curl", "-sf", "-r", "6-9", f"{url}/hello.txt"], capture_output=True, timeout=20)
    assert part.stdout == b"from"


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    with loopback_server(tmp_path) as srv:
        pid_text = (srv.data_dir / "serve.lock").read_text().strip()
        assert pid_text == str(srv.proc.pid)
        os.kill(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(timeout=10) == 0
        assert "shutting down" in srv.log()
        assert "Traceback" not in srv.log()
    # the lock is free again: a second server starts on the same data directory
    shutil.rmtree(tmp_path / "again", ignore_errors=True)
    with loopback_server(tmp_path) as again:
        assert again.proc.poll() is None


def test_second_server_on_same_data_dir_refused(tmp_path: Path) -> None:
    with loopback_server(tmp_path) as srv:
        res = subprocess.run([sys.executable, "-m", "mobinux", "--data-dir", str(srv.data_dir), "serve",
                              "--dhcp", "off", "--address", "127.0.0.1", "--tftp-port", "0",
                              "--http-port", "0"], capture_output=True, text=True, timeout=20)
        assert res.returncode == 1
        assert "already using" in res.stderr and "Traceback" not in res.stderr
