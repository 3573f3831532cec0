"""asyncio adapter for the DHCP core: sockets, batching, group commit.

One non-blocking UDP socket per port (67, and 4011 in proxy and full mode),
bound to 0.0.0.0 and to one interface with SO_BINDTODEVICE, so requests from
other interfaces never reach us and replies (broadcasts included) leave only
through it. SO_REUSEADDR lets a second DHCP server bound to another interface
(or dnsmasq next to a proxy) share the port; SO_REUSEPORT is not used because
it would spread broadcasts between sockets.

Each wake-up of ``loop.add_reader`` drains up to ``batch`` datagrams through
the core, then hands the batch's lease changes and replies to one commit
thread. That thread writes every pending batch in one SQLite transaction
(group commit, fsync'ed: see :mod:`mobinux.dhcp.leases`) and only then sends
the replies, so no ACK leaves before its lease is on disk, and the event loop
never waits for the disk. Batches without lease changes (proxy offers, NAKs,
INFORM answers) are sent straight from the loop unless earlier replies are
still waiting, so replies keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from mobinux.boot import BootPolicy, StepRecorder
from mobinux.dhcp.constants import CLIENT_PORT, PXE_PORT, SERVER_PORT
from mobinux.dhcp.leases import Lease, LeaseStore, LeaseTable
from mobinux.dhcp.server import DhcpConfig, DhcpServerCore, Reply
from mobinux.errors import LocalError, MalformedPacket

__all__ = ["DhcpService"]

_RECV_BUF = 4096  # larger than any DHCP datagram we accept (one MTU)
# Receive buffer: room for a boot storm of ~1500 requests (the kernel doubles
# the value), yet a bounded queue: beyond it the kernel drops early and cheaply
# instead of us answering requests so old their clients have already resent.
_SO_RCVBUF = 1 << 20


class _RateLimitedLog:
    """Logs one line per kind of trouble at most every *interval* seconds, with a count."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._lock = threading.Lock()

    def note(self, kind: str, message: str, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        with self._lock:
            n = self._count.get(kind, 0) + 1
            last = self._last.get(kind)
            if last is not None and now - last < self._interval:
                self._count[kind] = n
                return
            self._last[kind] = now
            self._count[kind] = 0
        self._logger.log(level, "%s (%d in the last %.0f s)", message, n, self._interval)


class _CommitThread(threading.Thread):
    """Group commit: persist every pending batch in one transaction, then have its
    replies sent (by the event loop thread)."""

    def __init__(self, store: LeaseStore, service: DhcpService) -> None:
        super().__init__(name="mobinux-dhcp-commit", daemon=True)
        self._store = store
        self._service = service
        self._cond = threading.Condition()
        self._pending: list[tuple[list[Lease], list[Reply], socket.socket]] = []
        self._stopping = False
        self._retry: dict[int, Lease] = {}  # rows of a failed commit, written next time
        self.outstanding = 0  # batches submitted and not yet sent (read from the loop)

    def submit(self, leases: list[Lease], replies: list[Reply], sock: socket.socket) -> None:
        with self._cond:
            self._pending.append((leases, replies, sock))
            self.outstanding += 1
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending and self._stopping:
                    return
                work = self._pending
                self._pending = []
            merged = self._retry
            for leases, _, _ in work:
                for lease in leases:
                    merged[int(lease.ip)] = lease  # a later change of one address wins
            ok = True
            try:
                self._store.commit(merged.values())
                self._retry = {}
            except LocalError as e:
                # Not durable, so not acknowledged (the clients retry); the rows
                # are kept and written with the next group.
                ok = False
                self._retry = merged
                self._service._trouble.note(
                    "commit", f"DHCP lease commit failed: {e}", logging.ERROR
                )
            # Replies go out from the event loop thread: one wake-up per group
            # instead of the two threads trading the GIL around every sendto.
            self._service._sent_from_thread(work if ok else [], len(work))


class DhcpService:
    """DHCP (full or proxy) on one interface, driven by the running asyncio loop."""

    def __init__(
        self,
        config: DhcpConfig,
        interface: str,
        policy: BootPolicy,
        lease_db: Path,
        record_step: StepRecorder,
        logger: logging.Logger | None = None,
        *,
        server_port: int = SERVER_PORT,
        proxy_port: int = PXE_PORT,
        client_port: int = CLIENT_PORT,
        batch: int = 256,
        log_interval: float = 10.0,
    ) -> None:
        self.config = config
        self.interface = interface
        self.policy = policy
        self.lease_db = Path(lease_db)
        self.record_step = record_step
        self.logger = logger or logging.getLogger("mobinux.dhcp")
        self.server_port = server_port
        self.proxy_port = proxy_port
        self.client_port = client_port
        self.batch = batch
        self._trouble = _RateLimitedLog(self.logger, log_interval)
        self._sockets: list[tuple[socket.socket, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: LeaseStore | None = None
        self._committer: _CommitThread | None = None
        self._buf = bytearray(_RECV_BUF)
        self._view = memoryview(self._buf)
        self.leases: LeaseTable | None = None
        self.core: DhcpServerCore | None = None
        #: counters for tests and ``mobinux status``
        self.stats = {"received": 0, "malformed": 0, "errors": 0, "sent": 0, "send_errors": 0}

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(address, port) of every bound socket."""
        out = []
        for sock, _ in self._sockets:
            host, port = sock.getsockname()[:2]
            out.append((str(host), int(port)))
        return out

    async def start(self) -> None:
        if self.config.mode == "off" or self._sockets:
            return
        self._loop = asyncio.get_running_loop()
        store = await asyncio.to_thread(LeaseStore, self.lease_db)
        try:
            loaded = await asyncio.to_thread(store.load)
            self.leases = LeaseTable(self.config.pool_first, self.config.pool_last, loaded)
            self.core = DhcpServerCore(
                self.config,
                self.policy,
                self.leases,
                self.record_step,
                server_port=self.server_port,
                client_port=self.client_port,
                proxy_port=self.proxy_port,
            )
            for port in (self.server_port, self.proxy_port):
                self._sockets.append((self._bind(port), port))
        except BaseException:
            for sock, _ in self._sockets:
                sock.close()
            self._sockets.clear()
            store.close()
            raise
        self._store = store
        self._committer = _CommitThread(store, self)
        self._committer.start()
        for sock, port in self._sockets:
            self._loop.add_reader(sock.fileno(), self._on_readable, sock, port)
        self.logger.info(
            "DHCP %s mode on %s, ports %s",
            self.config.mode,
            self.interface,
            ", ".join(str(p) for _, p in self._sockets),
        )

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            with contextlib.suppress(OSError):  # a smaller buffer only costs drops in bursts
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SO_RCVBUF)
            sock.setblocking(False)
            sock.bind(("0.0.0.0", port))
        except OSError as e:
            sock.close()
            raise LocalError(
                f"cannot listen for DHCP on {self.interface} port {port}: {e.strerror or e}"
            ) from e
        return sock

    async def close(self) -> None:
        if self._loop is not None:
            for sock, _ in self._sockets:
                self._loop.remove_reader(sock.fileno())
        if self._committer is not None:
            self._committer.stop()
            await asyncio.to_thread(self._committer.join)
            self._committer = None
        for sock, _ in self._sockets:
            sock.close()
        self._sockets.clear()
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- hot path ----------------------------------------------------------------

    def _on_readable(self, sock: socket.socket, port: int) -> None:
        core = self.core
        leases = self.leases
        committer = self._committer
        if core is None or leases is None or committer is None:
            return
        now = time.time()
        handle = core.handle
        buf = self._buf
        view = self._view
        replies: list[Reply] = []
        count = 0
        for _ in range(self.batch):
            try:
                n, addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._trouble.note("recv", f"DHCP receive error on {self.interface}: {e}")
                break
            count += 1
            try:
                out = handle(bytes(view[:n]), port, addr, now)
            except MalformedPacket as e:
                self.stats["malformed"] += 1
                self._trouble.note(
                    "malformed", f"dropped malformed DHCP packet from {addr[0]}: {e}"
                )
                continue
            except Exception:
                # A bug must cost one packet, never the service.
                self.stats["errors"] += 1
                self._trouble.note(
                    "bug", f"error handling DHCP packet from {addr[0]}", logging.ERROR
                )
                self.logger.debug("DHCP handler error", exc_info=True)
                continue
            if out:
                replies.extend(out)
        self.stats["received"] += count
        dirty = leases.take_dirty()
        if dirty or (replies and committer.outstanding):
            committer.submit(dirty, replies, sock)
        elif replies:
            self._send(sock, replies)

    def _sent_from_thread(
        self, work: list[tuple[list[Lease], list[Reply], socket.socket]], count: int
    ) -> None:
        """Called by the commit thread once *work* is durable (empty: commit failed)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed under us: nobody to send to
            loop.call_soon_threadsafe(self._send_committed, work, count)

    def _send_committed(
        self, work: list[tuple[list[Lease], list[Reply], socket.socket]], count: int
    ) -> None:
        for _, replies, sock in work:
            if sock.fileno() >= 0:
                self._send(sock, replies)
        if self._committer is not None:
            self._committer.outstanding -= count

    def _send(self, sock: socket.socket, replies: Sequence[Reply]) -> None:
        """Send replies; a failed send is counted and logged (rate-limited), never raised."""
        for reply in replies:
            try:
                sock.sendto(reply.data, reply.dest)
                self.stats["sent"] += 1
            except OSError as e:
                # ENETUNREACH/EHOSTUNREACH (no route on this interface), EPERM
                # (firewall), EAGAIN (send buffer full): drop, the client retries.
                self.stats["send_errors"] += 1
                name = errno.errorcode.get(e.errno or 0, str(e.errno))
                self._trouble.note(
                    f"send-{name}",
                    f"cannot send DHCP reply to {reply.dest[0]}:{reply.dest[1]}: {name}",
                )
