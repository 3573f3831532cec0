"""The full-feature phase of one iSCSI connection, driven by byte-exact PDUs (RFC 7143)."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import Any

import pytest

from mobinux.iscsi.connection import (
    Closed,
    IscsiConnection,
    LoggedIn,
    Task,
    sn_lt,
)
from mobinux.iscsi.constants import RESERVED_TAG, Opcode
from mobinux.iscsi.login import LoginStep
from mobinux.iscsi.params import (
    ChapSecret,
    SessionParams,
    SessionType,
    TargetEntry,
    TargetLimits,
)
from mobinux.iscsi.pdu import Pdu, PduReader, digest_bytes, encode_lun

IQN = "iqn.2024-01.org.mobinux:disk"
INITIATOR = "iqn.1994-05.com.redhat:client"


# ---------------------------------------------------------------- fakes


class FakeDirectory:
    def __init__(self, targets: Sequence[str] = (IQN,)) -> None:
        self.entries = [TargetEntry(t) for t in targets]

    def lookup(self, iqn: str) -> TargetEntry | None:
        return next((e for e in self.entries if e.iqn.lower() == iqn.lower()), None)

    def visible_to(self, initiator_name: str) -> Sequence[TargetEntry]:
        return self.entries

    def portals(self, iqn: str) -> Sequence[str]:
        return ["127.0.0.1:3260,1"]

    def discovery_chap(self) -> ChapSecret | None:
        return None


class FakeLogin:
    """Answers the first Login Request with a fixed reply and *params*."""

    def __init__(self, params: SessionParams, *, refuse: bool = False) -> None:
        self.params = params
        self.refuse = refuse
        self.seen: list[Pdu] = []

    def receive(self, pdu: Pdu) -> LoginStep:
        self.seen.append(pdu)
        if self.refuse:
            return LoginStep([b"REFUSED!"], close=True)
        return LoginStep([b"LOGIN-OK"], params=self.params)


class FakeScsi:
    def __init__(self) -> None:
        self.lun_resets: list[tuple[int, str]] = []
        self.target_resets: list[tuple[str, bool]] = []

    def lun_reset(self, lun: int, nexus: str) -> bool:
        self.lun_resets.append((lun, nexus))
        return lun == 0

    def target_reset(self, nexus: str, cold: bool) -> None:
        self.target_resets.append((nexus, cold))


def make_params(**overrides: Any) -> SessionParams:
    base = SessionParams(
        session_type=SessionType.NORMAL,
        initiator_name=INITIATOR,
        initiator_alias="",
        target_name=IQN,
        isid=bytes.fromhex("400001370000"),
        tsih=1,
        cid=0,
        tpgt=1,
        initial_r2t=True,
        immediate_data=True,
        max_burst_length=262144,
        first_burst_length=65536,
        initiator_max_recv_data_segment_length=8192,
        target_max_recv_data_segment_length=262144,
        exp_cmd_sn=10,
        stat_sn=100,
    )
    return dataclasses.replace(base, **overrides)


def login_request() -> bytes:
    bhs = bytearray(48)
    bhs[0] = 0x43
    bhs[1] = 0x87
    return bytes(bhs)


# ---------------------------------------------------------------- PDU builders (initiator side)


def bhs(opcode: int, flags: int, *, immediate: bool = False, lun: int = 0, itt: int = 0) -> bytearray:
    b = bytearray(48)
    b[0] = opcode | (0x40 if immediate else 0)
    b[1] = flags
    b[8:16] = encode_lun(lun)
    struct.pack_into("!I", b, 16, itt)
    return b


def wire(
    header: bytearray,
    data: bytes = b"",
    *,
    ahs: bytes = b"",
    header_digest: bool = False,
    data_digest: bool = False,
) -> bytes:
    header[4] = len(ahs) // 4
    n = len(data)
    header[5:8] = n.to_bytes(3, "big")
    out = bytes(header) + ahs
    if header_digest:
        out += digest_bytes(out)
    if n:
        padded = data + b"\0" * (-n & 3)
        out += padded
        if data_digest:
            out += digest_bytes(padded)
    return out


def scsi_cmd(
    itt: int,
    cmd_sn: int,
    cdb: bytes,
    *,
    edtl: int = 0,
    read: bool = False,
    write: bool = False,
    final: bool = True,
    immediate: bool = False,
    data: bytes = b"",
    lun: int = 0,
    attr: int = 1,
    ahs: bytes = b"",
    **kw: bool,
) -> bytes:
    flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | attr
    b = bhs(Opcode.SCSI_COMMAND, flags, immediate=immediate, lun=lun, itt=itt)
    struct.pack_into("!III", b, 20, edtl, cmd_sn, 0)
    b[32:48] = cdb.ljust(16, b"\0")[:16]
    return wire(b, data, ahs=ahs, **kw)


def data_out(
    itt: int, ttt: int, datasn: int, offset: int, data: bytes, *, final: bool = True, **kw: bool
) -> bytes:
    b = bhs(Opcode.SCSI_DATA_OUT, 0x80 if final else 0, itt=itt)
    struct.pack_into("!I", b, 20, ttt)
    struct.pack_into("!II", b, 36, datasn, offset)
    return wire(b, data, **kw)


def nop_out(itt: int, cmd_sn: int, data: bytes = b"", *, ttt: int = RESERVED_TAG, immediate: bool = True) -> bytes:
    b = bhs(Opcode.NOP_OUT, 0x80, immediate=immediate, itt=itt)
    struct.pack_into("!II", b, 20, ttt, cmd_sn)
    return wire(b, data)


def tmf(
    itt: int,
    function: int,
    cmd_sn: int,
    *,
    ref_itt: int = RESERVED_TAG,
    ref_cmd_sn: int = 0,
    lun: int = 0,
    immediate: bool = True,
) -> bytes:
    b = bhs(Opcode.TASK_MGMT_REQUEST, 0x80 | function, immediate=immediate, lun=lun, itt=itt)
    struct.pack_into("!II", b, 20, ref_itt, cmd_sn)
    struct.pack_into("!I", b, 32, ref_cmd_sn)
    return wire(b)


def text_req(
    itt: int,
    cmd_sn: int,
    data: bytes,
    *,
    ttt: int = RESERVED_TAG,
    final: bool = True,
    cont: bool = False,
    immediate: bool = False,
) -> bytes:
    b = bhs(Opcode.TEXT_REQUEST, (0x80 if final else 0) | (0x40 if cont else 0), immediate=immediate, itt=itt)
    struct.pack_into("!II", b, 20, ttt, cmd_sn)
    return wire(b, data)


def logout(itt: int, cmd_sn: int, *, reason: int = 0, cid: int = 0, immediate: bool = False) -> bytes:
    b = bhs(Opcode.LOGOUT_REQUEST, 0x80 | reason, immediate=immediate, itt=itt)
    struct.pack_into("!H", b, 20, cid)
    struct.pack_into("!I", b, 24, cmd_sn)
    return wire(b)


READ10_1 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])
WRITE10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])
TUR = bytes(6)


# ---------------------------------------------------------------- harness


@dataclasses.dataclass
class Out:
    """A target PDU as the initiator sees it."""

    pdu: Pdu

    @property
    def op(self) -> int:
        return self.pdu.opcode

    @property
    def flags(self) -> int:
        return self.pdu.flags

    @property
    def data(self) -> bytes:
        return self.pdu.data

    def u32(self, off: int) -> int:
        return self.pdu.u32(off)

    @property
    def itt(self) -> int:
        return self.pdu.itt

    @property
    def stat_sn(self) -> int:
        return self.u32(24)

    @property
    def exp_cmd_sn(self) -> int:
        return self.u32(28)

    @property
    def max_cmd_sn(self) -> int:
        return self.u32(32)


class Harness:
    def __init__(
        self,
        params: SessionParams | None = None,
        *,
        limits: TargetLimits | None = None,
        **core_kw: Any,
    ) -> None:
        self.params = params or make_params()
        self.scsi = FakeScsi()
        self.limits = limits or TargetLimits(queue_depth=8)
        self.conn = IscsiConnection(FakeLogin(self.params), FakeDirectory(), self.limits, **core_kw)
        self.conn.receive_data(login_request())
        assert self.conn.data_to_send() == [b"LOGIN-OK"]
        event = self.conn.next_event()
        assert isinstance(event, LoggedIn)
        self.conn.attach(None if self.params.session_type == SessionType.DISCOVERY else self.scsi)
        self.reader = PduReader(max_data_segment=1 << 24)
        self.reader.enable_digests(self.params.header_digest, self.params.data_digest)
        self.events: list[Any] = []

    def send(self, *pdus: bytes) -> list[Out]:
        for pdu in pdus:
            self.conn.receive_data(pdu)
        return self.collect()

    def collect(self) -> list[Out]:
        while (event := self.conn.next_event()) is not None:
            self.events.append(event)
        raw = b"".join(bytes(b) for b in self.conn.data_to_send())
        self.reader.feed(raw)
        out = []
        while (pdu := self.reader.next_pdu()) is not None:
            out.append(Out(pdu))
        assert self.reader.buffered == 0
        return out

    def tasks(self) -> list[Task]:
        tasks = [e for e in self.events if isinstance(e, Task)]
        self.events = [e for e in self.events if not isinstance(e, Task)]
        return tasks

    def task(self) -> Task:
        tasks = self.tasks()
        assert len(tasks) == 1, tasks
        assert self.conn.start(tasks[0])
        return tasks[0]

    def finish(self, task: Task, status: int = 0, data: bytes = b"", sense: bytes = b"", **kw: Any) -> list[Out]:
        self.conn.complete(task, status, data, sense, **kw)
        return self.collect()

    @property
    def closed(self) -> Closed | None:
        return next((e for e in self.events if isinstance(e, Closed)), None)


# ---------------------------------------------------------------- login hand-over


def test_login_pdus_go_to_the_login_and_nothing_runs_before_attach() -> None:
    params = make_params()
    login = FakeLogin(params)
    conn = IscsiConnection(login, FakeDirectory(), TargetLimits())
    # The final login request and a command in the same segment: the command waits for attach().
    conn.receive_data(login_request() + scsi_cmd(1, 10, TUR))
    assert len(login.seen) == 1
    assert conn.data_to_send() == [b"LOGIN-OK"]
    assert isinstance(conn.next_event(), LoggedIn)
    assert conn.next_event() is None
    conn.attach(FakeScsi())
    task = conn.next_event()
    assert isinstance(task, Task) and task.cdb[:6] == TUR


def test_refused_login_closes_after_the_reply() -> None:
    conn = IscsiConnection(FakeLogin(make_params(), refuse=True), FakeDirectory(), TargetLimits())
    conn.receive_data(login_request())
    assert conn.data_to_send() == [b"REFUSED!"]
    event = conn.next_event()
    assert isinstance(event, Closed) and event.reason == "login refused"
    assert conn.closed


def test_non_login_pdu_during_login_drops_without_reject() -> None:
    conn = IscsiConnection(FakeLogin(make_params()), FakeDirectory(), TargetLimits())
    conn.receive_data(scsi_cmd(1, 0, TUR))
    assert conn.data_to_send() == []
    assert isinstance(conn.next_event(), Closed)


def test_login_times_out_after_a_few_ticks() -> None:
    conn = IscsiConnection(FakeLogin(make_params()), FakeDirectory(), TargetLimits())
    for _ in range(5):
        conn.tick()
    assert conn.closed and conn.close_reason == "login timed out"


def test_digests_apply_from_the_first_full_feature_pdu() -> None:
    h = Harness(make_params(header_digest=True, data_digest=True))
    cmd = scsi_cmd(1, 10, READ10_1, edtl=512, read=True, header_digest=True, data_digest=True)
    h.send(cmd)
    out = h.finish(h.task(), 0, b"\x11" * 512)
    assert len(out) == 1 and out[0].op == Opcode.SCSI_DATA_IN and out[0].data == b"\x11" * 512


def test_bad_header_digest_drops_the_connection() -> None:
    h = Harness(make_params(header_digest=True))
    bad = bytearray(scsi_cmd(1, 10, TUR, header_digest=True))
    bad[50] ^= 1
    assert h.send(bytes(bad)) == []
    assert h.closed is not None and "digest" in h.closed.reason


def test_data_digest_error_drops_the_connection() -> None:
    h = Harness(make_params(data_digest=True, initial_r2t=False))
    bad = bytearray(scsi_cmd(1, 10, WRITE10, edtl=512, write=True, data=b"x" * 512, data_digest=True))
    bad[-1] ^= 0xFF
    h.send(bytes(bad))
    assert h.closed is not None and h.closed.reason == "data digest error"


# ---------------------------------------------------------------- command window


def test_serial_number_arithmetic() -> None:
    assert sn_lt(1, 2) and not sn_lt(2, 1) and not sn_lt(5, 5)
    assert sn_lt(0xFFFFFFFF, 0) and sn_lt(0xFFFFFFF0, 5) and not sn_lt(5, 0xFFFFFFF0)


def test_window_opens_as_commands_finish() -> None:
    h = Harness()  # queue depth 8, ExpCmdSN 10
    h.send(scsi_cmd(1, 10, TUR))
    task = h.task()
    assert h.conn.exp_cmd_sn == 11 and h.conn.max_cmd_sn == 17  # one slot busy
    (resp,) = h.finish(task)
    assert resp.op == Opcode.SCSI_RESPONSE
    assert (resp.stat_sn, resp.exp_cmd_sn, resp.max_cmd_sn) == (100, 11, 18)


def test_commands_outside_the_window_are_silently_ignored() -> None:
    h = Harness()
    assert h.send(scsi_cmd(1, 9, TUR)) == [] and h.tasks() == []  # below ExpCmdSN
    assert h.send(scsi_cmd(2, 18, TUR)) == [] and h.tasks() == []  # MaxCmdSN + 1
    h.send(scsi_cmd(3, 10, TUR))  # the next one is still welcome
    assert [t.itt for t in h.tasks()] == [3]
    assert h.closed is None


def test_closed_window_refuses_even_exp_cmd_sn() -> None:
    h = Harness(limits=TargetLimits(queue_depth=2))
    h.send(scsi_cmd(1, 10, TUR), scsi_cmd(2, 11, TUR))
    assert len(h.tasks()) == 2
    assert h.conn.max_cmd_sn == 11 and h.conn.exp_cmd_sn == 12  # window closed
    assert h.send(scsi_cmd(3, 12, TUR)) == [] and h.tasks() == []


def test_out_of_order_commands_are_held_until_the_gap_fills() -> None:
    h = Harness()
    h.send(scsi_cmd(2, 11, TUR), scsi_cmd(3, 12, TUR))
    assert h.tasks() == []
    h.send(scsi_cmd(2, 11, TUR))  # a duplicate of a held command: ignored
    h.send(scsi_cmd(1, 10, TUR))
    assert [t.itt for t in h.tasks()] == [1, 2, 3]
    assert h.conn.exp_cmd_sn == 13


def test_immediate_commands_do_not_advance_cmd_sn() -> None:
    h = Harness()
    h.send(scsi_cmd(1, 10, TUR, immediate=True))
    task = h.task()
    assert h.conn.exp_cmd_sn == 10
    (resp,) = h.finish(task)
    assert resp.max_cmd_sn == 17
    h.send(scsi_cmd(2, 10, TUR))
    assert [t.itt for t in h.tasks()] == [2]


def test_window_wraps_around_zero() -> None:
    h = Harness(make_params(exp_cmd_sn=0xFFFFFFFF))
    h.send(scsi_cmd(2, 0, TUR))  # held: one ahead, across the wrap
    assert h.tasks() == []
    h.send(scsi_cmd(1, 0xFFFFFFFF, TUR))
    assert [t.itt for t in h.tasks()] == [1, 2]
    assert h.conn.exp_cmd_sn == 1


def test_duplicate_itt_is_a_protocol_error() -> None:
    h = Harness()
    h.send(scsi_cmd(1, 10, TUR))
    out = h.send(scsi_cmd(1, 11, TUR))
    assert out[0].op == Opcode.REJECT and out[0].pdu.bhs[2] == 0x09
    assert h.closed is not None


# ---------------------------------------------------------------- reads


def read_out(h: Harness, edtl: int, produced: bytes, status: int = 0, sense: bytes = b"") -> list[Out]:
    h.send(scsi_cmd(7, 10, READ10_1, edtl=edtl, read=True))
    return h.finish(h.task(), status, produced, sense)


def test_read_splits_at_mrdsl_and_collapses_status() -> None:
    h = Harness(make_params(initiator_max_recv_data_segment_length=4096))
    data = bytes(range(256)) * 40  # 10240 bytes
    out = read_out(h, 10240, data)
    assert [o.op for o in out] == [Opcode.SCSI_DATA_IN] * 3
    assert [len(o.data) for o in out] == [4096, 4096, 2048]
    assert [o.u32(36) for o in out] == [0, 1, 2]  # DataSN
    assert [o.u32(40) for o in out] == [0, 4096, 8192]  # Buffer Offset
    assert [o.flags for o in out] == [0, 0, 0x81]  # F+S only on the last
    assert out[2].stat_sn == 100 and out[2].pdu.bhs[3] == 0
    assert b"".join(o.data for o in out) == data
    assert all(o.itt == 7 and o.u32(20) == RESERVED_TAG for o in out)
    assert h.conn.stat_sn == 101


def test_read_sets_f_at_every_max_burst_boundary() -> None:
    h = Harness(make_params(initiator_max_recv_data_segment_length=4096, max_burst_length=6144))
    out = read_out(h, 16384, b"z" * 16384)
    # bursts of 6144: [4096, 2048F] [4096, 2048F] [4096 F+S]
    assert [len(o.data) for o in out] == [4096, 2048, 4096, 2048, 4096]
    assert [o.flags & 0x80 for o in out] == [0, 0x80, 0, 0x80, 0x80]
    assert out[-1].flags & 0x01 and not any(o.flags & 0x01 for o in out[:-1])


def test_read_underflow_residual_in_the_last_data_in() -> None:
    h = Harness()
    (out,) = read_out(h, 10000, b"a" * 512)
    assert out.flags == 0x80 | 0x01 | 0x02  # F, S, U
    assert out.u32(44) == 10000 - 512
    assert out.data == b"a" * 512


def test_read_overflow_sends_only_edtl() -> None:
    h = Harness()
    (out,) = read_out(h, 200, b"b" * 512)
    assert out.flags == 0x80 | 0x01 | 0x04  # F, S, O
    assert out.u32(44) == 312 and out.data == b"b" * 200


def test_read_with_edtl_zero_gets_a_response_with_overflow() -> None:
    h = Harness()
    (out,) = read_out(h, 0, b"c" * 512)
    assert out.op == Opcode.SCSI_RESPONSE
    assert out.flags == 0x80 | 0x04 and out.u32(44) == 512
    assert out.pdu.bhs[2] == 0 and out.pdu.bhs[3] == 0


def test_check_condition_is_a_scsi_response_with_sense() -> None:
    h = Harness()
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])
    (out,) = read_out(h, 512, b"", status=2, sense=sense)
    assert out.op == Opcode.SCSI_RESPONSE and out.pdu.bhs[3] == 2
    assert out.data == struct.pack("!H", len(sense)) + sense
    assert out.flags == 0x80 | 0x02 and out.u32(44) == 512  # nothing transferred: underflow


def test_data_then_check_condition_sends_data_in_without_status() -> None:
    h = Harness()
    out = read_out(h, 1024, b"d" * 512, status=2, sense=b"\x70" + bytes(17))
    assert [o.op for o in out] == [Opcode.SCSI_DATA_IN, Opcode.SCSI_RESPONSE]
    assert out[0].flags == 0x80  # F without S
    assert out[1].u32(36) == 1  # ExpDataSN: one Data-In went out
    assert out[1].flags & 0x02 and out[1].u32(44) == 512


# ---------------------------------------------------------------- reads streamed in pieces


READ16_30 = bytes([0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30, 0, 0])  # 30 blocks = 15360 bytes


def header(o: Out) -> tuple[int, int, int, int, int, int]:
    """(opcode, flags, DataSN, Buffer Offset, length, StatSN) of a target PDU."""
    return (o.op, o.flags, o.u32(36), o.u32(40), len(o.data), o.stat_sn)


def streamed(h: Harness, edtl: int, pieces: list[bytes], status: int = 0, sense: bytes = b"") -> list[Out]:
    """A READ answered with send_data() for all pieces but the last, then complete()."""
    h.send(scsi_cmd(7, 10, READ16_30, edtl=edtl, read=True))
    task = h.task()
    out: list[Out] = []
    for piece in pieces[:-1]:
        h.conn.send_data(task, piece)
        out += h.collect()
    return out + h.finish(task, status, pieces[-1], sense)


def test_streamed_read_continues_offsets_datasn_and_bursts_across_pieces() -> None:
    h = Harness(make_params(initiator_max_recv_data_segment_length=4096, max_burst_length=6144))
    data = bytes(range(256)) * 60  # 15360 bytes in three pieces of 5120
    out = streamed(h, 15360, [data[:5120], data[5120:10240], data[10240:]])
    DI = Opcode.SCSI_DATA_IN
    # Sequences end at 6144 and 12288 whatever the pieces; a PDU never spans a piece,
    # so the piece ends at 5120 and 10240 cut PDUs short (without the F bit).
    assert [header(o) for o in out] == [
        (DI, 0x00, 0, 0, 4096, 0),
        (DI, 0x00, 1, 4096, 1024, 0),
        (DI, 0x80, 2, 5120, 1024, 0),
        (DI, 0x00, 3, 6144, 4096, 0),
        (DI, 0x80, 4, 10240, 2048, 0),
        (DI, 0x81, 5, 12288, 3072, 100),  # F+S, GOOD, the only StatSN
    ]
    assert out[-1].pdu.bhs[3] == 0 and out[-1].u32(44) == 0
    assert all(o.itt == 7 and o.u32(20) == RESERVED_TAG for o in out)
    assert b"".join(o.data for o in out) == data
    assert h.conn.stat_sn == 101 and h.conn.running == 0


def test_streamed_read_matches_one_buffer_when_pieces_end_on_burst_boundaries() -> None:
    params = make_params(initiator_max_recv_data_segment_length=4096, max_burst_length=6144)
    data = bytes(range(256)) * 48  # 12288 bytes
    whole, pieces = Harness(params), Harness(params)
    whole.send(scsi_cmd(7, 10, READ16_30, edtl=12288, read=True))
    expected = whole.finish(whole.task(), 0, data)
    got = streamed(pieces, 12288, [data[:6144], data[6144:]])

    def wire_bytes(o: Out) -> bytes:
        # MaxCmdSN (bytes 32-35) differs: the window opens only when the command completes.
        return bytes(o.pdu.bhs[:32]) + bytes(o.pdu.bhs[36:]) + o.data

    assert [wire_bytes(o) for o in got] == [wire_bytes(o) for o in expected]
    assert bytes(got[-1].pdu.bhs) == bytes(expected[-1].pdu.bhs)


def test_streamed_read_failing_later_piece_ends_with_its_check_condition() -> None:
    h = Harness(make_params(initiator_max_recv_data_segment_length=4096, max_burst_length=8192))
    sense = bytes([0x70, 0, 3, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0])  # MEDIUM ERROR
    out = streamed(h, 15360, [b"p" * 5120, b""], status=2, sense=sense)
    assert [(o.op, o.flags, o.u32(36), o.u32(40)) for o in out] == [
        (Opcode.SCSI_DATA_IN, 0x00, 0, 0),
        (Opcode.SCSI_DATA_IN, 0x00, 1, 4096),
        (Opcode.SCSI_RESPONSE, 0x80 | 0x02, 2, 0),  # ExpDataSN 2, underflow
    ]
    rsp = out[-1]
    assert rsp.pdu.bhs[3] == 2 and rsp.data == struct.pack("!H", len(sense)) + sense
    assert rsp.u32(44) == 15360 - 5120 and rsp.stat_sn == 100
    assert h.conn.stat_sn == 101


def test_streamed_read_stops_sending_at_the_expected_length() -> None:
    h = Harness(make_params(initiator_max_recv_data_segment_length=4096))
    out = streamed(h, 6000, [b"a" * 5120, b"b" * 5120, b"c" * 5120])
    data_in = [o for o in out if o.op == Opcode.SCSI_DATA_IN]
    assert [(o.flags, o.u32(36), o.u32(40), len(o.data)) for o in data_in] == [
        (0x00, 0, 0, 4096),
        (0x00, 1, 4096, 1024),
        (0x80, 2, 5120, 880),  # the EDTL is reached: the last Data-In ends the sequence
    ]
    (rsp,) = [o for o in out if o.op == Opcode.SCSI_RESPONSE]
    assert rsp.flags == 0x80 | 0x04 and rsp.u32(44) == 15360 - 6000  # overflow
    assert rsp.u32(36) == 3 and rsp.pdu.bhs[3] == 0


def test_streamed_read_of_an_aborted_task_sends_nothing_more() -> None:
    h = Harness()
    h.send(scsi_cmd(7, 10, READ16_30, edtl=15360, read=True))
    task = h.task()
    h.conn.send_data(task, b"x" * 5120)
    assert [o.op for o in h.collect()] == [Opcode.SCSI_DATA_IN]
    assert h.send(tmf(20, 1, 11, ref_itt=7)) == []  # ABORT TASK waits for the running task
    h.conn.send_data(task, b"y" * 5120)
    assert h.collect() == []
    out = h.finish(task, 0, b"z" * 5120)
    assert [o.op for o in out] == [Opcode.TASK_MGMT_RESPONSE]


def test_good_status_without_data_is_a_plain_response() -> None:
    h = Harness()
    h.send(scsi_cmd(1, 10, TUR))
    (out,) = h.finish(h.task())
    assert out.op == Opcode.SCSI_RESPONSE and out.flags == 0x80 and out.data == b""


def test_data_produced_without_read_flag_is_an_overflow() -> None:
    h = Harness()
    h.send(scsi_cmd(1, 10, READ10_1))
    (out,) = h.finish(h.task(), 0, b"x" * 512)
    assert out.op == Opcode.SCSI_RESPONSE and out.flags == 0x84 and out.u32(44) == 512


# ---------------------------------------------------------------- writes


def r2ts(out: list[Out]) -> list[tuple[int, int, int, int]]:
    """(TTT, R2TSN, offset, length) of each R2T."""
    return [(o.u32(20), o.u32(36), o.u32(40), o.u32(44)) for o in out if o.op == Opcode.R2T]


@pytest.mark.parametrize(
    ("immediate_data", "initial_r2t"), [(True, True), (True, False), (False, True), (False, False)]
)
def test_write_in_all_four_immediate_data_initial_r2t_combinations(
    immediate_data: bool, initial_r2t: bool
) -> None:
    fbl = 8192
    h = Harness(
        make_params(
            immediate_data=immediate_data,
            initial_r2t=initial_r2t,
            first_burst_length=fbl,
            max_burst_length=16384,
            target_max_recv_data_segment_length=4096,
        )
    )
    payload = bytes(i % 251 for i in range(40000))
    imm = payload[:4096] if immediate_data else b""
    unsolicited = not initial_r2t
    out = h.send(scsi_cmd(5, 10, WRITE10, edtl=len(payload), write=True, data=imm, final=not unsolicited))
    sent = len(imm)
    if unsolicited:
        assert out == []  # the target waits for the unsolicited burst before soliciting
        datasn = 0
        while sent < fbl:
            n = min(4096, fbl - sent)
            out = h.send(data_out(5, RESERVED_TAG, datasn, sent, payload[sent : sent + n], final=sent + n == fbl))
            sent += n
            datasn += 1
    # the rest comes through R2Ts of at most MaxBurstLength, one outstanding at a time
    expected_r2tsn = 0
    while sent < len(payload):
        (r2t,) = r2ts(out)
        ttt, r2tsn, offset, length = r2t
        assert r2tsn == expected_r2tsn and offset == sent
        assert length == min(16384, len(payload) - sent)
        expected_r2tsn += 1
        datasn = 0
        end = offset + length
        while sent < end:
            n = min(4096, end - sent)
            out = h.send(data_out(5, ttt, datasn, sent, payload[sent : sent + n], final=sent + n == end))
            sent += n
            datasn += 1
    assert out == []
    task = h.task()
    assert task.data_out == payload
    (resp,) = h.finish(task, data_out_used=len(payload))
    assert resp.op == Opcode.SCSI_RESPONSE and resp.flags == 0x80
    assert resp.u32(36) == expected_r2tsn  # ExpDataSN counts the R2Ts


def test_immediate_data_covering_everything_runs_at_once() -> None:
    h = Harness()
    assert h.send(scsi_cmd(1, 10, WRITE10, edtl=512, write=True, data=b"w" * 512)) == []
    assert h.task().data_out == b"w" * 512


def test_unsolicited_burst_may_end_early_with_f() -> None:
    h = Harness(make_params(initial_r2t=False, immediate_data=False, first_burst_length=8192))
    h.send(scsi_cmd(1, 10, WRITE10, edtl=10000, write=True, final=False))
    out = h.send(data_out(1, RESERVED_TAG, 0, 0, b"a" * 1000, final=True))
    assert r2ts(out)[0][2:] == (1000, 9000)


def test_multiple_outstanding_r2ts() -> None:
    h = Harness(make_params(max_outstanding_r2t=2, max_burst_length=4096, immediate_data=False))
    out = h.send(scsi_cmd(1, 10, WRITE10, edtl=12288, write=True))
    assert [r[2:] for r in r2ts(out)] == [(0, 4096), (4096, 4096)]
    first, second = r2ts(out)
    out = h.send(data_out(1, first[0], 0, 0, b"1" * 4096))
    assert [r[1:] for r in r2ts(out)] == [(2, 8192, 4096)]
    third = r2ts(out)[0]
    h.send(data_out(1, second[0], 0, 4096, b"2" * 4096), data_out(1, third[0], 0, 8192, b"3" * 4096))
    assert h.task().data_out == b"1" * 4096 + b"2" * 4096 + b"3" * 4096


def test_write_residuals_follow_what_the_command_used() -> None:
    h = Harness()
    h.send(scsi_cmd(1, 10, WRITE10, edtl=1024, write=True, data=b"q" * 1024))
    (resp,) = h.finish(h.task(), data_out_used=512)
    assert resp.flags == 0x80 | 0x02 and resp.u32(44) == 512
    h.send(scsi_cmd(2, 11, WRITE10, edtl=200, write=True, data=b"q" * 200))
    (resp,) = h.finish(h.task(), data_out_used=512)
    assert resp.flags == 0x80 | 0x04 and resp.u32(44) == 312


def test_write_with_edtl_zero_runs_without_data() -> None:
    h = Harness()
    h.send(scsi_cmd(1, 10, WRITE10, edtl=0, write=True))
    task = h.task()
    assert task.data_out == b""
    (resp,) = h.finish(task, data_out_used=512)
    assert resp.flags == 0x84 and resp.u32(44) == 512


@pytest.mark.parametrize(
    ("name", "pdu", "reason", "asc"),
    [
        ("wrong DataSN", data_out(1, 1, 1, 0, b"x" * 512), 0x04, 0x4B00),
        ("wrong offset", data_out(1, 1, 0, 512, b"x" * 512), 0x04, 0x4B05),
        ("unknown TTT", data_out(1, 99, 0, 0, b"x" * 512), 0x09, 0x4B01),
        ("missing F", data_out(1, 1, 0, 0, b"x" * 1024, final=False), 0x04, 0x4B00),
        ("early F", data_out(1, 1, 0, 0, b"x" * 512, final=True), 0x04, 0x4B00),
        ("beyond the R2T", data_out(1, 1, 0, 0, b"x" * 1536), 0x04, 0x4B02),
        ("unsolicited", data_out(1, RESERVED_TAG, 0, 0, b"x" * 512), 0x04, 0x0C0C),
    ],
)
def test_bad_data_out_ends_the_task_but_not_the_connection(
    name: str, pdu: bytes, reason: int, asc: int
) -> None:
    h = Harness(make_params(immediate_data=False))
    (r2t,) = r2ts(h.send(scsi_cmd(1, 10, WRITE10, edtl=1024, write=True)))
    assert r2t[0] == 1
    reject, resp = h.send(pdu)
    assert reject.op == Opcode.REJECT and reject.pdu.bhs[2] == reason, name
    assert reject.data == pdu[:48] and reject.itt == RESERVED_TAG
    assert resp.op == Opcode.SCSI_RESPONSE and resp.itt == 1 and resp.pdu.bhs[3] == 2
    sense = resp.data[2:]
    assert sense[2] == 0x0B and (sense[12] << 8 | sense[13]) == asc
    assert h.closed is None and h.tasks() == []
    # the rest of the sequence is dropped quietly; the connection goes on
    assert h.send(data_out(1, 1, 1, 512, b"y" * 512)) == []
    h.send(scsi_cmd(2, 11, TUR))
    assert [t.itt for t in h.tasks()] == [2]


def test_bad_data_out_of_a_held_task_is_answered_in_cmd_sn_order() -> None:
    h = Harness(make_params(immediate_data=False))
    out = h.send(scsi_cmd(2, 11, WRITE10, edtl=512, write=True))  # ahead of ExpCmdSN: held
    (r2t,) = r2ts(out)
    (reject,) = h.send(data_out(2, r2t[0], 5, 0, b"x" * 512))
    assert reject.op == Opcode.REJECT
    out = h.send(scsi_cmd(1, 10, TUR))
    assert [(o.op, o.itt) for o in out] == [(Opcode.SCSI_RESPONSE, 2)]
    assert [t.itt for t in h.tasks()] == [1]


def test_immediate_data_beyond_first_burst_is_a_protocol_error() -> None:
    h = Harness(make_params(first_burst_length=512))
    out = h.send(scsi_cmd(1, 10, WRITE10, edtl=2048, write=True, data=b"x" * 1024))
    assert out[0].op == Opcode.REJECT and h.closed is not None


def test_unsolicited_data_with_initial_r2t_yes_is_a_protocol_error() -> None:
    h = Harness()
    out = h.send(scsi_cmd(1, 10, WRITE10, edtl=2048, write=True, final=False))
    assert out[0].op == Opcode.REJECT and h.closed is not None


def test_data_out_for_an_unknown_task_is_discarded() -> None:
    h = Harness()
    assert h.send(data_out(42, RESERVED_TAG, 0, 0, b"x" * 512)) == []
    assert h.closed is None


def test_oversized_write_is_refused_without_soliciting() -> None:
    h = Harness(max_command_bytes=4096)
    (resp,) = h.send(scsi_cmd(1, 10, WRITE10, edtl=8192, write=True))
    assert resp.op == Opcode.SCSI_RESPONSE and resp.pdu.bhs[3] == 2
    assert resp.data[2:3] == b"\x70" and resp.data[4] == 5 and resp.data[14] == 0x24
    assert h.tasks() == []


def test_write_budget_defers_solicitation_until_buffers_free() -> None:
    h = Harness(make_params(immediate_data=False), write_budget=4096)
    out = h.send(scsi_cmd(1, 10, WRITE10, edtl=4096, write=True), scsi_cmd(2, 11, WRITE10, edtl=4096, write=True))
    assert [o.itt for o in out if o.op == Opcode.R2T] == [1]
    h.send(data_out(1, r2ts(out)[0][0], 0, 0, b"1" * 4096))
    out = h.finish(h.task())
    assert sorted((o.op, o.itt) for o in out) == [(Opcode.SCSI_RESPONSE, 1), (Opcode.R2T, 2)]


def test_write_budget_counts_immediate_data_and_serves_commands_in_order() -> None:
    h = Harness(write_budget=8192)
    w = lambda itt, sn, edtl, n: scsi_cmd(itt, sn, WRITE10, edtl=edtl, write=True, data=bytes([itt]) * n)  # noqa: E731
    out = h.send(w(1, 10, 8192, 4096))
    assert r2ts(out) == [(r2ts(out)[0][0], 0, 4096, 4096)]  # alone: solicited at once
    # 4096 immediate bytes held by command 2 are counted too: 8192 + 4096 + 4096 > 8192
    assert h.send(w(2, 11, 8192, 4096)) == []
    assert h.send(w(3, 12, 4096, 2048)) == []  # and 3 waits behind 2
    ttt1 = r2ts(out)[0][0]
    h.send(data_out(1, ttt1, 0, 4096, b"\1" * 4096))
    (task1,) = h.tasks()
    assert h.conn.start(task1) and task1.data_out == b"\1" * 8192
    out = h.finish(task1)
    assert sorted((o.op, o.itt) for o in out) == [(Opcode.SCSI_RESPONSE, 1), (Opcode.R2T, 2)]
    h.send(data_out(2, r2ts(out)[0][0], 0, 4096, b"\2" * 4096))
    (task2,) = h.tasks()
    assert h.conn.start(task2)
    out = h.finish(task2)
    assert sorted((o.op, o.itt) for o in out) == [(Opcode.SCSI_RESPONSE, 2), (Opcode.R2T, 3)]
    assert r2ts(out)[0][2:] == (2048, 2048)


def test_a_command_bigger_than_the_budget_runs_alone() -> None:
    h = Harness(make_params(immediate_data=False), write_budget=4096)
    out = h.send(scsi_cmd(1, 10, WRITE10, edtl=16384, write=True))
    assert [(o.itt, o.u32(40), o.u32(44)) for o in out if o.op == Opcode.R2T] == [(1, 0, 16384)]


def test_extended_cdb_and_bidi_read_length_from_ahs() -> None:
    h = Harness()
    ext = b"\xAA" * 16
    ahs = struct.pack("!HBB", len(ext) + 1, 1, 0) + ext  # 20 bytes: no padding needed
    ahs += struct.pack("!HBB", 5, 2, 0) + struct.pack("!I", 1024)
    cdb = b"\x7f" + bytes(15)
    h.send(scsi_cmd(1, 10, cdb, ahs=ahs, edtl=512, read=True, write=True, data=b"o" * 512))
    task = h.task()
    assert task.cdb == cdb + ext and task.read_len == 1024 and task.write_len == 512
    out = h.finish(task, 0, b"i" * 512, data_out_used=512)
    assert [o.op for o in out] == [Opcode.SCSI_DATA_IN, Opcode.SCSI_RESPONSE]
    assert out[1].flags & 0x08 and out[1].u32(40) == 512  # bidi read underflow


# ---------------------------------------------------------------- NOP


def test_nop_out_ping_is_echoed() -> None:
    h = Harness()
    (out,) = h.send(nop_out(9, 10, b"hello"))
    assert out.op == Opcode.NOP_IN and out.itt == 9 and out.u32(20) == RESERVED_TAG
    assert out.data == b"hello" and out.stat_sn == 100 and h.conn.stat_sn == 101


def test_non_immediate_nop_out_takes_a_cmd_sn() -> None:
    h = Harness()
    (out,) = h.send(nop_out(9, 10, immediate=False))
    assert out.exp_cmd_sn == 11 and out.max_cmd_sn == 18


def test_nop_out_with_reserved_itt_gets_no_answer() -> None:
    h = Harness()
    assert h.send(nop_out(RESERVED_TAG, 10, ttt=5)) == []


def test_idle_connection_gets_pings_and_survives_silence() -> None:
    h = Harness()
    h.conn.tick()  # activity since login: no ping yet
    assert h.collect() == []
    for _ in range(10):
        h.conn.tick()
        (ping,) = h.collect()
        assert ping.op == Opcode.NOP_IN and ping.itt == RESERVED_TAG and ping.u32(20) != RESERVED_TAG
        assert ping.stat_sn == 100  # not advanced for a ping
    assert h.closed is None
    h.send(nop_out(RESERVED_TAG, 10, ttt=ping.u32(20)))
    h.conn.tick()
    assert h.collect() == []


# ---------------------------------------------------------------- text


def test_send_targets_in_a_discovery_session() -> None:
    h = Harness(make_params(session_type=SessionType.DISCOVERY, target_name=""))
    (out,) = h.send(text_req(3, 10, b"SendTargets=All\0"))
    assert out.op == Opcode.TEXT_RESPONSE and out.flags == 0x80 and out.u32(20) == RESERVED_TAG
    assert out.data == f"TargetName={IQN}\0TargetAddress=127.0.0.1:3260,1\0".encode()


def test_long_text_answers_continue_with_c_bit_and_ttt() -> None:
    h = Harness(make_params(session_type=SessionType.DISCOVERY, target_name="", initiator_max_recv_data_segment_length=512))
    h.conn._directory = FakeDirectory([f"iqn.2024-01.org.mobinux:disk{i:03d}" for i in range(40)])  # type: ignore[attr-defined]
    (first,) = h.send(text_req(3, 10, b"SendTargets=All\0"))
    assert first.flags == 0x40 and first.u32(20) != RESERVED_TAG and len(first.data) == 512
    text = first.data
    pdu = first
    cmd_sn = 11
    while pdu.flags & 0x40:
        (pdu,) = h.send(text_req(3, cmd_sn, b"", ttt=pdu.u32(20)))
        text += pdu.data
        cmd_sn += 1
    assert pdu.flags == 0x80 and pdu.u32(20) == RESERVED_TAG
    assert text.count(b"TargetName=") == 40


def test_text_with_a_wrong_ttt_is_rejected() -> None:
    h = Harness()
    (out,) = h.send(text_req(3, 10, b"", ttt=1234))
    assert out.op == Opcode.REJECT and out.pdu.bhs[2] == 0x09 and h.closed is None


def test_other_text_keys_in_full_feature() -> None:
    h = Harness()
    (out,) = h.send(text_req(3, 10, b"X-foo=1\0InitialR2T=No\0MaxRecvDataSegmentLength=4096\0SendTargets=\0"))
    assert out.data == (
        b"X-foo=NotUnderstood\0InitialR2T=Reject\0"
        + f"TargetName={IQN}\0TargetAddress=127.0.0.1:3260,1\0".encode()
    )
    assert h.conn._mrdsl == 4096  # type: ignore[attr-defined]


def test_initiator_text_continued_with_c_bit() -> None:
    h = Harness(make_params(session_type=SessionType.DISCOVERY, target_name=""))
    (ack,) = h.send(text_req(3, 10, b"SendTar", final=False, cont=True))
    assert ack.op == Opcode.TEXT_RESPONSE and ack.data == b"" and ack.flags == 0
    (out,) = h.send(text_req(3, 11, b"gets=All\0", ttt=ack.u32(20)))
    assert out.flags == 0x80 and out.data.startswith(b"TargetName=")


# ---------------------------------------------------------------- logout


def test_logout_answers_then_closes() -> None:
    h = Harness()
    (out,) = h.send(logout(4, 10))
    assert out.op == Opcode.LOGOUT_RESPONSE and out.itt == 4 and out.pdu.bhs[2] == 0
    assert out.exp_cmd_sn == 11
    assert h.closed is not None and h.closed.logout


def test_logout_waits_for_running_tasks_and_drops_their_answers() -> None:
    h = Harness()
    h.send(scsi_cmd(1, 10, TUR))
    task = h.task()
    assert h.send(logout(4, 11)) == []
    out = h.finish(task)
    assert [o.op for o in out] == [Opcode.LOGOUT_RESPONSE]
    assert h.closed is not None


def test_logout_of_an_unknown_cid_and_for_recovery() -> None:
    h = Harness()
    (out,) = h.send(logout(4, 10, reason=1, cid=7))
    assert out.pdu.bhs[2] == 1
    (out,) = h.send(logout(5, 11, reason=2))
    assert out.pdu.bhs[2] == 2
    assert h.closed is None


# ---------------------------------------------------------------- task management


def tmf_response(out: list[Out]) -> int:
    (resp,) = [o for o in out if o.op == Opcode.TASK_MGMT_RESPONSE]
    return resp.pdu.bhs[2]


def test_abort_task_waiting_for_data() -> None:
    h = Harness(make_params(immediate_data=False))
    h.send(scsi_cmd(1, 10, WRITE10, edtl=512, write=True))
    out = h.send(tmf(50, 1, 11, ref_itt=1, ref_cmd_sn=10))
    assert tmf_response(out) == 0
    assert h.send(data_out(1, 1, 0, 0, b"x" * 512)) == []  # late data is dropped
    assert h.tasks() == [] and h.conn.max_cmd_sn == 18


def test_abort_of_a_running_task_answers_after_it_ends() -> None:
    h = Harness()
    h.send(scsi_cmd(1, 10, TUR))
    task = h.task()
    assert h.send(tmf(50, 1, 11, ref_itt=1, ref_cmd_sn=10)) == []
    out = h.finish(task)
    assert [o.op for o in out] == [Opcode.TASK_MGMT_RESPONSE] and out[0].pdu.bhs[2] == 0


def test_abort_of_a_finished_task_does_not_exist() -> None:
    h = Harness()
    h.send(scsi_cmd(1, 10, TUR))
    h.finish(h.task())
    assert tmf_response(h.send(tmf(50, 1, 11, ref_itt=1, ref_cmd_sn=10))) == 1


def test_abort_of_a_command_not_yet_arrived_consumes_its_cmd_sn() -> None:
    h = Harness()
    assert tmf_response(h.send(tmf(50, 1, 11, ref_itt=1, ref_cmd_sn=10))) == 0
    assert h.conn.exp_cmd_sn == 11
    h.send(scsi_cmd(1, 10, TUR))  # arrives late: already consumed, ignored
    assert h.tasks() == []


def test_abort_of_a_queued_task_that_never_started() -> None:
    h = Harness()
    h.send(scsi_cmd(1, 10, TUR))
    (task,) = h.tasks()
    out = h.send(tmf(50, 1, 11, ref_itt=1, ref_cmd_sn=10))
    assert out == []
    assert not h.conn.start(task)
    assert tmf_response(h.collect()) == 0


def test_lun_reset_aborts_the_tasks_of_that_lun() -> None:
    h = Harness(make_params(immediate_data=False))
    h.send(scsi_cmd(1, 10, WRITE10, edtl=512, write=True))
    out = h.send(tmf(50, 5, 11))
    assert tmf_response(out) == 0 and h.scsi.lun_resets == [(0, h.params.nexus)]
    assert tmf_response(h.send(tmf(51, 5, 11, lun=3))) == 2  # LUN_DOES_NOT_EXIST


def test_warm_and_cold_target_reset() -> None:
    h = Harness()
    assert tmf_response(h.send(tmf(50, 6, 10))) == 0
    assert h.closed is None
    out = h.send(tmf(51, 7, 10))
    assert tmf_response(out) == 0
    assert h.scsi.target_resets == [(h.params.nexus, False), (h.params.nexus, True)]
    assert h.closed is not None and h.closed.cold_reset


@pytest.mark.parametrize(("function", "response"), [(3, 5), (8, 4), (14, 5)])
def test_unsupported_task_management_functions(function: int, response: int) -> None:
    h = Harness()
    assert tmf_response(h.send(tmf(50, function, 10))) == response


# ---------------------------------------------------------------- errors


def test_snack_is_rejected_but_the_connection_stays() -> None:
    h = Harness()
    snack = wire(bhs(Opcode.SNACK_REQUEST, 0x80, itt=3))
    (out,) = h.send(snack)
    assert out.op == Opcode.REJECT and out.pdu.bhs[2] == 0x04 and out.data == snack[:48]
    assert h.closed is None


def test_unknown_opcode_is_rejected_and_drops() -> None:
    h = Harness()
    (out,) = h.send(wire(bhs(0x0F, 0x80, itt=3)))
    assert out.op == Opcode.REJECT and out.pdu.bhs[2] == 0x05
    assert h.closed is not None


def test_login_request_in_full_feature_phase_drops() -> None:
    h = Harness()
    (out,) = h.send(login_request())
    assert out.op == Opcode.REJECT and h.closed is not None


def test_scsi_command_in_a_discovery_session_drops() -> None:
    h = Harness(make_params(session_type=SessionType.DISCOVERY, target_name=""))
    (out,) = h.send(scsi_cmd(1, 10, TUR))
    assert out.op == Opcode.REJECT and h.closed is not None


def test_oversized_data_segment_drops() -> None:
    h = Harness(make_params(target_max_recv_data_segment_length=8192))
    h.send(nop_out(1, 10, b"x" * 9000))
    assert h.closed is not None and "MaxRecvDataSegmentLength" in h.closed.reason


def test_too_many_immediate_commands_are_rejected() -> None:
    h = Harness()
    for itt in range(16):
        h.send(scsi_cmd(itt, 10, TUR, immediate=True))
    (out,) = h.send(scsi_cmd(99, 10, TUR, immediate=True))
    assert out.op == Opcode.REJECT and out.pdu.bhs[2] == 0x06 and h.closed is None


def test_completions_after_close_are_ignored() -> None:
    h = Harness()
    h.send(scsi_cmd(1, 10, TUR))
    task = h.task()
    h.conn.close("test")
    assert h.finish(task) == []
