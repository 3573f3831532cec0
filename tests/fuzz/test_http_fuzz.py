"""Fuzzing the HTTP request parser: garbage in gives a request or a 4xx/505 error, nothing else."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobinux.boot import ResolvedFile
from mobinux.errors import PathRefused
from mobinux.http.ranges import UNSATISFIABLE, ByteRange, select_range
from mobinux.http.request import HttpError, Request, RequestParser, split_target
from mobinux.http.server import HttpService
from mobinux.paths import contained_file, normalise

PARSER_STATUSES = {400, 414, 431, 505}

SEEDS = [
    b"GET /boot.ipxe HTTP/1.1\r\nHost: 10.0.0.1\r\nUser-Agent: iPXE/1.21.1\r\n\r\n",
    b"HEAD /images/x/vmlinuz HTTP/1.1\r\nHost: h\r\nRange: bytes=0-99\r\nConnection: close\r\n\r\n",
    b"GET http://10.0.0.1:8080/pxelinux.cfg/01-52-54-00-00-00-01?mac=1 HTTP/1.0\r\n\r\n",
    b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    b"GET /%2e%2e/etc/passwd?a=%00 HTTP/1.1\nHost: x\n\n",
]
TOKENS = [
    b"\r",
    b"\n",
    b"\r\n",
    b" ",
    b"\t",
    b":",
    b"%",
    b"%00",
    b"%2f",
    b"/..",
    b"\x00",
    b"\xff",
    b"HTTP/1.1",
    b"HTTP/2.0",
    b"Content-Length: 9",
    b"?",
    b"#",
    b"=",
    b",",
]


def drain(parser: RequestParser) -> list[Request]:
    """Every request the parser can produce now; stops at (and re-raises) an HttpError."""
    out: list[Request] = []
    while (request := parser.next_request()) is not None:
        out.append(request)
    return out


def check_request(request: Request) -> None:
    """A parsed request can be taken apart without any other exception."""
    assert request.version in ((1, 0), (1, 1))
    assert request.method and request.target
    for name, value in request.headers:
        assert name == name.lower()
        assert "\r" not in value and "\n" not in value and "\x00" not in value
    try:
        path, _query = split_target(request.target)
        normalise(path)
    except HttpError as err:
        assert err.status == 400
    except PathRefused:
        pass
    for size in (0, 1, 1000):
        choice = select_range(request.get("range"), size)
        assert choice is None or choice is UNSATISFIABLE or isinstance(choice, ByteRange)


def feed_all(data: bytes, cuts: list[int]) -> None:
    parser = RequestParser()
    positions = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for start, stop in itertools.pairwise(positions):
            parser.feed(data[start:stop])
            for request in drain(parser):
                check_request(request)
    except HttpError as err:
        assert err.status in PARSER_STATUSES


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 4))
        if kind == 0 and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif kind == 1:
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif kind == 2:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == 3:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 40))]
        else:
            data[pos:pos] = draw(st.binary(max_size=8))
    return bytes(data)


@settings(max_examples=1000)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_random_bytes(data: bytes, cuts: list[int]) -> None:
    feed_all(data, cuts)


@settings(max_examples=2000)
@given(data=mutated(), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_mutated_requests(data: bytes, cuts: list[int]) -> None:
    feed_all(data, cuts)


@settings(max_examples=300)
@given(data=st.lists(mutated(), min_size=1, max_size=4).map(b"".join))
def test_pipelined_mutations(data: bytes) -> None:
    feed_all(data, [])


@settings(max_examples=50)
@given(junk=st.binary(min_size=1, max_size=20_000))
def test_oversized_and_line_free_input(junk: bytes) -> None:
    # a head that never ends is bounded: more bytes than the limit is 414/431, never memory
    parser = RequestParser()
    try:
        for _ in range(40):
            parser.feed(junk)
            for request in drain(parser):
                check_request(request)
            assert parser.buffered <= 16 * 1024 + len(junk)
    except HttpError as err:
        assert err.status in PARSER_STATUSES


@settings(max_examples=1000)
@given(target=st.text(max_size=80))
def test_targets(target: str) -> None:
    try:
        path, _ = split_target(target)
        name = normalise(path)
    except HttpError as err:
        assert err.status == 400
    except PathRefused:
        pass
    else:
        assert ".." not in name.split("/")
        assert "\x00" not in name and "\\" not in name


class _Resolver:
    def __init__(self, root: Path) -> None:
        self.root = root

    def resolve(self, name: str, client_ip: str, query: str = "") -> ResolvedFile | None:
        path = contained_file(self.root, name)
        return None if path is None else ResolvedFile(name=name, path=path)


GOOD = b"GET /f HTTP/1.1\r\nHost: t\r\n\r\n"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.one_of(mutated(), st.binary(max_size=300)))
def test_server_survives_garbage(tmp_path: Path, data: bytes) -> None:
    """Garbage on one connection gets a status line (or nothing); the next client is served."""
    (tmp_path / "f").write_bytes(b"payload")

    async def scenario() -> None:
        service = HttpService(_Resolver(tmp_path), host="127.0.0.1", port=0, idle_timeout=0.5)
        await service.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(data)
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            if reply:
                assert reply.startswith(b"HTTP/1.1 ")
                assert int(reply[9:12]) in {200, 206, 400, 403, 404, 405, 408, 414, 416, 431, 505}
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(GOOD)
            writer.write_eof()
            good = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert good.startswith(b"HTTP/1.1 200 ") and good.endswith(b"\r\n\r\npayload")
        finally:
            await service.close()

    asyncio.run(scenario())
