"""Fuzzing ScsiTarget.execute: random CDBs of random lengths with random data-out.

Whatever comes in, execute returns GOOD, CHECK CONDITION with well-formed
sense, or RESERVATION CONFLICT; it never raises, and it never changes a block
outside the range the command names (nor any block when it fails).
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobinux.scsi import LogicalUnit, ScsiTarget
from mobinux.scsi.cdb import decode_rw, has_rw_layout
from mobinux.scsi.constants import Opcode
from mobinux.scsi.opcodes import ALL
from mobinux.scsi.sense import parse_sense
from mobinux.storage.memory import MemoryDevice

BS = 512
BLOCKS = 64
NEXUSES = ("fuzz-a", "fuzz-b")
_WRITING = frozenset(
    (
        Opcode.WRITE_6,
        Opcode.WRITE_10,
        Opcode.WRITE_12,
        Opcode.WRITE_16,
        Opcode.WRITE_AND_VERIFY_10,
        Opcode.WRITE_AND_VERIFY_12,
        Opcode.WRITE_AND_VERIFY_16,
        Opcode.WRITE_SAME_10,
        Opcode.WRITE_SAME_16,
        Opcode.COMPARE_AND_WRITE,
        Opcode.ORWRITE_16,
        Opcode.WRITE_ATOMIC_16,
    )
)


@st.composite
def structured_cdb(draw: st.DrawFn) -> bytes:
    """A CDB of a supported command, mostly with its reserved bits clear and small LBAs."""
    spec = draw(st.sampled_from(ALL))
    cdb = bytearray(draw(st.binary(min_size=spec.cdb_length, max_size=spec.cdb_length)))
    if draw(st.booleans()):
        cdb = bytearray(a & b for a, b in zip(cdb, spec.usage, strict=True))
    cdb[0] = spec.opcode
    if spec.service_action is not None:
        cdb[1] = (cdb[1] & 0xE0) | spec.service_action
    if has_rw_layout(spec.opcode) and draw(st.booleans()):
        lba = draw(st.integers(0, BLOCKS + 2))
        count = draw(st.integers(0, 8))
        rw = decode_rw(bytes(cdb))
        if spec.opcode in (Opcode.READ_6, Opcode.WRITE_6):
            cdb[1:4] = (lba & 0x1FFFFF).to_bytes(3, "big")
            cdb[4] = count
        else:
            lba_size = 4 if rw.len_byte in (6, 7) else 8
            cdb[2 : 2 + lba_size] = lba.to_bytes(lba_size, "big")
            len_size = {7: 2, 6: 4, 10: 4, 13: 1, 12: 2}[rw.len_byte]
            cdb[rw.len_byte : rw.len_byte + len_size] = count.to_bytes(len_size, "big")
    tail = draw(st.binary(max_size=4))  # iSCSI pads CDBs to 16 bytes; sometimes more
    return bytes(cdb) + tail


cdbs = st.one_of(structured_cdb(), st.binary(max_size=32))


def _allowed_blocks(cdb: bytes, data_out: bytes) -> set[int]:
    """Blocks the command may change if it succeeds."""
    if not cdb:
        return set()
    op = cdb[0]
    if op in _WRITING:
        rw = decode_rw(cdb)
        blocks = rw.blocks
        if op in (Opcode.WRITE_SAME_10, Opcode.WRITE_SAME_16) and blocks == 0:
            blocks = BLOCKS - rw.lba
        return set(range(rw.lba, rw.lba + blocks))
    if op == Opcode.UNMAP:
        allowed: set[int] = set()
        for pos in range(8, len(data_out) - 15, 16):
            lba, count = struct.unpack_from(">QI", data_out, pos)
            allowed |= set(range(lba, min(lba + count, BLOCKS)))
        return allowed
    if op == Opcode.SANITIZE:
        return set(range(BLOCKS))  # BLOCK ERASE / CRYPTOGRAPHIC ERASE wipe the LU
    if op == Opcode.EXTENDED_COPY and len(data_out) >= 16:
        tgt_len = struct.unpack_from(">H", data_out, 2)[0]
        allowed = set()
        for pos in range(16 + tgt_len, len(data_out) - 27, 28):
            blocks = struct.unpack_from(">H", data_out, pos + 10)[0]
            dst = struct.unpack_from(">Q", data_out, pos + 20)[0]
            allowed |= set(range(dst, min(dst + blocks, BLOCKS)))
        return allowed
    return set()


def _blocks(dev: MemoryDevice) -> list[bytes]:
    buf = bytearray(BLOCKS * BS)
    dev.read_into(0, memoryview(buf))
    return [bytes(buf[i * BS : (i + 1) * BS]) for i in range(BLOCKS)]


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            cdbs,
            st.one_of(
                st.none(),
                st.binary(max_size=3 * BS),
                st.integers(0, 4).map(lambda n: b"\x5a" * n * BS),
            ),
            st.sampled_from(NEXUSES),
            st.sampled_from([0, 0, 0, 1, -1]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_random_commands_never_raise_and_stay_in_range(steps) -> None:  # type: ignore[no-untyped-def]
    dev = MemoryDevice(BLOCKS * BS)
    dev.write(0, bytes(range(256)) * (BLOCKS * BS // 256))
    target = ScsiTarget({0: LogicalUnit(dev, device_id="fuzz")})
    for cdb, data_out, nexus, lun in steps:
        before = _blocks(dev)
        result = target.execute(lun, cdb, data_out, nexus)
        assert result.status in (0x00, 0x02, 0x18)
        if result.status == 0x02:
            sense = parse_sense(result.sense)
            assert sense.key != 0
            assert len(result.data) == 0
        else:
            assert result.sense == b""
        after = _blocks(dev)
        changed = {i for i in range(BLOCKS) if before[i] != after[i]}
        if result.status != 0x00 or lun != 0:
            assert not changed, (cdb.hex(), sorted(changed))
        else:
            assert changed <= _allowed_blocks(cdb, data_out or b""), (cdb.hex(), sorted(changed))


@settings(max_examples=500, deadline=None)
@given(cdb=cdbs)
def test_helpers_never_raise(cdb: bytes) -> None:
    assert isinstance(ScsiTarget.is_nowait_candidate(cdb), bool)
    assert isinstance(ScsiTarget.touches_media(cdb), bool)
    assert ScsiTarget.data_out_length(cdb) >= 0
