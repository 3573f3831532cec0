"""HttpService against the real curl client, on 127.0.0.1 (no root or namespace needed)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mobinux.boot import ResolvedFile
from mobinux.http.server import HttpService
from mobinux.paths import contained_file

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

SECRET = b"TOP-SECRET-" + os.urandom(8).hex().encode()


class RootResolver:
    """The smallest real resolver: files under *root* plus one generated iPXE script."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def resolve(self, name: str, client_ip: str, query: str = "") -> ResolvedFile | None:
        if name == "boot.ipxe":
            script = f"#!ipxe\necho client {client_ip} query {query}\n"
            return ResolvedFile(name=name, data=script.encode(), mac="52:54:00:00:00:01")
        path = contained_file(self.root, name)
        return None if path is None else ResolvedFile(name=name, path=path)


class ServerThread:
    """An HttpService on its own event loop thread, so the tests can block on curl."""

    def __init__(self, root: Path) -> None:
        self.steps: list[tuple[str | None, str | None, str]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.service = HttpService(
            RootResolver(root),
            host="127.0.0.1",
            port=0,
            record_step=lambda mac, ip, step: self.steps.append((mac, ip, step)),
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.service.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.service.port}{path}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("http-curl")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    root = base / "root"
    (root / "pxelinux.cfg").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "pxelinux.cfg" / "default").write_text("DEFAULT linux\nLABEL linux\n")
    (root / "small.bin").write_bytes(os.urandom(10_000))
    (root / "head-only.bin").write_bytes(os.urandom(10_000))
    with open(root / "images" / "big.img", "wb") as big:
        for _ in range(64):
            big.write(os.urandom(1024 * 1024))
    (root / "escape").symlink_to(outside / "secret")
    (root / "images" / "up").symlink_to(outside)
    (root / "alias.bin").symlink_to(root / "small.bin")  # a link inside the root is fine
    return root


@pytest.fixture(scope="module")
def server(tree: Path) -> Iterator[ServerThread]:
    with ServerThread(tree) as running:
        yield running


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", str(timeout), *args],
        capture_output=True,
        timeout=timeout + 10,
        check=False,
    )


def fetch(server: ServerThread, path: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one curl request."""
    result = curl("--dump-header", "-", *args, server.url(path))
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_get(server: ServerThread, tree: Path) -> None:
    data = (tree / "small.bin").read_bytes()
    status, headers, body = fetch(server, "/small.bin")
    assert status == 200
    assert sha256(body) == sha256(data)
    assert headers["content-length"] == str(len(data))
    assert headers["content-type"] == "application/octet-stream"
    assert headers["accept-ranges"] == "bytes"
    status, _, body = fetch(server, "/alias.bin")
    assert (status, body) == (200, data)


def test_text_types_and_query(server: ServerThread) -> None:
    status, headers, body = fetch(server, "/boot.ipxe?mac=52-54-00-00-00-01&arch=x64")
    assert status == 200
    assert headers["content-type"] == "text/plain"
    assert body == b"#!ipxe\necho client 127.0.0.1 query mac=52-54-00-00-00-01&arch=x64\n"
    status, headers, body = fetch(server, "/pxelinux.cfg/default")
    assert (status, headers["content-type"]) == (200, "text/plain")
    assert body.startswith(b"DEFAULT linux")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-99", slice(0, 100)),
        ("100-", slice(100, None)),
        ("-50", slice(-50, None)),
        ("9990-20000", slice(9990, None)),
    ],
)
def test_ranges(server: ServerThread, tree: Path, spec: str, expected: slice) -> None:
    data = (tree / "small.bin").read_bytes()
    status, headers, body = fetch(server, "/small.bin", "--range", spec)
    assert status == 206
    assert body == data[expected]
    start = expected.start % len(data)
    assert headers["content-range"] == f"bytes {start}-{start + len(body) - 1}/{len(data)}"


def test_range_on_generated_file(server: ServerThread) -> None:
    status, _, body = fetch(server, "/boot.ipxe", "--range", "0-5")
    assert (status, body) == (206, b"#!ipxe")


def test_head(server: ServerThread, tree: Path) -> None:
    result = curl("--head", server.url("/head-only.bin"))
    assert result.returncode == 0, result.stderr
    head = result.stdout.decode("latin-1")
    assert head.startswith("HTTP/1.1 200 OK\r\n")
    assert "Content-Length: 10000\r\n" in head
    assert head.endswith("\r\n\r\n")  # headers only
    threading.Event().wait(0.2)
    assert not [s for s in server.steps if s[2] == "http head-only.bin"]  # not a boot step


def test_unsatisfiable_range(server: ServerThread) -> None:
    status, headers, _ = fetch(server, "/small.bin", "--range", "10000-")
    assert status == 416
    assert headers["content-range"] == "bytes */10000"


def test_not_found(server: ServerThread) -> None:
    status, _, _ = fetch(server, "/nope.bin")
    assert status == 404


def test_method_not_allowed(server: ServerThread) -> None:
    for method in ("DELETE", "PUT", "OPTIONS"):
        status, headers, _ = fetch(server, "/small.bin", "--request", method)
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
    status, _, _ = fetch(server, "/small.bin", "--data", "x=1")  # POST with a body
    assert status == 405


def test_http10(server: ServerThread, tree: Path) -> None:
    status, headers, body = fetch(server, "/small.bin", "--http1.0")
    assert (status, headers["connection"]) == (200, "close")
    assert body == (tree / "small.bin").read_bytes()


def test_keep_alive(server: ServerThread, tree: Path) -> None:
    before = server.service.connections_accepted
    result = curl(
        "--verbose",
        "--output",
        "/dev/null",
        "--output",
        "/dev/null",
        "--output",
        "/dev/null",
        server.url("/small.bin"),
        server.url("/boot.ipxe"),
        server.url("/nope.bin"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(b"Re-using existing connection") == 2
    assert server.service.connections_accepted == before + 1


def test_connection_close_is_honoured(server: ServerThread) -> None:
    before = server.service.connections_accepted
    result = curl(
        "--verbose",
        "--header",
        "Connection: close",
        "--output",
        "/dev/null",
        "--output",
        "/dev/null",
        server.url("/small.bin"),
        server.url("/small.bin"),
    )
    assert result.returncode == 0, result.stderr
    assert b"Re-using existing connection" not in result.stderr
    assert server.service.connections_accepted == before + 2


@pytest.mark.parametrize(
    "path",
    [
        "/../outside/secret",
        "/../../../../etc/passwd",
        "/images/../../outside/secret",
        "/%2e%2e/outside/secret",
        "/%2E%2E%2Foutside%2Fsecret",
        "/..%2foutside%2fsecret",
        "/small.bin%00.ipxe",
        "/%00",
        "/escape",
        "/images/up/secret",
        "/..\\outside\\secret",
        "/..%5Coutside%5Csecret",
        "/images%5c..%5c..%5coutside%5csecret",
        "/%252e%252e/outside/secret",
    ],
)
def test_path_escapes_are_refused(server: ServerThread, path: str) -> None:
    result = curl("--path-as-is", "--dump-header", "-", server.url(path))
    assert result.returncode == 0, result.stderr
    status = int(result.stdout.split(b" ", 2)[1])
    assert status in (403, 404), result.stdout
    assert SECRET not in result.stdout
    assert b"root:" not in result.stdout


def test_64_mib_download(server: ServerThread, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "big.img"
    step = (None, "127.0.0.1", "http images/big.img")
    steps_before = server.steps.count(step)
    result = curl(
        "--output", str(out), "--write-out", "%{http_code}", server.url("/images/big.img")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"200"
    assert out.stat().st_size == 64 * 1024 * 1024
    expected = hashlib.sha256((tree / "images" / "big.img").read_bytes()).hexdigest()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
    # the boot step is recorded once the body has been sent
    for _ in range(250):
        if server.steps.count(step) > steps_before:
            break
        threading.Event().wait(0.02)
    assert server.steps.count(step) == steps_before + 1


def test_big_range_from_the_middle(server: ServerThread, tree: Path) -> None:
    with open(tree / "images" / "big.img", "rb") as f:
        f.seek(30_000_000)
        expected = f.read(5_000_001)
    status, headers, body = fetch(server, "/images/big.img", "--range", "30000000-35000000")
    assert status == 206
    assert headers["content-length"] == "5000001"
    assert body == expected


def test_aborted_downloads_leave_the_server_working(server: ServerThread, tree: Path) -> None:
    # a rate-limited curl gives up after half a second, in the middle of the body
    for _ in range(3):
        result = curl(
            "--limit-rate",
            "1M",
            "--output",
            "/dev/null",
            server.url("/images/big.img"),
            timeout=0.5,
        )
        assert result.returncode == 28  # curl: operation timed out
    status, _, body = fetch(server, "/small.bin")
    assert (status, body) == (200, (tree / "small.bin").read_bytes())
