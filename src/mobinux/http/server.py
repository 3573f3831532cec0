"""The HTTP boot server: GET and HEAD of boot files over HTTP/1.1 (RFC 9110, RFC 9112).

iPXE, UEFI HTTP boot and Linux tools fetch kernels, initrds and scripts here.
The wire format is handled by the sans-I/O parser in :mod:`mobinux.http.request`
and the range arithmetic by :mod:`mobinux.http.ranges`; this module is the thin
asyncio adapter: read bytes, ask the parser for a request, ask the
:class:`~mobinux.boot.FileResolver` for the file, write the answer.

Choices worth knowing:

* Connections persist (HTTP/1.1 keep-alive: iPXE fetches kernel and initrd over
  one connection) until ``Connection: close``, an HTTP/1.0 request, an error
  that leaves the byte stream in doubt (400, 408, 414, 431, 505, 500) or
  *idle_timeout* seconds without a complete request.
* A real file is opened once and checked to be a regular file on the open
  descriptor (a FIFO or directory swapped in after the resolver looked is not
  served), then sent with ``loop.sendfile`` (``os.sendfile`` zero-copy on a
  plain socket) in 1 MiB steps, each bounded by *idle_timeout*: a client that
  stops reading is dropped instead of holding a connection slot forever (the
  price: a client slower than 1 MiB per *idle_timeout*, about 35 kB/s at the
  default 30 s, is dropped too). Generated files are written from memory.
* At most *max_connections* connections are served at once; further ones are
  answered 503 (at most *max_connections* of those at a time, beyond that they
  are reset), so a flood cannot exhaust file descriptors.
* Replies that end a connection (errors, ``Connection: close``) are followed
  by a lingering close (RFC 9112 §9.6) so unread request bytes do not turn
  into an RST that destroys the reply.
* A client that disconnects mid-transfer only ends its own connection
  (logged at DEBUG). Nothing per request is logged at INFO: a successful GET
  is reported once through *record_step*, which owns boot-step logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import BinaryIO

from mobinux.boot import FileResolver, StepRecorder
from mobinux.errors import PathRefused
from mobinux.http.ranges import (
    UNSATISFIABLE,
    ByteRange,
    RangeChoice,
    select_range,
    unsatisfied_range,
)
from mobinux.http.request import HttpError, Request, RequestParser, split_target
from mobinux.paths import normalise

__all__ = ["HttpService", "content_type_for"]

_READ_SIZE = 64 * 1024
_SEND_CHUNK = 1024 * 1024
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1024 * 1024
_ALLOW = "GET, HEAD"
_SERVER = "mobinux"
_TEXT_SUFFIXES = (".ipxe", ".cfg", ".conf", ".txt")

Headers = list[tuple[str, str]]
_Step = tuple[str | None, str]  # (mac, normalised name) of a GET, for record_step


def content_type_for(name: str) -> str:
    """``text/plain`` for iPXE scripts and boot loader configs, octet-stream otherwise.

    Text means: ``*.ipxe``, ``*.cfg`` (grub.cfg, syslinux.cfg), ``*.conf``,
    ``*.txt`` and anything inside a ``pxelinux.cfg/`` directory (pxelinux
    config names such as ``01-52-54-00-00-00-01`` have no suffix). iPXE itself
    recognises scripts by their ``#!ipxe`` line, but browsers and curl users
    see text.
    """
    lower = name.lower()
    if lower.endswith(_TEXT_SUFFIXES) or "pxelinux.cfg" in lower.split("/")[:-1]:
        return "text/plain"
    return "application/octet-stream"


@dataclass(slots=True)
class _Reply:
    """One response: status, headers and where its body comes from."""

    status: int
    headers: Headers = field(default_factory=list)
    data: bytes | memoryview = b""
    file: BinaryIO | None = None  # a body of `length` bytes from `offset` of this file
    offset: int = 0
    length: int = 0
    close: bool = False  # close the connection after this reply
    # content still to be made (awaited before sending) and its name
    later: tuple[Callable[[], Awaitable[bytes]], str] | None = None

    @property
    def body_length(self) -> int:
        """The Content-Length (also for HEAD, which sends no body)."""
        return self.length if self.file is not None else len(self.data)


class HttpService:
    """Serve the files of a :class:`~mobinux.boot.FileResolver` over HTTP/1.1.

    ``await start()`` binds *host*:*port* (port 0 picks a free port, read it
    back from :attr:`port`); ``await close()`` stops listening and ends every
    open connection.
    """

    def __init__(
        self,
        resolver: FileResolver,
        host: str = "0.0.0.0",
        port: int = 8080,
        record_step: StepRecorder | None = None,
        logger: logging.Logger | None = None,
        *,
        max_connections: int = 512,
        idle_timeout: float = 30.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self._resolver = resolver
        self._host = host
        self._port = port
        self._record_step = record_step
        self._log = logger if logger is not None else logging.getLogger("mobinux.http")
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # connections being served
        self._refusing: set[asyncio.Task[None]] = set()  # connections being told 503
        self._closing = False
        self._date_second = -1
        self._date = ""
        self.connections_accepted = 0
        """Connections accepted since start (including ones refused with 503)."""

    @property
    def port(self) -> int:
        """The bound port once started (the one the OS chose when 0 was asked)."""
        return self._port

    @property
    def active_connections(self) -> int:
        """Connections being served now (not counting ones being refused with 503)."""
        return len(self._tasks)

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("HttpService already started")
        self._closing = False
        self._server = await asyncio.start_server(
            self._on_connection, self._host, self._port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        server.close()
        tasks = [*self._tasks, *self._refusing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    # -- one connection ---------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections_accepted += 1
        busy = len(self._tasks) >= self._max_connections
        tasks = self._refusing if busy else self._tasks
        if self._closing or (busy and len(self._refusing) >= self._max_connections):
            writer.transport.abort()  # a flood: not even a 503 for this one
            return
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        peer = writer.get_extra_info("peername")
        client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        try:
            if busy:
                reply = self._error(503, close=True)
                reply.headers.append(("Retry-After", "1"))
                await self._send(writer, reply)
                linger = True
            else:
                linger = await self._serve(reader, writer, client_ip)
            await self._close(reader, writer, linger)
        except asyncio.CancelledError:
            writer.transport.abort()
            if not self._closing:
                raise
            # Cancelled by close(): end normally, because asyncio (3.11) reports a
            # cancelled client_connected_cb task as an "unhandled exception".
        except OSError as err:
            # the peer reset or stalled (TimeoutError is an OSError): its loss only
            self._log.debug("HTTP connection from %s dropped: %r", client_ip, err)
            writer.transport.abort()
        except Exception:
            self._log.exception("HTTP connection from %s failed", client_ip)
            writer.transport.abort()
        finally:
            tasks.discard(task)

    async def _close(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, linger: bool
    ) -> None:
        """Close the connection; with *linger*, first let the client read our last reply.

        Closing a socket that still has unread request bytes makes the kernel
        send RST, which can destroy the reply (a 400, 405 or 503) before the
        client reads it. So, as RFC 9112 §9.6 advises, half-close our side and
        read and discard what the client still sends, for a bounded time and
        byte count, before closing.
        """
        timeout = min(_LINGER_SECONDS, self._idle_timeout)
        if linger:
            with contextlib.suppress(OSError):  # includes TimeoutError
                async with asyncio.timeout(timeout):
                    if writer.can_write_eof():
                        writer.write_eof()
                    discarded = 0
                    while discarded < _LINGER_BYTES:
                        data = await reader.read(_READ_SIZE)
                        if not data:
                            break
                        discarded += len(data)
        writer.close()
        async with asyncio.timeout(timeout):
            await writer.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client_ip: str
    ) -> bool:
        """Answer requests until the connection should end; True to close with lingering."""
        parser = RequestParser()
        while True:
            try:
                request = await self._next_request(reader, parser)
            except HttpError as err:
                reply = self._error(err.status, close=True)
                await self._send(writer, reply)
                self._log.debug("HTTP %s bad request: %s -> %d", client_ip, err, err.status)
                return True
            if request is None:
                return False
            reply, step = self._answer(request, client_ip)
            if reply.later is not None:
                reply = await self._finish_later(request, reply)
            try:
                await self._send(writer, reply, head_only=request.method == "HEAD")
            finally:
                if reply.file is not None:
                    reply.file.close()
            self._log.debug(
                'HTTP %s "%s %s" %d %d',
                client_ip,
                request.method,
                # the query may hold a login's password: never logged
                request.target.partition("?")[0] + ("?..." if "?" in request.target else ""),
                reply.status,
                reply.body_length,
            )
            if step is not None and request.method == "GET" and reply.status in (200, 206):
                self._step(step, client_ip)
            if reply.close:
                return True

    async def _next_request(
        self, reader: asyncio.StreamReader, parser: RequestParser
    ) -> Request | None:
        """The next request on the connection; None at EOF or when it stays idle too long."""
        try:
            async with asyncio.timeout(self._idle_timeout):
                while (request := parser.next_request()) is None:
                    data = await reader.read(_READ_SIZE)
                    if not data:
                        return None
                    parser.feed(data)
                return request
        except TimeoutError:
            if parser.buffered:
                raise HttpError(408, "request head not received in time") from None
            return None

    def _step(self, step: _Step, client_ip: str) -> None:
        """Report one successful GET (after its body was sent) to the recorder."""
        if self._record_step is None:
            return
        mac, name = step
        try:
            self._record_step(mac, client_ip, f"http {name}")
        except Exception:
            self._log.exception("record_step failed for %s", name)

    # -- deciding the reply (no I/O but opening the file) ------------------

    def _answer(self, request: Request, client_ip: str) -> tuple[_Reply, _Step | None]:
        """The reply to *request*, and the boot step it is if it succeeds."""
        close = not request.keep_alive or request.has_body
        if request.method not in ("GET", "HEAD"):
            reply = self._error(405, close)
            reply.headers.append(("Allow", _ALLOW))
            return reply, None
        try:
            raw_path, query = split_target(request.target)
            name = normalise(raw_path)
            resolved = self._resolver.resolve(name, client_ip, query)
        except HttpError as err:
            return self._error(err.status, close=True), None
        except PathRefused as err:
            self._log.debug("HTTP %s refused %r: %s", client_ip, request.target, err)
            return self._error(403, close), None
        except Exception:
            self._log.exception("resolving %r failed", request.target)
            return self._error(500, close=True), None
        if resolved is None:
            return self._error(404, close), None
        step = (resolved.mac, name)
        if resolved.data is not None:
            return self._data_reply(request, resolved.data, name, close), step
        if resolved.later is not None:
            return _Reply(200, [], close=close, later=(resolved.later, name)), step
        assert resolved.path is not None
        return self._file_reply(request, resolved.path, name, close), step

    async def _finish_later(self, request: Request, pending: _Reply) -> _Reply:
        assert pending.later is not None
        make, name = pending.later
        try:
            data = await make()
        except Exception:
            self._log.exception("making %r failed", name)
            return self._error(500, close=True)
        return self._data_reply(request, data, name, pending.close)

    def _data_reply(self, request: Request, data: bytes, name: str, close: bool) -> _Reply:
        # Generated content has no validator, so an If-Range can never match.
        choice = self._choose_range(request, len(data), etag=None, last_modified=None)
        headers: Headers = [("Content-Type", content_type_for(name)), ("Accept-Ranges", "bytes")]
        if choice is UNSATISFIABLE:
            return self._unsatisfiable(len(data), close)
        if isinstance(choice, ByteRange):
            headers.append(("Content-Range", choice.content_range()))
            body = memoryview(data)[choice.start : choice.stop]
            return _Reply(206, headers, data=body, close=close)
        return _Reply(200, headers, data=data, close=close)

    def _file_reply(self, request: Request, path: Path, name: str, close: bool) -> _Reply:
        try:
            file, info = _open_regular(path)
        except FileNotFoundError:
            return self._error(404, close)
        except PermissionError:
            return self._error(403, close)
        except OSError as err:
            self._log.warning("cannot open %s: %s", path, err)
            return self._error(500, close)
        if file is None:
            return self._error(404, close)
        try:
            return self._open_file_reply(request, file, info, name, close)
        except BaseException:
            file.close()
            raise

    def _open_file_reply(
        self, request: Request, file: BinaryIO, info: os.stat_result, name: str, close: bool
    ) -> _Reply:
        size = info.st_size
        last_modified = formatdate(info.st_mtime, usegmt=True)
        # A strong validator from the inode's identity, size and mtime (ns): it
        # changes whenever an image is rewritten or replaced by rename.
        etag = f'"{info.st_ino:x}-{info.st_size:x}-{info.st_mtime_ns:x}"'
        headers: Headers = [
            ("Content-Type", content_type_for(name)),
            ("Accept-Ranges", "bytes"),
            ("Last-Modified", last_modified),
            ("ETag", etag),
        ]
        choice = self._choose_range(request, size, etag=etag, last_modified=last_modified)
        if choice is UNSATISFIABLE:
            file.close()
            return self._unsatisfiable(size, close)
        if isinstance(choice, ByteRange):
            headers.append(("Content-Range", choice.content_range()))
            return _Reply(
                206, headers, file=file, offset=choice.start, length=choice.length, close=close
            )
        return _Reply(200, headers, file=file, offset=0, length=size, close=close)

    def _choose_range(
        self, request: Request, size: int, *, etag: str | None, last_modified: str | None
    ) -> RangeChoice:
        # Range is defined for GET only (RFC 9110 §14.2); several Range fields
        # make no sense and are ignored like an invalid one.
        if request.method != "GET":
            return None
        if not _if_range_matches(request, etag, last_modified):
            return None
        return select_range(request.get("range"), size)

    def _unsatisfiable(self, size: int, close: bool) -> _Reply:
        reply = self._error(416, close)
        reply.headers.append(("Content-Range", unsatisfied_range(size)))
        reply.headers.append(("Accept-Ranges", "bytes"))
        return reply

    def _error(self, status: int, close: bool) -> _Reply:
        """An error reply with a one-line text body (HEAD gets the same head, no body)."""
        phrase = http.HTTPStatus(status).phrase
        body = f"{status} {phrase}\n".encode("ascii")
        return _Reply(status, [("Content-Type", "text/plain")], data=body, close=close)

    # -- writing -----------------------------------------------------------

    def _head(self, reply: _Reply) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second, self._date = now, formatdate(now, usegmt=True)
        phrase = http.HTTPStatus(reply.status).phrase
        lines = [
            f"HTTP/1.1 {reply.status} {phrase}",
            f"Date: {self._date}",
            f"Server: {_SERVER}",
        ]
        lines.extend(f"{name}: {value}" for name, value in reply.headers)
        lines.append(f"Content-Length: {reply.body_length}")
        if reply.close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send(
        self, writer: asyncio.StreamWriter, reply: _Reply, head_only: bool = False
    ) -> None:
        writer.write(self._head(reply))
        if head_only:
            await self._drain(writer)
        elif reply.file is not None:
            await self._send_file(writer, reply.file, reply.offset, reply.length)
        else:
            await self._send_data(writer, reply.data)

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(self._idle_timeout):
            await writer.drain()

    async def _send_data(self, writer: asyncio.StreamWriter, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for pos in range(0, len(view), _SEND_CHUNK):
            writer.write(view[pos : pos + _SEND_CHUNK])
            await self._drain(writer)
        if not view:
            await self._drain(writer)

    async def _send_file(
        self, writer: asyncio.StreamWriter, file: BinaryIO, offset: int, length: int
    ) -> None:
        loop = asyncio.get_running_loop()
        transport = writer.transport
        remaining = length
        while remaining:
            if transport.is_closing():
                # loop.sendfile would raise RuntimeError on a closing transport
                raise ConnectionResetError("peer closed the connection")
            async with asyncio.timeout(self._idle_timeout):
                sent = await loop.sendfile(transport, file, offset, min(remaining, _SEND_CHUNK))
            if sent == 0:
                # the file shrank after Content-Length was sent: only closing
                # the connection tells the client its body is incomplete
                raise OSError(f"file shrank while being sent ({remaining} bytes missing)")
            offset += sent
            remaining -= sent


def _open_regular(path: Path) -> tuple[BinaryIO | None, os.stat_result]:
    """Open *path* read-only and stat the open descriptor; (None, stat) if not a regular file.

    O_NONBLOCK keeps a FIFO swapped in after the resolver's check from blocking
    the event loop in open(2); it has no effect on regular files. Opening and
    fstat are metadata operations, done on the loop thread.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None, info
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "rb", buffering=0), info  # closed by the caller


def _if_range_matches(request: Request, etag: str | None, last_modified: str | None) -> bool:
    """Whether a Range may be honoured given If-Range (RFC 9110 §13.1.5).

    Without If-Range: yes. With an entity-tag: only a strong, exact match of our
    ETag. With an HTTP-date: only an exact match of our Last-Modified. Anything
    else (weak tag, no validator, several If-Range fields): send the full body.
    """
    values = request.values("if-range")
    if not values:
        return True
    if len(values) != 1:
        return False
    condition = values[0]
    if condition.startswith('"'):
        return etag is not None and condition == etag
    if condition.startswith("W/"):
        return False
    return last_modified is not None and condition == last_modified
