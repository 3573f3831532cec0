"""EXTENDED COPY (LID1), RECEIVE COPY RESULTS and SANITIZE."""

from __future__ import annotations

import struct

import pytest

from mobinux.scsi.xcopy import MAX_SEGMENT_DESCRIPTORS, MAX_TARGET_DESCRIPTORS
from tests.unit.test_scsi_harness import (
    BS,
    DATA_PROTECT,
    ILLEGAL_REQUEST,
    NEXUS,
    NEXUS2,
    RESERVATION_CONFLICT,
    Scsi,
    get_lba_status,
    inquiry,
    reserve6,
)

COPY_ABORTED = 0xA


def xcopy(length: int) -> bytes:
    return struct.pack(">BB8xIBB", 0x83, 0x00, length, 0, 0)


def rcr(action: int, list_id: int = 0, alloc: int = 1024) -> bytes:
    return struct.pack(">BBB7xIBB", 0x84, action, list_id, alloc, 0, 0)


def sanitize(action: int, length: int = 0) -> bytes:
    return struct.pack(">BB5xHB", 0x48, action, length, 0)


def target_descriptor(
    s: Scsi, *, naa: bytes | None = None, block: int = BS, kind: int = 0xE4
) -> bytes:
    value = s.lu.identity.naa if naa is None else naa
    designator = bytes((0x01, 0x03, 0, len(value))) + value
    return (
        bytes((kind, 0, 0, 0))
        + designator.ljust(24, b"\0")
        + bytes((0,))
        + block.to_bytes(3, "big")
    )


def segment(
    blocks: int, src_lba: int, dst_lba: int, src: int = 0, dst: int = 0, kind: int = 0x02
) -> bytes:
    return struct.pack(">BBHHH2xHQQ", kind, 0, 0x18, src, dst, blocks, src_lba, dst_lba)


def params(targets: list[bytes], segments: list[bytes], list_id: int = 1, usage: int = 0) -> bytes:
    tgt = b"".join(targets)
    seg = b"".join(segments)
    return struct.pack(">BBH4xII", list_id, usage << 3, len(tgt), len(seg), 0) + tgt + seg


def test_copy_within_the_lu() -> None:
    s = Scsi(blocks=8192)
    data = bytes(range(256)) * 2 * 3000
    s.write(0, data)
    p = params([target_descriptor(s)], [segment(3000, 0, 4000)])
    s.good(xcopy(len(p)), p)
    assert s.read(4000, 3000) == data


def test_overlapping_copy_forward_is_correct() -> None:
    s = Scsi(blocks=8192)
    data = b"".join(bytes([i % 251]) * BS for i in range(3000))
    s.write(0, data)
    p = params([target_descriptor(s)], [segment(3000, 0, 100)])
    s.good(xcopy(len(p)), p)
    assert s.read(100, 3000) == data


def test_several_segments_and_copy_status() -> None:
    s = Scsi()
    s.write(0, b"a" * BS + b"b" * BS)
    p = params([target_descriptor(s)], [segment(1, 0, 10), segment(1, 1, 11)], list_id=7)
    s.good(xcopy(len(p)), p)
    assert s.read(10, 2) == b"a" * BS + b"b" * BS
    status = s.good(rcr(0x00, list_id=7))
    assert struct.unpack_from(">I", status)[0] == 8
    assert status[4] == 0x01  # completed without error
    assert struct.unpack_from(">H", status, 5)[0] == 2
    assert s.check(rcr(0x00, list_id=8)).asc == 0x24  # no such list
    assert s.check(rcr(0x00, list_id=7), nexus=NEXUS2).asc == 0x24  # held per nexus


def test_results_are_not_held_when_the_list_says_discard() -> None:
    s = Scsi()
    p = params([target_descriptor(s)], [segment(1, 0, 1)], list_id=3, usage=0b11)
    s.good(xcopy(len(p)), p)
    assert s.check(rcr(0x00, list_id=3)).asc == 0x24


def test_operating_parameters() -> None:
    data = Scsi().good(rcr(0x03))
    assert struct.unpack_from(">HH", data, 8) == (MAX_TARGET_DESCRIPTORS, MAX_SEGMENT_DESCRIPTORS)
    count = data[43]
    assert set(data[44 : 44 + count]) == {0x02, 0xE4}
    assert struct.unpack_from(">I", data)[0] == len(data) - 4


def test_empty_parameter_list_is_good_and_short_lists_are_length_errors() -> None:
    s = Scsi()
    s.good(xcopy(0))
    p = params([target_descriptor(s)], [segment(1, 0, 1)])
    assert s.check(xcopy(len(p) - 1), p[:-1]).asc == 0x1A
    assert s.check(xcopy(10), p[:10]).asc == 0x1A


def test_descriptor_limits_and_types() -> None:
    s = Scsi()
    t = target_descriptor(s)
    p = params([t] * (MAX_TARGET_DESCRIPTORS + 1), [segment(1, 0, 1)])
    assert (s.check(xcopy(len(p)), p).asc, s.check(xcopy(len(p)), p).ascq) == (0x26, 0x06)
    p = params([t], [segment(1, 0, 1)] * (MAX_SEGMENT_DESCRIPTORS + 1))
    assert s.check(xcopy(len(p)), p).ascq == 0x08
    p = params([target_descriptor(s, kind=0xE0)], [segment(1, 0, 1)])
    assert s.check(xcopy(len(p)), p).ascq == 0x07
    p = params([t], [segment(1, 0, 1, kind=0x03)])
    assert s.check(xcopy(len(p)), p).ascq == 0x09


def test_copy_aborted_cases() -> None:
    s = Scsi(blocks=100)
    t = target_descriptor(s)
    for p in (
        params([t], [segment(1, 0, 1, dst=1)]),  # no such target descriptor
        params([t], [segment(2, 0, 99)]),  # beyond the end
        params([target_descriptor(s, naa=b"\x30" + bytes(7))], [segment(1, 0, 1)]),  # another LU
        params([target_descriptor(s, block=4096)], [segment(1, 0, 1)]),
    ):
        assert s.check(xcopy(len(p)), p).key == COPY_ABORTED


def test_copy_to_a_write_protected_lu() -> None:
    s = Scsi(readonly=True)
    p = params([target_descriptor(s)], [segment(1, 0, 1)])
    assert s.check(xcopy(len(p)), p).key == DATA_PROTECT


def test_inquiry_advertises_3pc() -> None:
    assert Scsi().good(inquiry())[5] & 0x08


# -- SANITIZE -------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", [0x02, 0x03])
def test_sanitize_erase_unmaps_everything(action: int) -> None:
    s = Scsi(blocks=512)
    s.write(0, b"s" * 512 * BS)
    s.good(sanitize(action))
    assert s.read(0, 512) == bytes(512 * BS)
    status = s.good(get_lba_status(0))
    assert status[8 + 12] & 0x0F == 1  # deallocated


def test_sanitize_validation() -> None:
    s = Scsi()
    assert s.check(sanitize(0x02, length=8), bytes(8)).asc == 0x24
    assert s.check(sanitize(0x1F, length=8), bytes(8)).asc == 0x24
    s.good(sanitize(0x1F))
    for action in (0x00, 0x01, 0x04, 0x1E):
        sense = s.check(sanitize(action))
        assert (sense.key, sense.asc) == (ILLEGAL_REQUEST, 0x24)
    cdb = bytearray(sanitize(0x02))
    cdb[1] |= 0x40
    assert s.check(bytes(cdb)).asc == 0x24
    cdb = bytearray(sanitize(0x02))
    cdb[3] = 3
    assert s.check(bytes(cdb)).asc == 0x24


def test_sanitize_respects_write_protect_and_reservations() -> None:
    assert Scsi(readonly=True).check(sanitize(0x02)).key == DATA_PROTECT
    s = Scsi()
    s.write(0, b"r" * BS)
    s.good(reserve6(), nexus=NEXUS2)
    assert s.run(sanitize(0x02), nexus=NEXUS).status == RESERVATION_CONFLICT
    assert s.read(0, 1, nexus=NEXUS2) == b"r" * BS  # nothing was erased
