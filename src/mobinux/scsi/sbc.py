"""SBC-3 block commands: capacity, reads, writes, verify, provisioning, cache.

Plain READ/WRITE run without any LU lock: the device allows concurrent I/O.
Writes pass through ``lu.gate`` in shared mode so that COMPARE AND WRITE and
ORWRITE (exclusive mode) see no write between their read and their write.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from mobinux.scsi.cdb import Rw, decode_rw, u32, u64
from mobinux.scsi.command import Command, ScsiResult, good
from mobinux.scsi.constants import (
    BLOCK_SIZE,
    Asc,
    Opcode,
    SanitizeAction,
    SenseKey,
    ServiceActionIn16,
)
from mobinux.scsi.sense import CheckCondition, invalid_cdb, invalid_param
from mobinux.storage.device import WouldBlock

if TYPE_CHECKING:
    from mobinux.scsi.lu import LogicalUnit

Handler = Callable[["LogicalUnit", Command], ScsiResult]

_PATTERN_CHUNK = 1 << 20  # WRITE SAME writes its pattern in pieces of this size
_GET_LBA_STATUS_SPAN = 1 << 24  # blocks examined per GET LBA STATUS (8 GiB)


def _miscompare(offset: int) -> CheckCondition:
    """SBC-3 5.2 / 5.33: MISCOMPARE, INFORMATION = offset of the first differing byte."""
    return CheckCondition(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, information=offset)


def _first_difference(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int:
    """Index of the first differing byte of equal-length *a* and *b*, or -1."""
    if a == b:
        return -1
    lo, hi = 0, len(a)
    # Bisect on slices (C-speed compares) rather than a Python loop per byte.
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return -1


# -- READ CAPACITY (SBC-3 5.16, 5.17) --------------------------------------------------


def _check_pmi(cdb: bytes, lba: int, pmi_byte: int) -> None:
    # SBC-3: with PMI=0 the LOGICAL BLOCK ADDRESS field must be zero.
    if not cdb[pmi_byte] & 0x01 and lba != 0:
        raise invalid_cdb(2)


def read_capacity_10(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    _check_pmi(cmd.cdb, u32(cmd.cdb, 2), 8)
    lu.check_ready()
    last = lu.num_blocks - 1
    # SBC-3 5.16: FFFFFFFFh tells the initiator to use READ CAPACITY(16).
    return good(struct.pack(">II", min(last, 0xFFFFFFFF) if last >= 0 else 0, BLOCK_SIZE))


def read_capacity_16(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    _check_pmi(cdb, u64(cdb, 2), 14)
    lu.check_ready()
    alloc = u32(cdb, 10)
    out = bytearray(32)
    struct.pack_into(">QI", out, 0, max(lu.num_blocks - 1, 0), BLOCK_SIZE)
    # Byte 13: LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: 2^3 = 4 KiB.
    out[13] = lu.physical_block_exponent
    # Byte 14: LBPME (thin provisioning: UNMAP works), LBPRZ (unmapped reads zero).
    out[14] = 0x80 | 0x40
    return good(out, alloc)


# -- helpers shared by the data commands --------------------------------------------------


def _rw_checked(lu: LogicalUnit, cmd: Command, *, limit: int | None) -> Rw:
    """Decode and check the LBA range; *limit* (None: none) caps the transfer length.

    Which command has which limit: see ``inquiry.BlockLimits``.
    """
    rw = decode_rw(cmd.cdb)
    lu.check_ready()
    lu.check_range(rw.lba, rw.blocks)
    if limit is not None and rw.blocks > limit:
        raise invalid_cdb(rw.len_byte)
    return rw


def _durable(lu: LogicalUnit, rw_fua: bool) -> bool:
    """Must this write reach stable storage before completing? (SBC-3 4.15, FUA / WCE=0).

    Asked inside ``lu.gate``: MODE SELECT switches WCE off in exclusive mode
    and then flushes, so a write that saw WCE=1 has reached the cache before
    that flush, and one that sees WCE=0 flushes by itself.
    """
    return rw_fua or not lu.mode.wce


# -- READ ---------------------------------------------------------------------------------


def read(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    """READ(6/10/12/16): any length within the capacity (no MAXIMUM TRANSFER LENGTH check).

    The data is read into one buffer of the whole transfer; a transport that
    must not hold that much splits the command first (``ScsiTarget.split_read``).
    """
    rw = _rw_checked(lu, cmd, limit=None)
    length = rw.blocks * BLOCK_SIZE
    if length == 0:
        return good()
    buf = cmd.data_in_buffer(length)
    # Shared mode: a read never overlaps a COMPARE AND WRITE or WRITE ATOMIC
    # half-way through, so those are atomic for readers too.
    with lu.gate.shared(nowait=cmd.nowait):
        lu.device.read_into(rw.lba * BLOCK_SIZE, buf, nowait=cmd.nowait)
    return ScsiResult(0, buf)


# -- WRITE, WRITE AND VERIFY ----------------------------------------------------------------


def _write_payload(cmd: Command, rw: Rw) -> memoryview:
    """The whole blocks of data-out this write covers.

    When the initiator sent less than the CDB asks for (its expected length
    disagreed), only the blocks actually received are written, as LIO does;
    libiscsi's residual tests check that the block beyond is left alone.
    """
    blocks = min(rw.blocks, len(cmd.data_out) // BLOCK_SIZE)
    return cmd.data_out[: blocks * BLOCK_SIZE]


def write(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    lu.check_writable()
    rw = _rw_checked(lu, cmd, limit=lu.limits.max_write_transfer)
    payload = _write_payload(cmd, rw)
    if not payload:
        return good()
    with lu.gate.shared(nowait=cmd.nowait):
        durable = _durable(lu, rw.fua)
        if durable and cmd.nowait:
            raise WouldBlock  # a flush always blocks
        lu.device.write(rw.lba * BLOCK_SIZE, payload, nowait=cmd.nowait)
    if durable:
        lu.device.flush()
    return good()


def write_atomic(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    """SBC-4 5.48 WRITE ATOMIC(16): all of it or none of it, as other commands see it.

    Run in exclusive mode of the gate, so no read or write of this LU runs
    meanwhile; a failed write surfaces as a MEDIUM ERROR like any other.
    """
    lu.check_writable()
    rw = _rw_checked(lu, cmd, limit=lu.limits.max_transfer)  # MAXIMUM ATOMIC TRANSFER LENGTH
    payload = _write_payload(cmd, rw)
    if not payload:
        return good()
    with lu.gate.exclusive():
        lu.device.write(rw.lba * BLOCK_SIZE, payload)
        if _durable(lu, rw.fua):
            lu.device.flush()
    return good()


def write_and_verify(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    """SBC-3 5.41-5.43: write, then verify from the medium (so flush first).

    With BYTCHK=1 the comparison is against the data just written, which the
    medium returns unless it failed, and a failure surfaces as an OSError.
    """
    lu.check_writable()
    rw = _rw_checked(lu, cmd, limit=lu.limits.max_write_transfer)
    payload = _write_payload(cmd, rw)
    if not payload:
        return good()
    with lu.gate.shared(nowait=False):
        lu.device.write(rw.lba * BLOCK_SIZE, payload)
    lu.device.flush()
    return good()


# -- VERIFY (SBC-3 5.33-5.35) ------------------------------------------------------------------


def verify(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    bytchk = (cdb[1] >> 1) & 0x03
    if bytchk == 0b10:
        raise invalid_cdb(1, 2)
    rw = _rw_checked(lu, cmd, limit=lu.limits.max_transfer)
    if rw.blocks == 0:
        return good()
    length = rw.blocks * BLOCK_SIZE
    offset = rw.lba * BLOCK_SIZE
    if bytchk == 0:
        # Medium verification: reading the blocks proves they are readable.
        with lu.gate.shared(nowait=False):
            lu.device.read_into(offset, memoryview(bytearray(length)))
        return good()
    if bytchk == 0b01:
        expected = cmd.data_out[:length]
    else:  # 11b: one block of data-out compared with every block in the range
        block = bytes(cmd.data_out[:BLOCK_SIZE])
        expected = memoryview(block * rw.blocks) if len(block) == BLOCK_SIZE else memoryview(b"")
    if len(expected) < length:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    actual = bytearray(length)
    with lu.gate.shared(nowait=False):
        lu.device.read_into(offset, memoryview(actual))
    diff = _first_difference(actual, expected)
    if diff >= 0:
        raise _miscompare(diff)
    return good()


# -- COMPARE AND WRITE, ORWRITE -------------------------------------------------------------------


def compare_and_write(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    """SBC-3 5.2: compare, and write only if equal, atomically for the LU."""
    lu.check_writable()
    rw = _rw_checked(lu, cmd, limit=lu.limits.max_compare_and_write)
    length = rw.blocks * BLOCK_SIZE
    if len(cmd.data_out) != 2 * length:
        # The Data-Out must be exactly the verify and the write instance; a
        # mismatch (including data with NUMBER OF LOGICAL BLOCKS 0, which is how
        # libiscsi's 256-block request wraps) is a malformed command.
        raise invalid_cdb(13)
    if rw.blocks == 0:
        return good()
    verify_data = cmd.data_out[:length]
    write_data = cmd.data_out[length : 2 * length]
    offset = rw.lba * BLOCK_SIZE
    current = bytearray(length)
    with lu.gate.exclusive():
        lu.device.read_into(offset, memoryview(current))
        diff = _first_difference(current, verify_data)
        if diff >= 0:
            raise _miscompare(diff)
        lu.device.write(offset, write_data)
        if _durable(lu, rw.fua):
            lu.device.flush()
    return good()


def orwrite(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    """SBC-3 5.12 ORWRITE(16) with the default "OR the data-out into the blocks"."""
    lu.check_writable()
    rw = _rw_checked(lu, cmd, limit=lu.limits.max_write_transfer)
    payload = _write_payload(cmd, rw)
    if not payload:
        return good()
    offset = rw.lba * BLOCK_SIZE
    current = bytearray(len(payload))
    with lu.gate.exclusive():
        lu.device.read_into(offset, memoryview(current))
        merged = (int.from_bytes(current, "big") | int.from_bytes(payload, "big")).to_bytes(
            len(payload), "big"
        )
        lu.device.write(offset, merged)
        if _durable(lu, rw.fua):
            lu.device.flush()
    return good()


# -- WRITE SAME (SBC-3 5.45, 5.46), UNMAP (5.28) ------------------------------------------------------


def write_same(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    rw = decode_rw(cdb)
    unmap = bool(cdb[1] & 0x08)
    ndob = cdb[0] == Opcode.WRITE_SAME_16 and bool(cdb[1] & 0x01)
    lu.check_ready()
    lu.check_writable()
    blocks = rw.blocks
    if blocks == 0:
        # WSNZ=0 (VPD B0h): zero blocks means "from LBA to the end of the medium".
        lu.check_range(rw.lba, 0)
        blocks = lu.num_blocks - rw.lba
    else:
        lu.check_range(rw.lba, blocks)
    if blocks > lu.limits.max_write_same:
        raise invalid_cdb(rw.len_byte)
    if ndob:
        pattern = bytes(BLOCK_SIZE)
    else:
        if len(cmd.data_out) != BLOCK_SIZE:
            # Exactly one block of data-out; anything else is a malformed command
            # (libiscsi WriteSame*.InvalidDataOutSize expects ILLEGAL REQUEST).
            raise invalid_cdb(rw.len_byte)
        pattern = bytes(cmd.data_out)
    if blocks == 0:
        return good()
    offset = rw.lba * BLOCK_SIZE
    length = blocks * BLOCK_SIZE
    zero = pattern.count(0) == BLOCK_SIZE
    with lu.gate.shared(nowait=False):
        if unmap:
            # SBC-3 5.46: with UNMAP=1 the blocks are unmapped and the data is
            # not written; LBPRZ=1, so they read back as zeros (LIO does the same).
            lu.device.discard(offset, length)
        elif zero:
            lu.device.write_zeroes(offset, length)
        else:
            chunk = pattern * max(1, min(blocks, _PATTERN_CHUNK // BLOCK_SIZE))
            pos = 0
            while pos < length:
                n = min(len(chunk), length - pos)
                lu.device.write(offset + pos, memoryview(chunk)[:n])
                pos += n
        durable = _durable(lu, False)
    if durable:
        lu.device.flush()
    return good()


def unmap(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    lu.check_ready()
    lu.check_writable()
    length = int.from_bytes(cdb[7:9], "big")
    if length == 0:
        return good()  # SBC-3 5.28: not an error
    data = bytes(cmd.data_out[:length])
    if length < 8 or len(data) < length:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    bd_len = int.from_bytes(data[2:4], "big")
    count = min(bd_len, length - 8) // 16
    if count > lu.limits.max_unmap_descriptors:
        raise invalid_param(2)
    ranges: list[tuple[int, int]] = []
    for i in range(count):
        at = 8 + 16 * i
        lba = u64(data, at)
        blocks = u32(data, at + 8)
        if blocks > lu.limits.max_unmap_lba_count:
            raise invalid_param(at + 8)
        lu.check_range(lba, blocks)
        if blocks:
            ranges.append((lba, blocks))
    if not ranges:
        return good()
    with lu.gate.shared(nowait=False):
        for lba, blocks in ranges:
            lu.device.discard(lba * BLOCK_SIZE, blocks * BLOCK_SIZE)
        durable = _durable(lu, False)
    if durable:
        # SBC-3 4.15: with WCE=0 no SYNCHRONIZE CACHE follows, so the unmap must
        # be on the media before GOOD, as for WRITE SAME with UNMAP=1 above;
        # otherwise the blocks (LBPRZ=1: read as zeros) come back after a power loss.
        lu.device.flush()
    return good()


# -- SANITIZE (SBC-4 5.30) -----------------------------------------------------------------------------


def sanitize(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    """BLOCK ERASE / CRYPTOGRAPHIC ERASE: every block unmapped (reads zeros, LBPRZ=1).

    Both run to completion before the command ends (so no SANITIZE IN PROGRESS
    state); EXIT FAILURE MODE has nothing to exit.  None takes a parameter list.
    """
    cdb = cmd.cdb
    if int.from_bytes(cdb[7:9], "big") != 0:
        raise invalid_cdb(7)
    action = cdb[1] & 0x1F
    if action == SanitizeAction.EXIT_FAILURE_MODE:
        return good()
    lu.check_writable()
    with lu.gate.exclusive():
        lu.device.discard(0, lu.num_blocks * BLOCK_SIZE)
        lu.device.flush()
    return good()


# -- GET LBA STATUS (SBC-3 5.16) -------------------------------------------------------------------------


def get_lba_status(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    lba = u64(cdb, 2)
    alloc = u32(cdb, 10)
    lu.check_ready()
    total = lu.num_blocks
    if lba >= total:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    span = min(total - lba, _GET_LBA_STATUS_SPAN)
    runs = lu.device.extents(lba * BLOCK_SIZE, span * BLOCK_SIZE)
    max_descriptors = max(1, (alloc - 8) // 16) if alloc > 8 else 1
    descriptors: list[tuple[int, int, int]] = []
    next_block = lba
    for off, ln, mapped in runs:
        start = max(off // BLOCK_SIZE, next_block)
        end = -(-(off + ln) // BLOCK_SIZE)
        if end <= start:
            continue
        status = 0 if mapped else 1  # 0 mapped, 1 deallocated
        if descriptors and descriptors[-1][2] == status:
            first, count, _ = descriptors[-1]
            descriptors[-1] = (first, count + end - start, status)
        elif len(descriptors) < max_descriptors:
            descriptors.append((start, end - start, status))
        else:
            break
        next_block = end
    body = b"".join(
        struct.pack(">QIB3x", first, count, status) for first, count, status in descriptors
    )
    return good(struct.pack(">I4x", len(body) + 4) + body, alloc)


# -- SYNCHRONIZE CACHE (SBC-3 5.22, 5.23), PRE-FETCH (5.11, 5.12), READ DEFECT DATA ------------------------


def synchronize_cache(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    rw = decode_rw(cmd.cdb)
    lu.check_ready()
    lu.check_range(rw.lba, rw.blocks)  # 0 blocks: from LBA to the end
    lu.device.flush()
    return good()


def pre_fetch(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    rw = decode_rw(cmd.cdb)
    lu.check_ready()
    lu.check_range(rw.lba, rw.blocks)
    # Nothing to do: the page cache reads ahead by itself.  GOOD rather than
    # CONDITION MET: we do not promise the blocks will be cached.
    return good()


def read_defect_data(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    """SBC-3 5.18/5.19: an empty defect list in the format asked for."""
    cdb = cmd.cdb
    if cdb[0] == Opcode.READ_DEFECT_DATA_10:
        flags = cdb[2] & 0x1F
        alloc = int.from_bytes(cdb[7:9], "big")
        data = struct.pack(">BBH", 0, flags, 0)
    else:
        flags = cdb[1] & 0x1F
        alloc = u32(cdb, 6)
        data = struct.pack(">BBHI", 0, flags, 0, 0)
    return good(data, alloc)


HANDLERS: dict[tuple[int, int | None], Handler] = {
    (Opcode.READ_CAPACITY_10, None): read_capacity_10,
    (Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16): read_capacity_16,
    (Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS): get_lba_status,
    (Opcode.READ_6, None): read,
    (Opcode.READ_10, None): read,
    (Opcode.READ_12, None): read,
    (Opcode.READ_16, None): read,
    (Opcode.WRITE_6, None): write,
    (Opcode.WRITE_10, None): write,
    (Opcode.WRITE_12, None): write,
    (Opcode.WRITE_16, None): write,
    (Opcode.WRITE_ATOMIC_16, None): write_atomic,
    (Opcode.WRITE_AND_VERIFY_10, None): write_and_verify,
    (Opcode.WRITE_AND_VERIFY_12, None): write_and_verify,
    (Opcode.WRITE_AND_VERIFY_16, None): write_and_verify,
    (Opcode.VERIFY_10, None): verify,
    (Opcode.VERIFY_12, None): verify,
    (Opcode.VERIFY_16, None): verify,
    (Opcode.COMPARE_AND_WRITE, None): compare_and_write,
    (Opcode.ORWRITE_16, None): orwrite,
    (Opcode.WRITE_SAME_10, None): write_same,
    (Opcode.WRITE_SAME_16, None): write_same,
    (Opcode.UNMAP, None): unmap,
    **{
        (Opcode.SANITIZE, int(sa)): sanitize
        for sa in SanitizeAction
        if sa != SanitizeAction.OVERWRITE
    },
    (Opcode.SYNCHRONIZE_CACHE_10, None): synchronize_cache,
    (Opcode.SYNCHRONIZE_CACHE_16, None): synchronize_cache,
    (Opcode.PRE_FETCH_10, None): pre_fetch,
    (Opcode.PRE_FETCH_16, None): pre_fetch,
    (Opcode.READ_DEFECT_DATA_10, None): read_defect_data,
    (Opcode.READ_DEFECT_DATA_12, None): read_defect_data,
}
