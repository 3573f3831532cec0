"""asyncio adapter for the TFTP server: :class:`TftpService`.

One listening socket receives requests; every accepted read gets its own
socket on a fresh ephemeral port (its TID, RFC 1350 §4), connected to the
client, so the kernel filters foreign TIDs and ``IP_MTU`` gives the path MTU.
Each transfer is driven by ``loop.add_reader`` on that socket: the callback
receives the ACK, feeds the sans-I/O :class:`~mobinux.tftp.session.ReadSession`
and sends the next DATA (or window) synchronously with non-blocking sends, so
no task, future or log record is created per packet. Each transfer has one
lazily re-armed ``loop.call_at`` timer for retransmissions.

In a lock-step transfer almost every datagram is the ACK of the block just
sent, and the next block already sits in the session's run buffer as a whole
DATA datagram. The callback recognises exactly that ACK by comparing its
four bytes, read in place as two halfwords, with what the session expects
(:attr:`~mobinux.tftp.session.ReadSession.expected_ack`), and then does only
``ReadSession.ack_and_next`` and one ``os.write``; everything else (duplicate,
old or future ACKs, ERROR, garbage, windows, the last block) takes the
general path. Socket I/O on that path is ``os.readv``/``os.write`` on the
descriptor: their argument handling costs a fraction of
``socket.recv_into``/``send``'s, which matters at one call of each per ACK.

Windows (RFC 7440) go out as one UDP GSO ``sendmsg`` (``UDP_SEGMENT``) when
the kernel accepts it, falling back to one ``send`` per block.

Disk reads: see :class:`FileSource`.

With ``workers=N`` the data transfer of large real files runs in worker
processes instead (:mod:`mobinux.tftp.worker`), with this same
:class:`_Transfer` code; every request decision stays here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mobinux import paths
from mobinux.boot import FileResolver, ResolvedFile, StepRecorder
from mobinux.errors import MalformedPacket, PathRefused
from mobinux.tftp.constants import (
    BLKSIZE_MAX,
    BLKSIZE_MIN,
    DATA_HEADER_LEN,
    UDP_IPV4_OVERHEAD,
    WINDOWSIZE_CAP,
    ErrorCode,
)
from mobinux.tftp.packet import Error, ReadRequest, error_bytes
from mobinux.tftp.session import (
    ACK_OPCODE_HALFWORD,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    BlockSource,
    BytesSource,
    Outcome,
    ReadSession,
    classify_request,
)

__all__ = ["FileSource", "TftpService"]

# Linux constants the socket module does not export.
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IP_MTU = getattr(socket, "IP_MTU", 14)
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
_PKTINFO = struct.Struct("=i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS on Linux < 6.9 (128 since)
_GSO_MAX_BYTES = 0xFFFF - UDP_IPV4_OVERHEAD  # one GSO super-datagram is one IP packet
_WARM_BYTES = 1 << 20  # how much a cache-miss read pulls in off the loop
_RECV_BUF = 0xFFFF
_REQUEST_BATCH = 64  # requests handled per wake-up of the listening socket
_LOG_INTERVAL = 10.0  # seconds between two log lines about dropped packets

_WORKER_MIN_SIZE = 1 << 20  # smaller files are served by the main process
_WORKER_STOP_TIMEOUT = 3.0  # seconds between SIGTERM and SIGKILL at close()
_WORKER_RESTARTS = 8  # per configured worker, over the service's lifetime

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
_IN_PROGRESS = Outcome.IN_PROGRESS
_ACK_OPCODE_HALFWORD = ACK_OPCODE_HALFWORD
_readv = os.readv
_write = os.write


class FileSource:
    """A :class:`~mobinux.tftp.session.BlockSource` over an open file.

    Reads go straight into the session's run buffer with ``os.preadv``, one
    call per run of blocks (about 32 KiB). They run on the event loop, which
    is right for boot files: they sit in the page cache (served over and
    over, and the kernel's read-ahead keeps the next blocks of a sequential
    read coming), and a page-cache ``preadv`` is a memcpy of a few
    microseconds, far cheaper than a hop to a thread and back per block.

    To keep a cold file from stalling every other transfer, reads use
    ``RWF_NOWAIT``: if the bytes are not cached the kernel refuses instead of
    blocking, :meth:`readinto` raises :class:`BlockingIOError`, and the
    adapter runs :meth:`warm` in the loop's shared executor (a few threads
    for the whole server, not one per transfer) before retrying. (No
    ``POSIX_FADV_SEQUENTIAL``: with it, RWF_NOWAIT reads of fully cached
    files came back short now and then.)
    """

    __slots__ = ("_fd", "_nowait", "miss_offset", "size")

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size
        self._nowait = _RWF_NOWAIT
        self.miss_offset = 0

    @classmethod
    def open(cls, path: Path) -> FileSource:
        """Open a regular file; raise FileNotFoundError for anything else."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a regular file", str(path))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, st.st_size)

    def readinto(self, views: Sequence[memoryview], offset: int) -> int:
        if self._nowait:
            # (views are equal-length blocks, see BlockSource.readinto).
            want = min(len(views) * len(views[0]), self.size - offset)
            try:
                n = os.preadv(self._fd, views, offset, self._nowait)
                if n < want:
                    # Short before EOF: the kernel stops at a page whose
                    # read-ahead it just started; asking again usually gets
                    # everything (measured: all of a cached file, one retry).
                    n = os.preadv(self._fd, views, offset, self._nowait)
            except BlockingIOError:
                self.miss_offset = offset
                raise
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = 0  # this file system has no RWF_NOWAIT
            else:
                if n < want:
                    self.miss_offset = offset + n
                    raise BlockingIOError(errno.EAGAIN, "not in page cache")
                return n
        return os.preadv(self._fd, views, offset)

    def warm(self) -> None:
        """Blocking: bring the bytes after the last miss into the page cache."""
        os.pread(self._fd, _WARM_BYTES, self.miss_offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _RateLimitedLog:
    """At most one log line per interval for a noisy condition, with a count."""

    __slots__ = ("_logger", "_next", "_suppressed")

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, now: float, level: int, msg: str, *args: object) -> None:
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += " (%d more since the last report)"
            args = (*args, self._suppressed)
        self._suppressed = 0
        self._next = now + _LOG_INTERVAL
        self._logger.log(level, msg, *args)


class _Transfer:
    """One read transfer: its socket, session, source and timer."""

    __slots__ = (
        "_fd",
        "_gso_anc",
        "_loop",
        "_rbufs",
        "_recorded",
        "_rhalf",
        "_rview",
        "_service",
        "_session",
        "_sock",
        "_source",
        "_time",
        "_timer",
        "_warming",
        "client",
        "closed",
        "name",
        "resolved",
    )

    def __init__(
        self,
        service: _TransferHost,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        session: ReadSession,
        source: BlockSource,
        client: tuple[str, int],
        resolved: ResolvedFile,
    ) -> None:
        self._service = service
        self._loop = loop
        self._sock = sock
        self._session = session
        self._source = source
        self.client = client
        self.resolved = resolved
        self.name = resolved.name
        self._fd = sock.fileno()
        self._rbufs = service._rbufs
        self._rview = service._rview
        self._rhalf = service._rhalf
        self._time = loop.time
        self._timer: asyncio.TimerHandle | None = None
        self._warming = False
        self._recorded = False
        self.closed = False
        stride = session.stride
        self._gso_anc: list[tuple[int, int, bytes]] | None = None
        if service._gso and session.windowsize > 1 and 2 * stride <= _GSO_MAX_BYTES:
            self._gso_anc = [(_SOL_UDP, _UDP_SEGMENT, struct.pack("=H", stride))]

    def start(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        self._flush()
        if not self.closed:
            self._arm()

    # -- hot path ---------------------------------------------------------

    def _on_readable(self) -> None:
        # Runs once per ACK, so written for speed (see the module docstring):
        # os.readv/os.write on the descriptor, buffers and views built once,
        # bound methods called from locals.
        try:
            n = _readv(self._fd, self._rbufs)
        except BlockingIOError:
            return
        except OSError as exc:
            # ECONNREFUSED: an ICMP port unreachable came back, the client
            # has gone away (its TID is closed).
            self._end(f"socket error: {exc.strerror or exc}")
            return
        session = self._session
        # The lean path of a lock-step transfer: exactly the ACK of the block
        # just sent (see ReadSession.expected_ack); the next DATA is ready.
        rhalf = self._rhalf
        if n == 4 and rhalf[1] == session.expected_ack and rhalf[0] == _ACK_OPCODE_HALFWORD:
            time = self._time
            view = session.ack_and_next(time())
            if view is not None:
                try:
                    _write(self._fd, view)
                except (BlockingIOError, InterruptedError):
                    pass  # send buffer full: dropped like a lost packet; the timer resends
                except OSError as exc:
                    if self._send_failed(exc):
                        return
                if session.read_due:
                    try:
                        session.prepare_next()
                    except BlockingIOError:
                        self._start_warm()
                return
            self._flush()
            return
        try:
            session.receive_datagram(self._rview[:n], self._loop.time())
        except MalformedPacket as exc:
            self._service._malformed(self.client, exc)
            return
        self._flush()

    def _flush(self) -> None:
        session = self._session
        try:
            burst = session.take_burst()
        except BlockingIOError:
            self._start_warm()
            return
        if burst is not None:
            view, stride = burst
            try:
                if len(view) <= stride:
                    _write(self._fd, view)
                elif self._gso_anc is not None:
                    self._send_gso(view, stride)
                else:
                    self._send_each(view, stride)
            except (BlockingIOError, InterruptedError):
                pass  # send buffer full: dropped like a lost packet; the timer resends
            except OSError as exc:
                if self._send_failed(exc):
                    return
        if session.outcome is not _IN_PROGRESS:
            self._end(None)
            return
        if not self._recorded and session.started:
            self._recorded = True
            self._service._record(self)
        # The client is now busy with what was just sent: read the next
        # window meanwhile, so its ACK is answered without a disk read.
        try:
            session.prepare_next()
        except BlockingIOError:
            self._start_warm()

    def _send_failed(self, exc: OSError) -> bool:
        """A send raised *exc* (other than EAGAIN/EINTR): end the transfer and
        return True, or return False for a mere loss (ENOBUFS) the timer repairs."""
        if isinstance(exc, ConnectionRefusedError):
            self._end("client port unreachable")
            return True
        if exc.errno == errno.ENOBUFS:  # a full queue: a loss like any other
            return False
        self._end(f"send failed: {exc.strerror or exc}")
        return True

    def _send_gso(self, view: memoryview, stride: int) -> None:
        # UDP_SEGMENT: the kernel cuts one buffer into stride-sized datagrams
        # (the last may be shorter): one syscall per window chunk.
        chunk = min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // stride) * stride
        sendmsg = self._sock.sendmsg
        anc = self._gso_anc
        for start in range(0, len(view), chunk):
            part = view[start : start + chunk]
            try:
                sendmsg([part], anc)  # type: ignore[arg-type]
            except OSError as exc:
                if exc.errno not in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                    raise  # EAGAIN, ENOBUFS, ECONNREFUSED...: not about GSO
                # EIO/EINVAL: no GSO on this route (no checksum offload, old
                # kernel). Stop trying for this service; send block by block.
                self._service._gso = False
                self._gso_anc = None
                self._send_each(view[start:], stride)
                return

    def _send_each(self, view: memoryview, stride: int) -> None:
        fd = self._fd
        for start in range(0, len(view), stride):
            _write(fd, view[start : start + stride])

    # -- timer ------------------------------------------------------------

    def _arm(self) -> None:
        when = self._session.get_timer()
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer, when)

    def _on_timer(self, when: float) -> None:
        self._timer = None
        if self.closed:
            return
        session = self._session
        if self._warming:
            # A disk read is in flight: not the client's fault, wait for it.
            self._timer = self._loop.call_at(self._time() + session.timeout, self._on_timer, 0.0)
            return
        # The loop runs timers up to its clock resolution early: it is due.
        session.handle_timer(max(self._time(), when))
        self._flush()
        if not self.closed:
            self._arm()

    # -- cold file --------------------------------------------------------

    def _start_warm(self) -> None:
        source = self._source
        if self._warming or not isinstance(source, FileSource):
            return
        self._warming = True
        fut = self._loop.run_in_executor(None, source.warm)
        fut.add_done_callback(self._warm_done)

    def _warm_done(self, fut: asyncio.Future[None]) -> None:
        self._warming = False
        exc = fut.exception() if not fut.cancelled() else None
        if self.closed:
            self._close_source()
            return
        if exc is not None and isinstance(self._source, FileSource):
            # Let the next read fail (or succeed) synchronously and report it.
            self._source._nowait = 0
        self._flush()

    # -- ending -----------------------------------------------------------

    def _end(self, why: str | None) -> None:
        if self.closed:
            return
        self.closed = True
        session = self._session
        if session.outcome is Outcome.IN_PROGRESS:
            session.abort()
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sock.close()
        if not self._warming:
            self._close_source()
        self._service._transfer_ended(self, why)

    def _close_source(self) -> None:
        if isinstance(self._source, FileSource):
            self._source.close()

    def cancel(self) -> None:
        """End silently (superseded by a new request, or shutdown)."""
        self._end("cancelled")


class _TransferHost:
    """What a :class:`_Transfer` needs from the process that runs it.

    :class:`TftpService` is one; a data-pump worker process
    (:mod:`mobinux.tftp.worker`) has its own, which reports back to the
    main process instead of calling ``record_step``.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transfers: set[_Transfer] = set()
        self._gso = True
        self._rbuf = bytearray(_RECV_BUF)
        self._rbufs = [self._rbuf]  # for os.readv
        self._rview = memoryview(self._rbuf)
        # The first four bytes of every received datagram as two native
        # halfwords, for the lean ACK path (see session.ack_halfwords).
        self._rhalf = self._rview[:4].cast("H")
        self._log_dropped = _RateLimitedLog(logger)
        self._log_failure = _RateLimitedLog(logger)

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def _malformed(self, addr: tuple[str, int], exc: Exception) -> None:
        self._log_dropped(self._now(), logging.WARNING, "TFTP: dropped malformed packet from %s: %s", addr[0], exc)

    def _record(self, transfer: _Transfer) -> None:
        raise NotImplementedError

    def _transfer_ended(self, transfer: _Transfer, why: str | None) -> None:
        self._transfers.discard(transfer)
        session = transfer._session
        outcome = session.outcome
        if outcome is Outcome.COMPLETE or outcome is Outcome.OPTIONS_REFUSED or why == "cancelled":
            # A size probe (OACK answered by ERROR 8) is routine: no noise.
            if outcome is Outcome.COMPLETE:
                self.logger.debug(
                    "tftp %s to %s:%d: %d bytes, blksize %d, window %d, %d retransmissions",
                    transfer.name, *transfer.client, session.size, session.blksize,
                    session.windowsize, session.retransmissions,
                )
            return
        if outcome is Outcome.CLIENT_ERROR and session.error is not None:
            self.logger.debug(
                "tftp %s to %s:%d: client ended with error %d %r",
                transfer.name, *transfer.client, session.error.code, session.error.message,
            )
            return
        self._log_failure(
            self._now(), logging.INFO, "tftp %s to %s:%d ended: %s after %d of %d bytes",
            transfer.name, *transfer.client, why or outcome.value, session.bytes_acked, session.size,
        )


class _Worker:
    """The main process's handle on one data-pump worker process."""

    __slots__ = ("ctl", "load", "pending", "proc")

    def __init__(self, proc: subprocess.Popen[bytes], ctl: socket.socket) -> None:
        self.proc = proc
        self.ctl = ctl
        self.load = 0  # transfers handed off and not yet reported ended
        # transfer id -> (mac, client ip, name), for record_step and the load count
        self.pending: dict[int, tuple[str | None, str, str]] = {}


def _spawn_worker(level: int) -> _Worker:
    """Start ``python -m mobinux.tftp.worker`` with one end of a SEQPACKET pair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        env = dict(os.environ)
        # The worker must import this very package, wherever it was loaded from.
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mobinux.tftp.worker", str(theirs.fileno()), str(os.getpid()), str(level)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    return _Worker(proc, ours)


class TftpService(_TransferHost):
    """Read-only TFTP server (RFC 1350, 2347, 2348, 2349, 7440) on asyncio.

    ``record_step(mac, client_ip, "tftp NAME")`` is called once per transfer,
    when its data phase starts (so a UEFI size probe, which stops after the
    OACK, is not counted as a download).

    With ``workers=N`` (N > 0), ``start()`` also starts N data-pump worker
    processes (:mod:`mobinux.tftp.worker`); every real file of at least
    ``worker_min_size`` bytes is then sent by the least-loaded worker, while
    this process keeps every decision (parsing, resolving, opening, the
    transfer socket, ``record_step``). Generated and small files, and every
    transfer when no worker is alive, are served here.
    """

    def __init__(
        self,
        resolver: FileResolver,
        host: str = "0.0.0.0",
        port: int = 69,
        record_step: StepRecorder | None = None,
        logger: logging.Logger | None = None,
        interface: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_RETRIES,
        max_windowsize: int = WINDOWSIZE_CAP,
        max_blksize: int = BLKSIZE_MAX,
        max_transfers: int = 1024,
        workers: int = 0,
        worker_min_size: int = _WORKER_MIN_SIZE,
    ) -> None:
        super().__init__(logger or logging.getLogger("mobinux.tftp"))
        self.resolver = resolver
        self.host = host
        self.port = port
        self.record_step = record_step
        self.interface = interface
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_windowsize = max_windowsize
        self.max_blksize = max_blksize
        self.max_transfers = max_transfers
        self.workers = workers
        self.worker_min_size = worker_min_size
        self._workers: list[_Worker] = []
        self._restarts_left = _WORKER_RESTARTS * workers
        self._handoff_ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._cmsg_space = socket.CMSG_SPACE(_PKTINFO.size)
        self._wildcard = host in ("0.0.0.0", "")

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Bind the server socket and start serving; ``.port`` is then the real port."""
        if self._sock is not None:
            return
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.interface:
                sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, self.interface.encode())
            # IP_PKTINFO tells which local address a request was sent to, so
            # the transfer socket answers from that same address.
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            sock.bind((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._loop = loop
        try:
            for _ in range(self.workers):
                self._add_worker(_spawn_worker(self.logger.getEffectiveLevel()))
        except BaseException:
            await self.close()
            raise
        loop.add_reader(sock.fileno(), self._on_request)

    async def close(self) -> None:
        """Stop listening and end every transfer."""
        sock, self._sock = self._sock, None
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for transfer in list(self._transfers):
            transfer.cancel()
        self._transfers.clear()
        workers, self._workers = self._workers, []
        for worker in workers:
            self._drop_worker(worker)
        await _stop_processes([w.proc for w in workers])

    @property
    def active_transfers(self) -> int:
        return len(self._transfers) + sum(w.load for w in self._workers)

    @property
    def worker_pids(self) -> list[int]:
        """The pids of the live data-pump workers."""
        return [w.proc.pid for w in self._workers]

    # -- data-pump workers --------------------------------------------------

    def _add_worker(self, worker: _Worker) -> None:
        assert self._loop is not None
        self._workers.append(worker)
        self._loop.add_reader(worker.ctl.fileno(), self._on_worker_message, worker)

    def _drop_worker(self, worker: _Worker) -> None:
        if self._loop is not None and worker.ctl.fileno() >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(worker.ctl.fileno())
        worker.ctl.close()  # EOF: the worker ends its transfers and exits
        worker.pending.clear()
        worker.load = 0

    def _worker_lost(self, worker: _Worker) -> None:
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        lost = worker.load
        self._drop_worker(worker)
        proc = worker.proc
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
        self.logger.error(
            "TFTP worker %d died (exit status %s); %d transfers lost", proc.pid, proc.returncode, lost
        )
        if self._sock is None or self._restarts_left <= 0:
            return
        self._restarts_left -= 1
        try:
            self._add_worker(_spawn_worker(self.logger.getEffectiveLevel()))
        except OSError as exc:
            self.logger.error("TFTP: cannot restart a worker: %s", exc)

    def _on_worker_message(self, worker: _Worker) -> None:
        for _ in range(256):
            try:
                msg = worker.ctl.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg = b""
            if not msg:
                self._worker_lost(worker)
                return
            kind, _, ident = msg.partition(b" ")
            try:
                tid = int(ident)
            except ValueError:
                continue
            if kind == b"s":
                job = worker.pending.get(tid)
                if job is not None:
                    self._record_step(*job)
            elif kind == b"e" and worker.pending.pop(tid, None) is not None:
                worker.load -= 1

    def _hand_off(self, request: ReadRequest, source: FileSource, sock: socket.socket,
                  addr: tuple[str, int], resolved: ResolvedFile, max_blksize: int) -> bool:
        """Give the transfer to the least-loaded worker; False to serve it here."""
        while self._workers:
            worker = min(self._workers, key=_load)
            tid = next(self._handoff_ids)
            job = {
                "id": tid, "name": resolved.name, "path": str(resolved.path), "mac": resolved.mac,
                "filename": request.filename, "mode": request.mode, "options": request.options,
                "client": addr, "max_blksize": max_blksize, "timeout": self.timeout,
                "max_retries": self.max_retries, "max_windowsize": self.max_windowsize,
            }
            try:
                socket.send_fds(worker.ctl, [json.dumps(job).encode()], [sock.fileno(), source._fd])
            except (BlockingIOError, InterruptedError):
                return False  # that worker is swamped: serve this one here
            except OSError:
                self._worker_lost(worker)  # EPIPE, ECONNRESET: it died; try another
                continue
            worker.load += 1
            worker.pending[tid] = (resolved.mac, addr[0], resolved.name)
            sock.close()
            source.close()
            return True
        return False

    # -- requests on the server port ----------------------------------------

    def _on_request(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(_REQUEST_BATCH):
            try:
                n, anc, _flags, addr = sock.recvmsg_into([self._rbuf], self._cmsg_space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # e.g. ECONNREFUSED left by an ICMP error for an earlier reply.
                continue
            local = self.host
            for level, kind, value in anc:
                if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(value) >= _PKTINFO.size:
                    local = socket.inet_ntoa(_PKTINFO.unpack_from(value)[1])
            try:
                self._handle_request(bytes(self._rview[:n]), addr, local)
            except Exception as exc:  # never let one request kill the service
                self._log_failure(
                    self._now(), logging.ERROR, "TFTP request from %s failed: %r", addr[0], exc
                )

    def _handle_request(self, data: bytes, addr: tuple[str, int], local: str) -> None:
        try:
            decision = classify_request(data)
        except MalformedPacket as exc:
            self._malformed(addr, exc)
            return
        if decision is None:
            return  # DATA/ACK/ERROR/OACK on the server port: not ours to answer
        if isinstance(decision, Error):
            self._reply_error(addr, local, decision.code, decision.message)
            return
        self._start_transfer(decision, addr, local)

    def _start_transfer(self, request: ReadRequest, addr: tuple[str, int], local: str) -> None:
        client_ip = addr[0]
        try:
            name = paths.normalise(request.filename)
            resolved = self.resolver.resolve(name, client_ip)
        except PathRefused as exc:
            self._reply_error(addr, local, ErrorCode.ACCESS_VIOLATION, f"access violation: {exc}")
            return
        except Exception as exc:  # a resolver bug must not take the server down
            self._log_failure(self._now(), logging.ERROR, "TFTP: resolving %r failed: %r", request.filename, exc)
            self._reply_error(addr, local, ErrorCode.NOT_DEFINED, "internal error")
            return
        if resolved is None:
            self._reply_error(addr, local, ErrorCode.FILE_NOT_FOUND, "file not found")
            return
        source: BlockSource
        if resolved.data is not None:
            source = BytesSource(resolved.data)
        else:
            assert resolved.path is not None
            try:
                source = FileSource.open(resolved.path)
            except FileNotFoundError:
                self._reply_error(addr, local, ErrorCode.FILE_NOT_FOUND, "file not found")
                return
            except PermissionError:
                self._reply_error(addr, local, ErrorCode.ACCESS_VIOLATION, "access violation")
                return
            except OSError as exc:
                self._reply_error(addr, local, ErrorCode.NOT_DEFINED, f"cannot open: {exc.strerror}")
                return

        # Every request gets its own transfer and TID, even a repeat from the
        # same client port (RFC 1350 §4). A retransmitted RRQ whose answer
        # crossed it thus gets a second transfer: the client keeps the first
        # TID it hears from and the other ends on its ERROR 5 or its timer
        # (what tftp-hpa does). Cancelling the older one instead would stall a
        # client that had already locked on to it.
        if self.active_transfers >= self.max_transfers:
            _close_source(source)
            self._reply_error(addr, local, ErrorCode.NOT_DEFINED, "server busy, try again")
            return
        try:
            sock, mtu = self._transfer_socket(local, addr)
        except OSError as exc:
            _close_source(source)
            self._log_failure(self._now(), logging.WARNING, "TFTP: no transfer socket: %s", exc)
            self._reply_error(addr, local, ErrorCode.NOT_DEFINED, "server busy, try again")
            return
        assert self._loop is not None
        # RFC 2348: no IP fragmentation; a block must fit the path MTU.
        max_blksize = max(BLKSIZE_MIN, min(self.max_blksize, mtu - UDP_IPV4_OVERHEAD - DATA_HEADER_LEN))
        if (
            self._workers
            and isinstance(source, FileSource)
            and source.size >= self.worker_min_size
            and self._hand_off(request, source, sock, addr, resolved, max_blksize)
        ):
            return
        session = ReadSession(
            request,
            source,
            self._loop.time(),
            max_blksize=max_blksize,
            timeout=self.timeout,
            max_retries=self.max_retries,
            max_windowsize=self.max_windowsize,
        )
        transfer = _Transfer(self, self._loop, sock, session, source, addr, resolved)
        self._transfers.add(transfer)
        transfer.start()

    def _transfer_socket(self, local: str, addr: tuple[str, int]) -> tuple[socket.socket, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.interface:
                sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, self.interface.encode())
            sock.bind((local, 0))  # a fresh ephemeral port: the server TID (RFC 1350 §4)
            sock.connect(addr)
            try:
                mtu = sock.getsockopt(socket.IPPROTO_IP, _IP_MTU)
            except OSError:
                mtu = 1500
        except BaseException:
            sock.close()
            raise
        return sock, mtu

    def _reply_error(self, addr: tuple[str, int], local: str, code: int, message: str) -> None:
        sock = self._sock
        if sock is None:
            return
        data = error_bytes(code, message)
        try:
            if self._wildcard and local not in ("0.0.0.0", ""):
                # Answer from the address the request was sent to.
                info = _PKTINFO.pack(0, socket.inet_aton(local), b"\0\0\0\0")
                sock.sendmsg([data], [(socket.IPPROTO_IP, _IP_PKTINFO, info)], 0, addr)
            else:
                sock.sendto(data, addr)
        except OSError:
            pass  # best effort: the client will retry or give up

    # -- callbacks from transfers -------------------------------------------

    def _record(self, transfer: _Transfer) -> None:
        self._record_step(transfer.resolved.mac, transfer.client[0], transfer.name)

    def _record_step(self, mac: str | None, client_ip: str, name: str) -> None:
        if self.record_step is None:
            return
        try:
            self.record_step(mac, client_ip, f"tftp {name}")
        except Exception as exc:
            self._log_failure(self._now(), logging.ERROR, "TFTP: record_step failed: %r", exc)


def _close_source(source: BlockSource) -> None:
    if isinstance(source, FileSource):
        source.close()


def _load(worker: _Worker) -> int:
    return worker.load


async def _stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, wait up to a timeout, then SIGKILL; reap them all."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _WORKER_STOP_TIMEOUT
    while any(p.poll() is None for p in procs) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
