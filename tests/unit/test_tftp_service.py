"""TftpService on 127.0.0.1 with an in-process raw client (fast, no external tools)."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, ParamSpec

import pytest

import mobinux.tftp.aio as aio_mod
from mobinux.boot import ResolvedFile
from mobinux.errors import PathRefused
from mobinux.paths import contained_file
from mobinux.tftp.aio import FileSource, TftpService
from mobinux.tftp.constants import ErrorCode
from mobinux.tftp.packet import (
    Ack,
    Data,
    Error,
    OptionAck,
    Packet,
    ReadRequest,
    WriteRequest,
    encode,
    parse,
)
from mobinux.tftp.worker import new_event_loop

Step = tuple[str | None, str | None, str]
P = ParamSpec("P")


def run_async(fn: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test body on a fresh event loop (no pytest-asyncio here)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return wrapper


class Resolver:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[str] = []

    def resolve(self, name: str, client_ip: str, query: str = "") -> ResolvedFile | None:
        self.calls.append(name)
        if name == "gen.cfg":
            return ResolvedFile(name=name, data=b"DEFAULT x\n" * 300, mac="52:54:00:aa:bb:cc")
        if name == "boom":
            raise RuntimeError("resolver bug")
        if name.startswith("refused"):
            raise PathRefused("policy says no")
        path = contained_file(self.root, name)
        return None if path is None else ResolvedFile(name=name, path=path)


@asynccontextmanager
async def serving(root: Path, **kw: object) -> AsyncIterator[tuple[TftpService, list[Step]]]:
    steps: list[Step] = []
    svc = TftpService(
        Resolver(root),
        host="127.0.0.1",
        port=0,
        record_step=lambda mac, ip, step: steps.append((mac, ip, step)),
        **kw,  # type: ignore[arg-type]
    )
    await svc.start()
    try:
        yield svc, steps
    finally:
        await svc.close()


class Client:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(("127.0.0.1", 0))
        self.loop = asyncio.get_running_loop()

    async def recv(self, timeout: float = 2.0) -> tuple[Packet, tuple[str, int]]:
        # add_reader rather than loop.sock_recvfrom, which uvloop lacks.
        fut: asyncio.Future[tuple[bytes, tuple[str, int]]] = self.loop.create_future()

        def ready() -> None:
            if fut.done():
                return  # the datagram stays queued for the next recv()
            with suppress(BlockingIOError):
                fut.set_result(self.sock.recvfrom(70_000))

        self.loop.add_reader(self.sock.fileno(), ready)
        try:
            data, addr = await asyncio.wait_for(fut, timeout)
        finally:
            self.loop.remove_reader(self.sock.fileno())
        return parse(data), addr

    def send(self, pkt: Packet | bytes, addr: tuple[str, int]) -> None:
        self.sock.sendto(pkt if isinstance(pkt, bytes) else encode(pkt), addr)

    async def download(self, port: int, name: str, *options: tuple[str, str]) -> bytes | Error:
        self.send(ReadRequest(name, "octet", options), ("127.0.0.1", port))
        out = bytearray()
        blksize, window, expected = 512, 1, 1
        for _ in range(100_000):
            pkt, addr = await self.recv()
            if isinstance(pkt, Error):
                return pkt
            if isinstance(pkt, OptionAck):
                opts = {k.lower(): v for k, v in pkt.options}
                blksize = int(opts.get("blksize", 512))
                window = int(opts.get("windowsize", 1))
                self.send(Ack(0), addr)
                continue
            assert isinstance(pkt, Data)
            assert pkt.block == expected & 0xFFFF
            out += pkt.data
            expected += 1
            last = len(pkt.data) < blksize
            if last or (expected - 1) % window == 0:
                self.send(Ack(pkt.block), addr)
            if last:
                return bytes(out)
        raise AssertionError("no end")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 40 + b"tail")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"b" * 1024)
    return tmp_path


@run_async
async def test_plain_and_windowed_downloads(root: Path) -> None:
    async with serving(root) as (svc, steps):
        c = Client()
        want = (root / "a.bin").read_bytes()
        assert await c.download(svc.port, "a.bin") == want
        assert await c.download(svc.port, "/a.bin", ("blksize", "1000"), ("windowsize", "4")) == want
        assert await c.download(svc.port, "sub/b.bin", ("tsize", "0")) == b"b" * 1024
        assert await c.download(svc.port, "gen.cfg") == b"DEFAULT x\n" * 300
        c.close()
        await asyncio.sleep(0.05)
        assert svc.active_transfers == 0
        assert steps == [
            (None, "127.0.0.1", "tftp a.bin"),
            (None, "127.0.0.1", "tftp a.bin"),
            (None, "127.0.0.1", "tftp sub/b.bin"),
            ("52:54:00:aa:bb:cc", "127.0.0.1", "tftp gen.cfg"),
        ]


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("missing", ErrorCode.FILE_NOT_FOUND),
        ("sub", ErrorCode.FILE_NOT_FOUND),  # a directory is not a file
        ("../etc/passwd", ErrorCode.ACCESS_VIOLATION),
        ("a\\b", ErrorCode.ACCESS_VIOLATION),
        ("refused/x", ErrorCode.ACCESS_VIOLATION),
        ("boom", ErrorCode.NOT_DEFINED),  # a crashing resolver: ERROR 0, service alive
    ],
)
@run_async
async def test_request_errors(root: Path, name: str, code: int, caplog: pytest.LogCaptureFixture) -> None:
    async with serving(root) as (svc, steps):
        c = Client()
        c.send(ReadRequest(name, "octet"), ("127.0.0.1", svc.port))
        pkt, _addr = await c.recv()
        c.close()
        assert isinstance(pkt, Error)
        assert pkt.code == code
        assert steps == []


@run_async
async def test_write_request_is_refused(root: Path) -> None:
    async with serving(root) as (svc, _):
        c = Client()
        c.send(WriteRequest("new.bin", "octet"), ("127.0.0.1", svc.port))
        pkt, _addr = await c.recv()
        c.close()
        assert isinstance(pkt, Error) and pkt.code == ErrorCode.ACCESS_VIOLATION
        assert not (root / "new.bin").exists()


@run_async
async def test_size_probe_then_real_request(root: Path) -> None:
    async with serving(root) as (svc, steps):
        c = Client()
        c.send(ReadRequest("a.bin", "octet", (("tsize", "0"), ("blksize", "1468"))), ("127.0.0.1", svc.port))
        pkt, tid = await c.recv()
        assert pkt == OptionAck((("tsize", str((root / "a.bin").stat().st_size)), ("blksize", "1468")))
        c.send(Error(ErrorCode.OPTION_NEGOTIATION, "probe done"), tid)
        assert await c.download(svc.port, "a.bin", ("blksize", "1468")) == (root / "a.bin").read_bytes()
        # The aborted probe ends silently: nothing more arrives from its TID.
        with pytest.raises(TimeoutError):
            await c.recv(timeout=0.3)
        c.close()
        assert steps == [(None, "127.0.0.1", "tftp a.bin")]  # the probe is not a download
        assert svc.active_transfers == 0


@run_async
async def test_unanswered_transfer_gives_up_and_closes(root: Path) -> None:
    async with serving(root, timeout=0.05, max_retries=2) as (svc, _):
        c = Client()
        c.send(ReadRequest("a.bin", "octet"), ("127.0.0.1", svc.port))
        first, _ = await c.recv()
        # Original plus two retransmissions, then silence.
        assert [await c.recv() for _ in range(2)] == [(first, _), (first, _)]
        with pytest.raises(TimeoutError):
            await c.recv(timeout=0.3)
        assert svc.active_transfers == 0
        c.close()


@run_async
async def test_duplicate_ack_is_not_answered_over_udp(root: Path) -> None:
    async with serving(root) as (svc, _):
        c = Client()
        c.send(ReadRequest("a.bin", "octet"), ("127.0.0.1", svc.port))
        _pkt, tid = await c.recv()
        c.send(Ack(1), tid)
        pkt, _ = await c.recv()
        assert isinstance(pkt, Data) and pkt.block == 2
        c.send(Ack(1), tid)
        with pytest.raises(TimeoutError):
            await c.recv(timeout=0.3)
        c.close()


@run_async
async def test_malformed_packets_are_dropped_and_logged_rate_limited(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mobinux.tftp")
    async with serving(root) as (svc, _):
        c = Client()
        for junk in (b"", b"\x00", b"\x00\x09zz", b"\x00\x01noterm", b"\xff" * 600) * 20:
            c.send(junk, ("127.0.0.1", svc.port))
        assert await c.download(svc.port, "sub/b.bin") == b"b" * 1024
        c.close()
    dropped = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert 1 <= len(dropped) <= 2


@run_async
async def test_repeated_request_gets_its_own_transfer(root: Path) -> None:
    # RFC 1350 §4: each request gets a new TID. The client goes on with the
    # first and refuses the other with ERROR 5; both transfers end cleanly.
    async with serving(root) as (svc, _):
        c = Client()
        rrq = ReadRequest("sub/b.bin", "octet", (("blksize", "1024"),))
        c.send(rrq, ("127.0.0.1", svc.port))
        first, tid1 = await c.recv()
        c.send(rrq, ("127.0.0.1", svc.port))
        second, tid2 = await c.recv()
        assert first == second == OptionAck((("blksize", "1024"),))
        assert tid1 != tid2
        assert svc.active_transfers == 2
        c.send(Error(ErrorCode.UNKNOWN_TID, "unknown transfer ID"), tid2)
        c.send(Ack(0), tid1)
        pkt, tid = await c.recv()
        assert pkt == Data(1, b"b" * 1024) and tid == tid1
        c.send(Ack(1), tid1)
        pkt, tid = await c.recv()
        assert pkt == Data(2, b"") and tid == tid1
        c.send(Ack(2), tid1)
        await asyncio.sleep(0.05)
        assert svc.active_transfers == 0
        c.close()


@run_async
async def test_busy_server_answers_error(root: Path) -> None:
    async with serving(root, max_transfers=1) as (svc, _):
        a, b = Client(), Client()
        a.send(ReadRequest("a.bin", "octet"), ("127.0.0.1", svc.port))
        await a.recv()
        b.send(ReadRequest("a.bin", "octet"), ("127.0.0.1", svc.port))
        pkt, _ = await b.recv()
        assert isinstance(pkt, Error) and pkt.code == ErrorCode.NOT_DEFINED
        a.close()
        b.close()


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_cold_file_is_read_in_a_worker_thread(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # RWF_NOWAIT refuses bytes that are not in the page cache; the service
    # then warms them in the shared executor instead of blocking the loop.
    cold = root / "cold.bin"
    cold.write_bytes(os.urandom(3 * 1024 * 1024))
    want = cold.read_bytes()
    warmed: list[int] = []
    real_warm = FileSource.warm

    def counting_warm(self: FileSource) -> None:
        warmed.append(self.miss_offset)
        real_warm(self)

    monkeypatch.setattr(FileSource, "warm", counting_warm)

    @run_async
    async def body() -> None:
        async with serving(root) as (svc, _):
            c = Client()
            for options in ((), (("blksize", "1468"), ("windowsize", "8"))):
                _evict(cold)
                assert await c.download(svc.port, "cold.bin", *options) == want
            c.close()

    body()
    if FileSource(-1, 0)._nowait:  # only where the platform has RWF_NOWAIT
        assert warmed, "the cold reads never went to the worker thread"


def test_file_source_reads_and_refuses_cold_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 64)
    src = FileSource.open(path)
    try:
        bufs = [memoryview(bytearray(100)) for _ in range(3)]
        assert src.readinto(bufs, 16000) == 300
        assert src.readinto(bufs, 16200) == 16384 - 16200  # EOF
        assert bytes(bufs[0]) == (bytes(range(256)) * 64)[16200:16300]
        with pytest.raises(FileNotFoundError):
            FileSource.open(tmp_path)  # a directory
    finally:
        src.close()


@run_async
async def test_windows_without_gso(root: Path) -> None:
    # Where the kernel refuses UDP_SEGMENT the window goes out block by block.
    async with serving(root) as (svc, _):
        svc._gso = False
        c = Client()
        want = (root / "a.bin").read_bytes()
        assert await c.download(svc.port, "a.bin", ("blksize", "100"), ("windowsize", "16")) == want
        c.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_BINDTODEVICE needs CAP_NET_RAW")
@run_async
async def test_bound_to_an_interface(root: Path) -> None:
    async with serving(root, interface="lo") as (svc, _):
        c = Client()
        assert await c.download(svc.port, "sub/b.bin", ("blksize", "1468")) == b"b" * 1024
        c.close()


# -- the lean ACK path of lock-step transfers, on both event loops ----------------------

try:
    import uvloop
except ImportError:  # the service falls back to asyncio; so do these tests
    uvloop = None  # type: ignore[assignment]

LOOPS = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(
        uvloop.new_event_loop if uvloop is not None else None,
        id="uvloop",
        marks=pytest.mark.skipif(uvloop is None, reason="uvloop not installed"),
    ),
]


def run_on(factory: Callable[[], asyncio.AbstractEventLoop], body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(body(), 30))


def test_worker_loop_is_uvloop_when_installed_else_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = new_event_loop()
    try:
        if uvloop is not None:
            assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    loop = new_event_loop()
    try:
        assert isinstance(loop, asyncio.BaseEventLoop)  # asyncio's own
    finally:
        loop.close()


async def _expect_data(c: Client, block: int, payload: bytes, timeout: float = 2.0) -> None:
    pkt, _ = await c.recv(timeout)
    assert pkt == Data(block, payload[(block - 1) * 512 : block * 512])


async def _silence(c: Client, timeout: float = 0.15) -> None:
    with pytest.raises(TimeoutError):
        await c.recv(timeout=timeout)


@pytest.mark.parametrize("factory", LOOPS)
def test_lock_step_lean_path_and_every_fallback(
    root: Path, factory: Callable[[], asyncio.AbstractEventLoop], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mobinux.tftp")
    payload = os.urandom(512 * 150 + 7)  # 151 blocks: three runs of the read-ahead buffer
    (root / "big.bin").write_bytes(payload)

    async def body() -> None:
        async with serving(root, timeout=0.4, max_retries=3) as (svc, _):
            c = Client()
            c.send(ReadRequest("big.bin", "octet"), ("127.0.0.1", svc.port))
            pkt, tid = await c.recv()
            assert pkt == Data(1, payload[:512])
            c.send(Ack(1), tid)  # the lean path
            await _expect_data(c, 2, payload)
            # Sorcerer's Apprentice: a duplicate ACK is not answered.
            c.send(Ack(1), tid)
            await _silence(c)
            # Old, future and malformed four-byte datagrams: ignored.
            for junk in (encode(Ack(0)), encode(Ack(9)), b"\x00\x09\x00\x02", b"\x00\x03\x00\x02"):
                c.send(junk, tid)
            await _silence(c)
            # The right ACK with a trailing byte: the generic path, same answer.
            c.send(encode(Ack(2)) + b"\x00", tid)
            await _expect_data(c, 3, payload)
            # Through the end of the first run buffer (64 blocks) and beyond,
            # every answer at once (well before the 0.4 s retransmission).
            for block in range(3, 100):
                c.send(Ack(block), tid)
                await _expect_data(c, block + 1, payload, timeout=0.3)
            # No ACK: the timer resends the same block, and only it.
            t0 = asyncio.get_running_loop().time()
            await _expect_data(c, 100, payload)
            assert asyncio.get_running_loop().time() - t0 >= 0.3
            c.send(Ack(100), tid)  # the resent block is lock-step again
            await _expect_data(c, 101, payload)
            c.send(Ack(101), tid)
            await _expect_data(c, 102, payload)
            # An ERROR from the client ends the transfer at once, silently.
            c.send(Error(ErrorCode.DISK_FULL, "disk full"), tid)
            await _silence(c, 0.6)
            assert svc.active_transfers == 0
            # A whole download, every block at once (the file's last block is
            # sent, and its ACK handled, the generic way).
            c.send(ReadRequest("big.bin", "octet"), ("127.0.0.1", svc.port))
            pkt, tid = await c.recv()
            assert pkt == Data(1, payload[:512])
            for block in range(1, 151):
                c.send(Ack(block), tid)
                await _expect_data(c, block + 1, payload, timeout=0.3)
            c.send(Ack(151), tid)
            await _silence(c, 0.6)
            assert svc.active_transfers == 0
            c.close()

    run_on(factory, body)
    assert any("malformed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("factory", LOOPS)
def test_lean_path_send_failures(
    root: Path, factory: Callable[[], asyncio.AbstractEventLoop], monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = os.urandom(512 * 10)
    (root / "ten.bin").write_bytes(payload)
    real_write = os.write
    fail: list[OSError] = []

    def flaky_write(fd: int, data: bytes | memoryview) -> int:
        if fail:
            raise fail.pop()
        return real_write(fd, data)

    monkeypatch.setattr(aio_mod, "_write", flaky_write)

    async def body() -> None:
        async with serving(root, timeout=0.3, max_retries=3) as (svc, _):
            c = Client()
            c.send(ReadRequest("ten.bin", "octet"), ("127.0.0.1", svc.port))
            pkt, tid = await c.recv()
            assert pkt == Data(1, payload[:512])
            # A full send buffer (EAGAIN) or queue (ENOBUFS): a lost packet
            # that the timer sends again.
            for exc in (BlockingIOError(errno.EAGAIN, "full"), OSError(errno.ENOBUFS, "no buffers")):
                fail.append(exc)
                block = 2 if exc.errno == errno.EAGAIN else 3
                c.send(Ack(block - 1), tid)
                t0 = asyncio.get_running_loop().time()
                await _expect_data(c, block, payload)
                assert asyncio.get_running_loop().time() - t0 >= 0.2
            # The client's port is gone (ICMP port unreachable): the end.
            fail.append(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
            c.send(Ack(3), tid)
            await _silence(c, 0.6)
            assert svc.active_transfers == 0
            c.close()

    run_on(factory, body)
