"""READ / WRITE / VERIFY / WRITE AND VERIFY / SYNCHRONIZE CACHE / PRE-FETCH (SBC-3)."""

from __future__ import annotations

import threading

import pytest

from mobinux.scsi import LogicalUnit, ScsiTarget
from mobinux.scsi.sense import parse_sense
from mobinux.storage.device import WouldBlock
from mobinux.storage.memory import MemoryDevice
from mobinux.storage.volatile import VolatileCacheDevice
from tests.unit.test_scsi_harness import (
    BS,
    CHECK_CONDITION,
    DATA_PROTECT,
    GOOD,
    ILLEGAL_REQUEST,
    MEDIUM_ERROR,
    MISCOMPARE,
    NEXUS,
    Scsi,
    prefetch10,
    read6,
    read10,
    read12,
    read16,
    sync_cache10,
    sync_cache16,
    tur,
    verify10,
    verify16,
    write6,
    write10,
    write12,
    write16,
    write_atomic16,
    write_verify10,
)

READS = [read6, read10, read12, read16]
WRITES = [write6, write10, write12, write16]


def _pattern(blocks: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(blocks * BS))


def _big_pattern(blocks: int, seed: int = 1) -> bytes:
    """Like _pattern, quickly for tens of MiB: every block differs from its neighbours."""
    return b"".join(
        (lba + seed).to_bytes(8, "big") * (BS // 8) for lba in range(blocks)
    )


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("read", READS)
def test_every_write_reads_back_with_every_read(write, read) -> None:  # type: ignore[no-untyped-def]
    s = Scsi()
    data = _pattern(3)
    s.good(write(10, 3), data)
    assert s.good(read(10, 3)) == data
    assert s.good(read(9, 1)) == bytes(BS)  # neighbours untouched


def test_read6_zero_length_means_256_blocks() -> None:
    s = Scsi()
    assert len(s.good(read6(0, 0))) == 256 * BS


@pytest.mark.parametrize("read", [read10, read12, read16])
def test_zero_block_read_is_good_and_empty(read) -> None:  # type: ignore[no-untyped-def]
    s = Scsi(blocks=100)
    assert s.good(read(0, 0)) == b""
    assert s.good(read(100, 0)) == b""  # at capacity: still in range
    assert s.check(read(101, 0)).asc == 0x21


@pytest.mark.parametrize(
    "cdb",
    [read10(99, 2), read16(100, 1), read16(2**64 - 1, 1), read12(0xFFFFFFFF, 1), read6(99, 2)],
)
def test_read_beyond_end_is_lba_out_of_range(cdb: bytes) -> None:
    s = Scsi(blocks=100)
    sense = s.check(cdb)
    assert (sense.key, sense.asc, sense.ascq) == (ILLEGAL_REQUEST, 0x21, 0x00)


@pytest.mark.parametrize("cdb", [write10(99, 2), write16(2**63, 1)])
def test_write_beyond_end_is_lba_out_of_range_and_writes_nothing(cdb: bytes) -> None:
    s = Scsi(blocks=100)
    assert s.check(cdb, b"\xff" * 2 * BS).asc == 0x21
    assert s.good(read16(99, 1)) == bytes(BS)


# -- transfer length limits (inquiry.BlockLimits) --------------------------------------------


def test_read_longer_than_maximum_transfer_length_succeeds() -> None:
    """Old iPXE ignores VPD B0h and reads a whole 14 MB kernel in one READ when UEFI sanboots."""
    s = Scsi(blocks=70_000)
    data = _big_pattern(30_000)
    s.write(0, data)
    assert s.lu.limits.max_transfer < 30_000
    assert s.good(read16(0, 30_000)) == data
    assert s.good(read12(0, 30_000)) == data
    assert s.good(read10(40_000, 30_000)) == bytes(30_000 * BS)
    # Still refused beyond the capacity, before reading anything.
    assert s.check(read16(40_001, 30_000)).asc == 0x21


@pytest.mark.parametrize("write", [write12, write16])
def test_write_longer_than_the_data_out_limit_is_invalid_field(write) -> None:  # type: ignore[no-untyped-def]
    s = Scsi(blocks=70_000)
    assert s.lu.limits.max_write_transfer == 65536  # 32 MiB
    sense = s.check(write(0, 70_000), bytes(70_000 * BS))
    assert (sense.key, sense.asc, sense.ascq) == (ILLEGAL_REQUEST, 0x24, 0x00)
    assert sense.sks == bytes((0xC0, 0, 6 if write is write12 else 10))  # TRANSFER LENGTH
    assert s.dev.extents(0, 70_000 * BS) == [(0, 70_000 * BS, False)]  # nothing written


def test_write_up_to_the_data_out_limit_succeeds() -> None:
    """Above the advertised MAXIMUM TRANSFER LENGTH, but within what one command may buffer."""
    s = Scsi(blocks=70_000)
    blocks = s.lu.limits.max_write_transfer
    assert blocks > s.lu.limits.max_transfer
    data = _big_pattern(blocks, seed=5)
    s.good(write16(10, blocks), data)
    assert s.read(10, blocks) == data


def test_verify_and_write_atomic_keep_the_maximum_transfer_length() -> None:
    s = Scsi(blocks=70_000)
    too_many = s.lu.limits.max_transfer + 1
    assert s.check(verify16(0, too_many)).sks == bytes((0xC0, 0, 10))
    sense = s.check(write_atomic16(0, too_many), bytes(too_many * BS))
    assert sense.sks == bytes((0xC0, 0, 12))
    s.good(verify16(0, s.lu.limits.max_transfer))


@pytest.mark.parametrize("protect", range(1, 8))
def test_rdprotect_and_wrprotect_are_refused(protect: int) -> None:
    s = Scsi()
    sense = s.check(read10(0, 1, flags=protect << 5))
    assert (sense.key, sense.asc) == (ILLEGAL_REQUEST, 0x24)
    assert sense.sks is not None and sense.sks[2] == 1  # byte 1
    assert s.check(write10(0, 1, flags=protect << 5), bytes(BS)).asc == 0x24
    vrprotect = bytearray(verify10(0, 1, bytchk=1))
    vrprotect[1] |= protect << 5
    assert s.check(bytes(vrprotect), bytes(BS)).asc == 0x24


@pytest.mark.parametrize("flags", [0x10, 0x08, 0x18, 0x02])
def test_dpo_fua_fua_nv_are_accepted(flags: int) -> None:
    s = Scsi()
    s.good(write10(0, 1, flags=flags), b"q" * BS)
    assert s.good(read10(0, 1, flags=flags)) == b"q" * BS


def test_naca_in_control_byte_is_invalid_field() -> None:
    s = Scsi()
    sense = s.check(read10(0, 1, control=0x04))
    assert sense.asc == 0x24
    assert sense.sks == bytes((0xC8 | 2, 0, 9))
    s.good(read10(0, 1, control=0xC0))  # vendor-specific bits are ignored


def test_fua_write_is_durable_across_power_cut() -> None:
    cache = VolatileCacheDevice(MemoryDevice(64 * BS))
    t = ScsiTarget({0: LogicalUnit(cache, device_id="v")})
    t.execute(0, tur(), None, NEXUS)
    assert t.execute(0, write10(0, 1, flags=0x08), b"F" * BS, NEXUS).status == GOOD
    assert t.execute(0, write10(1, 1), b"N" * BS, NEXUS).status == GOOD
    cache.power_cut()
    assert bytes(t.execute(0, read10(0, 2), None, NEXUS).data) == b"F" * BS + bytes(BS)


@pytest.mark.parametrize("sync", [sync_cache10, sync_cache16])
def test_synchronize_cache_makes_earlier_writes_durable(sync) -> None:  # type: ignore[no-untyped-def]
    cache = VolatileCacheDevice(MemoryDevice(64 * BS))
    t = ScsiTarget({0: LogicalUnit(cache, device_id="v")})
    t.execute(0, tur(), None, NEXUS)
    t.execute(0, write16(3, 2), b"S" * 2 * BS, NEXUS)
    assert t.execute(0, sync(), None, NEXUS).status == GOOD
    t.execute(0, write16(5, 1), b"L" * BS, NEXUS)
    cache.power_cut()
    data = bytes(t.execute(0, read16(3, 3), None, NEXUS).data)
    assert data == b"S" * 2 * BS + bytes(BS)


def test_synchronize_cache_range_is_checked() -> None:
    s = Scsi(blocks=100)
    s.good(sync_cache10(0, 100))
    assert s.check(sync_cache10(100, 1)).asc == 0x21


def test_prefetch_is_good_in_range_and_checks_range() -> None:
    s = Scsi(blocks=100)
    s.good(prefetch10(0, 10))
    assert s.check(prefetch10(95, 10)).asc == 0x21


def test_short_data_out_writes_only_the_blocks_received() -> None:
    """libiscsi's WRITE residual tests: EDTL shorter than the CDB's length."""
    s = Scsi()
    s.write(0, b"a" * 2 * BS)
    s.good(write10(0, 2), b"b" * BS)
    assert s.read(0, 2) == b"b" * BS + b"a" * BS
    s.good(write10(0, 1), b"c" * 200)  # less than a block: nothing written
    assert s.read(0, 1) == b"b" * BS


def test_long_data_out_writes_only_the_cdb_length() -> None:
    s = Scsi()
    s.write(0, b"a" * 2 * BS)
    s.good(write10(0, 1), b"b" * 2 * BS)
    assert s.read(0, 2) == b"b" * BS + b"a" * BS


def test_read_uses_the_lent_buffer() -> None:
    s = Scsi()
    s.write(0, b"z" * BS)
    lent = bytearray(4 * BS)
    r = s.run(read10(0, 1), buffer=lent)
    assert isinstance(r.data, memoryview)
    assert r.data.obj is lent
    assert bytes(r.data) == b"z" * BS
    small = bytearray(10)
    r = s.run(read10(0, 1), buffer=small)
    assert bytes(r.data) == b"z" * BS


def test_readonly_lu_refuses_writes_with_write_protected() -> None:
    s = Scsi(readonly=True)
    sense = s.check(write10(0, 1), bytes(BS))
    assert (sense.key, sense.asc, sense.ascq) == (DATA_PROTECT, 0x27, 0x00)
    s.good(read10(0, 1))


def test_readonly_device_makes_readonly_lu() -> None:
    dev = MemoryDevice(8 * BS, readonly=True)
    lu = LogicalUnit(dev, device_id="ro")
    assert lu.readonly


class _FailingDevice(MemoryDevice):
    def __init__(self, size: int, err: int) -> None:
        super().__init__(size)
        self.err = err

    def write(self, offset, data, *, nowait=False):  # type: ignore[no-untyped-def]
        raise OSError(self.err, "injected")

    def read_into(self, offset, buf, *, nowait=False):  # type: ignore[no-untyped-def]
        raise OSError(self.err, "injected")


@pytest.mark.parametrize(
    ("err", "key", "asc", "ascq"), [(28, DATA_PROTECT, 0x27, 0x07), (5, MEDIUM_ERROR, 0x0C, 0x00)]
)
def test_storage_errors_on_write_become_sense(err: int, key: int, asc: int, ascq: int) -> None:
    t = ScsiTarget({0: LogicalUnit(_FailingDevice(8 * BS, err), device_id="f")})
    t.execute(0, tur(), None, NEXUS)
    r = t.execute(0, write10(0, 1), bytes(BS), NEXUS)
    assert r.status == CHECK_CONDITION
    sense = parse_sense(r.sense)
    assert (sense.key, sense.asc, sense.ascq) == (key, asc, ascq)


def test_storage_error_on_read_is_unrecovered_read_error() -> None:
    t = ScsiTarget({0: LogicalUnit(_FailingDevice(8 * BS, 5), device_id="f")})
    t.execute(0, tur(), None, NEXUS)
    sense = parse_sense(t.execute(0, read10(0, 1), None, NEXUS).sense)
    assert (sense.key, sense.asc, sense.ascq) == (MEDIUM_ERROR, 0x11, 0x00)


def test_nowait_read_raises_would_block_and_blocking_retry_works() -> None:
    dev = MemoryDevice(8 * BS, nowait_would_block=True)
    t = ScsiTarget({0: LogicalUnit(dev, device_id="nw")})
    t.execute(0, tur(), None, NEXUS)
    with pytest.raises(WouldBlock):
        t.execute(0, read10(0, 1), None, NEXUS, nowait=True)
    assert t.execute(0, read10(0, 1), None, NEXUS).status == GOOD


def test_nowait_write_with_wce_off_goes_to_a_thread() -> None:
    s = Scsi(write_cache=False)
    s.run(tur())
    with pytest.raises(WouldBlock):
        s.target.execute(0, write10(0, 1), bytes(BS), NEXUS, nowait=True)


def test_nowait_path_never_swallows_a_unit_attention() -> None:
    dev = MemoryDevice(8 * BS, nowait_would_block=True)
    t = ScsiTarget({0: LogicalUnit(dev, device_id="nw")})
    r = t.execute(0, read10(0, 1), None, NEXUS, nowait=True)
    assert r.status == CHECK_CONDITION and parse_sense(r.sense).asc == 0x29


# -- VERIFY, WRITE AND VERIFY ------------------------------------------------------------


def test_verify_bytchk0_checks_range_only() -> None:
    s = Scsi(blocks=100)
    s.good(verify10(0, 100))
    assert s.check(verify10(99, 2)).asc == 0x21


def test_verify_bytchk1_match_and_miscompare_offset() -> None:
    s = Scsi()
    data = _pattern(2)
    s.write(4, data)
    s.good(verify16(4, 2, bytchk=1), data)
    bad = bytearray(data)
    bad[700] ^= 0xFF
    sense = s.check(verify16(4, 2, bytchk=1), bytes(bad))
    assert (sense.key, sense.asc, sense.ascq) == (MISCOMPARE, 0x1D, 0x00)
    assert sense.information == 700


def test_verify_bytchk3_compares_one_block_against_each() -> None:
    s = Scsi()
    s.write(0, b"r" * 3 * BS)
    s.good(verify10(0, 3, bytchk=3), b"r" * BS)
    s.write(2, b"x" * BS)
    assert s.check(verify10(0, 3, bytchk=3), b"r" * BS).information == 2 * BS


def test_verify_bytchk2_is_reserved() -> None:
    assert Scsi().check(verify10(0, 1, bytchk=2), bytes(BS)).asc == 0x24


def test_write_and_verify_writes_and_flushes() -> None:
    s = Scsi()
    before = s.dev.flush_count
    s.good(write_verify10(1, 1, bytchk=1), b"v" * BS)
    assert s.read(1, 1) == b"v" * BS
    assert s.dev.flush_count > before


def test_write_atomic16() -> None:
    s = Scsi(blocks=100)
    s.good(write_atomic16(10, 2), b"A" * 2 * BS)
    assert s.read(10, 2) == b"A" * 2 * BS
    assert s.check(write_atomic16(99, 2), bytes(2 * BS)).asc == 0x21
    assert s.check(write_atomic16(0, 1, boundary=1), bytes(BS)).asc == 0x24


def test_concurrent_writes_to_distinct_ranges_all_land() -> None:
    s = Scsi(blocks=512)
    s.run(tur())

    def worker(n: int) -> None:
        for i in range(20):
            lba = n * 64 + i
            assert s.target.execute(0, write10(lba, 1), bytes([n]) * BS, NEXUS).status == GOOD

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for n in range(8):
        assert s.read(n * 64, 20) == bytes([n]) * 20 * BS
