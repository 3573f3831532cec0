"""The sans-I/O HTTP request parser and request-target decoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobinux.errors import PathRefused
from mobinux.http.request import (
    MAX_HEAD,
    MAX_REQUEST_LINE,
    HttpError,
    Request,
    RequestParser,
    split_target,
)
from mobinux.paths import normalise


def parse_one(data: bytes) -> Request:
    parser = RequestParser()
    parser.feed(data)
    request = parser.next_request()
    assert request is not None
    return request


def parse_error(data: bytes) -> HttpError:
    parser = RequestParser()
    parser.feed(data)
    with pytest.raises(HttpError) as caught:
        parser.next_request()
    return caught.value


def test_simple_get() -> None:
    request = parse_one(
        b"GET /boot.ipxe HTTP/1.1\r\nHost: 10.0.0.1\r\nUser-Agent: iPXE/1.21\r\n\r\n"
    )
    assert request.method == "GET"
    assert request.target == "/boot.ipxe"
    assert request.version == (1, 1)
    assert request.headers == (("host", "10.0.0.1"), ("user-agent", "iPXE/1.21"))
    assert request.get("host") == "10.0.0.1"
    assert request.keep_alive
    assert not request.has_body


def test_incomplete_head_needs_more_bytes() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert parser.next_request() is None
    parser.feed(b"\r\n")
    assert parser.next_request() is not None
    assert parser.buffered == 0


def test_byte_at_a_time() -> None:
    data = b"\r\nHEAD /x HTTP/1.1\r\nHost: h\r\nRange: bytes=1-2\r\n\r\n"
    parser = RequestParser()
    for i in range(len(data) - 1):
        parser.feed(data[i : i + 1])
        assert parser.next_request() is None
    parser.feed(data[-1:])
    request = parser.next_request()
    assert request is not None
    assert request.method == "HEAD"
    assert request.get("range") == "bytes=1-2"


def test_pipelined_requests() -> None:
    parser = RequestParser()
    parser.feed(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c")
    first, second = parser.next_request(), parser.next_request()
    assert first is not None and first.target == "/a"
    assert second is not None and second.target == "/b"
    assert parser.next_request() is None
    assert parser.buffered == len(b"GET /c")


def test_bare_lf_line_endings_and_leading_blank_lines() -> None:
    request = parse_one(b"\r\n\nGET /x HTTP/1.1\nHost: h\n\n")
    assert request.target == "/x"
    assert request.get("host") == "h"


def test_header_value_whitespace_is_trimmed_and_names_lowercased() -> None:
    request = parse_one(b"GET / HTTP/1.1\r\nX-Thing:  \t a b \t\r\nCONNECTION: Close\r\n\r\n")
    assert request.get("x-thing") == "a b"
    assert not request.keep_alive


def test_http10_closes_and_http11_keeps_alive() -> None:
    assert not parse_one(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert not parse_one(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert parse_one(b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not parse_one(b"GET / HTTP/1.1\r\nConnection: te, close\r\n\r\n").keep_alive


def test_higher_minor_version_is_answered_as_11() -> None:
    assert parse_one(b"GET / HTTP/1.9\r\n\r\n").version == (1, 1)


def test_missing_host_is_tolerated_but_two_are_not() -> None:
    assert parse_one(b"GET / HTTP/1.1\r\n\r\n").get("host") is None
    assert parse_error(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").status == 400


@pytest.mark.parametrize(
    "data",
    [
        b"GET /\r\n\r\n",  # HTTP/0.9
        b"GET  / HTTP/1.1\r\n\r\n",  # double space
        b"GET / HTTP/1.1 \r\n\r\n",
        b"GET / http/1.1\r\n\r\n",
        b"GET / HTTP/1\r\n\r\n",
        b"G(T / HTTP/1.1\r\n\r\n",
        b"GET /a b HTTP/1.1\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\n\r\n",
        b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",  # raw non-ASCII must be percent-encoded
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",  # space before colon (RFC 9112 5.1)
        b"GET / HTTP/1.1\r\nHost h\r\n\r\n",
        b"GET / HTTP/1.1\r\n: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n  folded\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",  # bare CR
        b"GET / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_malformed_heads_are_400(data: bytes) -> None:
    assert parse_error(data).status == 400


def test_http2_is_505() -> None:
    assert parse_error(b"GET / HTTP/2.0\r\n\r\n").status == 505


def test_request_bodies_are_flagged() -> None:
    assert parse_one(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").has_body
    assert parse_one(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").has_body
    assert not parse_one(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").has_body
    # repeated identical values are one length (RFC 9112 6.3)
    assert parse_one(b"PUT / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n").has_body


def test_oversized_head_is_431_before_the_end_arrives() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\n")
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    with pytest.raises(HttpError) as caught:
        for _ in range(MAX_HEAD // len(filler) + 2):
            parser.feed(filler)
            assert parser.next_request() is None
    assert caught.value.status == 431


def test_head_of_exactly_the_limit_is_accepted() -> None:
    start = b"GET / HTTP/1.1\r\nX: "
    end = b"\r\n\r\n"
    data = start + b"a" * (MAX_HEAD - len(start) - len(end)) + end
    assert len(data) == MAX_HEAD
    assert parse_one(data).get("x") is not None
    assert parse_error(data[:-4] + b"a" + end).status == 431


def test_too_many_fields_is_431() -> None:
    data = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n"
    assert parse_error(data).status == 431


def test_long_request_line_is_414() -> None:
    parser = RequestParser()
    parser.feed(b"GET /" + b"a" * MAX_REQUEST_LINE)
    with pytest.raises(HttpError) as caught:
        parser.next_request()
    assert caught.value.status == 414


def test_http_error_is_a_remote_protocol_error() -> None:
    from mobinux.errors import MalformedPacket, RemoteProtocolError

    err = parse_error(b"nonsense\r\n\r\n")
    assert isinstance(err, MalformedPacket)
    assert isinstance(err, RemoteProtocolError)


# -- request targets ------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/boot.ipxe", "/boot.ipxe", ""),
        ("/boot.ipxe?mac=52:54:00:00:00:01&x=%20", "/boot.ipxe", "mac=52:54:00:00:00:01&x=%20"),
        ("/images/a%20b/vmlinuz", "/images/a b/vmlinuz", ""),
        ("/%252e%252e/x", "/%2e%2e/x", ""),  # decoded exactly once
        ("/caf%C3%A9", "/café", ""),
        ("http://10.0.0.1:8080/boot.ipxe?a=1", "/boot.ipxe", "a=1"),
        ("HTTP://host/x", "/x", ""),
        ("http://host", "/", ""),
        ("http://host?q", "/", "q"),
        ("/a?b?c", "/a", "b?c"),
    ],
)
def test_split_target(target: str, path: str, query: str) -> None:
    assert split_target(target) == (path, query)


@pytest.mark.parametrize(
    "target",
    ["*", "boot.ipxe", "ftp://host/x", "/a%zz", "/a%4", "/a#frag", "/%ff", "/a b"],
)
def test_bad_targets_are_400(target: str) -> None:
    with pytest.raises(HttpError) as caught:
        split_target(target)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "target",
    [
        "/../etc/passwd",
        "/%2e%2e/etc/passwd",
        "/%2E%2E%2Fetc%2Fpasswd",
        "/a/%2e%2e/%2e%2e/b",
        "/x%00.ipxe",
        "/..%5c..%5cwindows",
        "/a\\..\\b",
        "/a%2fb",
        "/%0a",
        "/",
        "http://host/../x",
    ],
)
def test_escaping_targets_are_refused(target: str) -> None:
    with pytest.raises(PathRefused):
        path, _ = split_target(target)
        normalise(path)


@pytest.mark.parametrize("module", ["mobinux.http.request", "mobinux.http.ranges"])
def test_protocol_cores_do_no_io(module: str) -> None:
    """The parser and range logic are sans-I/O: no socket, asyncio or time (design habit)."""
    import ast
    import importlib

    source = Path(importlib.import_module(module).__file__ or "").read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"socket", "asyncio", "time", "selectors", "os"}
