"""The asyncio side of the iSCSI target: sockets, threads and timers around the sans-I/O core.

:class:`IscsiService` listens on one TCP port. Each accepted connection gets
an :class:`~mobinux.iscsi.connection.IscsiConnection` (the protocol) fed from
the socket; this module only carries bytes and runs SCSI commands:

* Bytes are received into one buffer shared by all connections
  (``BufferedProtocol``: the loop is single-threaded and the core copies what
  it keeps), not into a fresh 256 KiB ``bytes`` per ``recv`` as
  ``Protocol.data_received`` does, which cost an mmap/munmap pair per recv.
* A command the SCSI layer calls a *nowait candidate* (plain READ/WRITE
  without FUA) runs inline on the event loop with ``nowait=True``, which
  costs no thread hop: a read served from the page cache, a write the storage
  admits as a plain page-cache copy (``storage.file.InlineWriteGate``: well
  below the kernel's dirty-page throttling, edge pages cached, no recent slow
  write). When the storage would block it raises ``WouldBlock`` and the
  command is re-run in the I/O thread pool. Other commands that touch the
  media always run in the pool (``io_threads`` threads shared by all
  connections); the rest (INQUIRY, MODE SENSE, ...) run inline. Nothing waits
  for a disk on the event loop.

  Why not a thread per command: on a 2-core VM a hop to a pool thread and back
  (two cross-thread wake-ups) cost ~300 us per 4 KiB write, more than the
  rest of the command; writes at queue depth 1 ran at 2,000/s with it and
  5,000+/s inline (ext4 refuses ``RWF_NOWAIT`` for buffered writes, so the
  kernel cannot make that choice for us). Batching the pool's work per
  connection was not done: with inline writes the pool only sees commands
  that wait for the disk anyway (flushes, FUA, cache misses, throttled
  writes), where a hop is small next to the wait and one job per batch would
  queue those waits one behind the other.
* Inline reads fill buffers from a shared pool of power-of-two sizes (a fresh
  zero-filled 1 MiB bytearray per 4 KiB read cost 20x the IOPS at queue depth
  32), and all Data-In of one batch of commands goes out with one write. A
  buffer goes back to the pool only when the transport kept no reference to
  it (Python 3.12+ ``writelines`` may hold memoryviews of unsent data).
* A READ longer than 1 MiB (old iPXE reads whole files in one command) runs
  as the SCSI layer's pieces (``ScsiTarget.split_read``), each read into a
  pooled 1 MiB buffer and sent before the next is read, waiting while the
  transport is above its high-water mark (:class:`_StreamedRead`): memory per
  command stays at one piece whatever the transfer length.
* Reading from a socket pauses while the peer does not drain our writes
  (``pause_writing``, high-water mark 8 MiB: a few large bursts) or while too
  many of its commands are running (``4 * io_threads``). Commands the window
  admits keep queueing in the kernel's socket buffer meanwhile. What the core
  buffers of Data-Out is bounded by its write budget (R2Ts wait for room).
* Every few seconds a tick lets each connection ping an idle initiator
  (NOP-In) and end logins that never finish.
* Sessions live in a :class:`~mobinux.iscsi.session.SessionRegistry`: a login
  that reinstates a session (§6.3.5) closes the old connection first, and the
  SCSI layer hears of every nexus that ends (``nexus_lost``), since at
  ErrorRecoveryLevel 0 with DefaultTime2Retain 0 a dropped connection ends its
  session.

Log lines: one per login (initiator, target, peer, session type) and one per
session end with the reason. Nothing per PDU, no secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from mobinux.iscsi.connection import (
    Closed,
    IscsiConnection,
    LoggedIn,
    Task,
    fixed_sense,
)
from mobinux.iscsi.login import Login
from mobinux.iscsi.params import SessionParams, SessionType, TargetDirectory, TargetLimits
from mobinux.iscsi.session import Session, SessionRegistry
from mobinux.storage.device import WouldBlock

if TYPE_CHECKING:
    from mobinux.scsi import ScsiResult, ScsiTarget

__all__ = ["Exports", "IscsiService", "SessionInfo"]

_CHECK_CONDITION = 0x02
# HARDWARE ERROR / INTERNAL TARGET FAILURE (SPC-4 Annex D): a bug below us, never the initiator's fault.
_SENSE_INTERNAL_FAILURE = fixed_sense(0x04, 0x44, 0x00)
# Python 3.12 made writelines keep references to unsent buffers instead of joining them.
_WRITELINES_COPIES = sys.version_info < (3, 12)
# Read buffers come in power-of-two sizes from 64 KiB to 1 MiB; each size keeps at most
# 2 MiB of idle buffers. A fresh bytearray is zero-filled page by page, which costs more
# than the read itself for a small command, so one sized to the read is what matters.
_WRITE_HIGH_WATER = 8 * 1024 * 1024
_SMALLEST_BUFFER = 64 * 1024
_LARGEST_BUFFER = 1024 * 1024
_IDLE_BYTES_PER_SIZE = 8 * 1024 * 1024
# Every connection receives into one shared buffer (the loop is single-threaded and the core
# copies what it keeps): no 256 KiB allocation per recv, as with Protocol.data_received.
_RECEIVE_BUFFER = 256 * 1024
# A READ longer than this runs as pieces of this size (ScsiTarget.split_read), each sent before
# the next is read: the largest pooled buffer, and the OPTIMAL TRANSFER LENGTH the LU advertises.
_PIECE_BYTES = _LARGEST_BUFFER
_PIECE_BLOCKS = _PIECE_BYTES // 512
_GOOD = 0x00


class Exports(TargetDirectory, Protocol):
    """What the service exports: the directory login and discovery read, plus each target's SCSI side."""

    def scsi_target(self, iqn: str) -> ScsiTarget | None: ...


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    initiator: str
    target: str
    isid: str
    tsih: int
    peer: str
    since: float  # time.time() at login
    session_type: str


class IscsiService:
    """An iSCSI target portal: ``await start()``, ``await stop()``."""

    def __init__(
        self,
        exports: Exports,
        *,
        host: str,
        port: int,
        limits: TargetLimits = TargetLimits(),  # noqa: B008 - frozen dataclass, safe as a default
        tpgt: int = 1,
        io_threads: int = 4,
        tick_interval: float = 15.0,
        max_connections: int = 1024,
        logger: logging.Logger | None = None,
    ) -> None:
        self.exports = exports
        self.host = host
        self.limits = limits
        self.tpgt = tpgt
        self.tick_interval = tick_interval
        self.max_connections = max_connections
        self.log = logger if logger is not None else logging.getLogger("mobinux.iscsi")
        self.registry = SessionRegistry()
        self.max_running = max(8, 4 * io_threads)
        self._requested_port = port
        self._io_threads = max(1, io_threads)
        self._executor: ThreadPoolExecutor | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_IscsiProtocol] = set()
        self._inflight: set[asyncio.Future[ScsiResult]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._buffers: dict[int, list[bytearray]] = {}
        self.receive_buffer = memoryview(bytearray(_RECEIVE_BUFFER))
        self._refused = 0
        self._refused_logged = -1e9

    # ------------------------------------------------------------------ public API

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(self._io_threads, thread_name_prefix="iscsi-io")
        self._server = await loop.create_server(
            lambda: _IscsiProtocol(self), self.host, self._requested_port, reuse_address=True
        )
        self._requested_port = int(self._server.sockets[0].getsockname()[1])
        self._timer = loop.call_later(self.tick_interval, self._tick)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._connections):
            conn.shut("service stopping")
        if self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        # Let the transports deliver connection_lost before the loop goes away.
        await asyncio.sleep(0)

    @property
    def port(self) -> int:
        """The port listened on (the ephemeral one chosen when *port* was 0), once started."""
        return self._requested_port

    def sessions(self) -> list[SessionInfo]:
        return [
            SessionInfo(
                initiator=s.params.initiator_name,
                target=s.params.target_name,
                isid=s.params.isid.hex(),
                tsih=s.params.tsih,
                peer=s.peer,
                since=s.since,
                session_type=str(s.params.session_type),
            )
            for s in self.registry
        ]

    def target_alive(self, target_iqn: str) -> bool:
        """Whether some initiator logged in to *target_iqn* was heard from within the last
        tick or two. A machine switched off never logs out, but it stops talking: a Linux
        initiator sends NOP-Outs every few seconds and answers our NOP-Ins."""
        return any(s.heard is None or s.heard() for s in self.registry.for_target(target_iqn))

    def close_sessions(self, target_iqn: str, *, reason: str = "closed by the server") -> int:
        """Drop every session logged in to *target_iqn*; returns how many."""
        sessions = self.registry.for_target(target_iqn)
        for session in sessions:
            self.registry.remove(session)
            session.close(reason)
        return len(sessions)

    # ------------------------------------------------------------------ internals

    def _tick(self) -> None:
        for conn in list(self._connections):
            conn.tick()
        if self._server is not None:
            self._timer = asyncio.get_running_loop().call_later(self.tick_interval, self._tick)

    def refused_connection(self, peer: str) -> None:
        """Log refusals at most once per tick interval (a flood must not flood the log)."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= self.tick_interval:
            self.log.warning(
                "iSCSI: %d connection(s) refused (last from %s): %d connections open",
                self._refused,
                peer,
                len(self._connections),
            )
            self._refused = 0
            self._refused_logged = now

    def take_buffer(self, length: int) -> bytearray | None:
        """A buffer of at least *length* bytes for an inline read (None: let the SCSI layer allocate)."""
        if length > _LARGEST_BUFFER:
            return None
        size = max(_SMALLEST_BUFFER, 1 << (length - 1).bit_length())
        idle = self._buffers.get(size)
        return idle.pop() if idle else bytearray(size)

    def give_buffers(self, buffers: list[bytearray]) -> None:
        for buffer in buffers:
            idle = self._buffers.setdefault(len(buffer), [])
            if (len(idle) + 1) * len(buffer) <= _IDLE_BYTES_PER_SIZE:
                idle.append(buffer)


class _IscsiProtocol(asyncio.BufferedProtocol):
    """One TCP connection: feeds the core, runs its tasks, writes its output."""

    def __init__(self, service: IscsiService) -> None:
        self.service = service
        self.transport: asyncio.Transport | None = None
        self.core: IscsiConnection | None = None
        self.peer = "?"
        self.scsi: ScsiTarget | None = None
        self.session: Session | None = None
        self.nexus = ""
        self.login: Login | None = None
        self._lent: list[bytearray] = []
        self._drained: list[Callable[[], None]] = []  # streamed reads waiting for resume_writing
        self._write_paused = False
        self._read_paused = False
        self._gone = False

    # asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        service = self.service
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # asyncio's default high-water mark (64 KiB) is below one large Data-In burst: reading
        # would stop after every big read. Pause only when a few bursts are queued unsent.
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER, low=_WRITE_HIGH_WATER // 4)
        self.peer = _address(transport.get_extra_info("peername"))
        if len(service._connections) >= service.max_connections:
            # A flood of connections (each may sit in login for a while) cannot exhaust
            # file descriptors: beyond the limit, new ones are closed at once.
            service.refused_connection(self.peer)
            self._gone = True
            transport.abort()
            return
        local = _address(transport.get_extra_info("sockname"))
        login = Login(
            service.exports,
            service.limits,
            tpgt=service.tpgt,
            new_tsih=service.registry.allocate_tsih,
            random_bytes=os.urandom,
            portal_address=local,
            session_exists=service.registry.exists,
        )
        self.login = login
        self.core = IscsiConnection(login, service.exports, service.limits)
        service._connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.service.receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        core = self.core
        if core is None:
            return
        core.receive_data(self.service.receive_buffer[:nbytes])
        self._pump()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        core = self.core
        if core is None:
            return  # refused in connection_made
        if core is not None:
            core.connection_lost()
            while core.next_event() is not None:
                pass
            core.data_to_send()
        self.service._connections.discard(self)
        self._lent.clear()
        self._drained.clear()
        self._end_session(core.close_reason if core is not None else None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        drained, self._drained = self._drained, []
        if drained:
            # Not from inside the transport's write callback: on the next loop iteration.
            loop = asyncio.get_running_loop()
            for step in drained:
                loop.call_soon(step)

    # service hooks ------------------------------------------------------

    def tick(self) -> None:
        if self.core is not None and not self._gone:
            self.core.tick()
            self._pump()

    def shut(self, reason: str) -> None:
        """Close from our side right away (service stop, session reinstated or dropped)."""
        if self.core is not None:
            self.core.close(reason)
            while self.core.next_event() is not None:
                pass
            self.core.data_to_send()
        if self.transport is not None and not self._gone:
            self.transport.abort()

    # the pump -----------------------------------------------------------

    def _pump(self) -> None:
        core = self.core
        transport = self.transport
        if core is None or transport is None or self._gone:
            return
        while (event := core.next_event()) is not None:
            if type(event) is Task:
                self._run(event)
            elif type(event) is LoggedIn:
                self._logged_in(event.params)
            elif type(event) is Closed:
                self._closing(event)
        out = core.data_to_send()
        if out and not transport.is_closing():
            if _WRITELINES_COPIES:
                # What writelines does before 3.12, without its extra call.
                transport.write(out[0] if len(out) == 1 else b"".join(out))
            else:
                transport.writelines(out)
        if self._lent:
            if _WRITELINES_COPIES or not transport.get_write_buffer_size():
                self.service.give_buffers(self._lent)
            self._lent = []
        if core.closed:
            if not transport.is_closing():
                transport.close()
        else:
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        core = self.core
        if transport is None or core is None or self._gone or transport.is_closing():
            return
        pause = self._write_paused or core.running >= self.service.max_running
        if pause != self._read_paused:
            self._read_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _logged_in(self, params: SessionParams) -> None:
        core = self.core
        assert core is not None
        service = self.service
        scsi: ScsiTarget | None = None
        if params.session_type == SessionType.NORMAL:
            scsi = service.exports.scsi_target(params.target_name)
            if scsi is None:
                core.close(f"target {params.target_name} is no longer exported")
                return
        self.scsi = scsi
        self.nexus = params.nexus
        on_end = (
            None
            if scsi is None
            else functools.partial(_nexus_lost, scsi, params.nexus, service.log)
        )
        session = Session(params, self.peer, time.time(), self._closed_by_registry, on_end,
                          heard=lambda: core.idle_ticks == 0)
        self.session = session
        service.registry.add(session)
        core.attach(scsi)
        self.login = None
        service.log.info(
            "iSCSI login: initiator %s, target %s, peer %s, %s session (TSIH %d)",
            params.initiator_name,
            params.target_name or "-",
            self.peer,
            params.session_type,
            params.tsih,
        )

    def _closed_by_registry(self, reason: str) -> None:
        self.shut(reason)

    def _closing(self, event: Closed) -> None:
        if event.cold_reset and self.session is not None:
            # §11.5.1: a cold reset drops every connection to the target, not only this one.
            target = self.session.params.target_name
            for other in self.service.registry.for_target(target):
                if other is not self.session:
                    self.service.registry.remove(other)
                    other.close("target cold reset by another initiator")

    def _end_session(self, reason: str | None) -> None:
        session, self.session = self.session, None
        log = self.service.log
        if session is None:
            failure = self.login.failure if self.login is not None else None
            log.info(
                "iSCSI connection from %s ended without a session: %s",
                self.peer,
                f"login refused: {failure}" if failure else reason or "closed",
            )
            return
        self.service.registry.remove(session)
        p = session.params
        log.info(
            "iSCSI session end: initiator %s, target %s, peer %s, TSIH %d: %s",
            p.initiator_name,
            p.target_name or "-",
            self.peer,
            p.tsih,
            reason or "connection closed",
        )

    # running SCSI commands ------------------------------------------------

    def _run(self, task: Task) -> None:
        core = self.core
        scsi = self.scsi
        assert core is not None
        if not core.start(task):
            return
        if scsi is None:  # cannot happen: discovery sessions carry no SCSI commands
            core.complete(task, _CHECK_CONDITION, b"", _SENSE_INTERNAL_FAILURE)
            return
        cdb = task.cdb
        if task.read and not task.write and _read_blocks(cdb) > _PIECE_BLOCKS:
            try:
                pieces = scsi.split_read(task.lun, cdb, _PIECE_BLOCKS)
            except Exception:
                self.service.log.exception("split_read failed inside the target")
                pieces = None
            if pieces is not None:
                _StreamedRead(self, scsi, task, pieces).step()
                return
        try:
            if scsi.is_nowait_candidate(cdb):
                buffer = self.service.take_buffer(task.read_len) if task.read else None
                try:
                    result = scsi.execute(
                        task.lun, cdb, task.data_out, self.nexus, nowait=True, buffer=buffer
                    )
                except WouldBlock:
                    if buffer is not None:
                        self.service.give_buffers([buffer])
                    self._in_thread(scsi, task)
                    return
                if buffer is not None:
                    self._lent.append(buffer)
                    if not task.write:  # a plain read: no Data-Out residual to work out
                        core.complete(task, result.status, result.data, result.sense)
                        return
            elif scsi.touches_media(cdb):
                self._in_thread(scsi, task)
                return
            else:
                result = scsi.execute(task.lun, cdb, task.data_out, self.nexus)
        except Exception:
            self.service.log.exception("SCSI command 0x%02x failed inside the target", cdb[0])
            core.complete(task, _CHECK_CONDITION, b"", _SENSE_INTERNAL_FAILURE)
            return
        self._complete(scsi, task, result)

    def _complete(self, scsi: ScsiTarget, task: Task, result: ScsiResult) -> None:
        assert self.core is not None
        used = scsi.data_out_length(task.cdb) if task.write or not task.read else None
        self.core.complete(task, result.status, result.data, result.sense, data_out_used=used)

    def _in_thread(self, scsi: ScsiTarget, task: Task) -> None:
        call = functools.partial(scsi.execute, task.lun, task.cdb, task.data_out, self.nexus)
        self.submit(call, functools.partial(self._thread_done, task))

    def submit(
        self,
        call: Callable[[], ScsiResult],
        done: Callable[[ScsiResult | None], None],
    ) -> None:
        """Run *call* in the I/O threads; *done* gets its result (None: it failed) on the loop."""
        service = self.service
        executor = service._executor
        if executor is None:
            assert self.core is not None
            self.core.close("service stopping")
            return
        future = asyncio.get_running_loop().run_in_executor(executor, call)
        service._inflight.add(future)
        future.add_done_callback(functools.partial(self._future_done, done))

    def _future_done(
        self, done: Callable[[ScsiResult | None], None], future: asyncio.Future[ScsiResult]
    ) -> None:
        self.service._inflight.discard(future)
        result: ScsiResult | None = None
        if not future.cancelled():
            if (exc := future.exception()) is not None:
                self.service.log.error("SCSI command failed inside the target: %r", exc)
            else:
                result = future.result()
        done(result)

    def _thread_done(self, task: Task, result: ScsiResult | None) -> None:
        core = self.core
        if core is None or self._gone:
            return
        if result is None:
            core.complete(task, _CHECK_CONDITION, b"", _SENSE_INTERNAL_FAILURE)
        elif self.scsi is not None:
            self._complete(self.scsi, task, result)
        self._pump()


class _StreamedRead:
    """A READ longer than one piece, run as the SCSI layer's pieces and sent piece by piece.

    Old iPXE reads a whole file in one READ (28,000 blocks for a 14 MB
    kernel), ignoring Block Limits; one buffer per such command, times the
    commands a connection may run, would be a lot of memory. ``split_read``
    cuts the READ into READ(16)s of at most 1 MiB over consecutive LBAs and
    documents why running them in order is the same command. Each piece is
    tried inline (page cache) and otherwise in a thread, into a pooled
    buffer; its Data-In goes out (``IscsiConnection.send_data``) before the
    next piece is read, and while the transport is above its high-water mark
    the next piece waits for ``resume_writing``. The last piece, or the first
    one that fails, completes the command with its status.
    """

    __slots__ = ("conn", "index", "pieces", "scsi", "task")

    def __init__(
        self, conn: _IscsiProtocol, scsi: ScsiTarget, task: Task, pieces: list[bytes]
    ) -> None:
        self.conn = conn
        self.scsi = scsi
        self.task = task
        self.pieces = pieces
        self.index = 0

    def _alive(self) -> bool:
        conn = self.conn
        return not conn._gone and conn.core is not None and not conn.core.closed

    def step(self) -> None:
        """Read the next piece."""
        if not self._alive():
            return
        conn = self.conn
        task = self.task
        if task.aborted:
            self._finish(None)
            return
        service = conn.service
        cdb = self.pieces[self.index]
        continued = self.index > 0
        buffer = service.take_buffer(_PIECE_BYTES)
        try:
            result = self.scsi.execute(
                task.lun, cdb, None, conn.nexus, nowait=True, buffer=buffer, continued=continued
            )
        except WouldBlock:
            call = functools.partial(
                self.scsi.execute, task.lun, cdb, None, conn.nexus,
                buffer=buffer, continued=continued,
            )  # fmt: skip
            conn.submit(call, functools.partial(self._piece_done, buffer))
            return
        except Exception:
            service.log.exception("SCSI READ piece failed inside the target")
            result = None
        self._piece_done(buffer, result)

    def _piece_done(self, buffer: bytearray | None, result: ScsiResult | None) -> None:
        conn = self.conn
        if buffer is not None:
            # The transport may still reference the data (Python 3.12+): _pump decides.
            conn._lent.append(buffer)
        if not self._alive():
            return
        core = conn.core
        assert core is not None
        task = self.task
        if task.aborted or result is None or result.status != _GOOD:
            self._finish(result)
            return
        if self.index == len(self.pieces) - 1:
            self._finish(result)
            return
        core.send_data(task, result.data)
        self.index += 1
        conn._pump()
        if conn._write_paused:
            conn._drained.append(self.step)
        else:
            # Let other connections' events in between pieces.
            asyncio.get_running_loop().call_soon(self.step)

    def _finish(self, result: ScsiResult | None) -> None:
        conn = self.conn
        core = conn.core
        assert core is not None
        task = self.task
        if task.aborted:
            core.complete(task, _GOOD)  # ends it unanswered (the TMF waits for this)
        elif result is None:
            core.complete(task, _CHECK_CONDITION, b"", _SENSE_INTERNAL_FAILURE)
        else:
            core.complete(task, result.status, result.data, result.sense)
        conn._pump()


def _read_blocks(cdb: bytes) -> int:
    """TRANSFER LENGTH of a READ(10/12/16) CDB (SBC-3 5.16-5.18); 0 for anything else.

    READ(6) moves at most 256 blocks and is never split.
    """
    op = cdb[0]
    if op == 0x28 and len(cdb) >= 10:
        return (cdb[7] << 8) | cdb[8]
    if op == 0xA8 and len(cdb) >= 12:
        return int.from_bytes(cdb[6:10], "big")
    if op == 0x88 and len(cdb) >= 16:
        return int.from_bytes(cdb[10:14], "big")
    return 0


def _nexus_lost(scsi: ScsiTarget, nexus: str, log: logging.Logger) -> None:
    try:
        scsi.nexus_lost(nexus)
    except Exception:
        log.exception("SCSI nexus_lost failed for %s", nexus)


def _address(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{addr[1]}"
    return str(addr or "?")
