"""DHCP codec: round trips, RFC 3396 long options, option overload, malformed input."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobinux.dhcp.constants import MAGIC_COOKIE, MIN_MESSAGE_LEN, OptionCode, Overload
from mobinux.dhcp.packet import DhcpPacket, PacketTooLarge, parse
from mobinux.errors import MalformedPacket

addresses = st.integers(0, 2**32 - 1).map(IPv4Address)
option_codes = st.integers(1, 254).filter(lambda c: c != OptionCode.OPTION_OVERLOAD)
option_values = st.one_of(st.binary(max_size=40), st.binary(min_size=250, max_size=700))


@st.composite
def packets(draw: st.DrawFn) -> DhcpPacket:
    return DhcpPacket(
        op=draw(st.integers(0, 255)),
        htype=draw(st.integers(0, 255)),
        hlen=draw(st.integers(0, 255)),
        hops=draw(st.integers(0, 255)),
        xid=draw(st.integers(0, 2**32 - 1)),
        secs=draw(st.integers(0, 2**16 - 1)),
        flags=draw(st.integers(0, 2**16 - 1)),
        ciaddr=draw(addresses),
        yiaddr=draw(addresses),
        siaddr=draw(addresses),
        giaddr=draw(addresses),
        chaddr=draw(st.binary(min_size=16, max_size=16)),
        sname=draw(st.binary(max_size=64)),
        file=draw(st.binary(max_size=128)),
        options=draw(st.dictionaries(option_codes, option_values, max_size=8)),
    )


@settings(max_examples=300)
@given(packets())
def test_round_trip(p: DhcpPacket) -> None:
    data = p.encode()
    assert len(data) >= MIN_MESSAGE_LEN
    assert parse(data) == p


@settings(max_examples=300)
@given(packets(), st.integers(300, 1500))
def test_round_trip_with_size_limit(p: DhcpPacket, limit: int) -> None:
    try:
        data = p.encode(limit)
    except PacketTooLarge:
        return
    assert len(data) <= max(limit, MIN_MESSAGE_LEN)
    assert parse(data) == p


def test_option_order_is_kept() -> None:
    p = DhcpPacket(options={53: b"\x01", 12: b"host", 55: b"\x01\x03", 3: b"\x0a\x00\x00\x01"})
    assert list(parse(p.encode()).options) == [53, 12, 55, 3]


def test_long_option_is_split_in_255_octet_instances() -> None:
    value = bytes(range(256)) * 2  # 512 octets
    data = DhcpPacket(options={67: value}).encode()
    opts = data[240:]
    assert opts[0] == 67 and opts[1] == 255
    assert opts[257] == 67 and opts[258] == 255
    assert opts[514] == 67 and opts[515] == 2
    assert opts[518] == OptionCode.END
    assert parse(data).options[67] == value


def _raw(options: bytes, *, sname: bytes = b"", file: bytes = b"") -> bytes:
    head = bytearray(236)
    head[0] = 1
    head[1] = 1
    head[2] = 6
    head[44 : 44 + len(sname)] = sname
    head[108 : 108 + len(file)] = file
    return bytes(head) + MAGIC_COOKIE + options


def test_split_instances_are_concatenated_rfc3396() -> None:
    data = _raw(bytes([53, 1, 1, 77, 2, b"ab"[0], b"ab"[1], 12, 1, 0x68, 77, 3]) + b"cde" + b"\xff")
    p = parse(data)
    assert p.options[77] == b"abcde"
    assert list(p.options) == [53, 77, 12]


def test_overloaded_file_and_sname_are_read_after_options() -> None:
    file_opts = bytes([77, 2]) + b"cd" + bytes([67, 3]) + b"f.0" + b"\xff"
    sname_opts = bytes([77, 1]) + b"e" + b"\xff"
    data = _raw(
        bytes([53, 1, 1, 52, 1, Overload.BOTH, 77, 2]) + b"ab" + b"\xff",
        sname=sname_opts,
        file=file_opts,
    )
    p = parse(data)
    assert p.options[77] == b"abcde"  # options, then file, then sname (RFC 3396 §6)
    assert p.options[67] == b"f.0"
    assert p.file == b"" and p.sname == b""
    assert 52 not in p.options


def test_overload_file_only_keeps_sname() -> None:
    data = _raw(
        bytes([53, 1, 1, 52, 1, Overload.FILE, 0xFF]),
        sname=b"server",
        file=bytes([12, 1]) + b"h\xff",
    )
    p = parse(data)
    assert p.sname == b"server"
    assert p.options[12] == b"h"


def test_encode_spills_into_file_and_sname_when_needed() -> None:
    p = DhcpPacket(options={53: b"\x02", 43: b"x" * 200, 60: b"y" * 100, 66: b"z" * 40})
    data = p.encode(548)
    assert len(data) <= 548
    assert data[108] != 0  # options moved into 'file'
    q = parse(data)
    assert q == p


def test_encode_does_not_touch_a_used_file_field() -> None:
    p = DhcpPacket(file=b"pxelinux.0", options={53: b"\x02", 43: b"x" * 250, 60: b"y" * 60})
    data = p.encode(548)
    assert data[108:118] == b"pxelinux.0"
    assert parse(data) == p


def test_encode_too_large() -> None:
    p = DhcpPacket(file=b"f", sname=b"s", options={43: b"x" * 255, 60: b"y" * 255})
    with pytest.raises(PacketTooLarge):
        p.encode(548)


def test_cannot_set_overload_or_pad_directly() -> None:
    for code in (0, 52, 255):
        with pytest.raises(ValueError):
            DhcpPacket(options={code: b"\x01"}).encode()


def test_short_fields_are_padded_and_normalised() -> None:
    p = DhcpPacket(chaddr=bytes.fromhex("525400000001"), file=b"boot\0\0")
    assert len(p.chaddr) == 16
    assert p.file == b"boot"
    assert p.mac == "52:54:00:00:00:01"
    with pytest.raises(ValueError):
        DhcpPacket(chaddr=bytes(17))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(239),
        bytes(236) + b"\x00\x00\x00\x00",  # no cookie (BOOTP)
        _raw(bytes([53])),  # no length
        _raw(bytes([53, 5, 1])),  # overruns
        _raw(bytes([52, 1, 7, 0xFF])),  # bad overload value
        _raw(bytes([52, 2, 1, 1, 0xFF])),  # bad overload length
        _raw(bytes([52, 1, 1, 0xFF]), file=bytes([12, 200])),  # overrun inside 'file'
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse(data)


def test_missing_end_option_is_tolerated() -> None:
    p = parse(_raw(bytes([53, 1, 3])))
    assert p.message_type == 3


def test_accessors() -> None:
    p = DhcpPacket(options={53: b"\x01", 50: IPv4Address("10.0.0.5").packed, 54: b"bad"})
    assert p.message_type == 1
    assert p.option_address(50) == IPv4Address("10.0.0.5")
    assert p.option_address(54) is None
    assert DhcpPacket(options={53: b"\x01\x02"}).message_type is None
