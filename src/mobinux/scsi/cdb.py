"""CDB field decoding shared by the command handlers (SPC-4 4.2, SBC-3 5).

Every decoder takes a CDB whose length has already been checked against the
command table (``opcodes.COMMANDS``), so fixed offsets are safe here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mobinux.scsi.constants import Opcode

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def u16(b: bytes | bytearray | memoryview, pos: int) -> int:
    return int(_U16.unpack_from(b, pos)[0])


def u24(b: bytes | bytearray | memoryview, pos: int) -> int:
    return (b[pos] << 16) | (b[pos + 1] << 8) | b[pos + 2]


def u32(b: bytes | bytearray | memoryview, pos: int) -> int:
    return int(_U32.unpack_from(b, pos)[0])


def u64(b: bytes | bytearray | memoryview, pos: int) -> int:
    return int(_U64.unpack_from(b, pos)[0])


@dataclass(frozen=True, slots=True)
class Rw:
    """The LBA range and flags of a READ/WRITE/VERIFY/WRITE SAME style CDB."""

    lba: int
    blocks: int
    flags: int  # byte 1: xPROTECT(7-5) DPO(4) FUA(3) ...
    lba_byte: int  # offset of the LBA field, for sense field pointers
    len_byte: int  # offset of the length field

    @property
    def fua(self) -> bool:
        return bool(self.flags & 0x08)


# opcode -> (LBA offset, LBA size, length offset, length size), SBC-3 5.x CDB layouts.
_RW_LAYOUT: dict[int, tuple[int, int, int, int]] = {}
for _ops, _layout in (
    (
        (
            Opcode.READ_10,
            Opcode.WRITE_10,
            Opcode.VERIFY_10,
            Opcode.WRITE_AND_VERIFY_10,
            Opcode.PRE_FETCH_10,
            Opcode.SYNCHRONIZE_CACHE_10,
            Opcode.WRITE_SAME_10,
        ),
        (2, 4, 7, 2),
    ),
    ((Opcode.READ_12, Opcode.WRITE_12, Opcode.VERIFY_12, Opcode.WRITE_AND_VERIFY_12), (2, 4, 6, 4)),
    (
        (
            Opcode.READ_16,
            Opcode.WRITE_16,
            Opcode.VERIFY_16,
            Opcode.WRITE_AND_VERIFY_16,
            Opcode.PRE_FETCH_16,
            Opcode.SYNCHRONIZE_CACHE_16,
            Opcode.WRITE_SAME_16,
            Opcode.ORWRITE_16,
        ),
        (2, 8, 10, 4),
    ),
    ((Opcode.COMPARE_AND_WRITE,), (2, 8, 13, 1)),
    ((Opcode.WRITE_ATOMIC_16,), (2, 8, 12, 2)),
):
    for _op in _ops:
        _RW_LAYOUT[_op] = _layout


def decode_rw(cdb: bytes | bytearray | memoryview) -> Rw:
    """Decode the LBA and transfer length of a block command.

    READ(6)/WRITE(6) (SBC-3 5.15, 5.38): a 21-bit LBA and a one-byte length
    where 0 means 256 blocks.
    """
    op = cdb[0]
    if op in (Opcode.READ_6, Opcode.WRITE_6):
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return Rw(lba, cdb[4] or 256, 0, 1, 4)
    lba_at, lba_size, len_at, len_size = _RW_LAYOUT[op]
    lba = u32(cdb, lba_at) if lba_size == 4 else u64(cdb, lba_at)
    if len_size == 1:
        blocks = cdb[len_at]
    elif len_size == 2:
        blocks = u16(cdb, len_at)
    else:
        blocks = u32(cdb, len_at)
    return Rw(lba, blocks, cdb[1], lba_at, len_at)


def has_rw_layout(op: int) -> bool:
    return op in _RW_LAYOUT or op in (Opcode.READ_6, Opcode.WRITE_6)
