"""Sense data (SPC-4 4.5) and the exception that carries it out of a command.

A command handler that cannot complete raises :class:`CheckCondition` (or
:class:`StatusError` for a status without sense, such as RESERVATION
CONFLICT); ``ScsiTarget.execute`` catches it and builds the reply.  Neither
exception ever leaves ``execute``.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from mobinux.scsi.constants import Asc, SenseKey, Status

FIXED_CURRENT = 0x70  # SPC-4 4.5.3: fixed format, current error
DESCRIPTOR_CURRENT = 0x72  # SPC-4 4.5.2: descriptor format, current error


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """SPC-4 4.5.2.4.2 sense-key specific "field pointer" information.

    ``byte`` is the offset of the bad field in the CDB (``in_cdb=True``) or in
    the parameter list; ``bit`` names its most significant wrong bit, if known.
    """

    byte: int
    bit: int | None = None
    in_cdb: bool = True

    def encode(self) -> bytes:
        first = 0x80 | (0x40 if self.in_cdb else 0)  # SKSV, C/D
        if self.bit is not None:
            first |= 0x08 | (self.bit & 0x07)  # BPV, BIT POINTER
        return bytes((first,)) + struct.pack(">H", self.byte & 0xFFFF)


class CheckCondition(Exception):
    """End the command with CHECK CONDITION and this sense."""

    def __init__(
        self,
        key: SenseKey,
        asc: Asc | int,
        *,
        information: int | None = None,
        field: FieldPointer | None = None,
    ) -> None:
        asc_value = int(asc)
        super().__init__(f"{key.name} asc/ascq {asc_value >> 8:02x}/{asc_value & 0xFF:02x}")
        self.key = key
        self.asc = asc_value
        self.information = information
        self.field = field

    def sense(self, *, descriptor: bool = False) -> bytes:
        return build_sense(
            self.key,
            self.asc,
            information=self.information,
            field=self.field,
            descriptor=descriptor,
        )


class StatusError(Exception):
    """End the command with a status that carries no sense (RESERVATION CONFLICT, BUSY)."""

    def __init__(self, status: Status) -> None:
        super().__init__(status.name)
        self.status = status


def build_sense(
    key: SenseKey,
    asc: Asc | int,
    *,
    information: int | None = None,
    field: FieldPointer | None = None,
    descriptor: bool = False,
) -> bytes:
    """Encode current-error sense data in fixed (SPC-4 4.5.3) or descriptor (4.5.2) format."""
    asc_value = int(asc)
    code, qual = asc_value >> 8, asc_value & 0xFF
    if descriptor:
        body = bytearray()
        if information is not None:
            # 4.5.2.2 information sense data descriptor: VALID=1, 8-byte INFORMATION.
            body += struct.pack(">BBBBQ", 0x00, 0x0A, 0x80, 0, information & (2**64 - 1))
        if field is not None:
            # 4.5.2.3 sense key specific sense data descriptor.
            body += bytes((0x02, 0x06, 0, 0)) + field.encode() + b"\x00"
        return bytes((DESCRIPTOR_CURRENT, key & 0x0F, code, qual, 0, 0, 0, len(body))) + body
    out = bytearray(18)
    out[0] = FIXED_CURRENT
    out[2] = key & 0x0F
    if information is not None:
        out[0] |= 0x80  # VALID: INFORMATION holds a value (4.5.3)
        struct.pack_into(">I", out, 3, information & 0xFFFFFFFF)
    out[7] = 10  # ADDITIONAL SENSE LENGTH: bytes 8..17
    out[12] = code
    out[13] = qual
    if field is not None:
        out[15:18] = field.encode()
    return bytes(out)


@dataclass(frozen=True, slots=True)
class ParsedSense:
    """The parts of sense data tests and the REQUEST SENSE path look at."""

    response_code: int
    key: int
    asc: int
    ascq: int
    information: int | None
    sks: bytes | None


def parse_sense(data: bytes | bytearray | memoryview) -> ParsedSense:
    """Decode fixed or descriptor sense data; ValueError on anything malformed."""
    b = bytes(data)
    if len(b) < 8:
        raise ValueError("sense data shorter than 8 bytes")
    code = b[0] & 0x7F
    if code in (0x70, 0x71):
        if len(b) < 18 or b[7] < 10:
            raise ValueError("fixed sense data shorter than 18 bytes")
        info = struct.unpack_from(">I", b, 3)[0] if b[0] & 0x80 else None
        sks = b[15:18] if b[15] & 0x80 else None
        return ParsedSense(code, b[2] & 0x0F, b[12], b[13], info, sks)
    if code in (0x72, 0x73):
        if len(b) != 8 + b[7]:
            raise ValueError("descriptor sense length mismatch")
        info = None
        sks = None
        pos = 8
        while pos < len(b):
            if pos + 2 > len(b) or pos + 2 + b[pos + 1] > len(b):
                raise ValueError("descriptor overruns sense data")
            dtype, dlen = b[pos], b[pos + 1]
            if dtype == 0x00 and dlen == 0x0A:
                info = struct.unpack_from(">Q", b, pos + 4)[0]
            elif dtype == 0x02 and dlen == 0x06:
                sks = b[pos + 4 : pos + 7]
            pos += 2 + dlen
        return ParsedSense(code, b[1] & 0x0F, b[2], b[3], info, sks)
    raise ValueError(f"unknown sense response code {b[0]:#x}")


def invalid_cdb(byte: int, bit: int | None = None) -> CheckCondition:
    """ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at *byte* (and *bit*)."""
    return CheckCondition(
        SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field=FieldPointer(byte, bit)
    )


def invalid_param(byte: int, bit: int | None = None) -> CheckCondition:
    """ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST pointing into the data-out."""
    return CheckCondition(
        SenseKey.ILLEGAL_REQUEST,
        Asc.INVALID_FIELD_IN_PARAMETER_LIST,
        field=FieldPointer(byte, bit, in_cdb=False),
    )


def illegal(asc: Asc) -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, asc)


def from_os_error(exc: OSError, *, writing: bool) -> CheckCondition:
    """Translate a storage OSError into sense, once, at the SCSI boundary.

    Running out of space on a thin-provisioned backing store is reported the
    way SBC-3 4.7.3.6 asks: DATA PROTECT / SPACE ALLOCATION FAILED WRITE
    PROTECT; a read-only backing store is WRITE PROTECTED; anything else is a
    medium error of the matching direction.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckCondition(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    if exc.errno == errno.EROFS:
        return CheckCondition(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    if writing:
        return CheckCondition(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR)
    return CheckCondition(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR)
