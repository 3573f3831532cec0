"""ScsiTarget as the transport sees it: unit attentions, resets, LUN map, helpers,
REPORT SUPPORTED OPERATION CODES, START STOP UNIT and unsupported commands."""

from __future__ import annotations

import struct

import pytest

from mobinux.scsi import LogicalUnit, ScsiTarget
from mobinux.scsi import lu as lu_module
from mobinux.scsi import target as target_module
from mobinux.scsi.opcodes import ALL
from mobinux.scsi.sense import parse_sense
from mobinux.storage.memory import MemoryDevice
from tests.unit.test_scsi_harness import (
    BS,
    CHECK_CONDITION,
    GOOD,
    ILLEGAL_REQUEST,
    NEXUS,
    NEXUS2,
    NOT_READY,
    UNIT_ATTENTION,
    Scsi,
    compare_and_write,
    inquiry,
    mode_select6,
    prevent_allow,
    read6,
    read10,
    read16,
    read_capacity10,
    report_luns,
    request_sense,
    rsoc,
    start_stop,
    sync_cache10,
    tur,
    unmap,
    write6,
    write10,
    write16,
    write_same16,
)

# -- unit attentions ------------------------------------------------------------------------


def test_first_command_of_a_new_nexus_gets_power_on_reset_once() -> None:
    s = Scsi()
    r = s.run(read10(0, 1), clear_ua=False)
    assert r.status == CHECK_CONDITION
    sense = parse_sense(r.sense)
    assert (sense.key, sense.asc, sense.ascq) == (UNIT_ATTENTION, 0x29, 0x00)
    assert s.run(read10(0, 1), clear_ua=False).status == GOOD


def test_inquiry_report_luns_request_sense_do_not_report_the_ua() -> None:
    s = Scsi()
    assert s.run(inquiry(), clear_ua=False).status == GOOD
    assert s.run(report_luns(), clear_ua=False).status == GOOD
    r = s.run(request_sense(), clear_ua=False)
    assert r.status == GOOD
    sense = parse_sense(bytes(r.data))
    assert (sense.key, sense.asc) == (UNIT_ATTENTION, 0x29)
    assert s.run(tur(), clear_ua=False).status == GOOD  # REQUEST SENSE cleared it


def test_request_sense_without_ua_is_no_sense_in_either_format() -> None:
    s = Scsi()
    data = s.good(request_sense())
    assert data == bytes.fromhex("700000000000000a000000000000000000 00".replace(" ", ""))
    data = s.good(request_sense(desc=1))
    assert data[:8] == bytes((0x72, 0, 0, 0, 0, 0, 0, 0))
    assert s.good(request_sense(alloc=4)) == bytes((0x70, 0, 0, 0))


def test_lun_reset_gives_every_nexus_a_ua() -> None:
    s = Scsi()
    s.good(tur(), nexus=NEXUS2)
    s.good(tur())
    assert s.target.lun_reset(0, NEXUS)
    assert not s.target.lun_reset(7, NEXUS)
    for nexus in (NEXUS, NEXUS2):
        sense = s.check(tur(), nexus=nexus)
        assert (sense.key, sense.asc, sense.ascq) == (UNIT_ATTENTION, 0x29, 0x03)
        s.good(tur(), nexus=nexus)


@pytest.mark.parametrize(("cold", "ascq"), [(False, 0x03), (True, 0x01)])
def test_target_reset_ua(cold: bool, ascq: int) -> None:
    s = Scsi()
    s.good(tur())
    s.target.target_reset(NEXUS, cold)
    sense = s.check(tur())
    assert (sense.key, sense.asc, sense.ascq) == (UNIT_ATTENTION, 0x29, ascq)


def test_capacity_changed_ua_and_new_capacity() -> None:
    dev = MemoryDevice(64 * BS)
    t = ScsiTarget({0: LogicalUnit(dev, device_id="grow")})
    t.execute(0, tur(), None, NEXUS)
    dev._size = 128 * BS  # the backing store grew
    t.capacity_changed(0)
    r = t.execute(0, read_capacity10(), None, NEXUS)
    sense = parse_sense(r.sense)
    assert (sense.key, sense.asc, sense.ascq) == (UNIT_ATTENTION, 0x2A, 0x09)
    r = t.execute(0, read_capacity10(), None, NEXUS)
    assert bytes(r.data) == struct.pack(">II", 127, BS)


def test_adding_a_lun_tells_other_luns_and_report_luns_clears_it() -> None:
    s = Scsi()
    s.good(tur())
    s.target.add_lun(1, LogicalUnit(MemoryDevice(8 * BS), device_id="one"))
    sense = s.check(tur())
    assert (sense.asc, sense.ascq) == (0x3F, 0x0E)
    s.target.add_lun(2, LogicalUnit(MemoryDevice(8 * BS), device_id="two"))
    s.good(report_luns())
    s.good(tur())
    assert s.target.remove_lun(2) is not None
    assert s.target.remove_lun(2) is None
    assert sorted(s.target.luns) == [0, 1]


def test_nexus_loss_forgets_the_nexus() -> None:
    s = Scsi()
    s.good(tur())
    s.target.nexus_lost(NEXUS)
    assert parse_sense(s.run(tur(), clear_ua=False).sense).asc == 0x29


# -- unsupported and malformed commands ------------------------------------------------------------


@pytest.mark.parametrize("op", [0x01, 0x04, 0x3B, 0x4D, 0x7F, 0xA4, 0xC0, 0xFF])
def test_unsupported_opcodes_are_invalid_command_operation_code(op: int) -> None:
    sense = Scsi().check(bytes((op,)) + bytes(15))
    assert (sense.key, sense.asc, sense.ascq) == (ILLEGAL_REQUEST, 0x20, 0x00)


@pytest.mark.parametrize(
    ("op", "sa"),
    [(0x9E, 0x11), (0x9E, 0x1F), (0xA3, 0x0A), (0x5F, 0x07), (0x48, 0x01), (0x83, 0x01)],
)
def test_unsupported_service_actions_point_at_the_service_action(op: int, sa: int) -> None:
    sense = Scsi().check(bytes((op, sa)) + bytes(14))
    assert (sense.key, sense.asc) == (ILLEGAL_REQUEST, 0x24)
    assert sense.sks == bytes((0xC8 | 4, 0, 1))


def test_empty_and_truncated_cdbs() -> None:
    s = Scsi()
    assert s.check(b"").asc == 0x20
    assert s.check(read10(0, 1)[:6]).asc == 0x24


def test_reserved_bits_are_refused_with_a_field_pointer() -> None:
    cdb = bytearray(tur())
    cdb[2] = 0x10
    sense = Scsi().check(bytes(cdb))
    assert sense.sks == bytes((0xC8 | 4, 0, 2))


# -- transport helpers --------------------------------------------------------------------------


def test_is_nowait_candidate() -> None:
    assert ScsiTarget.is_nowait_candidate(read10(0, 1))
    assert ScsiTarget.is_nowait_candidate(write16(0, 1))
    assert ScsiTarget.is_nowait_candidate(read6(0, 1))
    assert ScsiTarget.is_nowait_candidate(write6(0, 1))
    assert not ScsiTarget.is_nowait_candidate(write10(0, 1, flags=0x08))  # FUA
    assert not ScsiTarget.is_nowait_candidate(read16(0, 1, flags=0x08))
    assert not ScsiTarget.is_nowait_candidate(sync_cache10())
    assert not ScsiTarget.is_nowait_candidate(b"")


def test_touches_media() -> None:
    assert ScsiTarget.touches_media(read10(0, 1))
    assert ScsiTarget.touches_media(sync_cache10())
    assert ScsiTarget.touches_media(unmap(24))
    for cdb in (inquiry(), tur(), report_luns(), read_capacity10(), request_sense(), b"", b"\xff"):
        assert not ScsiTarget.touches_media(cdb)


def test_data_out_length() -> None:
    assert ScsiTarget.data_out_length(write10(0, 3)) == 3 * BS
    assert ScsiTarget.data_out_length(write6(0, 0)) == 256 * BS
    assert ScsiTarget.data_out_length(write16(0, 2), 4096) == 8192
    assert ScsiTarget.data_out_length(compare_and_write(0, 2)) == 4 * BS
    assert ScsiTarget.data_out_length(write_same16(0, 100)) == BS
    assert ScsiTarget.data_out_length(write_same16(0, 100, ndob=True)) == 0
    assert ScsiTarget.data_out_length(unmap(40)) == 40
    assert ScsiTarget.data_out_length(mode_select6(28)) == 28
    assert ScsiTarget.data_out_length(read10(0, 5)) == 0
    assert (
        ScsiTarget.data_out_length(bytes((0x83,)) + bytes(9) + (76).to_bytes(4, "big") + bytes(2))
        == 76
    )
    assert ScsiTarget.data_out_length(bytes((0x48, 0x01, 0, 0, 0, 0, 0, 0, 20, 0))) == 20
    assert ScsiTarget.data_out_length(b"\x2a") == 0  # truncated


def test_public_names_are_importable_where_promised() -> None:
    assert target_module.ScsiTarget is ScsiTarget
    assert target_module.LogicalUnit is LogicalUnit
    assert lu_module.LogicalUnit is LogicalUnit
    assert lu_module.ScsiResult is target_module.ScsiResult


def test_execute_accepts_bytearray_and_memoryview() -> None:
    s = Scsi()
    s.run(tur())
    r = s.target.execute(0, bytearray(write10(0, 1)), memoryview(bytearray(b"m" * BS)), NEXUS)
    assert r.status == GOOD
    assert bytes(s.target.execute(0, memoryview(read10(0, 1)), None, NEXUS).data) == b"m" * BS


# -- REPORT SUPPORTED OPERATION CODES -----------------------------------------------------------


def _all_descriptors(data: bytes) -> list[tuple[int, int, int, int]]:
    length = struct.unpack_from(">I", data)[0]
    out = []
    pos = 4
    while pos < 4 + length:
        op, _, sa, _, flags, cdb_len = struct.unpack_from(">BBHBBH", data, pos)
        out.append((op, sa, flags, cdb_len))
        pos += 8 + (12 if flags & 0x02 else 0)
    return out


def test_rsoc_all_commands_matches_the_table() -> None:
    s = Scsi()
    descriptors = _all_descriptors(s.good(rsoc()))
    assert len(descriptors) == len(ALL)
    for (op, sa, flags, cdb_len), spec in zip(descriptors, ALL, strict=True):
        assert op == spec.opcode
        assert bool(flags & 0x01) == (spec.service_action is not None)
        assert sa == (spec.service_action or 0)
        assert cdb_len == spec.cdb_length


def test_rsoc_with_timeouts_descriptors() -> None:
    data = Scsi().good(rsoc(rctd=True))
    length = struct.unpack_from(">I", data)[0]
    assert length == 20 * len(ALL)
    assert struct.unpack_from(">H", data, 4 + 8)[0] == 0x0A


def test_rsoc_one_command() -> None:
    s = Scsi()
    data = s.good(rsoc(options=1, opcode=0x28))
    assert data[1] & 0x07 == 0b011
    assert struct.unpack_from(">H", data, 2)[0] == 10
    usage = data[4:14]
    assert usage[0] == 0x28 and usage[1] & 0x18 == 0x18  # DPO and FUA supported
    assert s.good(rsoc(options=1, opcode=0xC7))[1] & 0x07 == 0b001  # not supported
    assert s.check(rsoc(options=1, opcode=0x9E)).asc == 0x24  # has service actions


def test_rsoc_service_action_forms() -> None:
    s = Scsi()
    data = s.good(rsoc(options=2, opcode=0x9E, sa=0x10, rctd=True))
    assert data[1] & 0x80 and data[1] & 0x07 == 0b011
    assert data[4:6] == b"\x9e\x10"
    assert len(data) == 4 + 16 + 12
    assert s.check(rsoc(options=2, opcode=0x28)).asc == 0x24  # no service actions
    assert s.good(rsoc(options=2, opcode=0x9E, sa=0x11))[1] & 0x07 == 0b001
    assert s.good(rsoc(options=3, opcode=0x28))[1] & 0x07 == 0b011
    assert s.check(rsoc(options=5)).asc == 0x24


def test_rsoc_usage_map_accepts_what_it_reports() -> None:
    """Every bit a command's usage map reports is accepted by the reserved-bit check."""
    from mobinux.scsi.opcodes import reserved_bits

    for spec in ALL:
        assert reserved_bits(spec, spec.usage[:-1] + b"\x00") is None, spec.name


# -- START STOP UNIT / PREVENT ALLOW --------------------------------------------------------------


def test_start_stop_on_fixed_disk_is_accepted_and_stop_flushes() -> None:
    s = Scsi()
    before = s.dev.flush_count
    s.good(start_stop(start=False))
    assert s.dev.flush_count == before + 1
    s.good(start_stop(start=True, loej=True))
    s.good(tur())
    s.good(start_stop(start=True, power_condition=3))


def test_removable_eject_load_and_prevent() -> None:
    s = Scsi(removable=True)
    assert s.good(inquiry())[1] & 0x80
    s.good(prevent_allow(1))
    sense = s.check(start_stop(start=False, loej=True))
    assert (sense.key, sense.asc, sense.ascq) == (ILLEGAL_REQUEST, 0x53, 0x02)
    s.good(prevent_allow(0))
    s.good(start_stop(start=False, loej=True))
    for cdb in (tur(), read10(0, 1), read_capacity10()):
        sense = s.check(cdb)
        assert (sense.key, sense.asc) == (NOT_READY, 0x3A)
    assert parse_sense(s.good(request_sense())).key == NOT_READY
    s.good(start_stop(start=True, loej=True))
    s.good(tur())


def test_prevent_is_per_nexus_and_cleared_by_nexus_loss() -> None:
    s = Scsi(removable=True)
    s.good(prevent_allow(1), nexus=NEXUS2)
    assert s.check(start_stop(start=False, loej=True)).asc == 0x53
    s.target.nexus_lost(NEXUS2)
    s.good(start_stop(start=False, loej=True))
    assert s.check(prevent_allow(2)).asc == 0x24
