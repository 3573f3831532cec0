"""Run the real `mobinux serve` on loopback (no DHCP, no root needed for high ports)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    log_path: Path
    tftp_port: int
    http_port: int
    data_dir: Path
    iscsi_port: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def loopback_server(tmp_path: Path, *extra: str) -> Iterator[Server]:
    data_dir = tmp_path / "data"
    tftp_port, http_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    iscsi_port = free_port(socket.SOCK_STREAM)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mobinux", "--data-dir", str(data_dir), "serve", "--dhcp", "off",
             "--address", "127.0.0.1", "--tftp-port", str(tftp_port), "--http-port", str(http_port),
             "--iscsi-port", str(iscsi_port), *extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    server = Server(proc, log_path, tftp_port, http_port, data_dir, iscsi_port)
    try:
        deadline = time.monotonic() + 20
        while "serving on" not in server.log():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mobinux serve did not start:\n{server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
