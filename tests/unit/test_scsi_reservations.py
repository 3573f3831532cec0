"""RESERVE(6)/RELEASE(6) (SPC-2) and persistent reservations (SPC-4 5.12, 6.15, 6.16)."""

from __future__ import annotations

import struct

import pytest

from mobinux.scsi.constants import PrType
from tests.unit.test_scsi_harness import (
    BS,
    GOOD,
    ILLEGAL_REQUEST,
    NEXUS,
    NEXUS2,
    RESERVATION_CONFLICT,
    UNIT_ATTENTION,
    Scsi,
    inquiry,
    mode_sense6,
    prin,
    prout,
    prout_params,
    read10,
    release6,
    report_luns,
    reserve6,
    tur,
    write10,
)

REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, REGISTER_IGNORE = range(7)
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = range(4)
NEXUS3 = "iqn.2026-01.test:init3,i,0x000000000001,iqn.2026-01.test:disk,t,0x0001"


def _status(s: Scsi, cdb: bytes, data: bytes | None = None, nexus: str = NEXUS) -> int:
    return s.run(cdb, data, nexus=nexus).status


def _register(s: Scsi, nexus: str, key: int) -> None:
    s.good(prout(REGISTER_IGNORE), prout_params(0, key), nexus=nexus)


def _keys(s: Scsi, nexus: str = NEXUS) -> tuple[int, list[int]]:
    data = s.good(prin(READ_KEYS), nexus=nexus)
    gen, length = struct.unpack_from(">II", data)
    return gen, [struct.unpack_from(">Q", data, 8 + i)[0] for i in range(0, length, 8)]


def _reservation(s: Scsi, nexus: str = NEXUS) -> tuple[int, int] | None:
    data = s.good(prin(READ_RESERVATION), nexus=nexus)
    if struct.unpack_from(">I", data, 4)[0] == 0:
        return None
    key = struct.unpack_from(">Q", data, 8)[0]
    return key, data[21] & 0x0F


def _can_read(s: Scsi, nexus: str) -> bool:
    return _status(s, read10(0, 1), nexus=nexus) == GOOD


def _can_write(s: Scsi, nexus: str) -> bool:
    return _status(s, write10(0, 1), bytes(BS), nexus=nexus) == GOOD


# -- RESERVE(6) ------------------------------------------------------------------------------


def test_reserve6_excludes_other_nexus_until_released() -> None:
    s = Scsi()
    s.good(reserve6())
    s.good(reserve6())  # re-reserving one's own reservation is fine
    assert _status(s, reserve6(), nexus=NEXUS2) == RESERVATION_CONFLICT
    assert _status(s, mode_sense6(0x3F), nexus=NEXUS2) == RESERVATION_CONFLICT
    assert _status(s, read10(0, 1), nexus=NEXUS2) == RESERVATION_CONFLICT
    s.good(inquiry(), nexus=NEXUS2)  # allowed by SPC-2
    s.good(report_luns(), nexus=NEXUS2)
    s.good(release6(), nexus=NEXUS2)  # a no-op for a non-holder
    assert _status(s, read10(0, 1), nexus=NEXUS2) == RESERVATION_CONFLICT
    s.good(mode_sense6(0x3F))
    s.good(release6())
    s.good(reserve6(), nexus=NEXUS2)


def test_reserve6_is_released_by_nexus_loss_and_lun_reset() -> None:
    s = Scsi()
    s.good(reserve6())
    s.target.nexus_lost(NEXUS)
    s.good(reserve6(), nexus=NEXUS2)
    assert s.target.lun_reset(0, NEXUS2)
    s.run(tur(), nexus=NEXUS2, clear_ua=False)
    s.run(tur(), nexus=NEXUS3)
    s.good(reserve6(), nexus=NEXUS3)


def test_reserve6_is_released_by_target_reset() -> None:
    s = Scsi()
    s.good(reserve6())
    s.target.target_reset(NEXUS, cold=False)
    s.good(reserve6(), nexus=NEXUS2)


def test_reserve6_conflicts_with_pr_registrations() -> None:
    s = Scsi()
    _register(s, NEXUS, 0xAB)
    assert _status(s, reserve6()) == RESERVATION_CONFLICT
    assert _status(s, release6()) == RESERVATION_CONFLICT


# -- PR: registration ------------------------------------------------------------------------


def test_register_read_keys_and_unregister() -> None:
    s = Scsi()
    gen0, keys = _keys(s)
    assert keys == []
    _register(s, NEXUS, 0x1111)
    _register(s, NEXUS2, 0x2222)
    gen, keys = _keys(s)
    assert keys == [0x1111, 0x2222] and gen == gen0 + 2
    # REGISTER (not ignore) with the wrong current key conflicts.
    assert _status(s, prout(REGISTER), prout_params(0x9999, 0x3333)) == RESERVATION_CONFLICT
    s.good(prout(REGISTER), prout_params(0x1111, 0x3333))  # change key
    s.good(prout(REGISTER), prout_params(0x3333, 0))  # unregister
    assert _keys(s)[1] == [0x2222]


def test_register_from_unregistered_nexus_with_nonzero_key_conflicts() -> None:
    s = Scsi()
    assert _status(s, prout(REGISTER), prout_params(5, 6)) == RESERVATION_CONFLICT


def test_read_keys_truncated_keeps_additional_length() -> None:
    s = Scsi()
    _register(s, NEXUS, 0x42)
    data = s.good(prin(READ_KEYS, alloc=8))
    assert len(data) == 8
    assert struct.unpack_from(">I", data, 4)[0] == 8


def test_prout_parameter_list_length_must_be_24() -> None:
    s = Scsi()
    sense = s.check(prout(REGISTER_IGNORE, length=20), prout_params(0, 1)[:20])
    assert (sense.key, sense.asc) == (ILLEGAL_REQUEST, 0x1A)


@pytest.mark.parametrize(("flag", "bit"), [(0x01, 0), (0x04, 2), (0x08, 3)])
def test_unsupported_aptpl_all_tg_pt_spec_i_pt(flag: int, bit: int) -> None:
    sense = Scsi().check(prout(REGISTER_IGNORE), prout_params(0, 1, flags=flag))
    assert sense.asc == 0x26
    assert sense.sks == bytes((0x80 | 0x08 | bit, 0, 20))


@pytest.mark.parametrize("action", range(4, 0x20))
def test_unknown_prin_service_actions_are_invalid_field(action: int) -> None:
    sense = Scsi().check(prin(action))
    assert (sense.key, sense.asc) == (ILLEGAL_REQUEST, 0x24)
    assert sense.sks == bytes((0xC8 | 4, 0, 1))  # the SERVICE ACTION field


def test_report_capabilities() -> None:
    data = Scsi().good(prin(REPORT_CAPABILITIES))
    assert struct.unpack_from(">H", data)[0] == 8
    assert data[2] & 0x10  # CRH
    assert not data[2] & 0x0D  # no SIP_C, ATP_C, PTPL_C
    assert data[4] == 0xEA and data[5] == 0x01  # all six types


# -- PR: reservations and access ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pr_type", "reg_read", "reg_write", "unreg_read", "unreg_write"),
    [
        (PrType.EXCLUSIVE_ACCESS, False, False, False, False),
        (PrType.WRITE_EXCLUSIVE, True, False, True, False),
        (PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, True, True, False, False),
        (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, True, True, True, False),
        (PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, True, True, False, False),
        (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, True, True, True, False),
    ],
)
def test_access_per_reservation_type(
    pr_type: PrType, reg_read: bool, reg_write: bool, unreg_read: bool, unreg_write: bool
) -> None:
    """SPC-4 5.12.9 Table 64, as libiscsi ProutReserve.Access* checks it."""
    s = Scsi()
    _register(s, NEXUS, 0xA)
    _register(s, NEXUS2, 0xB)
    s.good(prout(RESERVE, pr_type), prout_params(0xA))
    all_reg = pr_type in (
        PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
        PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
    )
    assert _reservation(s) == (0 if all_reg else 0xA, pr_type)
    assert _can_read(s, NEXUS) and _can_write(s, NEXUS)
    assert _can_read(s, NEXUS2) == reg_read
    assert _can_write(s, NEXUS2) == reg_write
    s.good(prout(REGISTER), prout_params(0xB, 0), nexus=NEXUS2)
    assert _can_read(s, NEXUS2) == unreg_read
    assert _can_write(s, NEXUS2) == unreg_write
    s.good(tur(), nexus=NEXUS2)  # TEST UNIT READY never conflicts
    s.good(prout(RELEASE, pr_type), prout_params(0xA))
    assert _reservation(s) is None
    assert _can_write(s, NEXUS2)


def test_reserve_needs_registration_and_right_key() -> None:
    s = Scsi()
    assert (
        _status(s, prout(RESERVE, PrType.EXCLUSIVE_ACCESS), prout_params(0xA))
        == RESERVATION_CONFLICT
    )
    _register(s, NEXUS, 0xA)
    assert (
        _status(s, prout(RESERVE, PrType.EXCLUSIVE_ACCESS), prout_params(0xB))
        == RESERVATION_CONFLICT
    )
    assert s.check(prout(RESERVE, 0x02), prout_params(0xA)).asc == 0x24  # type 2 is reserved
    assert s.check(prout(RESERVE, 0x13), prout_params(0xA)).asc == 0x24  # scope must be LU_SCOPE
    s.good(prout(RESERVE, PrType.EXCLUSIVE_ACCESS), prout_params(0xA))
    s.good(prout(RESERVE, PrType.EXCLUSIVE_ACCESS), prout_params(0xA))  # same again: no-op
    assert (
        _status(s, prout(RESERVE, PrType.WRITE_EXCLUSIVE), prout_params(0xA))
        == RESERVATION_CONFLICT
    )
    _register(s, NEXUS2, 0xB)
    assert (
        _status(s, prout(RESERVE, PrType.EXCLUSIVE_ACCESS), prout_params(0xB), nexus=NEXUS2)
        == RESERVATION_CONFLICT
    )


def test_release_with_wrong_type_is_invalid_release() -> None:
    s = Scsi()
    _register(s, NEXUS, 0xA)
    s.good(prout(RESERVE, PrType.WRITE_EXCLUSIVE), prout_params(0xA))
    sense = s.check(prout(RELEASE, PrType.EXCLUSIVE_ACCESS), prout_params(0xA))
    assert (sense.key, sense.asc, sense.ascq) == (ILLEGAL_REQUEST, 0x26, 0x04)


def test_release_by_non_holder_is_a_no_op() -> None:
    s = Scsi()
    _register(s, NEXUS, 0xA)
    _register(s, NEXUS2, 0xB)
    s.good(prout(RESERVE, PrType.WRITE_EXCLUSIVE), prout_params(0xA))
    s.good(prout(RELEASE, PrType.WRITE_EXCLUSIVE), prout_params(0xB), nexus=NEXUS2)
    assert _reservation(s) == (0xA, PrType.WRITE_EXCLUSIVE)


def test_clear_removes_everything_bumps_generation_once_and_tells_others() -> None:
    s = Scsi()
    _register(s, NEXUS, 0xA)
    _register(s, NEXUS2, 0xB)
    s.good(prout(RESERVE, PrType.EXCLUSIVE_ACCESS), prout_params(0xA))
    gen, _ = _keys(s)
    s.good(prout(CLEAR), prout_params(0xA))
    gen2, keys = _keys(s)
    assert keys == [] and gen2 == gen + 1
    assert _reservation(s) is None
    sense = s.check(tur(), nexus=NEXUS2)
    assert (sense.key, sense.asc, sense.ascq) == (UNIT_ATTENTION, 0x2A, 0x03)


def test_preempt_removes_registration_without_reservation() -> None:
    """libiscsi ProutPreempt.RemoveRegistration."""
    s = Scsi()
    _register(s, NEXUS, 0xA)
    _register(s, NEXUS2, 0xB)
    gen, _ = _keys(s)
    s.good(prout(PREEMPT, PrType.EXCLUSIVE_ACCESS), prout_params(0xB, 0xA), nexus=NEXUS2)
    gen2, keys = _keys(s, NEXUS2)
    assert keys == [0xB] and gen2 == gen + 1
    sense = s.check(tur())  # the victim learns of it
    assert (sense.key, sense.asc, sense.ascq) == (UNIT_ATTENTION, 0x2A, 0x05)


def test_preempt_takes_over_the_reservation() -> None:
    s = Scsi()
    _register(s, NEXUS, 0xA)
    _register(s, NEXUS2, 0xB)
    s.good(prout(RESERVE, PrType.WRITE_EXCLUSIVE), prout_params(0xA))
    s.good(prout(PREEMPT_ABORT, PrType.EXCLUSIVE_ACCESS), prout_params(0xB, 0xA), nexus=NEXUS2)
    assert s.check(tur()).asc == 0x2A
    assert _reservation(s) == (0xB, PrType.EXCLUSIVE_ACCESS)
    assert _keys(s, NEXUS2)[1] == [0xB]
    assert _status(s, read10(0, 1)) == RESERVATION_CONFLICT  # the preempted nexus is out


def test_preempt_errors() -> None:
    s = Scsi()
    _register(s, NEXUS, 0xA)
    assert s.check(prout(PREEMPT, PrType.EXCLUSIVE_ACCESS), prout_params(0xA, 0)).asc == 0x26
    assert (
        _status(s, prout(PREEMPT, PrType.EXCLUSIVE_ACCESS), prout_params(0xA, 0x77))
        == RESERVATION_CONFLICT
    )


def test_unregistering_the_holder_releases_the_reservation() -> None:
    s = Scsi()
    _register(s, NEXUS, 0xA)
    _register(s, NEXUS2, 0xB)
    s.good(prout(RESERVE, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY), prout_params(0xA))
    s.good(prout(REGISTER), prout_params(0xA, 0))
    assert _reservation(s) is None
    sense = s.check(tur(), nexus=NEXUS2)
    assert (sense.asc, sense.ascq) == (0x2A, 0x04)  # RESERVATIONS RELEASED


def test_all_registrants_reservation_survives_until_last_registrant_leaves() -> None:
    s = Scsi()
    _register(s, NEXUS, 0xA)
    _register(s, NEXUS2, 0xB)
    s.good(prout(RESERVE, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS), prout_params(0xA))
    s.good(prout(REGISTER), prout_params(0xA, 0))
    assert _reservation(s) is not None
    s.good(prout(REGISTER), prout_params(0xB, 0), nexus=NEXUS2)
    assert _reservation(s) is None


def test_registrations_survive_nexus_loss_and_lun_reset_but_not_power_on() -> None:
    s = Scsi()
    _register(s, NEXUS, 0xA)
    s.good(prout(RESERVE, PrType.EXCLUSIVE_ACCESS), prout_params(0xA))
    s.target.nexus_lost(NEXUS)
    s.target.lun_reset(0, NEXUS2)
    s.run(tur(), nexus=NEXUS2, clear_ua=False)
    assert _keys(s, NEXUS2)[1] == [0xA]
    assert _reservation(s, NEXUS2) == (0xA, PrType.EXCLUSIVE_ACCESS)
    s.target.target_reset(NEXUS2, cold=True)
    sense = s.check(tur(), nexus=NEXUS2)
    assert (sense.key, sense.asc, sense.ascq) == (UNIT_ATTENTION, 0x29, 0x01)  # POWER ON OCCURRED
    assert _keys(s, NEXUS2)[1] == []


def test_read_full_status_describes_each_registration() -> None:
    s = Scsi()
    _register(s, NEXUS, 0xA)
    _register(s, NEXUS2, 0xB)
    s.good(prout(RESERVE, PrType.WRITE_EXCLUSIVE), prout_params(0xA))
    data = s.good(prin(READ_FULL_STATUS))
    length = struct.unpack_from(">I", data, 4)[0]
    assert len(data) == 8 + length
    pos = 8
    seen = []
    while pos < len(data):
        key, _, flags, scope_type = struct.unpack_from(">QIBB", data, pos)
        tid_len = struct.unpack_from(">I", data, pos + 20)[0]
        tid = data[pos + 24 : pos + 24 + tid_len]
        assert tid[0] & 0x0F == 5 and tid_len % 4 == 0 and tid_len >= 20  # iSCSI TransportID
        seen.append((key, bool(flags & 1), scope_type))
        pos += 24 + tid_len
    assert seen == [(0xA, True, PrType.WRITE_EXCLUSIVE), (0xB, False, 0)]
    # The first TransportID names the initiator port: format 01b, "name,i,0xISID".
    tid_len = struct.unpack_from(">I", data, 8 + 20)[0]
    tid = data[8 + 24 : 8 + 24 + tid_len]
    assert tid[0] == 0x45
    assert tid[4:].rstrip(b"\0") == b"iqn.2026-01.test:init1,i,0x23d000000001"
