"""Fuzzing the iSCSI connection core: random and mutated PDUs in any chunking.

Whatever arrives, the core either answers with well-formed target PDUs or
closes the connection; it never raises, and what it holds stays bounded
(tasks, held commands, buffered write data).
"""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobinux.iscsi.connection import MAX_IMMEDIATE_TASKS, Closed, IscsiConnection, LoggedIn, Task
from mobinux.iscsi.constants import RESERVED_TAG
from mobinux.iscsi.login import Login
from mobinux.iscsi.params import TargetLimits
from mobinux.iscsi.pdu import PduReader
from tests.unit.test_iscsi_connection import (
    READ10_1,
    TUR,
    WRITE10,
    FakeDirectory,
    FakeLogin,
    FakeScsi,
    bhs,
    data_out,
    login_request,
    logout,
    make_params,
    nop_out,
    scsi_cmd,
    text_req,
    tmf,
    wire,
)

QUEUE_DEPTH = 8
BUDGET = 64 * 1024

SEEDS = [
    scsi_cmd(1, 10, TUR),
    scsi_cmd(2, 11, READ10_1, edtl=512, read=True),
    scsi_cmd(3, 12, WRITE10, edtl=512, write=True, data=b"w" * 512),
    scsi_cmd(4, 13, WRITE10, edtl=4096, write=True, data=b"w" * 512, final=False),
    scsi_cmd(5, 10, WRITE10, edtl=2048, write=True),
    scsi_cmd(6, 10, TUR, immediate=True),
    data_out(4, RESERVED_TAG, 0, 512, b"u" * 512, final=True),
    data_out(5, 1, 0, 0, b"s" * 2048),
    data_out(5, 1, 0, 0, b"s" * 1024, final=False),
    nop_out(7, 10, b"ping"),
    nop_out(RESERVED_TAG, 10, ttt=1),
    tmf(8, 1, 11, ref_itt=5, ref_cmd_sn=10),
    tmf(9, 5, 11),
    tmf(10, 6, 11),
    text_req(11, 10, b"SendTargets=All\0"),
    text_req(11, 11, b"", ttt=2),
    text_req(12, 10, b"Send", final=False, cont=True),
    logout(13, 14),
    wire(bhs(0x10, 0x80, itt=14)),  # SNACK
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "field"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "field" and len(data) >= 48:
            # a plausible but wrong 32-bit field: ITT, TTT, CmdSN, DataSN, offset, ...
            off = draw(st.sampled_from([16, 20, 24, 28, 32, 36, 40, 44]))
            struct.pack_into("!I", data, off, draw(st.sampled_from([0, 1, 9, 10, 11, 0x7FFFFFFF, RESERVED_TAG])))
    return bytes(data)


streams = st.lists(st.one_of(mutated(), st.sampled_from(SEEDS), st.binary(max_size=64)), max_size=25)


def drive(conn: IscsiConnection, chunks: list[bytes], rng: random.Random) -> None:
    """Feed *chunks* in random pieces, completing tasks as a SCSI layer would."""
    reader = PduReader(max_data_segment=1 << 24)
    closed = 0
    pending: list[Task] = []
    stream = b"".join(chunks)
    pos = 0
    while pos < len(stream) or pending:
        if pos < len(stream):
            step = rng.randint(1, 200)
            conn.receive_data(stream[pos : pos + step])
            pos += step
        while (event := conn.next_event()) is not None:
            if isinstance(event, Task):
                if conn.start(event):
                    pending.append(event)
            elif isinstance(event, Closed):
                closed += 1
            else:
                raise AssertionError(f"unexpected event {event!r}")
        if pending and rng.random() < 0.2:
            # part of a streamed read (a no-op for anything but a running read)
            conn.send_data(rng.choice(pending), b"s" * rng.choice([0, 512, 3000]))
        if pending and (rng.random() < 0.5 or pos >= len(stream)):
            task = pending.pop(rng.randrange(len(pending)))
            status = rng.choice([0, 0, 2])
            data = b"r" * rng.choice([0, 100, 512, 9000]) if status == 0 else b""
            conn.complete(task, status, data, b"\x70" + bytes(17) if status else b"", data_out_used=512)
        if rng.random() < 0.05:
            conn.tick()
        for buf in conn.data_to_send():
            reader.feed(buf)
        while (pdu := reader.next_pdu()) is not None:
            assert pdu.opcode >= 0x20, "the target only sends target opcodes"
        # bounded state, whatever the initiator does
        assert len(conn._tasks) <= QUEUE_DEPTH + MAX_IMMEDIATE_TASKS  # type: ignore[attr-defined]
        assert len(conn._held) <= QUEUE_DEPTH  # type: ignore[attr-defined]
        # the budget (or one command bigger than it, admitted alone and itself capped by
        # max_command_bytes), plus unsolicited data (FirstBurstLength per command) that
        # cannot be refused
        unsolicited = (QUEUE_DEPTH + MAX_IMMEDIATE_TASKS) * conn._first_burst  # type: ignore[attr-defined]
        held_cap = max(BUDGET, conn._max_command_bytes)  # type: ignore[attr-defined]
        assert conn._reserved <= held_cap + unsolicited  # type: ignore[attr-defined]
    assert closed <= 1
    assert reader.buffered == 0, "every byte sent belongs to a complete PDU"


def attached(**params: object) -> IscsiConnection:
    p = make_params(**params)
    conn = IscsiConnection(
        FakeLogin(p), FakeDirectory(), TargetLimits(queue_depth=QUEUE_DEPTH), write_budget=BUDGET
    )
    conn.receive_data(login_request())
    conn.data_to_send()
    assert isinstance(conn.next_event(), LoggedIn)
    conn.attach(FakeScsi())
    return conn


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=streams, seed=st.integers(0, 2**32), initial_r2t=st.booleans(), digests=st.booleans())
def test_full_feature_phase_survives_anything(
    chunks: list[bytes], seed: int, initial_r2t: bool, digests: bool
) -> None:
    conn = attached(
        initial_r2t=initial_r2t,
        header_digest=digests,
        data_digest=digests,
        first_burst_length=2048,
        max_burst_length=1024,
        max_outstanding_r2t=2,
        target_max_recv_data_segment_length=16384,
    )
    drive(conn, chunks, random.Random(seed))


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=10), seed=st.integers(0, 2**32))
def test_random_bytes_in_the_full_feature_phase(chunks: list[bytes], seed: int) -> None:
    drive(attached(), chunks, random.Random(seed))


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.one_of(mutated(), st.binary(max_size=100)), max_size=6), seed=st.integers(0, 2**32))
def test_login_phase_with_the_real_login(chunks: list[bytes], seed: int) -> None:
    login = Login(FakeDirectory(), TargetLimits(), new_tsih=lambda: 1, random_bytes=lambda n: bytes(n))
    conn = IscsiConnection(login, FakeDirectory(), TargetLimits())
    rng = random.Random(seed)
    stream = login_request() + b"".join(chunks)
    pos = 0
    while pos < len(stream) and not conn.closed:
        step = rng.randint(1, 120)
        conn.receive_data(stream[pos : pos + step])
        pos += step
        while (event := conn.next_event()) is not None:
            if isinstance(event, LoggedIn):
                conn.attach(FakeScsi())
        conn.data_to_send()


@settings(max_examples=300, deadline=None)
@given(
    mrdsl=st.integers(512, 9000),
    burst=st.integers(512, 20000),
    pieces=st.lists(st.integers(0, 12000), min_size=1, max_size=6),
    edtl=st.integers(0, 60000),
    fail=st.booleans(),
    digests=st.booleans(),
)
def test_streamed_reads_keep_the_data_in_sequence_rules(
    mrdsl: int, burst: int, pieces: list[int], edtl: int, fail: bool, digests: bool
) -> None:
    """A read in pieces: offsets contiguous from 0, DataSN 0, 1, ..., each PDU within
    MRDSL, F exactly at MaxBurstLength boundaries and on the last Data-In, status once,
    the bytes those of the pieces up to the EDTL, and residuals from the total (§11.7)."""
    conn = attached(
        initial_r2t=True,
        initiator_max_recv_data_segment_length=mrdsl,
        max_burst_length=burst,
        header_digest=digests,
        data_digest=digests,
    )
    cdb = bytes([0x88]) + bytes(15)
    conn.receive_data(scsi_cmd(7, 10, cdb, edtl=edtl, read=True, header_digest=digests))
    task = conn.next_event()
    assert isinstance(task, Task) and conn.start(task)
    chunks = [bytes([i + 1]) * n for i, n in enumerate(pieces)]
    for chunk in chunks[:-1]:
        conn.send_data(task, chunk)
    status = 2 if fail else 0
    sense = b"\x70" + bytes(17) if fail else b""
    last = b"" if fail else chunks[-1]
    conn.complete(task, status, last, sense)
    reader = PduReader(max_data_segment=1 << 24)
    reader.enable_digests(digests, digests)
    for buf in conn.data_to_send():
        reader.feed(buf)
    pdus = []
    while (pdu := reader.next_pdu()) is not None:
        pdus.append(pdu)
    assert reader.buffered == 0
    data_in = [p for p in pdus if p.opcode == 0x25]
    responses = [p for p in pdus if p.opcode == 0x21]
    produced = b"".join(chunks[:-1]) + last
    expected = produced[:edtl]
    assert b"".join(p.data for p in data_in) == expected
    # The last Data-In ends its sequence when the EDTL is reached or when it came with
    # the final part; a command that ended early (a failed piece) may leave it open.
    before_last = min(edtl, len(produced) - len(last))
    closes = len(expected) == edtl or len(expected) > before_last
    offset = 0
    for n, p in enumerate(data_in):
        assert p.u32(36) == n and p.u32(40) == offset
        assert 0 < len(p.data) <= mrdsl
        end = offset + len(p.data)
        assert offset // burst == (end - 1) // burst, "a PDU never crosses a burst boundary"
        assert bool(p.flags & 0x80) == (end % burst == 0 or (end == len(expected) and closes))
        offset = end
    with_status = [p for p in data_in if p.flags & 0x01] + responses
    assert len(with_status) == 1, "exactly one status"
    final = with_status[0]
    assert final is pdus[-1]
    assert final.bhs[3] == status
    if final.opcode == 0x21:
        assert final.u32(36) == len(data_in)  # ExpDataSN
    if len(produced) != edtl:
        assert final.flags & (0x04 if len(produced) > edtl else 0x02)
        assert final.u32(44) == abs(len(produced) - edtl)
