"""HttpService over real loopback sockets, driven by a raw asyncio client."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from mobinux.boot import ResolvedFile
from mobinux.errors import PathRefused
from mobinux.http.server import HttpService, content_type_for
from mobinux.paths import contained_file

MAC = "52:54:00:00:00:01"


class RootResolver:
    """Real files under *root*, plus generated ``*.ipxe`` scripts echoing the query."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, str, str]] = []

    def resolve(self, name: str, client_ip: str, query: str = "") -> ResolvedFile | None:
        self.calls.append((name, client_ip, query))
        if name == "boom":
            raise RuntimeError("resolver bug")
        if name == "refused":
            raise PathRefused("policy says no")
        if name.endswith(".ipxe"):
            return ResolvedFile(name=name, data=f"#!ipxe\necho {query}\n".encode(), mac=MAC)
        path = contained_file(self.root, name)
        return None if path is None else ResolvedFile(name=name, path=path)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


Steps = list[tuple[str | None, str | None, str]]


@asynccontextmanager
async def serving(
    root: Path, steps: Steps | None = None, **kwargs: float
) -> AsyncIterator[HttpService]:
    def record(mac: str | None, ip: str | None, step: str) -> None:
        if steps is not None:
            steps.append((mac, ip, step))

    service = HttpService(
        RootResolver(root),
        host="127.0.0.1",
        port=0,
        record_step=record,
        max_connections=int(kwargs.pop("max_connections", 64)),
        idle_timeout=kwargs.pop("idle_timeout", 5.0),
    )
    await service.start()
    try:
        yield service
    finally:
        await service.close()


async def connect(service: HttpService) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", service.port)


async def read_response(reader: asyncio.StreamReader, head_only: bool = False) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, value = line.split(": ", 1)
            assert name.lower() not in headers
            headers[name.lower()] = value
    body = b"" if head_only else await reader.readexactly(int(headers["content-length"]))
    return Response(int(status), headers, body)


async def request(
    service: HttpService, data: bytes, head_only: bool = False
) -> tuple[Response, bytes]:
    """Send *data* on a fresh connection; the response and whatever follows until EOF."""
    reader, writer = await connect(service)
    writer.write(data)
    response = await read_response(reader, head_only)
    writer.write_eof()
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return response, rest


async def is_closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1), 5) == b""


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll *condition*: the server finishes a reply just after the client has read it."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "pxelinux.cfg").mkdir(parents=True)
    (root / "pxelinux.cfg" / "default").write_text("DEFAULT linux\n")
    (root / "vmlinuz").write_bytes(bytes(range(256)) * 40)
    (root / "empty").write_bytes(b"")
    return root


GET = b"GET /vmlinuz HTTP/1.1\r\nHost: t\r\n\r\n"


def test_get_file(root: Path) -> None:
    async def test() -> None:
        steps: Steps = []
        async with serving(root, steps) as service:
            assert service.port != 0
            response, _ = await request(service, GET)
            assert response.status == 200
            assert response.body == (root / "vmlinuz").read_bytes()
            h = response.headers
            assert h["content-type"] == "application/octet-stream"
            assert h["content-length"] == "10240"
            assert h["accept-ranges"] == "bytes"
            assert h["etag"].startswith('"')
            assert h["last-modified"].endswith(" GMT")
            assert h["date"].endswith(" GMT")
            assert "connection" not in h
        assert steps == [(None, "127.0.0.1", "http vmlinuz")]

    run(test)


def test_generated_script_query_and_step(root: Path) -> None:
    async def test() -> None:
        steps: Steps = []
        async with serving(root, steps) as service:
            response, _ = await request(
                service, b"GET /boot/x.ipxe?mac=52-54&a=%20 HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            assert response.status == 200
            assert response.headers["content-type"] == "text/plain"
            assert response.body == b"#!ipxe\necho mac=52-54&a=%20\n"
            assert "etag" not in response.headers
        assert steps == [(MAC, "127.0.0.1", "http boot/x.ipxe")]

    run(test)


def test_head_has_get_headers_no_body_and_no_step(root: Path) -> None:
    async def test() -> None:
        steps: Steps = []
        async with serving(root, steps) as service:
            reader, writer = await connect(service)
            writer.write(b"HEAD /vmlinuz HTTP/1.1\r\nHost: t\r\nRange: bytes=0-1\r\n\r\n" + GET)
            head = await read_response(reader, head_only=True)
            got = await read_response(reader)
            assert head.status == 200  # Range is ignored for HEAD (RFC 9110 14.2)
            assert head.headers["content-length"] == "10240"
            assert head.headers["etag"] == got.headers["etag"]
            assert got.body == (root / "vmlinuz").read_bytes()
            await wait_until(lambda: len(steps) == 1)
            writer.close()
        assert steps == [(None, "127.0.0.1", "http vmlinuz")]

    run(test)


def test_content_types() -> None:
    assert content_type_for("boot.ipxe") == "text/plain"
    assert content_type_for("x/MENU.IPXE") == "text/plain"
    assert content_type_for("pxelinux.cfg/01-52-54-00-00-00-01") == "text/plain"
    assert content_type_for("pxelinux.cfg/default") == "text/plain"
    assert content_type_for("grub/grub.cfg") == "text/plain"
    assert content_type_for("ipxe.pxe") == "application/octet-stream"
    assert content_type_for("images/x/vmlinuz") == "application/octet-stream"


def test_pxelinux_config_is_text(root: Path) -> None:
    async def test() -> None:
        async with serving(root) as service:
            response, _ = await request(
                service, b"GET /pxelinux.cfg/default HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            assert response.headers["content-type"] == "text/plain"
            assert response.body == b"DEFAULT linux\n"

    run(test)


def test_errors_keep_the_connection_alive(root: Path) -> None:
    async def test() -> None:
        steps: Steps = []
        async with serving(root, steps) as service:
            reader, writer = await connect(service)
            cases = [
                (b"GET /missing HTTP/1.1\r\n\r\n", 404),
                (b"GET /refused HTTP/1.1\r\n\r\n", 403),
                (b"GET /../etc/passwd HTTP/1.1\r\n\r\n", 403),
                (b"GET /%2e%2e/x HTTP/1.1\r\n\r\n", 403),
                (b"GET / HTTP/1.1\r\n\r\n", 403),
                (b"GET /pxelinux.cfg HTTP/1.1\r\n\r\n", 404),  # a directory
                (b"HEAD /missing HTTP/1.1\r\n\r\n", 404),
                (b"DELETE /vmlinuz HTTP/1.1\r\n\r\n", 405),
                (b"OPTIONS * HTTP/1.1\r\n\r\n", 405),
                (b"GET /empty HTTP/1.1\r\n\r\n", 200),
                (GET, 200),
            ]
            for data, status in cases:
                writer.write(data)
                response = await read_response(reader, head_only=data.startswith(b"HEAD"))
                assert response.status == status, data
                assert "connection" not in response.headers
                if status == 405:
                    assert response.headers["allow"] == "GET, HEAD"
                if status in (403, 404, 405):
                    assert response.body in (b"", f"{status} ".encode() + response.body[4:])
            await wait_until(lambda: len(steps) == 2)
            writer.close()
        assert [step for _, _, step in steps] == ["http empty", "http vmlinuz"]

    run(test)


def test_method_with_body_is_405_and_closes(root: Path) -> None:
    async def test() -> None:
        async with serving(root) as service:
            response, rest = await request(
                service, b"POST /vmlinuz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello" + GET
            )
            assert response.status == 405
            assert response.headers["allow"] == "GET, HEAD"
            assert response.headers["connection"] == "close"
            assert rest == b""

    run(test)


def test_ranges(root: Path) -> None:
    data = (root / "vmlinuz").read_bytes()

    async def test() -> None:
        async with serving(root) as service:
            reader, writer = await connect(service)

            async def get(target: bytes, *headers: bytes) -> Response:
                extra = b"".join(h + b"\r\n" for h in headers)
                writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n")
                return await read_response(reader)

            r = await get(b"/vmlinuz", b"Range: bytes=0-99")
            assert (r.status, r.body) == (206, data[:100])
            assert r.headers["content-range"] == "bytes 0-99/10240"
            r = await get(b"/vmlinuz", b"Range: bytes=100-")
            assert (r.status, r.body) == (206, data[100:])
            r = await get(b"/vmlinuz", b"Range: bytes=-50")
            assert (r.status, r.body) == (206, data[-50:])
            r = await get(b"/vmlinuz", b"Range: bytes=10240-")
            assert r.status == 416
            assert r.headers["content-range"] == "bytes */10240"
            r = await get(b"/vmlinuz", b"Range: bytes=0-1,5-6")
            assert (r.status, r.body) == (200, data)
            r = await get(b"/vmlinuz", b"Range: bytes=5-1")
            assert (r.status, r.body) == (200, data)
            etag = r.headers["etag"].encode()
            modified = r.headers["last-modified"].encode()
            r = await get(b"/vmlinuz", b"Range: bytes=1-2", b"If-Range: " + etag)
            assert (r.status, r.body) == (206, data[1:3])
            r = await get(b"/vmlinuz", b"Range: bytes=1-2", b"If-Range: " + modified)
            assert (r.status, r.body) == (206, data[1:3])
            r = await get(b"/vmlinuz", b"Range: bytes=1-2", b'If-Range: "other"')
            assert (r.status, r.body) == (200, data)
            r = await get(b"/vmlinuz", b"Range: bytes=1-2", b"If-Range: W/" + etag)
            assert (r.status, r.body) == (200, data)
            r = await get(b"/x.ipxe?q", b"Range: bytes=-3")
            assert (r.status, r.body) == (206, b" q\n")
            r = await get(b"/x.ipxe", b"Range: bytes=100-")
            assert r.status == 416
            r = await get(b"/x.ipxe", b"Range: bytes=0-0", b'If-Range: "x"')
            assert r.status == 200
            r = await get(b"/empty", b"Range: bytes=0-")
            assert (r.status, r.headers["content-range"]) == (416, "bytes */0")
            writer.close()

    run(test)


def test_reply_survives_a_large_unread_body(root: Path) -> None:
    async def test() -> None:
        async with serving(root) as service:
            reader, writer = await connect(service)
            writer.write(b"PUT /vmlinuz HTTP/1.1\r\nContent-Length: 4000000\r\n\r\n")
            writer.write(bytes(4_000_000))
            response = await read_response(reader)
            assert response.status == 405
            assert await is_closed(reader)
            writer.close()

    run(test)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /vmlinuz\r\n\r\n", 400),
        (b"GET /vmlinuz HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /a%zz HTTP/1.1\r\n\r\n", 400),
        (b"GET /vmlinuz HTTP/3.0\r\n\r\n", 505),
        (b"GET /vmlinuz HTTP/1.1\r\nX: " + b"a" * 17000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    ],
)
def test_bad_requests_are_answered_and_closed(root: Path, data: bytes, status: int) -> None:
    async def test() -> None:
        async with serving(root) as service:
            response, rest = await request(service, data + GET)
            assert response.status == status
            assert response.headers["connection"] == "close"
            assert rest == b""

    run(test)


@pytest.mark.parametrize(
    "data",
    [
        b"GET /vmlinuz HTTP/1.0\r\n\r\n",
        b"GET /vmlinuz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET /vmlinuz HTTP/1.1\r\nConnection: close\r\n\r\n",
    ],
)
def test_connection_close(root: Path, data: bytes) -> None:
    async def test() -> None:
        async with serving(root) as service:
            reader, writer = await connect(service)
            writer.write(data + GET)  # the pipelined second request is never answered
            response = await read_response(reader)
            assert response.status == 200
            assert response.headers["connection"] == "close"
            assert await is_closed(reader)
            writer.close()

    run(test)


def test_pipelining_and_absolute_form(root: Path) -> None:
    async def test() -> None:
        async with serving(root) as service:
            reader, writer = await connect(service)
            writer.write(
                b"GET http://10.0.0.1:8080/pxelinux.cfg/default HTTP/1.1\r\n\r\n"
                + GET
                + b"GET /a.ipxe?1 HTTP/1.1\r\n\r\n"
            )
            assert (await read_response(reader)).body == b"DEFAULT linux\n"
            assert (await read_response(reader)).status == 200
            assert (await read_response(reader)).body == b"#!ipxe\necho 1\n"
            writer.close()
            assert service.connections_accepted == 1

    run(test)


def test_idle_keep_alive_connection_is_closed(root: Path) -> None:
    async def test() -> None:
        async with serving(root, idle_timeout=0.2) as service:
            reader, writer = await connect(service)
            writer.write(GET)
            await read_response(reader)
            assert await is_closed(reader)
            writer.close()
            # a head that never completes gets 408
            response, rest = await request(service, b"GET /vmlinuz HTTP/1.1\r\n")
            assert response.status == 408
            assert rest == b""

    run(test)


def test_connection_limit(root: Path) -> None:
    async def test() -> None:
        async with serving(root, max_connections=1) as service:
            reader1, writer1 = await connect(service)
            writer1.write(GET)
            await read_response(reader1)
            response, _ = await request(service, GET)
            assert response.status == 503
            assert response.headers["connection"] == "close"
            writer1.close()
            for _ in range(100):
                if service.active_connections == 0:
                    break
                await asyncio.sleep(0.02)
            response, _ = await request(service, GET)
            assert response.status == 200

    run(test)


def test_resolver_bug_is_500_and_logged(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        async with serving(root) as service:
            response, rest = await request(service, b"GET /boom HTTP/1.1\r\n\r\n")
            assert response.status == 500
            assert rest == b""
            response, _ = await request(service, GET)
            assert response.status == 200

    with caplog.at_level(logging.ERROR, logger="mobinux.http"):
        run(test)
    assert any("resolving" in r.message for r in caplog.records)


def test_fifo_is_not_served(root: Path) -> None:
    os.mkfifo(root / "fifo")

    async def test() -> None:
        async with serving(root) as service:
            # contained_file refuses it already; the server's own check is for races
            service._resolver = _Fixed(root / "fifo")
            response, _ = await request(service, b"GET /fifo HTTP/1.1\r\n\r\n")
            assert response.status == 404

    run(test)


class _Fixed:
    def __init__(self, path: Path) -> None:
        self.path = path

    def resolve(self, name: str, client_ip: str, query: str = "") -> ResolvedFile | None:
        return ResolvedFile(name=name, path=self.path)


def test_disconnects_mid_transfer_do_not_hurt_the_server(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (root / "big").write_bytes(os.urandom(16 * 1024 * 1024))

    async def test() -> None:
        steps: Steps = []
        async with serving(root, steps) as service:
            for abort in (False, True, False, True):
                reader, writer = await connect(service)
                writer.write(b"GET /big HTTP/1.1\r\n\r\n")
                await reader.readexactly(100_000)
                if abort:  # RST instead of FIN
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()
            for _ in range(250):
                if service.active_connections == 0:
                    break
                await asyncio.sleep(0.02)
            assert service.active_connections == 0
            response, _ = await request(service, GET)
            assert response.status == 200
        assert [step for _, _, step in steps] == ["http vmlinuz"]

    with caplog.at_level(logging.DEBUG):
        run(test)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_client_that_stops_reading_is_dropped(root: Path) -> None:
    (root / "big").write_bytes(bytes(32 * 1024 * 1024))

    async def test() -> None:
        async with serving(root, idle_timeout=0.3) as service:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", service.port))
            sock.sendall(b"GET /big HTTP/1.1\r\n\r\n")
            for _ in range(250):
                await asyncio.sleep(0.02)
                if service.active_connections == 0:
                    break
            assert service.active_connections == 0
            sock.close()

    run(test)


def test_close_ends_open_connections(root: Path) -> None:
    async def test() -> None:
        async with serving(root, idle_timeout=60) as service:
            reader, writer = await connect(service)
            writer.write(GET)
            await read_response(reader)
            await asyncio.wait_for(service.close(), 5)
            assert await is_closed(reader)
            writer.close()

    run(test)


def test_no_info_logging_per_request(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        async with serving(root) as service:
            for data in (GET, b"GET /missing HTTP/1.1\r\n\r\n", b"GET /../x HTTP/1.1\r\n\r\n"):
                await request(service, data)

    with caplog.at_level(logging.DEBUG, logger="mobinux.http"):
        run(test)
    records = [r for r in caplog.records if r.name.startswith("mobinux")]
    assert records  # the DEBUG access log
    assert all(r.levelno == logging.DEBUG for r in records)
