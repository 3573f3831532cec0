"""ScsiTarget.split_read: a long READ executed as READ(16) pieces gives what the whole READ gives."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from mobinux.scsi import LogicalUnit, ScsiResult, ScsiTarget
from mobinux.scsi.sense import parse_sense
from mobinux.storage.device import WouldBlock
from mobinux.storage.memory import MemoryDevice
from tests.unit.test_scsi_harness import (
    BS,
    CHECK_CONDITION,
    GOOD,
    MEDIUM_ERROR,
    NEXUS,
    NEXUS2,
    RESERVATION_CONFLICT,
    UNIT_ATTENTION,
    Scsi,
    mode_select6,
    mode_sense6,
    read6,
    read10,
    read12,
    read16,
    release6,
    reserve6,
    tur,
    write10,
)

BLOCKS = 4096
FRESH = "iqn.2026-01.test:init9,i,0x000000000009,iqn.2026-01.test:disk,t,0x0001"  # never seen


def _disk() -> Scsi:
    s = Scsi(blocks=BLOCKS)
    s.write(0, b"".join(lba.to_bytes(4, "big") * (BS // 4) for lba in range(BLOCKS)))
    return s


def _run_split(
    target: ScsiTarget,
    cdb: bytes,
    max_blocks: int,
    nexus: str = NEXUS,
    between: Callable[[], object] | None = None,
) -> ScsiResult:
    """What a transport does with split_read: pieces in order, stop at the first non-GOOD."""
    pieces = target.split_read(0, cdb, max_blocks)
    assert pieces is not None
    data = bytearray()
    for i, piece in enumerate(pieces):
        if i and between is not None:
            between()
        r = target.execute(0, piece, None, nexus, continued=i > 0)
        if r.status != GOOD:
            return r
        data += r.data
    return ScsiResult(GOOD, bytes(data))


def _same(a: ScsiResult, b: ScsiResult) -> None:
    assert (a.status, bytes(a.data), a.sense) == (b.status, bytes(b.data), b.sense)


@pytest.mark.parametrize(
    ("cdb", "max_blocks"),
    [
        (read6(100, 0), 100),  # 256 blocks
        (read10(5, 1000), 64),
        (read10(5, 1000, flags=0x18), 999),  # DPO+FUA, two pieces
        (read12(0, BLOCKS), 1024),  # exactly four pieces
        (read16(3000, 1096, flags=0x08), 7),
    ],
)
def test_split_read_returns_the_same_bytes_and_status_as_the_whole_read(
    cdb: bytes, max_blocks: int
) -> None:
    s = _disk()
    s.good(tur())
    whole = s.target.execute(0, cdb, None, NEXUS)
    assert whole.status == GOOD
    _same(_run_split(s.target, cdb, max_blocks), whole)


def test_pieces_are_consecutive_read16_with_the_flags_group_and_control_of_the_read() -> None:
    s = _disk()
    cdb = struct.pack(">BBIBHB", 0x28, 0x1A, 10, 0x05, 25, 0xC0)  # DPO FUA FUA_NV, group 5, vendor
    pieces = s.target.split_read(0, cdb, 10)
    assert pieces is not None
    fields = [struct.unpack(">BBQIBB", p) for p in pieces]
    assert fields == [
        (0x88, 0x1A, 10, 10, 0x05, 0xC0),
        (0x88, 0x1A, 20, 10, 0x05, 0xC0),
        (0x88, 0x1A, 30, 5, 0x05, 0xC0),
    ]
    cdb12 = struct.pack(">BBIIBB", 0xA8, 0x08, 7, 3, 0x1F, 0)
    assert s.target.split_read(0, cdb12, 2) == [
        struct.pack(">BBQIBB", 0x88, 0x08, 7, 2, 0x1F, 0),
        struct.pack(">BBQIBB", 0x88, 0x08, 9, 1, 0x1F, 0),
    ]
    assert s.target.split_read(0, read6(4, 3), 2) == [read16(4, 2), read16(6, 1)]


@pytest.mark.parametrize(
    "cdb",
    [
        read10(0, 64),  # fits in one piece
        read10(0, 0),
        write10(0, 100),  # not a READ
        tur(),
        b"",
        read16(BLOCKS - 10, 100),  # beyond the capacity
        read16(2**64 - 1, 100),
        read10(0, 100, flags=0x20),  # RDPROTECT
        read10(0, 100, control=0x04),  # NACA
        read16(0, 100)[:10],  # too short
    ],
)
def test_split_read_says_execute_whole_when_that_reads_nothing_big(cdb: bytes) -> None:
    s = _disk()
    assert s.target.split_read(0, cdb, 64) is None
    r = s.run(cdb, bytes(100 * BS) if cdb[:1] == b"\x2a" else None)
    assert r.status == GOOD or len(r.data) == 0


def test_split_read_of_a_missing_lun_is_none() -> None:
    s = _disk()
    assert s.target.split_read(5, read10(0, 100), 10) is None
    assert s.target.split_read(-1, read10(0, 100), 10) is None


def test_max_blocks_must_be_positive() -> None:
    with pytest.raises(ValueError):
        _disk().target.split_read(0, read10(0, 100), 0)


def test_pending_unit_attention_is_reported_by_the_first_piece_once() -> None:
    split, whole = _disk(), _disk()
    cdb = read16(0, 100)
    # A new nexus: POWER ON, RESET is pending for it on both targets.
    r_whole = whole.target.execute(0, cdb, None, FRESH)
    r_split = _run_split(split.target, cdb, 10, nexus=FRESH)
    assert r_whole.status == CHECK_CONDITION
    assert parse_sense(r_whole.sense).key == UNIT_ATTENTION
    _same(r_split, r_whole)
    # Reported once: the retry succeeds on both.
    r_whole = whole.target.execute(0, cdb, None, FRESH)
    assert r_whole.status == GOOD
    _same(_run_split(split.target, cdb, 10, nexus=FRESH), r_whole)


def test_unit_attention_established_meanwhile_is_left_for_the_next_command() -> None:
    s = _disk()
    s.good(tur(), nexus=NEXUS)
    s.good(tur(), nexus=NEXUS2)
    caching = bytearray(s.good(mode_sense6(0x08, dbd=True), nexus=NEXUS2)[4:])
    caching[2] ^= 0x04  # toggle WCE: MODE PARAMETERS CHANGED for every other nexus
    params = bytes(4) + bytes(caching)

    def other_initiator_changes_mode() -> None:
        s.good(mode_select6(len(params)), params, nexus=NEXUS2)

    whole = s.target.execute(0, read16(0, 100), None, NEXUS)
    r = _run_split(s.target, read16(0, 100), 10, between=other_initiator_changes_mode)
    assert r.status == GOOD and bytes(r.data) == bytes(whole.data)
    sense = s.check(tur(), nexus=NEXUS)
    assert (sense.key, sense.asc, sense.ascq) == (UNIT_ATTENTION, 0x2A, 0x01)


def test_reservation_conflict_is_reported_by_the_first_piece() -> None:
    s = _disk()
    expected = s.read(0, 100)
    s.good(reserve6(), nexus=NEXUS2)
    whole = s.target.execute(0, read16(0, 100), None, NEXUS)
    assert whole.status == RESERVATION_CONFLICT
    _same(_run_split(s.target, read16(0, 100), 10), whole)
    s.good(release6(), nexus=NEXUS2)
    # A reservation made while the READ runs does not cut it short.
    reserved: list[int] = []

    def other_initiator_reserves() -> None:
        if not reserved:
            reserved.append(s.run(reserve6(), nexus=NEXUS2).status)

    r = _run_split(s.target, read16(0, 100), 10, between=other_initiator_reserves)
    assert reserved == [GOOD]
    assert r.status == GOOD and bytes(r.data) == expected
    assert s.run(read16(0, 1), nexus=NEXUS).status == RESERVATION_CONFLICT


def test_continued_is_ignored_for_commands_other_than_read() -> None:
    s = _disk()
    r = s.target.execute(0, write10(0, 1), bytes(BS), FRESH, continued=True)
    assert r.status == CHECK_CONDITION and parse_sense(r.sense).key == UNIT_ATTENTION


class _BadBlocks(MemoryDevice):
    """Reads fail with EIO from byte offset *bad* on."""

    def __init__(self, size: int, bad: int) -> None:
        super().__init__(size)
        self.bad = bad

    def read_into(self, offset, buf, *, nowait=False):  # type: ignore[no-untyped-def]
        if offset + len(buf) > self.bad:
            raise OSError(5, "injected")
        super().read_into(offset, buf, nowait=nowait)


def test_medium_error_part_way_gives_the_sense_of_the_whole_read() -> None:
    t = ScsiTarget({0: LogicalUnit(_BadBlocks(1024 * BS, 500 * BS), device_id="bad")})
    t.execute(0, tur(), None, NEXUS)
    whole = t.execute(0, read16(0, 1000), None, NEXUS)
    assert whole.status == CHECK_CONDITION and parse_sense(whole.sense).key == MEDIUM_ERROR
    _same(_run_split(t, read16(0, 1000), 128), whole)


def test_pieces_use_nowait_and_the_lent_buffer() -> None:
    dev = MemoryDevice(1024 * BS, nowait_would_block=True)
    t = ScsiTarget({0: LogicalUnit(dev, device_id="nw")})
    t.execute(0, tur(), None, NEXUS)
    pieces = t.split_read(0, read10(0, 300), 128)
    assert pieces is not None and len(pieces) == 3
    assert ScsiTarget.is_nowait_candidate(pieces[1])
    with pytest.raises(WouldBlock):
        t.execute(0, pieces[1], None, NEXUS, nowait=True, continued=True)
    dev.nowait_would_block = False
    lent = bytearray(128 * BS)
    r = t.execute(0, pieces[1], None, NEXUS, nowait=True, buffer=lent, continued=True)
    assert r.status == GOOD and isinstance(r.data, memoryview) and r.data.obj is lent
