"""Sense data encoding (SPC-4 4.5) and the OSError mapping."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mobinux.scsi.constants import Asc, SenseKey
from mobinux.scsi.sense import (
    CheckCondition,
    FieldPointer,
    build_sense,
    from_os_error,
    invalid_cdb,
    parse_sense,
)


def test_fixed_format_byte_for_byte() -> None:
    sense = build_sense(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    assert sense == bytes.fromhex("700005000000000a000000002100000000 00".replace(" ", ""))


def test_fixed_format_with_information_and_field_pointer() -> None:
    sense = build_sense(
        SenseKey.MISCOMPARE,
        Asc.MISCOMPARE_DURING_VERIFY,
        information=0x1234,
        field=FieldPointer(2, 7),
    )
    assert sense[0] == 0xF0  # VALID | 70h
    assert sense[2] == 0x0E
    assert sense[3:7] == b"\x00\x00\x12\x34"
    assert sense[12:14] == b"\x1d\x00"
    # SKSV | C/D | BPV | bit 7, field byte 2
    assert sense[15:18] == bytes((0x80 | 0x40 | 0x08 | 7, 0, 2))


def test_descriptor_format_byte_for_byte() -> None:
    sense = build_sense(
        SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field=FieldPointer(1), descriptor=True
    )
    assert sense == bytes.fromhex("72052400000000 08 0206 0000 c00001 00".replace(" ", ""))


def test_descriptor_format_information() -> None:
    sense = build_sense(
        SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, information=513, descriptor=True
    )
    parsed = parse_sense(sense)
    assert (parsed.response_code, parsed.key, parsed.asc, parsed.ascq) == (0x72, 0xE, 0x1D, 0)
    assert parsed.information == 513


def test_parameter_list_field_pointer_clears_cd() -> None:
    assert FieldPointer(9, in_cdb=False).encode() == bytes((0x80, 0, 9))


@given(
    key=st.sampled_from(list(SenseKey)),
    asc=st.sampled_from(list(Asc)),
    info=st.none() | st.integers(0, 2**32 - 1),
    fp=st.none() | st.tuples(st.integers(0, 65535), st.none() | st.integers(0, 7), st.booleans()),
    descriptor=st.booleans(),
)
def test_parse_inverts_build(
    key: SenseKey,
    asc: Asc,
    info: int | None,
    fp: tuple[int, int | None, bool] | None,
    descriptor: bool,
) -> None:
    field = None if fp is None else FieldPointer(fp[0], fp[1], in_cdb=fp[2])
    parsed = parse_sense(
        build_sense(key, asc, information=info, field=field, descriptor=descriptor)
    )
    assert parsed.key == key
    assert (parsed.asc, parsed.ascq) == (asc.asc, asc.ascq)
    assert parsed.information == info
    assert parsed.sks == (None if field is None else field.encode())


@pytest.mark.parametrize(
    ("err", "writing", "key", "asc"),
    [
        (errno.ENOSPC, True, SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
        (errno.EDQUOT, True, SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
        (errno.EROFS, True, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED),
        (errno.EIO, True, SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR),
        (errno.EIO, False, SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR),
    ],
)
def test_os_errors_map_to_sense(err: int, writing: bool, key: SenseKey, asc: Asc) -> None:
    cc = from_os_error(OSError(err, "x"), writing=writing)
    parsed = parse_sense(cc.sense())
    assert (parsed.key, parsed.asc, parsed.ascq) == (key, asc.asc, asc.ascq)


def test_space_allocation_failed_is_27_07() -> None:
    sense = from_os_error(OSError(errno.ENOSPC, "full"), writing=True).sense()
    assert (sense[2], sense[12], sense[13]) == (7, 0x27, 0x07)


def test_invalid_cdb_helper_points_into_the_cdb() -> None:
    exc = invalid_cdb(4, 3)
    assert isinstance(exc, CheckCondition)
    assert exc.sense()[15:18] == bytes((0xC8 | 3, 0, 4))


@pytest.mark.parametrize(
    "junk",
    [b"", b"\x70" * 7, b"\x71" + bytes(10), b"\x55" + bytes(20), b"\x72" + bytes(6) + b"\x05"],
)
def test_parse_rejects_malformed(junk: bytes) -> None:
    with pytest.raises(ValueError):
        parse_sense(junk)
