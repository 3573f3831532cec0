"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4 and 6.18, LID1 formats).

The copy manager copies blocks within one logical unit: the only target
descriptor it accepts is an identification descriptor (E4h) naming this LU
by one of its VPD 83h designators.  That is what VMware's VAAI "full copy"
and libiscsi's ExtendedCopy tests send, and it lets a clone run without the
data crossing the network.  Inline and held data, stream devices and copies
between LUs are not supported; the operating parameters say so.

Copies run synchronously in the command; RECEIVE COPY RESULTS / COPY STATUS
reports the outcome of the last copies of each I_T nexus whose LIST ID USAGE
asked for their results to be held.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mobinux.scsi.cdb import u32
from mobinux.scsi.command import Command, ScsiResult, good
from mobinux.scsi.constants import BLOCK_SIZE, Asc, SenseKey
from mobinux.scsi.sense import CheckCondition, FieldPointer, invalid_cdb

if TYPE_CHECKING:
    from mobinux.scsi.lu import LogicalUnit

Handler = Callable[["LogicalUnit", Command], ScsiResult]

HEADER_LENGTH = 16  # SPC-4 6.4.3.1 parameter list header (LID1)
IDENTIFICATION_DESCRIPTOR = 0xE4  # SPC-4 6.4.5.3 target descriptor type
IDENTIFICATION_DESCRIPTOR_LENGTH = 32
BLOCK_TO_BLOCK = 0x02  # SPC-4 6.4.6.5 segment descriptor type
BLOCK_TO_BLOCK_LENGTH = 28

MAX_TARGET_DESCRIPTORS = 2
MAX_SEGMENT_DESCRIPTORS = 16
MAX_DESCRIPTOR_LIST_LENGTH = 1024
MAX_SEGMENT_BLOCKS = 0xFFFF  # the NUMBER OF BLOCKS field is 16 bits
HELD_RESULTS = 16  # per nexus

_COPY_CHUNK = 1 << 20

# SPC-4 Annex D additional sense codes of the copy manager.
TOO_MANY_TARGET_DESCRIPTORS = 0x2606
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE = 0x2607
TOO_MANY_SEGMENT_DESCRIPTORS = 0x2608
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE = 0x2609
UNREACHABLE_COPY_TARGET = 0x0804

# RECEIVE COPY RESULTS service actions (SPC-4 6.18.1 Table 205).
COPY_STATUS = 0x00
OPERATING_PARAMETERS = 0x03

_LIST_ID_USAGE_HOLD = 0b00


@dataclass(frozen=True, slots=True)
class CopyStatus:
    """What COPY STATUS reports for one finished list."""

    status: int  # 01h completed without error, 02h completed with error
    segments: int
    blocks: int


def _param_error(byte: int, asc: int = Asc.INVALID_FIELD_IN_PARAMETER_LIST) -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, asc, field=FieldPointer(byte, in_cdb=False))


def _aborted(asc: int) -> CheckCondition:
    return CheckCondition(SenseKey.COPY_ABORTED, asc)


def _length_error() -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)


def _designators(lu: LogicalUnit) -> set[bytes]:
    """This LU's VPD 83h designators, as (type, value) keys."""
    t10 = lu.identity.vendor.encode("ascii", "replace")[:8].ljust(8) + (
        f"{lu.identity.product}:{lu.identity.serial}".encode("ascii", "replace")
    )
    return {b"\x03" + lu.identity.naa, b"\x01" + t10}


def _check_target(lu: LogicalUnit, desc: bytes, at: int) -> None:
    """Validate one identification target descriptor: it must name this LU."""
    if desc[1] & 0x1F != 0:  # PERIPHERAL DEVICE TYPE: block devices only
        raise _aborted(UNREACHABLE_COPY_TARGET)
    des_len = desc[7]
    if des_len > 20:
        raise _param_error(at + 7)
    key = bytes((desc[5] & 0x0F,)) + desc[8 : 8 + des_len]
    if key not in _designators(lu):
        raise _aborted(UNREACHABLE_COPY_TARGET)
    block_length = int.from_bytes(desc[29:32], "big")
    if block_length != BLOCK_SIZE:
        raise _aborted(UNREACHABLE_COPY_TARGET)


def extended_copy(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    length = u32(cdb, 10)
    if length == 0:
        return good()  # SPC-4 6.4.1: not an error, nothing to copy
    data = bytes(cmd.data_out[:length])
    if length < HEADER_LENGTH or len(data) < length:
        raise _length_error()
    list_id = data[0]
    if data[1] & 0x20:  # STR: stream devices only
        raise _param_error(1)
    usage = (data[1] >> 3) & 0x03
    tgt_len = struct.unpack_from(">H", data, 2)[0]
    seg_len, inline_len = struct.unpack_from(">II", data, 8)
    if inline_len:
        raise _param_error(12)  # no inline data (MAXIMUM INLINE DATA LENGTH 0)
    if tgt_len + seg_len > MAX_DESCRIPTOR_LIST_LENGTH:
        raise _length_error()
    if HEADER_LENGTH + tgt_len + seg_len > length:
        raise _length_error()
    if tgt_len % IDENTIFICATION_DESCRIPTOR_LENGTH:
        raise _param_error(2)
    targets = tgt_len // IDENTIFICATION_DESCRIPTOR_LENGTH
    if targets > MAX_TARGET_DESCRIPTORS:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, TOO_MANY_TARGET_DESCRIPTORS)
    # Segment descriptors: count and type before any target is resolved.
    segments: list[tuple[int, int, int, int, int, int]] = []
    pos = HEADER_LENGTH + tgt_len
    end = pos + seg_len
    while pos < end:
        if end - pos < 4:
            raise _length_error()
        kind = data[pos]
        desc_len = 4 + struct.unpack_from(">H", data, pos + 2)[0]
        if pos + desc_len > end:
            raise _length_error()
        if kind != BLOCK_TO_BLOCK:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE)
        if desc_len != BLOCK_TO_BLOCK_LENGTH:
            raise _param_error(pos + 2)
        src, dst = struct.unpack_from(">HH", data, pos + 4)
        blocks = struct.unpack_from(">H", data, pos + 10)[0]
        src_lba, dst_lba = struct.unpack_from(">QQ", data, pos + 12)
        segments.append((pos, src, dst, blocks, src_lba, dst_lba))
        pos += desc_len
        if len(segments) > MAX_SEGMENT_DESCRIPTORS:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, TOO_MANY_SEGMENT_DESCRIPTORS)
    for i in range(targets):
        at = HEADER_LENGTH + i * IDENTIFICATION_DESCRIPTOR_LENGTH
        if data[at] != IDENTIFICATION_DESCRIPTOR:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE)
        # LU ID TYPE and NUL are ignored (SPC-4 made them obsolete).
        _check_target(lu, data[at : at + IDENTIFICATION_DESCRIPTOR_LENGTH], at)
    lu.check_writable()
    total = lu.num_blocks
    for _, src, dst, blocks, src_lba, dst_lba in segments:
        if src >= targets or dst >= targets:
            raise _aborted(UNREACHABLE_COPY_TARGET)
        if src_lba + blocks > total or dst_lba + blocks > total:
            raise _aborted(Asc.NO_ADDITIONAL_SENSE)
    done_blocks = 0
    for n, (_, _, _, blocks, src_lba, dst_lba) in enumerate(segments):
        try:
            _copy(lu, src_lba, dst_lba, blocks)
        except OSError:
            _remember(lu, cmd.nexus, usage, list_id, CopyStatus(0x02, n, done_blocks))
            raise
        done_blocks += blocks
    if not lu.mode.wce:
        lu.device.flush()
    _remember(lu, cmd.nexus, usage, list_id, CopyStatus(0x01, len(segments), done_blocks))
    return good()


def _copy(lu: LogicalUnit, src_lba: int, dst_lba: int, blocks: int) -> None:
    """Copy in chunks, in the direction that is safe when the ranges overlap."""
    chunk_blocks = _COPY_CHUNK // BLOCK_SIZE
    starts = list(range(0, blocks, chunk_blocks))
    if dst_lba > src_lba:
        starts.reverse()
    buf = bytearray(min(blocks, chunk_blocks) * BLOCK_SIZE)
    for start in starts:
        n = min(chunk_blocks, blocks - start)
        view = memoryview(buf)[: n * BLOCK_SIZE]
        with lu.gate.shared(nowait=False):
            lu.device.read_into((src_lba + start) * BLOCK_SIZE, view)
            lu.device.write((dst_lba + start) * BLOCK_SIZE, view)


def _remember(lu: LogicalUnit, nexus: str, usage: int, list_id: int, status: CopyStatus) -> None:
    if usage != _LIST_ID_USAGE_HOLD:
        return
    with lu.lock:
        held = lu.copy_results.setdefault(nexus, {})
        held.pop(list_id, None)
        held[list_id] = status
        while len(held) > HELD_RESULTS:
            del held[next(iter(held))]


def receive_copy_results(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    action = cdb[1] & 0x1F
    alloc = u32(cdb, 10)
    if action == OPERATING_PARAMETERS:
        return good(operating_parameters(), alloc)
    # COPY STATUS
    with lu.lock:
        status = lu.copy_results.get(cmd.nexus, {}).get(cdb[2])
    if status is None:
        raise invalid_cdb(2)  # SPC-4 6.18.3: no held results for that list
    # TRANSFER COUNT in KiB (TRANSFER COUNT UNITS F1h), so a 4 GiB copy still fits.
    kib = min(status.blocks * BLOCK_SIZE // 1024, 0xFFFFFFFF)
    body = struct.pack(">BHBI", status.status, min(status.segments, 0xFFFF), 0xF1, kib)
    return good(struct.pack(">I", len(body)) + body, alloc)


HANDLERS: dict[tuple[int, int | None], Handler] = {
    (0x83, 0x00): extended_copy,
    (0x84, COPY_STATUS): receive_copy_results,
    (0x84, OPERATING_PARAMETERS): receive_copy_results,
}


def operating_parameters() -> bytes:
    """SPC-4 6.18.4 (LID1 format, as SPC-3 7.17.4 lays it out)."""
    codes = bytes((BLOCK_TO_BLOCK, IDENTIFICATION_DESCRIPTOR))
    body = bytearray(40 + len(codes))
    body[0] = 0x01  # SNLID: supports no list identifier (LIST ID USAGE 11b)
    struct.pack_into(
        ">HHIIIII",
        body,
        4,
        MAX_TARGET_DESCRIPTORS,
        MAX_SEGMENT_DESCRIPTORS,
        MAX_DESCRIPTOR_LIST_LENGTH,
        MAX_SEGMENT_BLOCKS * BLOCK_SIZE,  # MAXIMUM SEGMENT LENGTH (bytes)
        0,  # MAXIMUM INLINE DATA LENGTH
        0,  # HELD DATA LIMIT
        0,  # MAXIMUM STREAM DEVICE TRANSFER SIZE
    )
    struct.pack_into(">HB", body, 30, 1, 1)  # TOTAL / MAXIMUM CONCURRENT COPIES
    body[33] = 9  # DATA SEGMENT GRANULARITY: 2^9 = one block
    body[39] = len(codes)
    body[40:] = codes
    return struct.pack(">I", len(body)) + bytes(body)
