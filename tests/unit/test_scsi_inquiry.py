"""INQUIRY, VPD pages, READ CAPACITY, REPORT LUNS and LUNs with nothing behind them."""

from __future__ import annotations

import struct

import pytest

from mobinux.scsi import LogicalUnit, ScsiTarget
from mobinux.scsi.inquiry import Identity
from mobinux.scsi.sense import parse_sense
from mobinux.storage.memory import MemoryDevice
from tests.unit.test_scsi_harness import (
    BS,
    CHECK_CONDITION,
    GOOD,
    ILLEGAL_REQUEST,
    NEXUS,
    Scsi,
    inquiry,
    read_capacity10,
    read_capacity16,
    report_luns,
    request_sense,
    tur,
)


def test_standard_inquiry_claims_spc4_disk() -> None:
    s = Scsi()
    data = s.good(inquiry(alloc=255))
    assert len(data) == 96
    assert data[0] == 0x00  # PQ 000b, direct access block device
    assert data[1] == 0x00  # not removable
    assert data[2] == 0x06  # SPC-4
    assert data[3] & 0x0F == 2  # response data format
    assert data[4] == len(data) - 5
    assert data[7] & 0x02  # CMDQUE
    assert data[8:16] == b"MOBINUX "
    assert data[16:32] == b"DISK".ljust(16)
    assert data[32:36] == b"0001"
    versions = {struct.unpack_from(">H", data, 58 + 2 * i)[0] for i in range(8)}
    assert {0x0460, 0x04C0, 0x0960} <= versions  # SPC-4, SBC-3, iSCSI


def test_inquiry_is_cut_to_the_allocation_length() -> None:
    s = Scsi()
    full = s.good(inquiry(alloc=255))
    for alloc in (0, 5, 36, 95):
        assert s.good(inquiry(alloc=alloc)) == full[:alloc]


def test_inquiry_strings_are_sanitised_and_padded() -> None:
    s = Scsi(vendor="AB\x01", product="a-very-long-product-name", revision="1")
    data = s.good(inquiry())
    assert data[8:16] == b"AB_     "
    assert data[16:32] == b"a-very-long-prod"
    assert data[32:36] == b"1   "


def test_page_code_without_evpd_is_invalid_field() -> None:
    s = Scsi()
    sense = s.check(inquiry(evpd=0, page=1))
    assert (sense.key, sense.asc, sense.ascq) == (ILLEGAL_REQUEST, 0x24, 0)
    assert sense.sks == bytes((0xC0, 0, 2))


def test_unknown_vpd_page_is_invalid_field() -> None:
    s = Scsi()
    sense = s.check(inquiry(evpd=1, page=0x99))
    assert (sense.key, sense.asc) == (ILLEGAL_REQUEST, 0x24)


def test_supported_vpd_pages_are_sorted_and_all_answer() -> None:
    s = Scsi()
    data = s.good(inquiry(evpd=1, page=0x00))
    pages = list(data[4 : 4 + struct.unpack_from(">H", data, 2)[0]])
    assert pages == sorted(pages)
    assert {0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2} <= set(pages)
    for page in pages:
        vpd = s.good(inquiry(evpd=1, page=page))
        assert vpd[1] == page
        assert len(vpd) == 4 + struct.unpack_from(">H", vpd, 2)[0]


def _designators(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    pos = 4
    while pos < len(data):
        code_set, kind, _, length = data[pos : pos + 4]
        out.append(
            (code_set & 0x0F, (kind >> 4) & 0x03, kind & 0x0F, data[pos + 4 : pos + 4 + length])
        )
        pos += 4 + length
    return out


def test_identifiers_are_stable_and_unique_per_device_id() -> None:
    a1 = Identity.derive("iqn.a/0", "V", "P", "R")
    a2 = Identity.derive("iqn.a/0", "V", "P", "R")
    b = Identity.derive("iqn.a/1", "V", "P", "R")
    assert a1 == a2
    assert a1.naa != b.naa
    assert a1.serial != b.serial
    assert a1.naa[0] >> 4 == 0x3  # NAA 3h: locally assigned


def test_device_identification_page_has_naa_t10_and_port() -> None:
    s = Scsi()
    data = s.good(inquiry(evpd=1, page=0x83))
    des = _designators(data)
    naa = [d for d in des if d[2] == 3]
    assert len(naa) == 1
    assert naa[0][0] == 1 and naa[0][1] == 0  # binary, logical unit
    assert naa[0][3] == s.lu.identity.naa
    t10 = [d for d in des if d[2] == 1]
    assert t10 and t10[0][3].startswith(b"MOBINUX ")
    port = [d for d in des if d[2] == 4]
    assert port and port[0][1] == 1 and port[0][3] == b"\x00\x00\x00\x01"


def test_unit_serial_number_page() -> None:
    s = Scsi()
    data = s.good(inquiry(evpd=1, page=0x80))
    assert data[4:].decode("ascii") == s.lu.identity.serial
    other = LogicalUnit(MemoryDevice(BS * 8), device_id="other")
    assert other.identity.serial != s.lu.identity.serial


def test_block_limits_page() -> None:
    s = Scsi()
    data = s.good(inquiry(evpd=1, page=0xB0))
    assert struct.unpack_from(">H", data, 2)[0] == 0x3C
    assert data[4] & 0x01 == 0  # WSNZ=0
    assert data[5] == 255  # MAXIMUM COMPARE AND WRITE LENGTH
    (max_transfer, optimal_transfer) = struct.unpack_from(">II", data, 8)
    # Linux sd uses OPTIMAL TRANSFER LENGTH as its request size only if it is a
    # multiple of the page size and at most MAXIMUM TRANSFER LENGTH.
    assert optimal_transfer == s.lu.limits.optimal_transfer == 2048
    assert (optimal_transfer * BS) % 4096 == 0 and optimal_transfer <= max_transfer
    granularity = struct.unpack_from(">H", data, 6)[0]
    assert optimal_transfer % granularity == 0
    max_unmap, max_desc = struct.unpack_from(">II", data, 20)
    (max_ws,) = struct.unpack_from(">Q", data, 36)
    assert max_transfer == s.lu.limits.max_transfer
    assert 0 < max_unmap <= 1024 * 1024
    assert 0 < max_desc <= 1024 * 1024
    assert max_ws >= 256
    (max_atomic,) = struct.unpack_from(">I", data, 44)
    assert 0 < max_atomic <= max_transfer


def test_block_device_characteristics_says_non_rotating() -> None:
    data = Scsi().good(inquiry(evpd=1, page=0xB1))
    assert struct.unpack_from(">H", data, 4)[0] == 1


def test_logical_block_provisioning_page() -> None:
    data = Scsi().good(inquiry(evpd=1, page=0xB2))
    assert data[5] & 0xE4 == 0xE4  # LBPU, LBPWS, LBPWS10, LBPRZ
    assert data[6] & 0x07 == 2  # thin provisioned


def test_read_capacity_10_and_16() -> None:
    s = Scsi(blocks=4096)
    assert s.good(read_capacity10()) == struct.pack(">II", 4095, BS)
    data = s.good(read_capacity16())
    assert len(data) == 32
    last, bs = struct.unpack_from(">QI", data, 0)
    assert (last, bs) == (4095, BS)
    assert data[12] & 0x01 == 0  # no protection
    assert data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ


@pytest.mark.parametrize("alloc", [0, 1, 8, 15, 31])
def test_read_capacity_16_respects_allocation_length(alloc: int) -> None:
    s = Scsi()
    assert s.good(read_capacity16(alloc)) == s.good(read_capacity16(32))[:alloc]


def test_read_capacity_10_saturates_for_huge_disks() -> None:
    dev = MemoryDevice((2**32 + 10) * BS)
    t = ScsiTarget({0: LogicalUnit(dev, device_id="big")})
    t.execute(0, tur(), None, NEXUS)
    r = t.execute(0, read_capacity10(), None, NEXUS)
    assert bytes(r.data) == struct.pack(">II", 0xFFFFFFFF, BS)


def test_read_capacity_lba_without_pmi_is_invalid() -> None:
    s = Scsi()
    cdb = bytearray(read_capacity10())
    cdb[5] = 1
    assert s.check(bytes(cdb)).asc == 0x24


def test_report_luns_lists_every_lun_and_works_on_any_lun() -> None:
    dev = MemoryDevice(BS * 16)
    luns = {n: LogicalUnit(dev, device_id=f"x/{n}") for n in (0, 3, 300)}
    t = ScsiTarget(luns)
    for address in (0, 7, -1):
        r = t.execute(address, report_luns(), None, NEXUS)
        assert r.status == GOOD
        data = bytes(r.data)
        assert struct.unpack_from(">I", data)[0] == 24
        assert data[8:] == (
            bytes((0, 0))
            + bytes(6)
            + bytes((0, 3))
            + bytes(6)
            + bytes((0x40 | 1, 300 & 0xFF))
            + bytes(6)
        )


def test_report_luns_validation() -> None:
    s = Scsi()
    assert s.check(report_luns(select=0x05)).asc == 0x24
    assert s.check(report_luns(alloc=8)).asc == 0x24
    assert struct.unpack_from(">I", s.good(report_luns(select=1)))[0] == 0  # no well-known LUs


def test_report_luns_truncated_keeps_the_list_length() -> None:
    t = ScsiTarget({n: LogicalUnit(MemoryDevice(BS), device_id=str(n)) for n in range(4)})
    r = t.execute(0, report_luns(alloc=16), None, NEXUS)
    assert len(r.data) == 16
    assert struct.unpack_from(">I", bytes(r.data))[0] == 32


def test_missing_lun_inquiry_says_no_device() -> None:
    s = Scsi()
    r = s.target.execute(5, inquiry(), None, NEXUS)
    assert r.status == GOOD
    assert bytes(r.data)[0] == 0x7F  # PQ 011b, type 1Fh


@pytest.mark.parametrize("lun", [5, -1])
def test_missing_lun_other_commands_fail_lu_not_supported(lun: int) -> None:
    s = Scsi()
    r = s.target.execute(lun, tur(), None, NEXUS)
    assert r.status == CHECK_CONDITION
    sense = parse_sense(r.sense)
    assert (sense.key, sense.asc, sense.ascq) == (ILLEGAL_REQUEST, 0x25, 0)


def test_missing_lun_request_sense_reports_lu_not_supported_as_data() -> None:
    s = Scsi()
    r = s.target.execute(9, request_sense(), None, NEXUS)
    assert r.status == GOOD
    sense = parse_sense(bytes(r.data))
    assert (sense.key, sense.asc) == (ILLEGAL_REQUEST, 0x25)
