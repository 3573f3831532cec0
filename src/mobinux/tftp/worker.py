"""A TFTP data-pump worker process: ``python -m mobinux.tftp.worker CTL_FD PARENT_PID LOG_LEVEL``.

The main process (:class:`~mobinux.tftp.aio.TftpService` with ``workers=N``)
makes every request decision: it parses the RRQ, resolves the file, opens
it, creates the connected per-transfer socket (the server TID) and works out
the largest block size the path allows. For a large real file it then hands
the transfer to a worker: one ``SOCK_SEQPACKET`` message on the worker's
control socket carrying the socket and file descriptors (``SCM_RIGHTS``) and
a small JSON object (the request's name, mode and options, the client's
address and the session limits). The worker runs the very same
:class:`~mobinux.tftp.aio._Transfer` / :class:`~mobinux.tftp.session.ReadSession`
machinery on its own asyncio loop (OACK, windows, GSO, RWF_NOWAIT reads,
timers) and answers on the control socket with two short messages per
transfer: ``s ID`` when the data phase starts (the main process then calls
``record_step``, as it would for a transfer of its own) and ``e ID`` when it
ends (the main process's per-worker load count).

A worker runs its loop on uvloop when it is installed (:func:`new_event_loop`):
a worker's work is almost only the per-ACK callback of lock-step transfers,
and uvloop's dispatch of a ready socket to its callback costs a fraction of
asyncio's ``selectors``-based one in Python (measured: about half the
worker's CPU instructions per ACK at blksize 512). Plain asyncio is the
fallback when uvloop cannot be imported.

A worker exits on EOF on its control socket (the main process closed it or
died), on SIGTERM, and, through ``PR_SET_PDEATHSIG``, when its parent dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from mobinux.boot import ResolvedFile
from mobinux.tftp.aio import FileSource, _Transfer, _TransferHost
from mobinux.tftp.packet import ReadRequest
from mobinux.tftp.session import ReadSession

__all__ = ["CONTROL_MESSAGE_MAX", "main", "new_event_loop"]

CONTROL_MESSAGE_MAX = 16384  # a handoff message: a file name, a few options, numbers
_PR_SET_PDEATHSIG = 1


class _WorkerHost(_TransferHost):
    """Runs handed-off transfers and reports their start and end."""

    def __init__(self, logger: logging.Logger, ctl: socket.socket, stop: asyncio.Event) -> None:
        super().__init__(logger)
        self._ctl = ctl
        self._stop = stop
        self._ids: dict[_Transfer, int] = {}

    def _tell(self, message: bytes) -> None:
        # OSError: the main process is going away (or its queue is full): only bookkeeping is lost.
        with contextlib.suppress(OSError):
            self._ctl.send(message)

    def _record(self, transfer: _Transfer) -> None:
        tid = self._ids.get(transfer)
        if tid is not None:
            self._tell(b"s %d" % tid)

    def _transfer_ended(self, transfer: _Transfer, why: str | None) -> None:
        super()._transfer_ended(transfer, why)
        tid = self._ids.pop(transfer, None)
        if tid is not None:
            self._tell(b"e %d" % tid)

    def on_control(self) -> None:
        for _ in range(64):
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self._ctl, CONTROL_MESSAGE_MAX, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg:
                for fd in fds:
                    os.close(fd)
                self._stop.set()  # EOF: the main process closed us or died
                return
            try:
                self._start(msg, fds)
            except Exception as exc:  # one bad handoff must not end the worker
                self._log_failure(self._now(), logging.ERROR, "TFTP worker: handoff failed: %r", exc)

    def _start(self, msg: bytes, fds: list[int]) -> None:
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"handoff with {len(fds)} descriptors")
        try:
            job = json.loads(msg)
            sock = socket.socket(fileno=fds[0])
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        source = FileSource(fds[1], os.fstat(fds[1]).st_size)
        try:
            sock.setblocking(False)
            loop = self._loop
            assert loop is not None
            request = ReadRequest(job["filename"], job["mode"], tuple((k, v) for k, v in job["options"]))
            session = ReadSession(
                request,
                source,
                loop.time(),
                max_blksize=job["max_blksize"],
                timeout=job["timeout"],
                max_retries=job["max_retries"],
                max_windowsize=job["max_windowsize"],
            )
            client = (job["client"][0], job["client"][1])
            resolved = ResolvedFile(job["name"], path=Path(job["path"]), mac=job.get("mac"))
        except BaseException:
            sock.close()
            source.close()
            raise
        transfer = _Transfer(self, loop, sock, session, source, client, resolved)
        self._transfers.add(transfer)
        self._ids[transfer] = int(job["id"])
        transfer.start()


async def _serve(ctl_fd: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    ctl = socket.socket(fileno=ctl_fd)
    ctl.setblocking(False)
    host = _WorkerHost(logging.getLogger("mobinux.tftp"), ctl, stop)
    host._loop = loop
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(ctl.fileno(), host.on_control)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(ctl.fileno())
        for transfer in list(host._transfers):
            transfer.cancel()
        ctl.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is installed, else an asyncio one."""
    return _loop_factory()()


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl
        sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    ctl_fd, parent, level = int(args[0]), int(args[1]), int(args[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process shuts us down
    _die_with_parent(parent)
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s %(name)s[worker {os.getpid()}]: %(message)s")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(ctl_fd))


if __name__ == "__main__":
    main()
