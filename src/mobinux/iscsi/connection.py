"""One iSCSI connection as a sans-I/O state machine (RFC 7143), in the style of h11.

The asyncio adapter (:mod:`mobinux.iscsi.aio`) owns the socket and the
threads; this module owns every protocol decision::

    conn = IscsiConnection(login, directory, limits)
    conn.receive_data(chunk)              # bytes from TCP
    while (event := conn.next_event()) is not None:
        LoggedIn    -> look the target up, then conn.attach(scsi) or conn.close(reason)
        Task        -> run task.cdb on the SCSI layer, then conn.complete(task, ...)
                       (a long read: conn.send_data(task, part) for all parts but the last)
        Closed      -> send what is left, then close the socket
    transport.writelines(conn.data_to_send())
    conn.tick()                           # every few seconds: idle NOP-In pings, login timeout

The login phase is delegated to :class:`~mobinux.iscsi.login.Login`; this
module runs the full-feature phase:

* **Command numbering** (§4.2.2.1). Non-immediate commands are delivered in
  CmdSN order; a command ahead of ExpCmdSN inside the window is held (its
  data may already flow) until the gap fills; anything outside the window,
  or a duplicate, is dropped without a word. The window is ``queue_depth``
  commands wide and slides as commands finish: MaxCmdSN = ExpCmdSN +
  queue_depth - 1 - (commands accepted but not yet answered), so it never
  shrinks (§4.2.2.1: MaxCmdSN never decreases) and bounds the work one
  initiator can queue. Sequence numbers compare with serial arithmetic
  (RFC 1982).
* **Writes** (§4.2.5, §11.7, §11.8): immediate data, unsolicited Data-Out up to
  FirstBurstLength (InitialR2T=No), then R2Ts of at most MaxBurstLength, at
  most MaxOutstandingR2T at a time. Every Data-Out is checked (TTT, DataSN,
  Buffer Offset, length, F bit); a violation ends that task (Reject, then
  CHECK CONDITION / ABORTED COMMAND) but not the connection, which is what
  libiscsi's iSCSIDataSnInvalid test needs and §11.17.1 describes. The data of
  a command is kept as the received segments and joined once, so a write that
  arrives in one PDU reaches the disk without a copy. What a connection
  buffers is bounded: commands solicit in arrival order, each only once its
  whole remaining length fits in the write budget next to the Data-Out other
  commands hold (immediate and unsolicited data included), so R2Ts wait
  rather than fail and commands cannot starve each other half-way.
* **Reads** (§11.7): Data-In PDUs of at most the initiator's
  MaxRecvDataSegmentLength, the F bit at every MaxBurstLength boundary, the
  status collapsed into the last Data-In when it is GOOD (§11.7.4), otherwise
  a SCSI Response with the sense data (§11.4.7). A long read may be answered
  in parts (:meth:`IscsiConnection.send_data`, then ``complete``): offsets,
  DataSN and sequences continue across the parts. Residuals compare the
  Expected Data Transfer Length with what the command produced (reads) or
  consumed (writes), as libiscsi's residual tests expect (§11.4.5).
* **Task management** (§11.5/§11.6): ABORT TASK, ABORT TASK SET, CLEAR TASK
  SET, LOGICAL UNIT RESET, TARGET WARM/COLD RESET. A task already running on
  the SCSI layer cannot be stopped; it is marked aborted, its response is
  never sent, and the TMF response waits until it has finished
  (§4.2.3.3: the response comes after the affected tasks are terminated).
* **NOP** (§11.18/§11.19): pings are answered; an idle connection gets a NOP-In
  ping every tick, and an initiator that never answers (iPXE) is not dropped.
* **Text** (§11.10/§11.11): SendTargets in discovery and normal sessions, long
  answers in several PDUs with the C bit and a Target Transfer Tag.
* **Errors** (§7, ErrorRecoveryLevel 0): a protocol error ends this connection
  only; a Reject PDU goes first where the spec has a reason for it. SNACK is
  rejected (ERL 0 has nothing to resend).

Nothing here imports ``asyncio``, ``socket`` or ``time``.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol

from mobinux.errors import MalformedPacket
from mobinux.iscsi.constants import (
    BHS_LEN,
    CMD_ATTR_MASK,
    CMD_READ,
    CMD_WRITE,
    DATAIN_STATUS,
    FINAL_BIT,
    RESERVED_TAG,
    RESP_BIDI_OVERFLOW,
    RESP_BIDI_UNDERFLOW,
    RESP_OVERFLOW,
    RESP_UNDERFLOW,
    LogoutReason,
    LogoutResponse,
    Opcode,
    RejectReason,
    TmfFunction,
    TmfResponse,
)
from mobinux.iscsi.keys import (
    LEADING_DECLARATIONS,
    NOT_UNDERSTOOD,
    OPERATIONAL_KEYS,
    REJECT,
    SECURITY_KEYS,
    TARGET_ONLY_KEYS,
    encode_text,
    parse_text,
)
from mobinux.iscsi.login import LoginStep
from mobinux.iscsi.params import SessionParams, SessionType, TargetDirectory, TargetLimits
from mobinux.iscsi.pdu import DataDigestError, Pdu, PduReader, digest_bytes, encode_pdu, pad_len
from mobinux.iscsi.sendtargets import send_targets_text

__all__ = [
    "Closed",
    "IscsiConnection",
    "LoggedIn",
    "LoginHandler",
    "ScsiPort",
    "Task",
    "sn_lt",
]

MASK32 = 0xFFFFFFFF
_HALF = 0x80000000

# SAM-5 status codes this layer needs to recognise.
_GOOD = 0x00
_CHECK_CONDITION = 0x02

# A single command may not make us buffer more than this much Data-Out; a
# larger Expected Data Transfer Length is answered with CHECK CONDITION
# (ILLEGAL REQUEST, INVALID FIELD IN CDB) without soliciting anything.
DEFAULT_MAX_COMMAND_BYTES = 64 * 1024 * 1024
# All commands of one connection together: solicited-but-unexecuted Data-Out.
DEFAULT_WRITE_BUDGET = 64 * 1024 * 1024
# Immediate SCSI commands bypass the CmdSN window; this many may be open at once,
# more are refused with Reject "Immediate command reject" (§11.17.1, reason 0x06).
MAX_IMMEDIATE_TASKS = 16
# An initiator's Text Request split with the C bit may not grow beyond this.
MAX_TEXT_REQUEST = 65536
# Login must finish within this many ticks of the adapter's clock.
LOGIN_TICKS = 3

# Keys that belong to the login phase (§13): answered "Reject" in the full-feature phase.
_LOGIN_KEYS = (
    frozenset(OPERATIONAL_KEYS) | SECURITY_KEYS | LEADING_DECLARATIONS | TARGET_ONLY_KEYS
) - {"MaxRecvDataSegmentLength"}

# Data-In and SCSI Response share one layout of the 48-byte BHS (§11.4, §11.7):
# opcode, flags, byte 2, status, AHS+DataSegmentLength, LUN/reserved, ITT, TTT/SNACK Tag,
# StatSN, ExpCmdSN, MaxCmdSN, DataSN/ExpDataSN, Buffer Offset/Bidi residual, Residual Count.
_STATUS_BHS = struct.Struct("!BBBBI8sIIIIIIII")
# R2T (§11.8): opcode, flags, -, -, AHS+DSL, LUN, ITT, TTT, StatSN, ExpCmdSN, MaxCmdSN,
# R2TSN, Buffer Offset, Desired Data Transfer Length.
_R2T_BHS = _STATUS_BHS
_ZERO_LUN = bytes(8)
_U16 = struct.Struct("!H")
# ITT, Expected Data Transfer Length / TTT, CmdSN: bytes 16-27 of an initiator BHS.
_ITT_EDTL_CMDSN = struct.Struct("!III")
# Opcodes of the per-command path as plain ints (an IntEnum member lookup costs ~75 ns).
_OP_NOP_OUT = int(Opcode.NOP_OUT)
_OP_SCSI_COMMAND = int(Opcode.SCSI_COMMAND)
_OP_DATA_OUT = int(Opcode.SCSI_DATA_OUT)
_OP_SNACK = int(Opcode.SNACK_REQUEST)
_OP_SCSI_RESPONSE = int(Opcode.SCSI_RESPONSE)
_OP_DATA_IN = int(Opcode.SCSI_DATA_IN)


def sn_lt(a: int, b: int) -> bool:
    """``a < b`` in 32-bit serial number arithmetic (RFC 1982 §3.2, RFC 7143 §4.2.2.1)."""
    return a != b and ((b - a) & MASK32) < _HALF


class ScsiPort(Protocol):
    """What the connection calls on the SCSI layer itself (task management only).

    Commands are handed to the adapter as :class:`Task` events; these calls
    are cheap state changes inside the SCSI layer, made on the event loop.
    """

    def lun_reset(self, lun: int, nexus: str) -> bool: ...

    def target_reset(self, nexus: str, cold: bool) -> object: ...


class LoginHandler(Protocol):
    """The login phase (:class:`mobinux.iscsi.login.Login`)."""

    def receive(self, pdu: Pdu) -> LoginStep: ...


@dataclasses.dataclass(frozen=True, slots=True)
class LoggedIn:
    """The login succeeded. Call :meth:`IscsiConnection.attach` (or ``close``) next."""

    params: SessionParams


@dataclasses.dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over: send what :meth:`~IscsiConnection.data_to_send` holds, then close.

    ``cold_reset``: a TARGET COLD RESET was answered; every other connection to
    the target must go as well (§11.5.1).
    """

    reason: str
    cold_reset: bool = False
    logout: bool = False


class _ProtocolError(Exception):
    """Internal: the initiator broke the protocol; reject (maybe) and drop the connection."""

    def __init__(self, message: str, reason: RejectReason | None = RejectReason.PROTOCOL_ERROR):
        super().__init__(message)
        self.reason = reason


class _DataOutError(Exception):
    """Internal: a Data-Out broke its task's data sequence (the task ends, the connection stays)."""

    def __init__(
        self, message: str, asc: int, reason: RejectReason = RejectReason.PROTOCOL_ERROR
    ) -> None:
        super().__init__(message)
        self.asc = asc
        self.reason = reason


class _R2T:
    __slots__ = ("datasn", "end", "next", "ttt")

    def __init__(self, ttt: int, offset: int, length: int) -> None:
        self.ttt = ttt
        self.next = offset
        self.end = offset + length
        self.datasn = 0


# Task states.
_COLLECTING = 0  # waiting for Data-Out (or for its turn in CmdSN order)
_QUEUED = 1  # handed to the adapter via next_event()
_RUNNING = 2  # the adapter took it (it called task.data_out / complete)
_DONE = 3


class Task:
    """One SCSI command of the initiator; the adapter executes it.

    ``lun``, ``cdb`` and :attr:`data_out` are what ``ScsiTarget.execute`` needs;
    the rest is iSCSI bookkeeping.
    """

    __slots__ = (
        "_pieces",
        "aborted",
        "attr",
        "cdb",
        "cmd_sn",
        "data_sent",
        "datasn",
        "edtl",
        "immediate",
        "itt",
        "lun",
        "lun_bytes",
        "next_r2t",
        "ordered",
        "produced",
        "r2ts",
        "r2tsn",
        "read",
        "read_len",
        "received",
        "refusal",
        "reserved",
        "state",
        "unsol_datasn",
        "unsol_end",
        "write",
        "write_len",
    )

    def __init__(
        self,
        itt: int,
        lun: int,
        lun_bytes: bytes,
        cdb: bytes,
        flags: int,
        edtl: int,
        cmd_sn: int,
        immediate: bool,
        read_len: int,
    ) -> None:
        self.itt = itt
        self.lun = lun
        self.lun_bytes = lun_bytes
        self.cdb = cdb
        self.read = bool(flags & CMD_READ)
        self.write = bool(flags & CMD_WRITE)
        self.attr = flags & CMD_ATTR_MASK
        self.edtl = edtl
        self.read_len = read_len
        self.write_len = edtl if self.write else 0
        self.cmd_sn = cmd_sn
        self.immediate = immediate
        self._pieces: list[bytes] = []
        self.received = 0
        self.unsol_end = -1  # offset unsolicited data may reach; -1: unsolicited phase over
        self.unsol_datasn = 0
        self.r2ts: list[_R2T] = []
        self.next_r2t = 0
        self.r2tsn = 0
        self.reserved = 0
        self.ordered = False
        self.state = _COLLECTING
        self.aborted = False
        self.refusal: bytes | None = None  # sense data: answer CHECK CONDITION without executing
        # A read answered in parts (send_data, then complete): what went out so far.
        self.produced = 0  # bytes of data-in the SCSI layer produced before the last part
        self.data_sent = 0  # bytes of it sent as Data-In (at most the read EDTL)
        self.datasn = 0  # DataSN of the next Data-In PDU

    @property
    def data_out(self) -> bytes | None:
        """The Data-Out of a write command, in one buffer (None when the command has no W bit)."""
        if not self.write:
            return None
        pieces = self._pieces
        if len(pieces) == 1:
            return pieces[0]
        data = b"".join(pieces)
        self._pieces = [data]
        return data

    @property
    def collected(self) -> bool:
        return self.unsol_end < 0 and not self.r2ts and self.received >= self.write_len

    def __repr__(self) -> str:
        return (
            f"Task(itt=0x{self.itt:08x}, lun={self.lun}, op=0x{self.cdb[0]:02x}, edtl={self.edtl})"
        )


class _PendingTmf:
    __slots__ = ("itt", "response", "then_close", "waiting")

    def __init__(self, itt: int, response: int, waiting: set[Task], then_close: bool) -> None:
        self.itt = itt
        self.response = response
        self.waiting = waiting
        self.then_close = then_close


class _TextState:
    __slots__ = ("answer", "itt", "request", "ttt")

    def __init__(self, itt: int, ttt: int) -> None:
        self.itt = itt
        self.ttt = ttt
        self.request = bytearray()  # the initiator's text while it sends C=1
        self.answer = b""  # what is still to send


_CONSUMED = object()  # a CmdSN an ABORT TASK declared received (§11.5.1 b)

Event = LoggedIn | Task | Closed

# Connection states.
_LOGIN = 0
_ATTACHING = 1
_FULL = 2
_LOGOUT = 3  # logout accepted, waiting for running tasks before the response
_CLOSED = 4


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    """Fixed-format sense data (SPC-4 §4.5.3) for the few conditions this layer raises itself."""
    sense = bytearray(18)
    sense[0] = 0x70
    sense[2] = key
    sense[7] = 10
    sense[12] = asc
    sense[13] = ascq
    return bytes(sense)


_SENSE_INVALID_FIELD_IN_CDB = fixed_sense(0x05, 0x24, 0x00)
# ABORTED COMMAND and the ASC/ASCQ (SPC-4 Annex D; RFC 7143 §11.4.7.2) of a broken Data-Out sequence.
_ABORTED_COMMAND = 0x0B
_ASC_UNEXPECTED_UNSOLICITED = 0x0C0C  # RFC 7143 §11.4.7.2 "Unexpected unsolicited data"
_ASC_DATA_PHASE = 0x4B00  # DATA PHASE ERROR
_ASC_INVALID_TTT = 0x4B01  # INVALID TARGET PORT TRANSFER TAG RECEIVED
_ASC_TOO_MUCH_DATA = 0x4B02  # TOO MUCH WRITE DATA
_ASC_DATA_OFFSET = 0x4B05  # DATA OFFSET ERROR


class IscsiConnection:
    """The protocol state of one TCP connection, from the first Login Request to the close."""

    def __init__(
        self,
        login: LoginHandler,
        directory: TargetDirectory,
        limits: TargetLimits,
        *,
        max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES,
        write_budget: int = DEFAULT_WRITE_BUDGET,
    ) -> None:
        self._login: LoginHandler | None = login
        self._directory = directory
        self._limits = limits
        self._max_command_bytes = max_command_bytes
        self._write_budget = write_budget
        self._reader = PduReader()
        self._out: list[bytes | bytearray | memoryview] = []
        self._events: deque[Event] = deque()
        self._state = _LOGIN
        self.params: SessionParams | None = None
        self.scsi: ScsiPort | None = None
        self.close_reason: str | None = None
        self._nexus = ""
        self._hd = False
        self._dd = False
        self._mrdsl = 8192  # the most we put in one PDU (initiator's MaxRecvDataSegmentLength)
        self._max_burst = 262144
        self._first_burst = 65536
        self._max_r2t = 1
        self._immediate_data = True
        self._initial_r2t = True
        self._exp_cmd_sn = 0
        self._max_cmd_sn = 0
        self._stat_sn = 0
        self._held: dict[int, Task | Pdu | object] = {}
        self._tasks: dict[int, Task] = {}
        self._immediate_tasks = 0
        self._running = 0
        self._reserved = 0
        self._r2t_queue: deque[Task] = deque()
        self._tmfs: list[_PendingTmf] = []
        self._text: _TextState | None = None
        self._next_ttt = 1
        self._logout_itt: int | None = None
        self._rx_activity = False
        self._ticks = 0
        self._discovery = False
        # Ticks in a row with nothing received: 0 while the initiator talks (a Linux
        # initiator sends NOP-Outs every few seconds and answers our NOP-Ins).
        self.idle_ticks = 0

    # ------------------------------------------------------------------ adapter API

    @property
    def full_feature(self) -> bool:
        return self._state in (_FULL, _LOGOUT)

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def running(self) -> int:
        """Tasks handed to the adapter and not yet completed."""
        return self._running

    @property
    def exp_cmd_sn(self) -> int:
        return self._exp_cmd_sn

    @property
    def max_cmd_sn(self) -> int:
        return self._max_cmd_sn

    @property
    def stat_sn(self) -> int:
        return self._stat_sn

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the initiator; afterwards read :meth:`next_event` and :meth:`data_to_send`."""
        if self._state == _CLOSED or not data:
            return
        self._rx_activity = True
        self._reader.feed(data)
        self._process()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Wire buffers to write, in order (for ``transport.writelines``)."""
        out = self._out
        if out:
            self._out = []
        return out

    def attach(self, scsi: ScsiPort | None) -> None:
        """Enter the full-feature phase after :class:`LoggedIn` (*scsi* is None for discovery)."""
        params = self.params
        if self._state != _ATTACHING or params is None:
            raise RuntimeError("attach() without a finished login")
        self.scsi = scsi
        self._nexus = params.nexus
        self._hd = params.header_digest
        self._dd = params.data_digest
        self._reader.max_data_segment = params.target_max_recv_data_segment_length
        self._reader.enable_digests(params.header_digest, params.data_digest)
        self._mrdsl = max(512, params.initiator_max_recv_data_segment_length)
        self._max_burst = max(512, params.max_burst_length)
        self._first_burst = max(0, params.first_burst_length)
        self._max_r2t = max(1, params.max_outstanding_r2t)
        self._immediate_data = params.immediate_data
        self._initial_r2t = params.initial_r2t
        self._exp_cmd_sn = params.exp_cmd_sn & MASK32
        self._max_cmd_sn = (params.exp_cmd_sn + max(1, self._limits.queue_depth) - 1) & MASK32
        self._stat_sn = params.stat_sn & MASK32
        self._discovery = params.session_type == SessionType.DISCOVERY
        self._state = _FULL
        self._process()

    def complete(
        self,
        task: Task,
        status: int,
        data: bytes | bytearray | memoryview = b"",
        sense: bytes = b"",
        *,
        data_out_used: int | None = None,
    ) -> None:
        """The SCSI layer finished *task*: answer it (unless it was aborted or the connection is gone).

        *data* is what a read command produced; *data_out_used* how many bytes
        of Data-Out the command wanted, when the SCSI layer says (for the
        write residual of §11.4.5).
        """
        if task.state == _DONE:
            return
        if task.state in (_QUEUED, _RUNNING):
            self._running -= 1
        task.state = _DONE
        if self._state == _CLOSED:
            return
        self._forget(task)
        # The window opens before the answer goes out, so the answer carries the new MaxCmdSN.
        if not task.immediate:
            self._max_cmd_sn = (self._max_cmd_sn + 1) & MASK32  # _release_slot
        if task.aborted:
            self._task_terminated(task)
        else:
            self._respond(task, status, data, sense, data_out_used)
        if self._state == _LOGOUT and not self._running:
            self._finish_logout()

    def send_data(self, task: Task, data: bytes | bytearray | memoryview) -> None:
        """Part of a running read's data, more to follow: sent as Data-In PDUs now, no status.

        For a READ streamed in pieces (the adapter splits a long one so that no
        buffer holds the whole transfer): call this for every piece but the
        last, in order, then :meth:`complete` with the last piece (or with the
        CHECK CONDITION of a piece that failed). Offsets, DataSN and the F bit
        at every MaxBurstLength boundary continue across the calls exactly as
        if the data had come in one buffer; the status goes with the last
        part only. What goes out is copied or referenced by
        :meth:`data_to_send` like any Data-In: *data* must stay unchanged
        until it is sent. Ignored for an aborted task or a closed connection.
        """
        if task.state != _RUNNING or task.aborted or self._state == _CLOSED:
            return
        n = len(data)
        task.produced += n
        room = task.read_len - task.data_sent if task.read else 0
        if n > room:
            n = max(0, room)
        if n:
            # Once the Expected Data Transfer Length is reached nothing more is sent:
            # this PDU ends the last sequence (F bit), the SCSI Response follows alone.
            last = task.data_sent + n >= task.read_len
            self._send_data_in(task, data, n, last, 0, 0, 0, collapse=False)

    def start(self, task: Task) -> bool:
        """The adapter is about to run *task*; False when it was aborted meanwhile (then do not)."""
        if task.state != _QUEUED:
            return False
        if task.aborted:
            self.complete(task, _GOOD)  # ends it unanswered, like a finished aborted task
            return False
        task.state = _RUNNING
        return True

    def tick(self) -> None:
        """Called every few seconds: pings an idle initiator, ends logins that take too long."""
        if self._state == _CLOSED:
            return
        self._ticks += 1
        if self._state in (_LOGIN, _ATTACHING):
            if self._ticks >= LOGIN_TICKS:
                self.close("login timed out")
            return
        if self._rx_activity:
            self._rx_activity = False
            self.idle_ticks = 0
            return
        self.idle_ticks += 1
        # §11.19: a NOP-In with a valid TTT asks for a NOP-Out; ITT 0xffffffff, StatSN not advanced.
        # The answer is not required: iPXE never sends one, and it stays connected.
        bhs = bytearray(BHS_LEN)
        _STATUS_BHS.pack_into(
            bhs, 0, Opcode.NOP_IN, FINAL_BIT, 0, 0, 0, _ZERO_LUN, RESERVED_TAG,
            self._new_ttt(), self._stat_sn, self._exp_cmd_sn, self._max_cmd_sn, 0, 0, 0,
        )  # fmt: skip
        self._emit(bhs)

    def close(self, reason: str, *, cold_reset: bool = False, logout: bool = False) -> None:
        """End the connection (a Closed event follows); later input and completions are ignored."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self.close_reason = reason
        for task in self._tasks.values():
            task.aborted = True
        self._tasks.clear()
        self._held.clear()
        self._r2t_queue.clear()
        self._tmfs.clear()
        self._events = deque(e for e in self._events if not isinstance(e, Task))
        self._events.append(Closed(reason, cold_reset=cold_reset, logout=logout))

    def connection_lost(self) -> None:
        """The transport is gone (peer closed or reset)."""
        if self._state != _CLOSED:
            self.close("connection closed by peer")

    # ------------------------------------------------------------------ input

    def _process(self) -> None:
        reader = self._reader
        while self._state in (_LOGIN, _FULL, _LOGOUT):
            try:
                pdu = reader.next_pdu()
            except DataDigestError:
                # §7.8: at ErrorRecoveryLevel 0 the PDU cannot be recovered.
                self.close("data digest error")
                return
            except MalformedPacket as exc:
                self.close(f"malformed PDU: {exc}")
                return
            if pdu is None:
                return
            try:
                if self._state == _LOGIN:
                    self._on_login(pdu)
                else:
                    self._on_pdu(pdu)
            except _ProtocolError as exc:
                self._protocol_error(pdu, exc)
                return
            except MalformedPacket as exc:
                self.close(f"malformed PDU: {exc}")
                return

    def _protocol_error(self, pdu: Pdu, exc: _ProtocolError) -> None:
        if exc.reason is not None and self._state != _LOGIN:
            self._reject(pdu, exc.reason)
        self.close(f"protocol error: {exc}")

    def _on_login(self, pdu: Pdu) -> None:
        if pdu.opcode != Opcode.LOGIN_REQUEST or self._login is None:
            raise _ProtocolError(f"opcode 0x{pdu.opcode:02x} during login", None)
        step = self._login.receive(pdu)
        self._out.extend(step.reply)
        if step.close:
            self.close("login refused")
        elif step.params is not None:
            self.params = step.params
            self._login = None
            self._state = _ATTACHING
            self._events.append(LoggedIn(step.params))

    def _on_pdu(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        op = bhs[0] & 0x3F
        if op == _OP_DATA_OUT:
            self._on_data_out(pdu)
            return
        if op == _OP_SNACK:
            # §11.16: SNACK needs ErrorRecoveryLevel > 0. Reject it and carry on.
            self._reject(pdu, RejectReason.PROTOCOL_ERROR)
            return
        if op not in _COMMAND_OPCODES:
            if op == Opcode.LOGIN_REQUEST:
                raise _ProtocolError("Login Request in the full-feature phase")
            raise _ProtocolError(
                f"unsupported opcode 0x{op:02x}", RejectReason.COMMAND_NOT_SUPPORTED
            )
        if self._discovery and op not in _DISCOVERY_OPCODES:
            raise _ProtocolError(f"opcode 0x{op:02x} in a discovery session")
        if self._state == _LOGOUT:
            # §11.14: after a Logout the initiator sends nothing that needs an answer.
            return
        itt, edtl, cmd_sn = _ITT_EDTL_CMDSN.unpack_from(bhs, 16)
        if bhs[0] & 0x40 or (op == _OP_NOP_OUT and itt == RESERVED_TAG):
            # Immediate: delivered at once, CmdSN not advanced (§4.2.2.1).
            if op == _OP_SCSI_COMMAND:
                if self._immediate_tasks >= MAX_IMMEDIATE_TASKS:
                    self._reject(pdu, RejectReason.IMMEDIATE_COMMAND_REJECT)
                    return
                task = self._new_task(pdu, True, itt, edtl, cmd_sn)
                task.ordered = True
                self._maybe_ready(task)
            else:
                self._deliver_pdu(pdu, True)
            return
        exp = self._exp_cmd_sn
        window = (self._max_cmd_sn - exp + 1) & MASK32
        if ((cmd_sn - exp) & MASK32) >= window or cmd_sn in self._held:
            return  # §4.2.2.1: outside the window or a duplicate: silently ignored
        if cmd_sn == exp:
            if op != _OP_SCSI_COMMAND:
                self._advance(pdu)
            elif self._held:
                self._advance(self._new_task(pdu, False, itt, edtl, cmd_sn))
            else:
                # In order with nothing held behind it: what _advance does, without the loop.
                task = self._new_task(pdu, False, itt, edtl, cmd_sn)
                self._exp_cmd_sn = (exp + 1) & MASK32
                task.ordered = True
                self._maybe_ready(task)
            return
        if op == _OP_SCSI_COMMAND:
            self._held[cmd_sn] = self._new_task(pdu, False, itt, edtl, cmd_sn)
        else:
            self._held[cmd_sn] = pdu

    def _advance(self, item: Task | Pdu | object) -> None:
        """Deliver *item* (it carries ExpCmdSN) and whatever held commands follow it."""
        while True:
            self._exp_cmd_sn = (self._exp_cmd_sn + 1) & MASK32
            if isinstance(item, Task):
                item.ordered = True
                self._maybe_ready(item)
            elif isinstance(item, Pdu):
                self._deliver_pdu(item, False)
            else:  # _CONSUMED: a command ABORT TASK ended before it arrived
                self._release_slot(False)
            if self._state not in (_FULL, _LOGOUT):
                return
            nxt = self._held.pop(self._exp_cmd_sn, None)
            if nxt is None:
                return
            item = nxt

    def _deliver_pdu(self, pdu: Pdu, immediate: bool) -> None:
        op = pdu.opcode
        if op == Opcode.NOP_OUT:
            self._release_slot(immediate)
            self._on_nop_out(pdu)
        elif op == Opcode.TEXT_REQUEST:
            self._release_slot(immediate)
            self._on_text(pdu)
        elif op == Opcode.TASK_MGMT_REQUEST:
            self._on_tmf(pdu, immediate)
        elif op == Opcode.LOGOUT_REQUEST:
            self._on_logout(pdu, immediate)

    # ------------------------------------------------------------------ SCSI commands

    def _new_task(self, pdu: Pdu, immediate: bool, itt: int, edtl: int, cmd_sn: int) -> Task:
        if itt == RESERVED_TAG:
            raise _ProtocolError(
                "SCSI Command with the reserved ITT", RejectReason.INVALID_PDU_FIELD
            )
        if itt in self._tasks:
            raise _ProtocolError(f"ITT 0x{itt:08x} already in use", RejectReason.INVALID_PDU_FIELD)
        bhs = pdu.bhs
        flags = bhs[1]
        cdb = bhs[32:48]
        read_len = edtl if flags & CMD_READ else 0
        if pdu.ahs:
            ext, bidi_read = _parse_ahs(pdu.ahs)
            cdb += ext
            if flags & CMD_READ and flags & CMD_WRITE:
                read_len = bidi_read
        lun_bytes = bhs[8:16]
        lun = 0 if lun_bytes == _ZERO_LUN else pdu.lun
        task = Task(itt, lun, lun_bytes, cdb, flags, edtl, cmd_sn, immediate, read_len)
        data = pdu.data
        n = len(data)
        final = bool(flags & FINAL_BIT) or not task.write
        if n:
            if not task.write:
                raise _ProtocolError("immediate data on a command without the W bit")
            if not self._immediate_data:
                raise _ProtocolError("immediate data with ImmediateData=No")
            if n > task.write_len or n > self._first_burst:
                raise _ProtocolError("immediate data beyond FirstBurstLength or the EDTL")
        if not final and self._initial_r2t:
            raise _ProtocolError("unsolicited Data-Out announced with InitialR2T=Yes")
        if task.write_len > self._max_command_bytes:
            task.refusal = _SENSE_INVALID_FIELD_IN_CDB
        elif n:
            self._hold(task, data)
        if not final and task.refusal is None:
            task.unsol_end = min(self._first_burst, task.write_len)
            if task.received >= task.unsol_end:
                task.unsol_end = -1
        self._tasks[itt] = task
        if immediate:
            self._immediate_tasks += 1
        if task.unsol_end < 0 and task.refusal is None and task.received < task.write_len:
            self._solicit(task)
        return task

    def _maybe_ready(self, task: Task) -> None:
        if task.state != _COLLECTING or not task.ordered or task.aborted:
            return
        if task.refusal is not None:
            task.state = _DONE
            self._forget(task)
            self._release_slot(task.immediate)
            self._respond(task, _CHECK_CONDITION, b"", task.refusal, None)
            return
        if not task.collected:
            return
        task.state = _QUEUED
        self._running += 1
        self._events.append(task)

    def _forget(self, task: Task) -> None:
        if self._tasks.get(task.itt) is task:
            del self._tasks[task.itt]
            if task.immediate:
                self._immediate_tasks -= 1
        if task.reserved:
            self._reserved -= task.reserved
            task.reserved = 0
            if self._r2t_queue:
                self._drain_r2t_queue()

    def _release_slot(self, immediate: bool) -> None:
        """A non-immediate command is finished: the window opens by one (§4.2.2.1)."""
        if not immediate:
            self._max_cmd_sn = (self._max_cmd_sn + 1) & MASK32

    # ------------------------------------------------------------------ Data-Out and R2T

    def _hold(self, task: Task, data: bytes) -> None:
        """Keep a piece of unsolicited Data-Out (immediate or ahead of any R2T).

        It counts against the write budget like solicited data, so R2Ts wait
        while the initiator's unsolicited data fills the buffers; it cannot be
        refused, but it is bounded by FirstBurstLength per command in the window.
        """
        task._pieces.append(data)
        n = len(data)
        task.received += n
        task.reserved += n
        self._reserved += n

    def _solicit(self, task: Task) -> None:
        """The unsolicited phase is over: ask for the rest with R2Ts once the budget allows.

        Commands take their turn in arrival order (a big one is not starved by a
        stream of small ones), and a command starts soliciting only once all of
        its remaining Data-Out fits in the connection's budget, so commands
        cannot starve each other half-way. Its R2Ts wait until then; they are
        never refused.
        """
        if task.write_len - task.received <= 0:
            self._maybe_ready(task)
            return
        task.next_r2t = task.received
        self._r2t_queue.append(task)
        self._drain_r2t_queue()

    def _drain_r2t_queue(self) -> None:
        """Start soliciting for waiting commands, first come first served, while they fit.

        The budget counts all Data-Out held by commands that are not waiting
        here (solicited or running, or still sending unsolicited data): those
        finish without this queue moving, so the head always gets its turn. A
        command bigger than the budget goes when nothing else is held.
        """
        queue = self._r2t_queue
        while queue and self._state in (_FULL, _LOGOUT):
            task = queue[0]
            if task.aborted or task.state != _COLLECTING or task.refusal is not None:
                queue.popleft()
                continue
            remaining = task.write_len - task.received
            active = self._reserved - sum(t.reserved for t in queue)
            if active and active + task.reserved + remaining > self._write_budget:
                return
            queue.popleft()
            task.reserved += remaining
            self._reserved += remaining
            self._send_r2ts(task)

    def _send_r2ts(self, task: Task) -> None:
        while len(task.r2ts) < self._max_r2t and task.next_r2t < task.write_len:
            offset = task.next_r2t
            length = min(self._max_burst, task.write_len - offset)
            r2t = _R2T(self._new_ttt(), offset, length)
            task.r2ts.append(r2t)
            task.next_r2t = offset + length
            bhs = bytearray(BHS_LEN)
            # §11.8: StatSN is the next one and is not advanced.
            _R2T_BHS.pack_into(
                bhs, 0, Opcode.R2T, FINAL_BIT, 0, 0, 0, task.lun_bytes, task.itt, r2t.ttt,
                self._stat_sn, self._exp_cmd_sn, self._max_cmd_sn, task.r2tsn, offset, length,
            )  # fmt: skip
            task.r2tsn += 1
            self._emit(bhs)

    def _on_data_out(self, pdu: Pdu) -> None:
        task = self._tasks.get(pdu.itt)
        if task is None or task.state != _COLLECTING or task.refusal is not None:
            # A task that ended (answered, aborted, refused) may still have data in flight:
            # it is discarded, as the spec lets a target end a command early (§11.7).
            return
        try:
            self._accept_data_out(task, pdu)
        except _DataOutError as exc:
            # The PDU framing is intact, only this task's data sequence is broken. At
            # ErrorRecoveryLevel 0 the task cannot be recovered, but the connection can
            # stay: Reject the PDU and end the task with CHECK CONDITION (§11.17.1: "the
            # target MUST issue a proper SCSI command response with CHECK CONDITION").
            # Later Data-Out for the task is discarded.
            self._reject(pdu, exc.reason)
            task.refusal = fixed_sense(_ABORTED_COMMAND, exc.asc >> 8, exc.asc & 0xFF)
            task.unsol_end = -1
            task.r2ts.clear()
            if task.reserved:
                self._reserved -= task.reserved
                task.reserved = 0
                self._drain_r2t_queue()
            self._maybe_ready(task)

    def _accept_data_out(self, task: Task, pdu: Pdu) -> None:
        ttt = pdu.u32(20)
        datasn = pdu.u32(36)
        offset = pdu.u32(40)
        data = pdu.data
        n = len(data)
        final = pdu.final
        if ttt == RESERVED_TAG:
            if task.unsol_end < 0:
                raise _DataOutError(
                    "unsolicited Data-Out not expected", _ASC_UNEXPECTED_UNSOLICITED
                )
            if datasn != task.unsol_datasn:
                raise _DataOutError(
                    f"DataSN {datasn}, expected {task.unsol_datasn}", _ASC_DATA_PHASE
                )
            if offset != task.received:
                raise _DataOutError(f"offset {offset}, expected {task.received}", _ASC_DATA_OFFSET)
            if offset + n > task.unsol_end:
                raise _DataOutError("unsolicited data beyond FirstBurstLength", _ASC_TOO_MUCH_DATA)
            task.unsol_datasn += 1
            if n:
                self._hold(task, data)
            if final:
                task.unsol_end = -1
                self._solicit(task)
            elif task.received == task.unsol_end:
                raise _DataOutError("last unsolicited Data-Out without the F bit", _ASC_DATA_PHASE)
            return
        r2t = None
        for candidate in task.r2ts:
            if candidate.ttt == ttt:
                r2t = candidate
                break
        if r2t is None:
            raise _DataOutError(
                f"unknown TTT 0x{ttt:08x}", _ASC_INVALID_TTT, RejectReason.INVALID_PDU_FIELD
            )
        if datasn != r2t.datasn:
            raise _DataOutError(f"DataSN {datasn}, expected {r2t.datasn}", _ASC_DATA_PHASE)
        if offset != r2t.next or offset != task.received:
            raise _DataOutError(f"offset {offset}, expected {r2t.next}", _ASC_DATA_OFFSET)
        if offset + n > r2t.end:
            raise _DataOutError("Data-Out beyond its R2T", _ASC_TOO_MUCH_DATA)
        r2t.datasn += 1
        r2t.next += n
        if n:
            task._pieces.append(data)
            task.received += n
        if r2t.next == r2t.end:
            if not final:
                raise _DataOutError("last Data-Out of an R2T without the F bit", _ASC_DATA_PHASE)
            task.r2ts.remove(r2t)
            self._send_r2ts(task)
            self._maybe_ready(task)
        elif final:
            raise _DataOutError(
                "Data-Out sequence ended before its R2T was satisfied", _ASC_DATA_PHASE
            )

    # ------------------------------------------------------------------ responses

    def _respond(
        self,
        task: Task,
        status: int,
        data: bytes | bytearray | memoryview,
        sense: bytes,
        data_out_used: int | None,
    ) -> None:
        produced = task.produced + len(data)
        sent = min(len(data), max(0, task.read_len - task.data_sent)) if task.read else 0
        resid_flags = 0
        resid = 0
        bidi_flags = 0
        bidi_resid = 0
        if task.read and task.write:
            # Bidirectional (§11.4.5.1): the read side has its own residual fields.
            if produced > task.read_len:
                bidi_flags, bidi_resid = RESP_BIDI_OVERFLOW, produced - task.read_len
            elif produced < task.read_len:
                bidi_flags, bidi_resid = RESP_BIDI_UNDERFLOW, task.read_len - produced
            resid_flags, resid = _residual(task.write_len, data_out_used)
        elif task.read:
            resid_flags, resid = _residual(task.read_len, produced)
        elif task.write:
            resid_flags, resid = _residual(task.write_len, data_out_used)
        else:
            # No transfer announced: whatever the command wanted is an overflow.
            wanted = produced or data_out_used or 0
            if wanted:
                resid_flags, resid = RESP_OVERFLOW, wanted
        if sent:
            collapse = status == _GOOD and not sense and not bidi_flags
            self._send_data_in(task, data, sent, True, status, resid_flags, resid, collapse)
            if collapse:
                return
        # §11.4.8 ExpDataSN: the Data-In PDUs of a read, the R2Ts of a write.
        datasn = task.datasn if task.data_sent or not task.write else task.r2tsn
        stat_sn = self._stat_sn
        self._stat_sn = (stat_sn + 1) & MASK32
        if not sense and not self._hd:
            # The common answer (a write, or a read whose status could not be collapsed):
            # one 48-byte BHS, no data segment, no digest.
            bhs_bytes = _STATUS_BHS.pack(
                _OP_SCSI_RESPONSE, FINAL_BIT | resid_flags | bidi_flags, 0, status & 0xFF,
                0, _ZERO_LUN, task.itt, 0, stat_sn, self._exp_cmd_sn, self._max_cmd_sn,
                datasn, bidi_resid, resid,
            )  # fmt: skip
            self._out.append(bhs_bytes)
            return
        payload = b""
        if sense:
            payload = _U16.pack(len(sense)) + sense
        bhs = bytearray(BHS_LEN)
        _STATUS_BHS.pack_into(
            bhs, 0, _OP_SCSI_RESPONSE, FINAL_BIT | resid_flags | bidi_flags, 0, status & 0xFF,
            0, _ZERO_LUN, task.itt, 0, stat_sn, self._exp_cmd_sn, self._max_cmd_sn,
            datasn, bidi_resid, resid,
        )  # fmt: skip
        self._out.extend(encode_pdu(bhs, payload, header_digest=self._hd, data_digest=self._dd))

    def _send_data_in(
        self,
        task: Task,
        data: bytes | bytearray | memoryview,
        length: int,
        last: bool,
        status: int,
        resid_flags: int,
        resid: int,
        collapse: bool,
    ) -> None:
        """Data-In PDUs for the first *length* bytes of *data*, from the task's current offset.

        PDUs carry at most the initiator's MaxRecvDataSegmentLength; a sequence
        ends (F bit) at every MaxBurstLength boundary of the whole transfer and,
        when *last*, at the end of *data*. *collapse* puts the status and the
        residual in the last PDU (§11.7.4), which needs *last*.
        """
        mrdsl = self._mrdsl
        burst = self._max_burst
        base = task.data_sent
        stop = base + length
        if not base and length <= mrdsl and length <= burst and last and not self._hd:
            # The common read: one PDU, which ends the sequence and carries the status.
            self._single_data_in(task, data, length, status, resid_flags, resid, collapse)
            return
        # PDU boundaries: at most MRDSL each, never across a MaxBurstLength boundary.
        count = 0
        pos = base
        while pos < stop:
            seq_end = min((pos // burst + 1) * burst, stop)
            count += -(-(seq_end - pos) // mrdsl)
            pos = seq_end
        headers = bytearray(BHS_LEN * count)
        hview = memoryview(headers)
        dview = memoryview(data)
        out = self._out
        hd = self._hd
        dd = self._dd
        pack = _STATUS_BHS.pack_into
        itt = task.itt
        exp = self._exp_cmd_sn
        mx = self._max_cmd_sn
        datasn = task.datasn
        offset = base
        h = 0
        while offset < stop:
            seq_end = min((offset // burst + 1) * burst, stop)
            end = min(offset + mrdsl, seq_end)
            n = end - offset
            flags = 0
            stat = 0
            statsn = 0
            rcount = 0
            if end % burst == 0 or (last and end == stop):
                flags = FINAL_BIT
                if collapse and end == stop:
                    flags |= DATAIN_STATUS | resid_flags
                    stat = status
                    statsn = self._stat_sn
                    rcount = resid
                    self._stat_sn = (statsn + 1) & MASK32
            pack(
                headers, h, _OP_DATA_IN, flags, 0, stat, n, _ZERO_LUN, itt, RESERVED_TAG,
                statsn, exp, mx, datasn, offset, rcount,
            )  # fmt: skip
            hdr = hview[h : h + BHS_LEN]
            out.append(hdr)
            if hd:
                out.append(digest_bytes(hdr))
            chunk = dview[offset - base : end - base]
            out.append(chunk)
            pad = pad_len(n)
            if pad:
                padding = bytes(pad)
                out.append(padding)
                if dd:
                    out.append(digest_bytes(chunk, padding))
            elif dd:
                out.append(digest_bytes(chunk))
            offset = end
            datasn = (datasn + 1) & MASK32
            h += BHS_LEN
        task.data_sent = stop
        task.datasn = datasn

    def _single_data_in(
        self,
        task: Task,
        data: bytes | bytearray | memoryview,
        length: int,
        status: int,
        resid_flags: int,
        resid: int,
        collapse: bool,
    ) -> None:
        """:meth:`_send_data_in` for all of a read in one PDU, without header digest."""
        flags = FINAL_BIT
        stat = 0
        statsn = 0
        rcount = 0
        if collapse:
            flags |= DATAIN_STATUS | resid_flags
            stat = status
            statsn = self._stat_sn
            rcount = resid
            self._stat_sn = (statsn + 1) & MASK32
        out = self._out
        header = _STATUS_BHS.pack(
            _OP_DATA_IN, flags, 0, stat, length, _ZERO_LUN, task.itt, RESERVED_TAG,
            statsn, self._exp_cmd_sn, self._max_cmd_sn, task.datasn, 0, rcount,
        )  # fmt: skip
        out.append(header)
        chunk = data if len(data) == length else memoryview(data)[:length]
        out.append(chunk)
        pad = -length & 3
        if pad:
            padding = bytes(pad)
            out.append(padding)
            if self._dd:
                out.append(digest_bytes(chunk, padding))
        elif self._dd:
            out.append(digest_bytes(chunk))
        task.data_sent = length
        task.datasn = (task.datasn + 1) & MASK32

    def _emit(self, bhs: bytearray, data: bytes | bytearray | memoryview = b"") -> None:
        self._out.extend(encode_pdu(bhs, data, header_digest=self._hd, data_digest=self._dd))

    def _status_pdu(self, opcode: int, flags: int, itt: int, byte2: int = 0) -> bytearray:
        """A target PDU that carries StatSN (advanced), ExpCmdSN and MaxCmdSN."""
        bhs = bytearray(BHS_LEN)
        bhs[0] = opcode
        bhs[1] = flags
        bhs[2] = byte2
        struct.pack_into("!I", bhs, 16, itt)
        struct.pack_into("!III", bhs, 24, self._stat_sn, self._exp_cmd_sn, self._max_cmd_sn)
        self._stat_sn = (self._stat_sn + 1) & MASK32
        return bhs

    def _reject(self, pdu: Pdu, reason: RejectReason) -> None:
        """§11.17: Reject carrying the offending header; ITT is 0xffffffff, StatSN advances."""
        bhs = self._status_pdu(Opcode.REJECT, FINAL_BIT, RESERVED_TAG, int(reason))
        self._emit(bhs, pdu.bhs)

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = (ttt + 1) & 0x7FFFFFFF or 1
        return ttt

    # ------------------------------------------------------------------ NOP, text, logout

    def _on_nop_out(self, pdu: Pdu) -> None:
        if pdu.itt == RESERVED_TAG:
            return  # an answer to our ping, or a ping that wants no answer (§11.18.2)
        bhs = self._status_pdu(Opcode.NOP_IN, FINAL_BIT, pdu.itt)
        bhs[8:16] = pdu.bhs[8:16]
        struct.pack_into("!I", bhs, 20, RESERVED_TAG)
        self._emit(bhs, pdu.data[: self._mrdsl])

    def _on_text(self, pdu: Pdu) -> None:
        itt = pdu.itt
        ttt = pdu.u32(20)
        more = bool(pdu.flags & 0x40)  # C bit: the initiator's text continues
        state = self._text
        if ttt != RESERVED_TAG:
            if state is None or state.itt != itt or state.ttt != ttt:
                self._reject(pdu, RejectReason.INVALID_PDU_FIELD)
                return
        else:
            # A new request replaces whatever exchange was going on (§11.10.4).
            state = self._text = _TextState(itt, RESERVED_TAG)
        if not state.answer:
            # Still reading the initiator's text (it may come in pieces with the C bit).
            state.request += pdu.data
            if len(state.request) > MAX_TEXT_REQUEST:
                self._text = None
                raise _ProtocolError("Text Request too long")
            if more:
                # §11.10.2: an incomplete request gets an empty response asking for the rest.
                state.ttt = self._new_ttt()
                self._text_response(itt, b"", final=False, cont=False, ttt=state.ttt)
                return
            state.answer = self._answer_text(bytes(state.request))
            state.request = bytearray()
        chunk = state.answer[: self._mrdsl]
        state.answer = state.answer[len(chunk) :]
        if state.answer:
            state.ttt = self._new_ttt()
            self._text_response(itt, chunk, final=False, cont=True, ttt=state.ttt)
        else:
            self._text = None
            self._text_response(itt, chunk, final=True, cont=False, ttt=RESERVED_TAG)

    def _text_response(self, itt: int, data: bytes, *, final: bool, cont: bool, ttt: int) -> None:
        flags = (FINAL_BIT if final else 0) | (0x40 if cont else 0)
        bhs = self._status_pdu(Opcode.TEXT_RESPONSE, flags, itt)
        struct.pack_into("!I", bhs, 20, ttt)
        self._emit(bhs, data)

    def _answer_text(self, request: bytes) -> bytes:
        params = self.params
        assert params is not None
        try:
            pairs = parse_text(request)
        except MalformedPacket as exc:
            raise _ProtocolError(f"Text Request: {exc}") from exc
        answer = bytearray()
        for key, value in pairs:
            if key == "SendTargets":
                if params.session_type == SessionType.DISCOVERY:
                    answer += send_targets_text(self._directory, params.initiator_name, value)
                else:
                    answer += send_targets_text(
                        self._directory,
                        params.initiator_name,
                        value,
                        session_target=params.target_name,
                    )
            elif key == "MaxRecvDataSegmentLength":
                # Declarative and allowed in the full-feature phase (§13.12): it bounds our PDUs.
                if value.isdigit() and 512 <= int(value) <= 0xFFFFFF:
                    self._mrdsl = int(value)
                else:
                    answer += encode_text([(key, REJECT)])
            elif key in _LOGIN_KEYS:
                answer += encode_text([(key, REJECT)])
            else:
                answer += encode_text([(key, NOT_UNDERSTOOD)])
        return bytes(answer)

    def _on_logout(self, pdu: Pdu, immediate: bool) -> None:
        params = self.params
        assert params is not None
        reason = pdu.flags & 0x7F
        cid = pdu.u16(20)
        if reason == LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            self._logout_response(pdu.itt, LogoutResponse.RECOVERY_NOT_SUPPORTED)
            self._release_slot(immediate)
            return
        if reason == LogoutReason.CLOSE_CONNECTION and cid != params.cid:
            self._logout_response(pdu.itt, LogoutResponse.CID_NOT_FOUND)
            self._release_slot(immediate)
            return
        if reason not in (LogoutReason.CLOSE_SESSION, LogoutReason.CLOSE_CONNECTION):
            raise _ProtocolError(f"Logout reason {reason}", RejectReason.INVALID_PDU_FIELD)
        # §11.14: the tasks of the connection (session) are terminated; running ones
        # finish on the SCSI layer unanswered, then the Logout Response goes out.
        self._release_slot(immediate)
        self._logout_itt = pdu.itt
        self._abort_tasks(lambda task: True)
        self._state = _LOGOUT
        if not self._running:
            self._finish_logout()

    def _finish_logout(self) -> None:
        itt = self._logout_itt
        if itt is None:
            return
        self._logout_itt = None
        self._logout_response(itt, LogoutResponse.CLOSED_SUCCESSFULLY)
        self.close("logout", logout=True)

    def _logout_response(self, itt: int, response: int) -> None:
        bhs = self._status_pdu(Opcode.LOGOUT_RESPONSE, FINAL_BIT, itt, response)
        # Time2Wait / Time2Retain: 0 (nothing to recover at ERL 0).
        self._emit(bhs)

    # ------------------------------------------------------------------ task management

    def _on_tmf(self, pdu: Pdu, immediate: bool) -> None:
        function = pdu.flags & 0x7F
        lun = pdu.lun
        itt = pdu.itt
        scsi = self.scsi
        nexus = self._nexus
        response = TmfResponse.FUNCTION_COMPLETE
        affected: set[Task] = set()
        then_close = False
        if function == TmfFunction.ABORT_TASK:
            ref_itt = pdu.u32(20)
            ref_cmd_sn = pdu.u32(32)
            task = self._tasks.get(ref_itt)
            if task is not None and task.itt != itt:
                affected = self._abort_tasks(lambda t: t is task)
            elif self._cmd_sn_pending(ref_cmd_sn, pdu.u32(24)):
                # §11.5.1 b): the command never arrived; it counts as received and is never run.
                self._held[ref_cmd_sn] = _CONSUMED
                if ref_cmd_sn == self._exp_cmd_sn:
                    del self._held[ref_cmd_sn]
                    self._advance(_CONSUMED)
            else:
                response = TmfResponse.TASK_DOES_NOT_EXIST
        elif function in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET):
            affected = self._abort_tasks(lambda t: t.lun == lun and t.itt != itt)
        elif function == TmfFunction.LOGICAL_UNIT_RESET:
            if scsi is None or not scsi.lun_reset(lun, nexus):
                response = TmfResponse.LUN_DOES_NOT_EXIST
            else:
                affected = self._abort_tasks(lambda t: t.lun == lun and t.itt != itt)
        elif function in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            cold = function == TmfFunction.TARGET_COLD_RESET
            if scsi is not None:
                scsi.target_reset(nexus, cold)
            affected = self._abort_tasks(lambda t: t.itt != itt)
            # §11.5.1: after a cold reset's response the target drops every connection.
            then_close = cold
        elif function == TmfFunction.TASK_REASSIGN:
            response = TmfResponse.TASK_ALLEGIANCE_REASSIGNMENT_NOT_SUPPORTED
        else:
            response = TmfResponse.FUNCTION_NOT_SUPPORTED
        waiting = {t for t in affected if t.state in (_QUEUED, _RUNNING)}
        pending = _PendingTmf(itt, response, waiting, then_close)
        self._release_slot(immediate)
        if pending.waiting:
            self._tmfs.append(pending)
        else:
            self._tmf_response(pending)

    def _cmd_sn_pending(self, ref: int, tmf_cmd_sn: int) -> bool:
        """RefCmdSN names a command inside the window that has not arrived (§11.5.1 b)."""
        exp = self._exp_cmd_sn
        window = (self._max_cmd_sn - exp + 1) & MASK32
        if ((ref - exp) & MASK32) >= window:
            return False
        held = self._held.get(ref)
        if held is not None:
            return False  # it did arrive (a held non-SCSI command): not abortable here
        return sn_lt(ref, tmf_cmd_sn)

    def _abort_tasks(self, match: Callable[[Task], bool]) -> set[Task]:
        """Terminate matching tasks; returns them (running ones finish unanswered later)."""
        victims = [t for t in self._tasks.values() if match(t)]
        for task in victims:
            task.aborted = True
            if task.state == _COLLECTING:
                # Never started: it ends here. Its CmdSN is consumed when its turn comes.
                task.state = _DONE
                self._forget(task)
                if task.ordered:
                    self._release_slot(task.immediate)
                else:
                    self._held[task.cmd_sn] = _CONSUMED
            # _QUEUED: start() will refuse it; _RUNNING: its completion goes unanswered.
        return set(victims)

    def _task_terminated(self, task: Task) -> None:
        for pending in list(self._tmfs):
            pending.waiting.discard(task)
            if not pending.waiting:
                self._tmfs.remove(pending)
                self._tmf_response(pending)

    def _tmf_response(self, pending: _PendingTmf) -> None:
        if self._state == _CLOSED:
            return
        bhs = self._status_pdu(Opcode.TASK_MGMT_RESPONSE, FINAL_BIT, pending.itt, pending.response)
        self._emit(bhs)
        if pending.then_close:
            self.close("target cold reset", cold_reset=True)


_COMMAND_OPCODES = frozenset(
    {Opcode.NOP_OUT, Opcode.SCSI_COMMAND, Opcode.TASK_MGMT_REQUEST, Opcode.TEXT_REQUEST,
     Opcode.LOGOUT_REQUEST}
)  # fmt: skip
_DISCOVERY_OPCODES = frozenset({Opcode.NOP_OUT, Opcode.TEXT_REQUEST, Opcode.LOGOUT_REQUEST})


def _residual(expected: int, actual: int | None) -> tuple[int, int]:
    """Residual flag and count of §11.4.5 for *expected* (EDTL) against *actual* bytes."""
    if actual is None or actual == expected:
        return 0, 0
    if actual > expected:
        return RESP_OVERFLOW, actual - expected
    return RESP_UNDERFLOW, expected - actual


def _parse_ahs(ahs: bytes) -> tuple[bytes, int]:
    """Extended CDB bytes (AHS type 1) and the bidirectional read length (type 2), §11.2.2."""
    ext = b""
    bidi_read = 0
    pos = 0
    while pos + 4 <= len(ahs):
        length = (ahs[pos] << 8) | ahs[pos + 1]
        ahs_type = ahs[pos + 2]
        body = ahs[pos + 4 : pos + 3 + length]
        if len(body) != max(0, length - 1):
            raise _ProtocolError("AHS longer than TotalAHSLength", RejectReason.INVALID_PDU_FIELD)
        if ahs_type == 1:
            ext = body
        elif ahs_type == 2 and len(body) >= 4:
            bidi_read = int.from_bytes(body[:4], "big")
        pos += 3 + length + (-(3 + length) & 3)
    return ext, bidi_read
