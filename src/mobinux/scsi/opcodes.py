"""The command table: every operation code (and service action) the LU supports.

One row per command gives its CDB length, its CDB usage data (SPC-4 6.35.3:
a bit map of the CDB bits the device server looks at, reported by REPORT
SUPPORTED OPERATION CODES and also used to reject CDBs with reserved bits
set), whether it may touch the media (the caller runs it in a thread), and
how it behaves under reservations (SPC-4 5.9 Table 52 and 5.12.2 Table 62,
SBC-3 4.16 Table 13).

Usage maps: byte 0 is the operation code itself and, for commands with a
service action, the service action field holds its value (SPC-4 6.35.3).  The
CONTROL byte's usage is 0x04 (NACA), the only bit the device server
examines; NACA=1 is refused because ACA is not supported (SAM-5 5.10).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mobinux.scsi.constants import (
    MaintenanceIn,
    Opcode,
    PrInAction,
    SanitizeAction,
    ServiceActionIn16,
)

CONTROL_USAGE = 0x04


class Access(Enum):
    """What a command does, for reservation conflict checks."""

    ALWAYS = "always"  # never conflicts (INQUIRY, REPORT LUNS, ...)
    READ = "read"  # conflicts with Exclusive Access types only
    WRITE = "write"  # conflicts with any reservation held by someone else
    SPECIAL = "special"  # the handler decides (PR OUT, RESERVE/RELEASE)


@dataclass(frozen=True, slots=True)
class CommandSpec:
    opcode: int
    service_action: int | None
    name: str
    usage: bytes
    media: bool = False
    access: Access = Access.READ
    # SPC-4 6.35.4 command timeouts descriptor, in seconds.
    nominal_timeout: int = 0
    recommended_timeout: int = 0
    # Allowed while a RESERVE(6) is held by another I_T nexus (SPC-2 5.5.1 Table 10).
    allowed_when_reserved: bool = False

    @property
    def cdb_length(self) -> int:
        return len(self.usage)


def _u(*b: int) -> bytes:
    return bytes(b)


_C = CONTROL_USAGE
_RW10 = 0x1A  # DPO, FUA, FUA_NV (obsolete, accepted and ignored)
_WV = 0x12  # WRITE AND VERIFY: DPO, BYTCHK (SBC-3 5.42)
_VFY = 0x16  # VERIFY: DPO, BYTCHK (2 bits, SBC-3 5.33)
_GRP = 0x1F  # GROUP NUMBER
_L8 = (0xFF,) * 8
_L4 = (0xFF,) * 4

# fmt: off
_SPECS: tuple[CommandSpec, ...] = (
    CommandSpec(Opcode.TEST_UNIT_READY, None, "TEST UNIT READY", _u(0x00, 0, 0, 0, 0, _C),
                access=Access.ALWAYS),
    CommandSpec(Opcode.REQUEST_SENSE, None, "REQUEST SENSE", _u(0x03, 0x01, 0, 0, 0xFF, _C),
                access=Access.ALWAYS, allowed_when_reserved=True),
    CommandSpec(Opcode.READ_6, None, "READ(6)", _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, _C),
                media=True, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.WRITE_6, None, "WRITE(6)", _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.INQUIRY, None, "INQUIRY", _u(0x12, 0x01, 0xFF, 0xFF, 0xFF, _C),
                access=Access.ALWAYS, allowed_when_reserved=True),
    # MODE SELECT may flush (turning the write cache off writes it back): media=True.
    CommandSpec(Opcode.MODE_SELECT_6, None, "MODE SELECT(6)", _u(0x15, 0x11, 0, 0, 0xFF, _C),
                media=True, access=Access.WRITE),
    CommandSpec(Opcode.RESERVE_6, None, "RESERVE(6)", _u(0x16, 0, 0, 0, 0, _C),
                access=Access.SPECIAL),
    CommandSpec(Opcode.RELEASE_6, None, "RELEASE(6)", _u(0x17, 0, 0, 0, 0, _C),
                access=Access.SPECIAL, allowed_when_reserved=True),
    CommandSpec(Opcode.MODE_SENSE_6, None, "MODE SENSE(6)", _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, _C)),
    CommandSpec(Opcode.START_STOP_UNIT, None, "START STOP UNIT",
                _u(0x1B, 0x01, 0, 0x0F, 0xF7, _C), media=True, access=Access.ALWAYS),
    CommandSpec(Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, None, "PREVENT ALLOW MEDIUM REMOVAL",
                _u(0x1E, 0, 0, 0, 0x03, _C), access=Access.SPECIAL),
    CommandSpec(Opcode.READ_CAPACITY_10, None, "READ CAPACITY(10)",
                _u(0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, _C),
                allowed_when_reserved=False, access=Access.ALWAYS),
    CommandSpec(Opcode.READ_10, None, "READ(10)",
                _u(0x28, _RW10, *_L4, _GRP, 0xFF, 0xFF, _C),
                media=True, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.WRITE_10, None, "WRITE(10)",
                _u(0x2A, _RW10, *_L4, _GRP, 0xFF, 0xFF, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.WRITE_AND_VERIFY_10, None, "WRITE AND VERIFY(10)",
                _u(0x2E, _WV, *_L4, _GRP, 0xFF, 0xFF, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.VERIFY_10, None, "VERIFY(10)",
                _u(0x2F, _VFY, *_L4, _GRP, 0xFF, 0xFF, _C),
                media=True, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.PRE_FETCH_10, None, "PRE-FETCH(10)",
                _u(0x34, 0x02, *_L4, _GRP, 0xFF, 0xFF, _C), media=True),
    CommandSpec(Opcode.SYNCHRONIZE_CACHE_10, None, "SYNCHRONIZE CACHE(10)",
                _u(0x35, 0x06, *_L4, _GRP, 0xFF, 0xFF, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=120),
    CommandSpec(Opcode.READ_DEFECT_DATA_10, None, "READ DEFECT DATA(10)",
                _u(0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, _C)),
    CommandSpec(Opcode.WRITE_SAME_10, None, "WRITE SAME(10)",
                _u(0x41, 0x08, *_L4, _GRP, 0xFF, 0xFF, _C),
                media=True, access=Access.WRITE, nominal_timeout=60, recommended_timeout=300),
    # SANITIZE (SBC-4 5.30): BLOCK ERASE and CRYPTOGRAPHIC ERASE unmap the
    # whole LU; OVERWRITE is not offered.  IMMED and AUSE are accepted.
    *(
        CommandSpec(Opcode.SANITIZE, sa, f"SANITIZE/{sa.name}",
                    _u(0x48, 0xA0 | sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, _C),
                    media=True, access=Access.WRITE, nominal_timeout=60, recommended_timeout=600)
        for sa in (SanitizeAction.BLOCK_ERASE, SanitizeAction.CRYPTOGRAPHIC_ERASE,
                   SanitizeAction.EXIT_FAILURE_MODE)
    ),
    CommandSpec(Opcode.UNMAP, None, "UNMAP", _u(0x42, 0, 0, 0, 0, 0, _GRP, 0xFF, 0xFF, _C),
                media=True, access=Access.WRITE, nominal_timeout=60, recommended_timeout=300),
    CommandSpec(Opcode.MODE_SELECT_10, None, "MODE SELECT(10)",
                _u(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, _C), media=True, access=Access.WRITE),
    CommandSpec(Opcode.RESERVE_10, None, "RESERVE(10)",
                _u(0x56, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, _C), access=Access.SPECIAL),
    CommandSpec(Opcode.RELEASE_10, None, "RELEASE(10)",
                _u(0x57, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, _C),
                access=Access.SPECIAL, allowed_when_reserved=True),
    CommandSpec(Opcode.MODE_SENSE_10, None, "MODE SENSE(10)",
                _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, _C)),
    *(
        CommandSpec(Opcode.PERSISTENT_RESERVE_IN, sa, f"PERSISTENT RESERVE IN/{sa.name}",
                    _u(0x5E, sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, _C), access=Access.ALWAYS,
                    allowed_when_reserved=True)
        for sa in PrInAction
    ),
    *(
        CommandSpec(Opcode.PERSISTENT_RESERVE_OUT, sa, f"PERSISTENT RESERVE OUT/{name}",
                    _u(0x5F, sa, 0xFF, 0, 0, *_L4, _C), access=Access.SPECIAL)
        for sa, name in (
            (0, "REGISTER"), (1, "RESERVE"), (2, "RELEASE"), (3, "CLEAR"), (4, "PREEMPT"),
            (5, "PREEMPT AND ABORT"), (6, "REGISTER AND IGNORE EXISTING KEY"),
        )
    ),
    # EXTENDED COPY (LID1) and RECEIVE COPY RESULTS: scsi/xcopy.py.
    CommandSpec(Opcode.EXTENDED_COPY, 0x00, "EXTENDED COPY(LID1)",
                _u(0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, *_L4, 0, _C),
                media=True, access=Access.WRITE, nominal_timeout=60, recommended_timeout=600),
    CommandSpec(Opcode.RECEIVE_COPY_RESULTS, 0x00, "RECEIVE COPY RESULTS/COPY STATUS",
                _u(0x84, 0x00, 0xFF, 0, 0, 0, 0, 0, 0, 0, *_L4, 0, _C)),
    CommandSpec(Opcode.RECEIVE_COPY_RESULTS, 0x03, "RECEIVE COPY RESULTS/OPERATING PARAMETERS",
                _u(0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, *_L4, 0, _C), access=Access.ALWAYS),
    CommandSpec(Opcode.READ_16, None, "READ(16)",
                _u(0x88, _RW10, *_L8, *_L4, _GRP, _C),
                media=True, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.COMPARE_AND_WRITE, None, "COMPARE AND WRITE",
                _u(0x89, _RW10, *_L8, 0, 0, 0, 0xFF, _GRP, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.WRITE_16, None, "WRITE(16)",
                _u(0x8A, _RW10, *_L8, *_L4, _GRP, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.ORWRITE_16, None, "ORWRITE(16)",
                _u(0x8B, _RW10, *_L8, *_L4, _GRP, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.WRITE_AND_VERIFY_16, None, "WRITE AND VERIFY(16)",
                _u(0x8E, _WV, *_L8, *_L4, _GRP, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.VERIFY_16, None, "VERIFY(16)",
                _u(0x8F, _VFY, *_L8, *_L4, _GRP, _C),
                media=True, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.PRE_FETCH_16, None, "PRE-FETCH(16)",
                _u(0x90, 0x02, *_L8, *_L4, _GRP, _C), media=True),
    CommandSpec(Opcode.SYNCHRONIZE_CACHE_16, None, "SYNCHRONIZE CACHE(16)",
                _u(0x91, 0x06, *_L8, *_L4, _GRP, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=120),
    CommandSpec(Opcode.WRITE_SAME_16, None, "WRITE SAME(16)",
                _u(0x93, 0x09, *_L8, *_L4, _GRP, _C),
                media=True, access=Access.WRITE, nominal_timeout=60, recommended_timeout=300),
    # ATOMIC BOUNDARY (bytes 10-11) is not in the map: boundaries are not
    # supported (VPD B0h MAXIMUM ATOMIC BOUNDARY SIZE 0), so it must be zero.
    CommandSpec(Opcode.WRITE_ATOMIC_16, None, "WRITE ATOMIC(16)",
                _u(0x9C, 0x18, *_L8, 0, 0, 0xFF, 0xFF, _GRP, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16,
                "READ CAPACITY(16)", _u(0x9E, 0x10, *_L8, *_L4, 0x01, _C),
                access=Access.ALWAYS),
    CommandSpec(Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS,
                "GET LBA STATUS", _u(0x9E, 0x12, *_L8, *_L4, 0, _C), media=True),
    CommandSpec(Opcode.REPORT_LUNS, None, "REPORT LUNS",
                _u(0xA0, 0, 0xFF, 0, 0, 0, *_L4, 0, _C),
                access=Access.ALWAYS, allowed_when_reserved=True),
    CommandSpec(Opcode.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
                "REPORT SUPPORTED OPERATION CODES",
                _u(0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, *_L4, 0, _C),
                access=Access.ALWAYS, allowed_when_reserved=True),
    CommandSpec(Opcode.READ_12, None, "READ(12)",
                _u(0xA8, _RW10, *_L4, *_L4, _GRP, _C),
                media=True, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.WRITE_12, None, "WRITE(12)",
                _u(0xAA, _RW10, *_L4, *_L4, _GRP, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.WRITE_AND_VERIFY_12, None, "WRITE AND VERIFY(12)",
                _u(0xAE, _WV, *_L4, *_L4, _GRP, _C),
                media=True, access=Access.WRITE, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.VERIFY_12, None, "VERIFY(12)",
                _u(0xAF, _VFY, *_L4, *_L4, _GRP, _C),
                media=True, nominal_timeout=30, recommended_timeout=60),
    CommandSpec(Opcode.READ_DEFECT_DATA_12, None, "READ DEFECT DATA(12)",
                _u(0xB7, 0x1F, 0, 0, 0, 0, *_L4, 0, _C)),
)
# fmt: on

# Operation codes whose second byte carries a service action (SPC-4 4.2.5.2).
SERVICE_ACTION_OPCODES: frozenset[int] = frozenset(
    s.opcode for s in _SPECS if s.service_action is not None
)
"""Opcodes whose CDB byte 1 (bits 4-0) selects a service action."""

BY_OPCODE: dict[int, CommandSpec] = {s.opcode: s for s in _SPECS if s.service_action is None}
BY_SERVICE_ACTION: dict[tuple[int, int], CommandSpec] = {
    (s.opcode, s.service_action): s for s in _SPECS if s.service_action is not None
}
ALL: tuple[CommandSpec, ...] = tuple(
    sorted(_SPECS, key=lambda s: (s.opcode, s.service_action or 0))
)


def lookup(cdb: bytes | bytearray | memoryview) -> CommandSpec | None:
    """The table row for *cdb*, or None if the opcode/service action is unsupported."""
    if not cdb:
        return None
    op = cdb[0]
    if op in SERVICE_ACTION_OPCODES:
        if len(cdb) < 2:
            return None
        return BY_SERVICE_ACTION.get((op, cdb[1] & 0x1F))
    return BY_OPCODE.get(op)


def _reserved_mask(spec: CommandSpec) -> bytes:
    """Per CDB byte (from byte 1), the bits that must be zero."""
    usage = spec.usage
    last = len(usage) - 1
    out = bytearray()
    for i in range(1, len(usage)):
        allowed = usage[i]
        if i == 1 and spec.service_action is not None:
            allowed |= 0x1F
        if i == last:
            allowed = 0xC0  # vendor bits only: NACA and the obsolete LINK/FLAG bits are refused
        out.append(~allowed & 0xFF)
    return bytes(out)


# Precomputed once: (mask as an int over bytes 1..n-1, the same as bytes).
_MASKS: dict[tuple[int, int | None], tuple[int, bytes]] = {
    (s.opcode, s.service_action): (int.from_bytes(m, "big"), m)
    for s in _SPECS
    for m in (_reserved_mask(s),)
}


def reserved_bits(spec: CommandSpec, cdb: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(byte, bit) of the most significant CDB bit set outside the usage map, or None.

    Byte 0 and the service action are skipped (they selected this row).  In the
    CONTROL byte (SAM-5 5.2) the vendor-specific bits 7-6 are ignored and every
    other bit refused: NACA=1 because ACA is not supported (SAM-5 5.10), the
    obsolete LINK and FLAG bits because linked commands are gone.
    """
    mask_int, mask = _MASKS[(spec.opcode, spec.service_action)]
    n = len(mask) + 1
    if not int.from_bytes(cdb[1:n], "big") & mask_int:
        return None  # the common case: one big-int AND
    for i in range(1, n):
        extra = cdb[i] & mask[i - 1]
        if extra:
            return i, extra.bit_length() - 1
    return None


__all__ = [
    "ALL",
    "BY_OPCODE",
    "BY_SERVICE_ACTION",
    "SERVICE_ACTION_OPCODES",
    "Access",
    "CommandSpec",
    "PrInAction",
    "lookup",
    "reserved_bits",
]
