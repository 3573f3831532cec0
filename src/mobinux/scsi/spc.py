"""SPC-4 primary commands: the ones every SCSI device has.

Each handler takes the LogicalUnit and the Command and returns a ScsiResult
or raises CheckCondition/StatusError.  Handlers that touch shared LU state
take ``lu.lock``; none of them does disk I/O while holding it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from mobinux.scsi import inquiry
from mobinux.scsi.cdb import u16, u32
from mobinux.scsi.command import Command, ScsiResult, good
from mobinux.scsi.constants import (
    BLOCK_SIZE,
    Asc,
    MaintenanceIn,
    ModePage,
    Opcode,
    PageControl,
    PrInAction,
    SenseKey,
    VpdPage,
)
from mobinux.scsi.opcodes import (
    ALL,
    BY_OPCODE,
    BY_SERVICE_ACTION,
    SERVICE_ACTION_OPCODES,
    CommandSpec,
)
from mobinux.scsi.sense import (
    CheckCondition,
    FieldPointer,
    build_sense,
    invalid_cdb,
    invalid_param,
)

if TYPE_CHECKING:
    from mobinux.scsi.lu import LogicalUnit

Handler = Callable[["LogicalUnit", Command], ScsiResult]


# -- TEST UNIT READY, REQUEST SENSE ---------------------------------------------


def test_unit_ready(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    lu.check_ready()
    return good()


def request_sense(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    """SPC-4 6.29: report a pending unit attention (and clear it), else NO SENSE.

    The DESC bit picks descriptor format regardless of D_SENSE.
    """
    descriptor = bool(cmd.cdb[1] & 0x01)
    alloc = cmd.cdb[4]
    asc = lu.pop_unit_attention(cmd.nexus)
    if asc is not None:
        data = build_sense(SenseKey.UNIT_ATTENTION, asc, descriptor=descriptor)
    elif not lu.medium_present:
        data = build_sense(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT, descriptor=descriptor)
    else:
        data = build_sense(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE, descriptor=descriptor)
    return good(data, alloc)


# -- INQUIRY -----------------------------------------------------------------------


def inquiry_cmd(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    evpd = cdb[1] & 0x01
    page = cdb[2]
    alloc = u16(cdb, 3)
    if not evpd:
        if page != 0:
            raise invalid_cdb(2)  # SPC-4 6.4.1: PAGE CODE must be 0 when EVPD=0
        return good(lu.standard_inquiry, alloc)
    builder = _VPD.get(page)
    if builder is None:
        raise invalid_cdb(2)
    return good(builder(lu), alloc)


_VPD: dict[int, Callable[[LogicalUnit], bytes]] = {
    VpdPage.SUPPORTED_VPD_PAGES: lambda lu: inquiry.supported_pages(),
    VpdPage.UNIT_SERIAL_NUMBER: lambda lu: inquiry.unit_serial(lu.identity),
    VpdPage.DEVICE_IDENTIFICATION: lambda lu: inquiry.device_identification(lu.identity),
    VpdPage.BLOCK_LIMITS: lambda lu: inquiry.block_limits(lu.limits),
    VpdPage.BLOCK_DEVICE_CHARACTERISTICS: lambda lu: inquiry.block_device_characteristics(),
    VpdPage.LOGICAL_BLOCK_PROVISIONING: lambda lu: inquiry.logical_block_provisioning(),
}


# -- MODE SENSE / MODE SELECT ------------------------------------------------------


def _block_descriptor(lu: LogicalUnit, long_lba: bool) -> bytes:
    """SPC-4 7.5.5 short / 7.5.6 long LBA mode parameter block descriptor."""
    blocks = lu.num_blocks
    if long_lba:
        return struct.pack(">QII", blocks, 0, BLOCK_SIZE)
    return struct.pack(">II", min(blocks, 0xFFFFFFFF), BLOCK_SIZE)


def mode_sense(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    """MODE SENSE(6)/(10), SPC-4 6.11 / 6.12."""
    cdb = cmd.cdb
    ten = cdb[0] == Opcode.MODE_SENSE_10
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc = PageControl(cdb[2] >> 6)
    code = cdb[2] & 0x3F
    subpage = cdb[3]
    alloc = u16(cdb, 7) if ten else cdb[4]
    if pc == PageControl.SAVED:
        raise CheckCondition(
            SenseKey.ILLEGAL_REQUEST,
            Asc.SAVING_PARAMETERS_NOT_SUPPORTED,
            field=FieldPointer(2, 7),
        )
    if code == ModePage.ALL_PAGES:
        if subpage not in (0x00, 0xFF):  # 3Fh/FFh: all pages and subpages (we have none)
            raise invalid_cdb(3)
        with lu.lock:
            pages = b"".join(lu.mode.get(c, pc) for c in lu.mode.codes)
    else:
        if code not in lu.mode.codes:
            raise invalid_cdb(2, 5)
        if subpage != 0:
            raise invalid_cdb(3)
        with lu.lock:
            pages = lu.mode.get(code, pc)
    # SBC-3 6.4.1: WP when writes are refused; DPOFUA: DPO and FUA are supported.
    dsp = (0x80 if lu.write_protected else 0) | 0x10
    bd = b"" if dbd else _block_descriptor(lu, llbaa)
    if bd and pc == PageControl.CHANGEABLE:
        bd = bytes(len(bd))  # nothing in the block descriptor can be changed
    if ten:
        total = 8 + len(bd) + len(pages)
        header = struct.pack(">HBBBBH", total - 2, 0, dsp, 0x01 if llbaa and bd else 0, 0, len(bd))
    else:
        total = 4 + len(bd) + len(pages)
        header = bytes((total - 1, 0, dsp, len(bd)))
    return good(header + bd + pages, alloc)


def mode_select(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    """MODE SELECT(6)/(10), SPC-4 6.9 / 6.10."""
    cdb = cmd.cdb
    ten = cdb[0] == Opcode.MODE_SELECT_10
    if cdb[1] & 0x01:
        raise invalid_cdb(1, 0)  # SP: saved pages are not supported
    length = u16(cdb, 7) if ten else cdb[4]
    if length == 0:
        return good()
    data = bytes(cmd.data_out[:length])
    header_len = 8 if ten else 4
    if len(data) < length or length < header_len:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    if ten:
        long_lba = bool(data[4] & 0x01)
        bd_len = u16(data, 6)
        bd_field = 6
    else:
        long_lba = False
        bd_len = data[3]
        bd_field = 3
    bd_size = 16 if long_lba else 8
    if bd_len not in (0, bd_size):
        raise invalid_param(bd_field)
    if header_len + bd_len > length:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    if bd_len:
        bl_at = header_len + (12 if long_lba else 4)
        block_len = (
            u32(data, bl_at) if long_lba else int.from_bytes(data[bl_at + 1 : bl_at + 4], "big")
        )
        if block_len not in (0, BLOCK_SIZE):
            raise invalid_param(bl_at)
    base = header_len + bd_len
    # Exclusive mode of the gate: no write is between deciding whether it must
    # be durable (which reads WCE) and writing, while WCE changes.
    with lu.gate.exclusive(), lu.lock:
        was_caching = lu.mode.wce
        changed = lu.mode.select(data[base:], base)
        if changed:
            # SPC-4 7.5.3: other I_T nexuses learn of the change by unit attention.
            lu.queue_unit_attention_locked(Asc.MODE_PARAMETERS_CHANGED, except_nexus=cmd.nexus)
        write_back = was_caching and not lu.mode.wce
    if write_back:
        # SBC-3 4.15 / 6.4.5: turning the write cache off writes back what it
        # holds before GOOD.  An initiator that sees write-through stops sending
        # SYNCHRONIZE CACHE (Linux drops flushes for a queue without a write
        # cache), so a write acknowledged before the switch would stay volatile.
        # Writes that start after the switch see WCE=0 and flush by themselves.
        lu.device.flush()
    return good()


# -- REPORT SUPPORTED OPERATION CODES (SPC-4 6.35) ------------------------------------

_SUPPORT_NOT_SUPPORTED = 0b001
_SUPPORT_STANDARD = 0b011


def _timeouts(spec: CommandSpec) -> bytes:
    """SPC-4 6.35.4 command timeouts descriptor."""
    return struct.pack(">HBBII", 0x0A, 0, 0, spec.nominal_timeout, spec.recommended_timeout)


def report_supported_operation_codes(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    req_op = cdb[3]
    req_sa = u16(cdb, 4)
    alloc = u32(cdb, 6)
    if options == 0:
        out = bytearray()
        for row in ALL:
            sa = row.service_action
            flags = (0x02 if rctd else 0) | (0x01 if sa is not None else 0)
            out += struct.pack(">BBHBBH", row.opcode, 0, sa or 0, 0, flags, row.cdb_length)
            if rctd:
                out += _timeouts(row)
        return good(struct.pack(">I", len(out)) + out, alloc)
    spec: CommandSpec | None
    has_sa = req_op in SERVICE_ACTION_OPCODES
    if options == 1:
        if has_sa:
            raise invalid_cdb(2, 2)
        spec = BY_OPCODE.get(req_op)
    elif options == 2:
        if not has_sa:
            raise invalid_cdb(2, 2)
        spec = BY_SERVICE_ACTION.get((req_op, req_sa)) if req_sa <= 0x1F else None
    elif options == 3:
        if has_sa:
            spec = BY_SERVICE_ACTION.get((req_op, req_sa)) if req_sa <= 0x1F else None
        else:
            spec = BY_OPCODE.get(req_op) if req_sa == 0 else None
    else:
        raise invalid_cdb(2, 2)
    if spec is None:
        return good(bytes((0, _SUPPORT_NOT_SUPPORTED, 0, 0)), alloc)
    head = struct.pack(">BBH", 0, (0x80 if rctd else 0) | _SUPPORT_STANDARD, spec.cdb_length)
    body = head + spec.usage + (_timeouts(spec) if rctd else b"")
    return good(body, alloc)


# -- START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL (SBC-3 5.25, 5.14) ----------------


def start_stop_unit(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    power_condition = cdb[4] >> 4
    no_flush = bool(cdb[4] & 0x04)
    loej = bool(cdb[4] & 0x02)
    start = bool(cdb[4] & 0x01)
    if power_condition != 0:
        # SBC-3 5.25: with a POWER CONDITION, START and LOEJ are ignored; we
        # have no power states to move between.
        return good()
    if not start and not no_flush and lu.medium_present:
        lu.device.flush()  # stopping writes the cache back (SBC-3 4.15)
    if loej and lu.removable:
        with lu.lock:
            # SBC-3 5.25: while removal is prevented, neither eject nor load.
            if lu.prevented_by:
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)
            lu.medium_present = start
    return good()


def prevent_allow(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    prevent = cmd.cdb[4] & 0x03
    if prevent > 1:
        raise invalid_cdb(4, 1)  # 10b/11b are for medium changers (SPC-4 6.13)
    with lu.lock:
        if prevent:
            lu.prevented_by.add(cmd.nexus)
        else:
            lu.prevented_by.discard(cmd.nexus)
    return good()


# -- RESERVE / RELEASE (SPC-2 7.21, 7.17) ------------------------------------------------


def reserve(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    if cdb[0] == Opcode.RESERVE_10 and u16(cdb, 7) != 0:
        raise invalid_cdb(7)  # third-party reservations are not supported
    with lu.lock:
        lu.reservations.reserve6(cmd.nexus)
    return good()


def release(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    with lu.lock:
        lu.reservations.release6(cmd.nexus)
    return good()


# -- PERSISTENT RESERVE IN / OUT (SPC-4 6.15, 6.16) --------------------------------------


def persistent_reserve_in(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    action = cmd.cdb[1] & 0x1F
    alloc = u16(cmd.cdb, 7)
    with lu.lock:
        state = lu.reservations
        if action == PrInAction.READ_KEYS:
            data = state.read_keys()
        elif action == PrInAction.READ_RESERVATION:
            data = state.read_reservation()
        elif action == PrInAction.REPORT_CAPABILITIES:
            data = state.report_capabilities()
        else:
            data = state.read_full_status()
    return good(data, alloc)


def persistent_reserve_out(lu: LogicalUnit, cmd: Command) -> ScsiResult:
    cdb = cmd.cdb
    action = cdb[1] & 0x1F
    length = u32(cdb, 5)
    params = bytes(cmd.data_out[: min(length, 4096)])
    with lu.lock:
        uas = lu.reservations.prout(cmd.nexus, action, cdb[2], params, length)
        for nexus, asc in uas:
            lu.queue_unit_attention_locked(asc, only_nexus=nexus)
    return good()


HANDLERS: dict[tuple[int, int | None], Handler] = {
    (Opcode.TEST_UNIT_READY, None): test_unit_ready,
    (Opcode.REQUEST_SENSE, None): request_sense,
    (Opcode.INQUIRY, None): inquiry_cmd,
    (Opcode.MODE_SENSE_6, None): mode_sense,
    (Opcode.MODE_SENSE_10, None): mode_sense,
    (Opcode.MODE_SELECT_6, None): mode_select,
    (Opcode.MODE_SELECT_10, None): mode_select,
    (Opcode.START_STOP_UNIT, None): start_stop_unit,
    (Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, None): prevent_allow,
    (Opcode.RESERVE_6, None): reserve,
    (Opcode.RESERVE_10, None): reserve,
    (Opcode.RELEASE_6, None): release,
    (Opcode.RELEASE_10, None): release,
    (Opcode.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES): (
        report_supported_operation_codes
    ),
    **{(Opcode.PERSISTENT_RESERVE_IN, int(sa)): persistent_reserve_in for sa in PrInAction},
    **{(Opcode.PERSISTENT_RESERVE_OUT, sa): persistent_reserve_out for sa in range(7)},
}
