"""Helpers for the TFTP interop tests and the benchmark: a directory resolver,
a TftpService running in a background thread, and a minimal raw-socket client.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mobinux.boot import ResolvedFile
from mobinux.paths import contained_file
from mobinux.tftp.aio import TftpService
from mobinux.tftp.packet import Ack, Data, Error, OptionAck, Packet, ReadRequest, encode, parse


class DirResolver:
    """A FileResolver over one directory plus a few generated files."""

    def __init__(self, root: Path, generated: dict[str, bytes] | None = None) -> None:
        self.root = root
        self.generated = generated or {}

    def resolve(self, name: str, client_ip: str, query: str = "") -> ResolvedFile | None:
        if name in self.generated:
            return ResolvedFile(name=name, data=self.generated[name], mac="52:54:00:00:00:01")
        path = contained_file(self.root, name)
        return None if path is None else ResolvedFile(name=name, path=path)


class ServerThread:
    """A TftpService on 127.0.0.1 (port 0) driven by its own loop in a thread."""

    def __init__(self, resolver: DirResolver, **kwargs: object) -> None:
        self.steps: list[tuple[str | None, str | None, str]] = []
        self.logger = logging.getLogger("mobinux.tftp.test")
        self._loop = asyncio.new_event_loop()
        self.service = TftpService(
            resolver,
            host="127.0.0.1",
            port=0,
            record_step=lambda mac, ip, step: self.steps.append((mac, ip, step)),
            logger=self.logger,
            **kwargs,  # type: ignore[arg-type]
        )
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.service.port

    def __enter__(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(), self._loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.service.close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def active_transfers(self) -> int:
        async def count() -> int:
            return self.service.active_transfers

        return asyncio.run_coroutine_threadsafe(count(), self._loop).result(5)

    def wait_idle(self, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.active_transfers() == 0:
                return 0
            time.sleep(0.02)
        return self.active_transfers()


@contextmanager
def udp_client(timeout: float = 2.0) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def recv_packet(sock: socket.socket) -> tuple[Packet, tuple[str, int]]:
    data, addr = sock.recvfrom(70_000)
    return parse(data), addr


def raw_download(
    sock: socket.socket, port: int, name: str, options: tuple[tuple[str, str], ...] = ()
) -> bytes | Error:
    """Fetch *name* over *sock* in lock-step; return the bytes or the server's ERROR."""
    sock.sendto(encode(ReadRequest(name, "octet", options)), ("127.0.0.1", port))
    out = bytearray()
    expected = 1
    blksize = 512
    for _ in range(1_000_000):
        pkt, addr = recv_packet(sock)
        if isinstance(pkt, Error):
            return pkt
        if isinstance(pkt, OptionAck):
            blksize = int(dict(pkt.options).get("blksize", "512"))
            sock.sendto(encode(Ack(0)), addr)
            continue
        assert isinstance(pkt, Data), pkt
        if pkt.block == expected & 0xFFFF:
            out += pkt.data
            expected += 1
        sock.sendto(encode(Ack(pkt.block)), addr)
        if len(pkt.data) < blksize and pkt.block == (expected - 1) & 0xFFFF:
            return bytes(out)
    raise AssertionError("transfer did not end")


def _serve_forever(root: str, port: int) -> None:
    """``python -m tests.interop.tftp_helpers ROOT PORT``: serve ROOT until killed."""

    async def main() -> None:
        svc = TftpService(DirResolver(Path(root)), host="0.0.0.0", port=port)
        await svc.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    import sys

    _serve_forever(sys.argv[1], int(sys.argv[2]))
