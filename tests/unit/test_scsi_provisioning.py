"""UNMAP, WRITE SAME, GET LBA STATUS, COMPARE AND WRITE and ORWRITE (SBC-3)."""

from __future__ import annotations

import struct
import threading

import pytest

from mobinux.storage.volatile import VolatileCacheDevice
from tests.unit.test_scsi_harness import (
    BS,
    DATA_PROTECT,
    GOOD,
    ILLEGAL_REQUEST,
    MISCOMPARE,
    NEXUS,
    NEXUS2,
    Scsi,
    compare_and_write,
    get_lba_status,
    orwrite,
    read16,
    tur,
    unmap,
    unmap_params,
    write_same10,
    write_same16,
)

CHUNK_BLOCKS = 128  # MemoryDevice allocates 64 KiB chunks


def _lba_status(data: bytes) -> list[tuple[int, int, int]]:
    length = struct.unpack_from(">I", data)[0]
    out = []
    for pos in range(8, 4 + length, 16):
        lba, count, status = struct.unpack_from(">QIB", data, pos)
        out.append((lba, count, status & 0x0F))
    return out


# -- UNMAP -----------------------------------------------------------------------------


def test_unmap_makes_blocks_read_zero() -> None:
    s = Scsi()
    s.write(0, b"a" * 16 * BS)
    params = unmap_params((2, 3), (10, 1))
    s.good(unmap(len(params)), params)
    data = s.read(0, 16)
    for lba in range(16):
        block = data[lba * BS : (lba + 1) * BS]
        assert block == (bytes(BS) if lba in (2, 3, 4, 10) else b"a" * BS)


@pytest.mark.parametrize("write_cache", [True, False])
def test_unmap_is_durable_when_the_write_cache_is_off(write_cache: bool) -> None:
    """WCE=0: no SYNCHRONIZE CACHE follows, so the unmap must be on the media at GOOD."""
    s = Scsi(write_cache=write_cache)
    s.write(0, b"a" * 8 * BS)
    cache = VolatileCacheDevice(s.dev)
    s.lu.device = cache
    params = unmap_params((2, 3))
    s.good(unmap(len(params)), params)
    assert s.read(2, 3) == bytes(3 * BS)
    assert cache.dirty_bytes == (3 * BS if write_cache else 0)
    cache.power_cut()
    assert s.read(2, 3) == (b"a" * 3 * BS if write_cache else bytes(3 * BS))


def test_unmap_zero_length_list_and_zero_block_descriptors_are_good() -> None:
    s = Scsi(blocks=100)
    s.good(unmap(0))
    params = unmap_params((100, 0))
    s.good(unmap(len(params)), params)


def test_unmap_out_of_range_changes_nothing() -> None:
    s = Scsi(blocks=100)
    s.write(0, b"k" * BS)
    params = unmap_params((0, 1), (99, 2))
    assert s.check(unmap(len(params)), params).asc == 0x21
    assert s.read(0, 1) == b"k" * BS  # validated before anything was unmapped


def test_unmap_parameter_list_errors() -> None:
    s = Scsi()
    assert s.check(unmap(6), bytes(6)).asc == 0x1A  # shorter than the header
    params = unmap_params((0, 1))
    assert s.check(unmap(len(params)), params[:10]).asc == 0x1A  # less data than announced
    too_many = unmap_params(*[(i, 1) for i in range(s.lu.limits.max_unmap_descriptors + 1)])
    sense = s.check(unmap(len(too_many)), too_many)
    assert (sense.key, sense.asc) == (ILLEGAL_REQUEST, 0x26)
    huge = unmap_params((0, s.lu.limits.max_unmap_lba_count + 1))
    assert s.check(unmap(len(huge)), huge).asc == 0x26


def test_unmap_anchor_is_refused() -> None:
    cdb = bytearray(unmap(24))
    cdb[1] = 0x01
    assert Scsi().check(bytes(cdb), unmap_params((0, 1))).asc == 0x24


def test_unmap_on_readonly_lu_is_write_protected() -> None:
    params = unmap_params((0, 1))
    assert Scsi(readonly=True).check(unmap(len(params)), params).key == DATA_PROTECT


# -- WRITE SAME --------------------------------------------------------------------------


@pytest.mark.parametrize("ws", [write_same10, write_same16])
def test_write_same_repeats_the_block(ws) -> None:  # type: ignore[no-untyped-def]
    s = Scsi()
    block = bytes(range(256)) * 2
    s.good(ws(5, 300), block)
    assert s.read(5, 300) == block * 300
    assert s.read(4, 1) == bytes(BS) and s.read(305, 1) == bytes(BS)


@pytest.mark.parametrize("ws", [write_same10, write_same16])
def test_write_same_unmap_reads_zero_even_with_nonzero_data(ws) -> None:  # type: ignore[no-untyped-def]
    s = Scsi()
    s.write(0, b"\xff" * 8 * BS)
    s.good(ws(0, 8, unmap=True), b"\xff" * BS)
    assert s.read(0, 8) == bytes(8 * BS)


def test_write_same_zero_blocks_means_to_the_end() -> None:
    s = Scsi(blocks=300)
    s.good(write_same10(290, 0), b"e" * BS)
    assert s.read(290, 10) == b"e" * 10 * BS
    assert s.check(write_same10(301, 0), b"e" * BS).asc == 0x21


def test_write_same_longer_than_the_limit_is_invalid_field() -> None:
    s = Scsi(blocks=200_000)
    sense = s.check(write_same16(0, s.lu.limits.max_write_same + 1), bytes(BS))
    assert (sense.key, sense.asc) == (ILLEGAL_REQUEST, 0x24)
    assert s.check(write_same16(0, 0), bytes(BS)).asc == 0x24  # "to the end" is too long too


def test_write_same_needs_exactly_one_block_of_data() -> None:
    s = Scsi()
    assert s.check(write_same10(0, 1), bytes(BS // 2)).key == ILLEGAL_REQUEST
    assert s.check(write_same10(0, 1), bytes(2 * BS)).key == ILLEGAL_REQUEST


def test_write_same16_ndob_writes_zeros_without_data() -> None:
    s = Scsi()
    s.write(0, b"n" * 4 * BS)
    s.good(write_same16(0, 4, ndob=True))
    assert s.read(0, 4) == bytes(4 * BS)


def test_write_same_anchor_and_wrprotect_are_refused() -> None:
    s = Scsi()
    assert s.check(write_same10(0, 1, unmap=True, anchor=True), bytes(BS)).asc == 0x24
    cdb = bytearray(write_same10(0, 1))
    cdb[1] |= 0x20
    assert s.check(bytes(cdb), bytes(BS)).asc == 0x24


# -- GET LBA STATUS --------------------------------------------------------------------------


def test_get_lba_status_reports_mapped_and_deallocated_runs() -> None:
    s = Scsi(blocks=4 * CHUNK_BLOCKS)
    s.write(CHUNK_BLOCKS, b"m" * BS)  # maps the second 64 KiB chunk
    runs = _lba_status(s.good(get_lba_status(0)))
    assert runs == [
        (0, CHUNK_BLOCKS, 1),
        (CHUNK_BLOCKS, CHUNK_BLOCKS, 0),
        (2 * CHUNK_BLOCKS, 2 * CHUNK_BLOCKS, 1),
    ]
    # The first descriptor starts at the requested LBA, even mid-run.
    assert _lba_status(s.good(get_lba_status(CHUNK_BLOCKS + 5)))[0] == (
        CHUNK_BLOCKS + 5,
        CHUNK_BLOCKS - 5,
        0,
    )


def test_get_lba_status_after_unmap() -> None:
    s = Scsi(blocks=4 * CHUNK_BLOCKS)
    s.write(0, b"m" * 2 * CHUNK_BLOCKS * BS)
    params = unmap_params((0, CHUNK_BLOCKS))
    s.good(unmap(len(params)), params)
    assert _lba_status(s.good(get_lba_status(0)))[:2] == [
        (0, CHUNK_BLOCKS, 1),
        (CHUNK_BLOCKS, CHUNK_BLOCKS, 0),
    ]


def test_get_lba_status_small_allocation_and_range() -> None:
    s = Scsi(blocks=100)
    data = s.good(get_lba_status(0, alloc=24))
    assert len(data) == 24
    assert s.check(get_lba_status(100)).asc == 0x21
    assert s.good(get_lba_status(0, alloc=4)) == s.good(get_lba_status(0))[:4]


# -- COMPARE AND WRITE / ORWRITE ---------------------------------------------------------------


def test_compare_and_write_writes_when_equal() -> None:
    s = Scsi()
    s.write(7, b"A" * 2 * BS)
    s.good(compare_and_write(7, 2), b"A" * 2 * BS + b"B" * 2 * BS)
    assert s.read(7, 2) == b"B" * 2 * BS


def test_compare_and_write_miscompare_reports_offset_and_writes_nothing() -> None:
    s = Scsi()
    s.write(7, b"A" * 2 * BS)
    expected = bytearray(b"A" * 2 * BS)
    expected[BS + 3] = ord("Z")
    sense = s.check(compare_and_write(7, 2), bytes(expected) + b"B" * 2 * BS)
    assert (sense.key, sense.asc, sense.ascq) == (MISCOMPARE, 0x1D, 0x00)
    assert sense.information == BS + 3
    assert s.read(7, 2) == b"A" * 2 * BS


def test_compare_and_write_sizes() -> None:
    s = Scsi()
    assert s.check(compare_and_write(0, 1), bytes(4 * BS)).key == ILLEGAL_REQUEST  # too much data
    assert s.check(compare_and_write(0, 3), bytes(4 * BS)).key == ILLEGAL_REQUEST  # too little
    assert (
        s.check(compare_and_write(0, 0), bytes(2 * BS)).key == ILLEGAL_REQUEST
    )  # 256 wrapped to 0
    s.good(compare_and_write(0, 0))  # zero blocks, no data: nothing to do
    s.good(compare_and_write(0, 255), bytes(510 * BS))  # the largest allowed (VPD B0h)


def test_compare_and_write_beyond_end_and_readonly() -> None:
    assert Scsi(blocks=10).check(compare_and_write(9, 2), bytes(4 * BS)).asc == 0x21
    assert Scsi(readonly=True).check(compare_and_write(0, 1), bytes(2 * BS)).key == DATA_PROTECT


def test_compare_and_write_is_atomic_between_initiators() -> None:
    """Many initiators increment one counter block with CAW: no update is lost."""
    s = Scsi()
    s.write(0, struct.pack(">Q", 0).ljust(BS, b"\0"))
    for nexus in (NEXUS, NEXUS2):
        s.run(tur(), nexus=nexus)
    rounds = 30

    def worker(nexus: str) -> None:
        done = 0
        while done < rounds:
            current = bytes(s.target.execute(0, read16(0, 1), None, nexus).data)
            value = struct.unpack_from(">Q", current)[0]
            new = struct.pack(">Q", value + 1).ljust(BS, b"\0")
            r = s.target.execute(0, compare_and_write(0, 1), current + new, nexus)
            if r.status == GOOD:
                done += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in (NEXUS, NEXUS2, NEXUS, NEXUS2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert struct.unpack_from(">Q", s.read(0, 1))[0] == 4 * rounds


def test_orwrite_ors_the_data_in() -> None:
    s = Scsi()
    s.write(3, b"\x0f" * BS)
    s.good(orwrite(3, 1), b"\xf0" * BS)
    assert s.read(3, 1) == b"\xff" * BS
