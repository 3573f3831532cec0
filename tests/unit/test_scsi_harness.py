"""A small driver for ScsiTarget used by the test_scsi_* modules, and CDB builders.

The module also tests its own builders, so a wrong builder cannot make every
other test pass vacuously.
"""

from __future__ import annotations

import struct
from typing import Any

from mobinux.scsi import LogicalUnit, ScsiResult, ScsiTarget
from mobinux.scsi.sense import ParsedSense, parse_sense
from mobinux.storage.memory import MemoryDevice

BS = 512
# The iSCSI layer's nexus names: initiator port, then target port (RFC 7143 4.2.7.2).
NEXUS = "iqn.2026-01.test:init1,i,0x23d000000001,iqn.2026-01.test:disk,t,0x0001"
NEXUS2 = "iqn.2026-01.test:init2,i,0x23d000000002,iqn.2026-01.test:disk,t,0x0001"

GOOD = 0x00
CHECK_CONDITION = 0x02
RESERVATION_CONFLICT = 0x18

ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
MISCOMPARE = 0xE
NOT_READY = 0x2
MEDIUM_ERROR = 0x3


class Scsi:
    """A target with one LU on a MemoryDevice; new nexuses have their power-on UA cleared."""

    def __init__(self, blocks: int = 2048, **lu_kwargs: Any) -> None:
        self.dev = MemoryDevice(blocks * BS)
        self.lu = LogicalUnit(self.dev, device_id="iqn.2026-01.test:disk/0", **lu_kwargs)
        self.target = ScsiTarget({0: self.lu})
        self._seen: set[str] = set()

    def run(
        self,
        cdb: bytes,
        data: bytes | None = None,
        *,
        nexus: str = NEXUS,
        lun: int = 0,
        clear_ua: bool = True,
        buffer: bytearray | None = None,
    ) -> ScsiResult:
        if clear_ua and nexus not in self._seen:
            self._seen.add(nexus)
            # INQUIRY never reports a unit attention; REQUEST SENSE pops one each.
            for _ in range(8):
                sense = self.target.execute(lun, request_sense(), None, nexus).data
                if not sense or parse_sense(bytes(sense)).key != UNIT_ATTENTION:
                    break
        return self.target.execute(lun, cdb, data, nexus, buffer=buffer)

    def good(self, cdb: bytes, data: bytes | None = None, **kw: Any) -> bytes:
        r = self.run(cdb, data, **kw)
        assert r.status == GOOD, (r.status, r.sense.hex())
        return bytes(r.data)

    def check(self, cdb: bytes, data: bytes | None = None, **kw: Any) -> ParsedSense:
        r = self.run(cdb, data, **kw)
        assert r.status == CHECK_CONDITION, (r.status, bytes(r.data[:32]).hex())
        assert r.data == b""
        return parse_sense(r.sense)

    def expect(
        self, cdb: bytes, key: int, asc: int, ascq: int, data: bytes | None = None, **kw: Any
    ) -> ParsedSense:
        s = self.check(cdb, data, **kw)
        assert (s.key, s.asc, s.ascq) == (key, asc, ascq), (hex(s.key), hex(s.asc), hex(s.ascq))
        return s

    def read(self, lba: int, blocks: int, nexus: str = NEXUS) -> bytes:
        return self.good(read16(lba, blocks), nexus=nexus)

    def write(self, lba: int, data: bytes) -> None:
        self.good(write16(lba, len(data) // BS), data)


# -- CDB builders (SPC-4 / SBC-3 layouts) ------------------------------------------


def tur() -> bytes:
    return bytes(6)


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def request_sense(alloc: int = 252, desc: int = 0) -> bytes:
    return bytes((0x03, desc, 0, 0, alloc, 0))


def read6(lba: int, blocks: int) -> bytes:
    return bytes((0x08, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0))


def write6(lba: int, blocks: int) -> bytes:
    return bytes((0x0A, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0))


def _10(op: int, lba: int, blocks: int, flags: int = 0, group: int = 0, control: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba & 0xFFFFFFFF, group, blocks, control)


def _12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba & 0xFFFFFFFF, blocks, 0, 0)


def _16(op: int, lba: int, blocks: int, flags: int = 0, control: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba & (2**64 - 1), blocks, 0, control)


def read10(lba: int, blocks: int, flags: int = 0, control: int = 0) -> bytes:
    return _10(0x28, lba, blocks, flags, control=control)


def write10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return _10(0x2A, lba, blocks, flags)


def read12(lba: int, blocks: int, flags: int = 0) -> bytes:
    return _12(0xA8, lba, blocks, flags)


def write12(lba: int, blocks: int, flags: int = 0) -> bytes:
    return _12(0xAA, lba, blocks, flags)


def read16(lba: int, blocks: int, flags: int = 0, control: int = 0) -> bytes:
    return _16(0x88, lba, blocks, flags, control)


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return _16(0x8A, lba, blocks, flags)


def verify10(lba: int, blocks: int, bytchk: int = 0) -> bytes:
    return _10(0x2F, lba, blocks, bytchk << 1)


def verify16(lba: int, blocks: int, bytchk: int = 0) -> bytes:
    return _16(0x8F, lba, blocks, bytchk << 1)


def write_verify10(lba: int, blocks: int, bytchk: int = 0) -> bytes:
    return _10(0x2E, lba, blocks, bytchk << 1)


def write_same10(lba: int, blocks: int, unmap: bool = False, anchor: bool = False) -> bytes:
    return _10(0x41, lba, blocks, (0x08 if unmap else 0) | (0x10 if anchor else 0))


def write_same16(lba: int, blocks: int, unmap: bool = False, ndob: bool = False) -> bytes:
    return _16(0x93, lba, blocks, (0x08 if unmap else 0) | (0x01 if ndob else 0))


def compare_and_write(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, 0x08 if fua else 0, lba, blocks, 0, 0)


def orwrite(lba: int, blocks: int) -> bytes:
    return _16(0x8B, lba, blocks)


def write_atomic16(lba: int, blocks: int, boundary: int = 0) -> bytes:
    return struct.pack(">BBQHHBB", 0x9C, 0, lba, boundary, blocks, 0, 0)


def sync_cache10(lba: int = 0, blocks: int = 0) -> bytes:
    return _10(0x35, lba, blocks)


def sync_cache16(lba: int = 0, blocks: int = 0) -> bytes:
    return _16(0x91, lba, blocks)


def prefetch10(lba: int, blocks: int) -> bytes:
    return _10(0x34, lba, blocks)


def unmap(param_len: int) -> bytes:
    return struct.pack(">BBIBHB", 0x42, 0, 0, 0, param_len, 0)


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(body), len(body)) + body


def read_capacity10() -> bytes:
    return bytes((0x25,)) + bytes(9)


def read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def get_lba_status(lba: int, alloc: int = 4096) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def mode_sense6(
    page: int, pc: int = 0, dbd: bool = False, alloc: int = 255, subpage: int = 0
) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc, 0))


def mode_sense10(
    page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False, alloc: int = 4096
) -> bytes:
    flags = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return struct.pack(">BBBB3xHB", 0x5A, flags, (pc << 6) | page, 0, alloc, 0)


def mode_select6(length: int, sp: bool = False) -> bytes:
    return bytes((0x15, 0x10 | (0x01 if sp else 0), 0, 0, length, 0))


def mode_select10(length: int) -> bytes:
    return struct.pack(">BB5xHB", 0x55, 0x10, length, 0)


def report_luns(alloc: int = 4096, select: int = 0) -> bytes:
    return struct.pack(">BBB3xIBB", 0xA0, 0, select, alloc, 0, 0)


def rsoc(
    options: int = 0, opcode: int = 0, sa: int = 0, rctd: bool = False, alloc: int = 65535
) -> bytes:
    return struct.pack(
        ">BBBBHIBB", 0xA3, 0x0C, (0x80 if rctd else 0) | options, opcode, sa, alloc, 0, 0
    )


def reserve6() -> bytes:
    return bytes((0x16, 0, 0, 0, 0, 0))


def release6() -> bytes:
    return bytes((0x17, 0, 0, 0, 0, 0))


def prin(action: int, alloc: int = 4096) -> bytes:
    return struct.pack(">BB5xHB", 0x5E, action, alloc, 0)


def prout(action: int, pr_type: int = 0, length: int = 24) -> bytes:
    return struct.pack(">BBB2xIB", 0x5F, action, pr_type, length, 0)


def prout_params(key: int, sa_key: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">QQ4xBx2x", key, sa_key, flags)


def start_stop(start: bool, loej: bool = False, power_condition: int = 0) -> bytes:
    return bytes(
        (0x1B, 0, 0, 0, (power_condition << 4) | (0x02 if loej else 0) | (0x01 if start else 0), 0)
    )


def prevent_allow(prevent: int) -> bytes:
    return bytes((0x1E, 0, 0, 0, prevent, 0))


# -- the builders' own tests -------------------------------------------------------


def test_builders_have_the_spec_lengths() -> None:
    assert len(read6(0, 1)) == 6
    assert len(read10(0, 1)) == 10
    assert len(read12(0, 1)) == 12
    assert len(read16(0, 1)) == 16
    assert len(compare_and_write(0, 1)) == 16
    assert len(write_atomic16(0, 1)) == 16
    assert len(report_luns()) == 12
    assert len(rsoc()) == 12
    assert len(prout(0)) == 10
    assert len(prout_params(1)) == 24
    assert len(mode_sense10(0x3F)) == 10
    assert len(unmap(24)) == 10


def test_builders_put_fields_where_sbc3_says() -> None:
    assert read10(0x01020304, 0x0506) == bytes.fromhex("2800010203040005 0600".replace(" ", ""))
    assert read16(0x0102030405060708, 0x090A0B0C)[2:14] == bytes.fromhex("0102030405060708090a0b0c")
    assert compare_and_write(7, 3)[13] == 3
    assert unmap_params((5, 6)) == bytes.fromhex("0016001000000000") + struct.pack(">QI4x", 5, 6)


def test_harness_clears_the_power_on_unit_attention() -> None:
    s = Scsi()
    raw = s.target.execute(0, tur(), None, "fresh")
    assert raw.status == CHECK_CONDITION
    assert parse_sense(raw.sense).asc == 0x29
    assert s.run(tur(), nexus="other").status == GOOD
