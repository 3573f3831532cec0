"""MODE SENSE / MODE SELECT (SPC-4 6.9-6.12) and what the pages change."""

from __future__ import annotations

import struct

import pytest

from mobinux.scsi import ScsiTarget
from mobinux.scsi.sense import parse_sense
from mobinux.storage.volatile import VolatileCacheDevice
from tests.unit.test_scsi_harness import (
    BS,
    DATA_PROTECT,
    ILLEGAL_REQUEST,
    NEXUS,
    NEXUS2,
    UNIT_ATTENTION,
    Scsi,
    mode_select6,
    mode_select10,
    mode_sense6,
    mode_sense10,
    read16,
    tur,
    write10,
)


def _pages(data: bytes, header: int) -> dict[int, bytes]:
    bd_len = data[3] if header == 4 else struct.unpack_from(">H", data, 6)[0]
    pos = header + bd_len
    pages = {}
    while pos < len(data):
        code, length = data[pos] & 0x3F, data[pos + 1]
        pages[code] = data[pos : pos + 2 + length]
        pos += 2 + length
    return pages


def test_mode_sense6_all_pages_header_and_block_descriptor() -> None:
    s = Scsi(blocks=1000)
    data = s.good(mode_sense6(0x3F))
    assert data[0] == len(data) - 1
    assert data[2] == 0x10  # DPOFUA, not write protected
    assert data[3] == 8
    assert data[4:12] == struct.pack(">II", 1000, BS)
    assert set(_pages(data, 4)) == {0x01, 0x08, 0x0A, 0x1C}


def test_mode_sense6_dbd_and_single_page() -> None:
    s = Scsi()
    data = s.good(mode_sense6(0x08, dbd=True))
    assert data[3] == 0
    page = data[4:]
    assert page[:2] == b"\x08\x12"
    assert page[2] & 0x04  # WCE on by default


def test_mode_sense10_long_lba_descriptor() -> None:
    s = Scsi(blocks=77)
    data = s.good(mode_sense10(0x0A, llbaa=True))
    assert struct.unpack_from(">H", data)[0] == len(data) - 2
    assert data[4] & 0x01  # LONGLBA
    assert struct.unpack_from(">H", data, 6)[0] == 16
    assert data[8:24] == struct.pack(">QII", 77, 0, BS)
    assert _pages(data, 8)[0x0A][:2] == b"\x0a\x0a"


def test_changeable_values_report_wce_d_sense_swp() -> None:
    s = Scsi()
    pages = _pages(s.good(mode_sense6(0x3F, pc=1, dbd=True)), 4)
    assert pages[0x08][2] == 0x04
    assert pages[0x0A][2] == 0x04 and pages[0x0A][4] == 0x08
    assert pages[0x0A][:2] == b"\x0a\x0a"  # real page code and length in the mask too
    assert not any(pages[0x1C][2:])


def test_write_cache_false_reports_wce_zero_and_default_matches() -> None:
    s = Scsi(write_cache=False)
    assert not _pages(s.good(mode_sense6(0x08, dbd=True)), 4)[0x08][2] & 0x04
    assert not _pages(s.good(mode_sense6(0x08, pc=2, dbd=True)), 4)[0x08][2] & 0x04


def test_saved_values_are_not_supported() -> None:
    s = Scsi()
    sense = s.check(mode_sense6(0x3F, pc=3))
    assert (sense.key, sense.asc, sense.ascq) == (ILLEGAL_REQUEST, 0x39, 0x00)


@pytest.mark.parametrize(("page", "sub"), [(0x05, 0), (0x08, 1), (0x3F, 0x01)])
def test_unknown_page_or_subpage_is_invalid_field(page: int, sub: int) -> None:
    assert Scsi().check(mode_sense6(page, subpage=sub)).asc == 0x24


def test_all_pages_and_subpages_is_accepted() -> None:
    s = Scsi()
    assert s.good(mode_sense6(0x3F, subpage=0xFF)) == s.good(mode_sense6(0x3F))


def test_mode_sense_cut_to_allocation_length() -> None:
    s = Scsi()
    assert s.good(mode_sense6(0x3F, alloc=4)) == s.good(mode_sense6(0x3F))[:4]


def _control_page(s: Scsi, *, d_sense: bool = False, swp: bool = False) -> bytes:
    page = bytearray(_pages(s.good(mode_sense6(0x0A, dbd=True)), 4)[0x0A])
    page[2] = (page[2] & ~0x04) | (0x04 if d_sense else 0)
    page[4] = (page[4] & ~0x08) | (0x08 if swp else 0)
    return bytes(page)


def test_mode_select_wce_changes_caching_and_makes_writes_durable() -> None:
    s = Scsi()
    caching = bytearray(_pages(s.good(mode_sense6(0x08, dbd=True)), 4)[0x08])
    caching[2] &= ~0x04
    params = bytes(4) + bytes(caching)
    s.good(mode_select6(len(params)), params)
    assert not _pages(s.good(mode_sense6(0x08, dbd=True)), 4)[0x08][2] & 0x04
    before = s.dev.flush_count
    s.good(write10(0, 1), b"x" * BS)
    assert s.dev.flush_count == before + 1  # WCE=0: every write is flushed


def test_mode_select_d_sense_switches_to_descriptor_sense() -> None:
    s = Scsi()
    params = bytes(4) + _control_page(s, d_sense=True)
    s.good(mode_select6(len(params)), params)
    r = s.run(read16(2**63, 1))
    assert r.sense[0] == 0x72
    assert parse_sense(r.sense).asc == 0x21


def test_mode_select_swp_write_protects() -> None:
    s = Scsi()
    params = bytes(4) + _control_page(s, swp=True)
    s.good(mode_select6(len(params)), params)
    assert s.good(mode_sense6(0x3F))[2] & 0x80  # WP in the device-specific parameter
    sense = s.check(write10(0, 1), b"a" * BS)
    assert (sense.key, sense.asc) == (DATA_PROTECT, 0x27)
    s.good(read16(0, 1))
    params = bytes(4) + _control_page(s, swp=False)
    s.good(mode_select6(len(params)), params)
    s.good(write10(0, 1), b"a" * BS)


def test_mode_select10_with_block_descriptor() -> None:
    s = Scsi()
    page = _control_page(s, d_sense=True)
    params = struct.pack(">HBBBBH", 0, 0, 0, 0, 0, 8) + struct.pack(">II", 0, BS) + page
    s.good(mode_select10(len(params)), params)
    assert _pages(s.good(mode_sense6(0x0A, dbd=True)), 4)[0x0A][2] & 0x04


def test_mode_select_refuses_unchangeable_bits_with_pointer() -> None:
    s = Scsi()
    page = bytearray(_control_page(s))
    page[3] ^= 0x10  # QUEUE ALGORITHM MODIFIER is not changeable
    params = bytes(4) + bytes(page)
    sense = s.check(mode_select6(len(params)), params)
    assert (sense.key, sense.asc, sense.ascq) == (ILLEGAL_REQUEST, 0x26, 0x00)
    assert sense.sks == bytes((0x80 | 0x08 | 4, 0, 4 + 3))  # parameter list byte 7, bit 4
    # Nothing was applied.
    assert _pages(s.good(mode_sense6(0x0A, dbd=True)), 4)[0x0A][3] == 0x10


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p.__setitem__(4, 0x3B),  # unknown page code
        lambda p: p.__setitem__(5, 0x09),  # wrong page length
        lambda p: p.__setitem__(4, 0x0A | 0x80),  # PS set
        lambda p: p.__setitem__(4, 0x0A | 0x40),  # SPF (subpage format)
        lambda p: p.__setitem__(3, 4),  # block descriptor length not 0/8
    ],
)
def test_mode_select_parameter_list_errors(mutate: object) -> None:
    s = Scsi()
    params = bytearray(bytes(4) + _control_page(s))
    mutate(params)  # type: ignore[operator]
    sense = s.check(mode_select6(len(params)), bytes(params))
    assert (sense.key, sense.asc) == (ILLEGAL_REQUEST, 0x26)


def test_mode_select_sp_and_short_lists() -> None:
    s = Scsi()
    params = bytes(4) + _control_page(s)
    assert s.check(mode_select6(len(params), sp=True), params).asc == 0x24
    assert s.check(mode_select6(3), params[:3]).asc == 0x1A
    assert s.check(mode_select6(len(params)), params[:6]).asc == 0x1A
    s.good(mode_select6(0))


def test_mode_change_gives_other_nexus_a_unit_attention() -> None:
    s = Scsi()
    s.good(tur(), nexus=NEXUS2)
    params = bytes(4) + _control_page(s, d_sense=True)
    s.good(mode_select6(len(params)), params, nexus=NEXUS)
    s.good(tur(), nexus=NEXUS)
    sense = s.check(tur(), nexus=NEXUS2)
    assert (sense.key, sense.asc, sense.ascq) == (UNIT_ATTENTION, 0x2A, 0x01)


def test_lun_reset_restores_default_mode_pages() -> None:
    s = Scsi()
    params = bytes(4) + _control_page(s, swp=True)
    s.good(mode_select6(len(params)), params)
    s.target.lun_reset(0, NEXUS)
    s.run(tur(), clear_ua=False)  # consumes the reset UA
    assert not s.good(mode_sense6(0x3F))[2] & 0x80


# -- turning the write cache off writes it back (SBC-3 4.15) --------------------------------


def _caching_params(s: Scsi, *, wce: bool) -> bytes:
    page = bytearray(_pages(s.good(mode_sense6(0x08, dbd=True)), 4)[0x08])
    page[2] = (page[2] & ~0x04 & 0xFF) | (0x04 if wce else 0)
    return bytes(4) + bytes(page)


def _cached_scsi(*, write_cache: bool = True) -> tuple[Scsi, VolatileCacheDevice]:
    s = Scsi(write_cache=write_cache)
    cache = VolatileCacheDevice(s.dev)
    s.lu.device = cache
    return s, cache


def test_mode_select_wce_off_writes_back_what_was_cached() -> None:
    """An initiator that sees write-through sends no more SYNCHRONIZE CACHE."""
    s, cache = _cached_scsi()
    s.good(write10(0, 2), b"c" * 2 * BS)
    assert cache.dirty_bytes == 2 * BS
    params = _caching_params(s, wce=False)
    s.good(mode_select6(len(params)), params)
    assert cache.dirty_bytes == 0
    cache.power_cut()
    assert s.read(0, 2) == b"c" * 2 * BS


@pytest.mark.parametrize("write_cache", [True, False])
def test_mode_select_that_leaves_wce_off_or_turns_it_on_does_not_flush(write_cache: bool) -> None:
    s = Scsi(write_cache=write_cache)
    before = s.dev.flush_count
    params = _caching_params(s, wce=True)  # no change, or 0 -> 1
    s.good(mode_select6(len(params)), params)
    params = bytes(4) + _control_page(s, d_sense=True)
    s.good(mode_select6(len(params)), params)
    assert s.dev.flush_count == before


def test_lun_reset_that_turns_the_write_cache_off_writes_it_back() -> None:
    s, cache = _cached_scsi(write_cache=False)
    params = _caching_params(s, wce=True)
    s.good(mode_select6(len(params)), params)
    s.good(write10(3, 1), b"r" * BS)
    assert cache.dirty_bytes == BS
    s.target.lun_reset(0, NEXUS)  # back to the default: WCE=0
    assert cache.dirty_bytes == 0
    assert not s.lu.mode.wce


def test_mode_select_runs_off_the_event_loop() -> None:
    """It may flush, so the transport runs it in a thread like other media commands."""
    assert ScsiTarget.touches_media(mode_select6(28))
    assert ScsiTarget.touches_media(mode_select10(28))
