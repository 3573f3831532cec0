"""TFTP codec: round trips (hypothesis) and refusals (RFC 1350 §5, RFC 2347)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mobinux.errors import MalformedPacket
from mobinux.tftp import packet as p
from mobinux.tftp.constants import ErrorCode, Opcode

# Any text without NUL that survives UTF-8 + surrogateescape (what the wire can carry).
_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40
)
_raw_text = st.binary(max_size=40).filter(lambda b: b"\x00" not in b).map(
    lambda b: b.decode("utf-8", "surrogateescape")
)
_str = st.one_of(_text, _raw_text)
_options = st.lists(st.tuples(_str, _str), max_size=6).map(tuple)
_u16 = st.integers(0, 0xFFFF)

packets = st.one_of(
    st.builds(p.ReadRequest, _str, _str, _options),
    st.builds(p.WriteRequest, _str, _str, _options),
    st.builds(p.Data, _u16, st.binary(max_size=1500)),
    st.builds(p.Ack, _u16),
    st.builds(p.Error, _u16, _str),
    st.builds(p.OptionAck, _options),
)


@given(packets)
def test_round_trip(packet: p.Packet) -> None:
    assert p.parse(p.encode(packet)) == packet


@given(packets)
def test_encoding_starts_with_the_opcode(packet: p.Packet) -> None:
    wire = p.encode(packet)
    assert int.from_bytes(wire[:2], "big") in {op.value for op in Opcode}


def test_known_bytes() -> None:
    assert p.encode(p.ReadRequest("pxelinux.0", "octet", (("tsize", "0"),))) == (
        b"\x00\x01pxelinux.0\x00octet\x00tsize\x000\x00"
    )
    assert p.encode(p.Data(1, b"abc")) == b"\x00\x03\x00\x01abc"
    assert p.encode(p.Ack(65535)) == b"\x00\x04\xff\xff"
    assert p.encode(p.Error(ErrorCode.FILE_NOT_FOUND, "nope")) == b"\x00\x05\x00\x01nope\x00"
    assert p.encode(p.OptionAck((("blksize", "1468"),))) == b"\x00\x06blksize\x001468\x00"


def test_utf8_filename_survives() -> None:
    req = p.parse(b"\x00\x01caf\xc3\xa9/\xff.bin\x00octet\x00")
    assert isinstance(req, p.ReadRequest)
    assert req.filename.encode("utf-8", "surrogateescape") == b"caf\xc3\xa9/\xff.bin"


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x00",
        b"\x00\x00",  # opcode 0
        b"\x00\x07",  # opcode 7
        b"\xff\xff\x00",
        b"\x00\x01file",  # unterminated filename
        b"\x00\x01file\x00",  # no mode
        b"\x00\x01file\x00octet",  # unterminated mode
        b"\x00\x01file\x00octet\x00blksize\x00512",  # unterminated option value
        b"\x00\x01file\x00octet\x00blksize\x00512\x00tsize\x00",  # odd option strings
        b"\x00\x02\x00",
        b"\x00\x03\x00",  # DATA without a full block number
        b"\x00\x04\x00",  # short ACK
        b"\x00\x05\x00",  # short ERROR
        b"\x00\x06tsize",  # unterminated OACK
    ],
)
def test_malformed(wire: bytes) -> None:
    with pytest.raises(MalformedPacket):
        p.parse(wire)


def test_lenient_forms() -> None:
    # NUL padding after the options (some PXE ROMs) is not an option.
    assert p.parse(b"\x00\x01f\x00octet\x00tsize\x000\x00\x00") == p.ReadRequest(
        "f", "octet", (("tsize", "0"),)
    )
    # ERROR without its terminating NUL, ACK with trailing bytes.
    assert p.parse(b"\x00\x05\x00\x08abort") == p.Error(8, "abort")
    assert p.parse(b"\x00\x04\x00\x02junk") == p.Ack(2)
    assert p.parse(b"\x00\x06") == p.OptionAck(())


@pytest.mark.parametrize(
    "packet",
    [p.Ack(-1), p.Ack(65536), p.Data(70000, b""), p.Error(0, "a\x00b"), p.ReadRequest("a\x00", "octet")],
)
def test_encode_refuses_bad_fields(packet: p.Packet) -> None:
    with pytest.raises(ValueError):
        p.encode(packet)
