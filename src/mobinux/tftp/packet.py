"""TFTP packet codec (RFC 1350 §5, RFC 2347 "Packet Formats").

``parse(data)`` returns one of the packet classes below or raises
:class:`~mobinux.errors.MalformedPacket`; ``encode(packet)`` is its inverse, so
``parse(encode(p)) == p`` for every packet built from valid fields.

Strings (file names, modes, options, error messages) are NUL-terminated bytes
on the wire. RFC 1350 calls them netascii; real clients send UTF-8 or raw
bytes in file names, so they are decoded as UTF-8 with ``surrogateescape``:
lossless for any byte string, and what ``os.fsencode`` expects on POSIX.

The DATA/ACK hot path of a transfer does not go through this module (see
:mod:`mobinux.tftp.session`); it is for requests, errors, OACKs and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from mobinux._wire import Reader, Writer
from mobinux.errors import MalformedPacket
from mobinux.tftp.constants import Opcode

Options = tuple[tuple[str, str], ...]
"""Option name/value pairs in wire order, spelt as received (RFC 2347)."""

_ENC = "utf-8"
_ERRS = "surrogateescape"


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """RRQ (RFC 1350 §5) with the RFC 2347 options appended."""

    filename: str
    mode: str
    options: Options = ()


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """WRQ (RFC 1350 §5); this server refuses it but must parse it to say so."""

    filename: str
    mode: str
    options: Options = ()


@dataclass(frozen=True, slots=True)
class Data:
    """DATA (RFC 1350 §5): a 16-bit block number and 0..blksize bytes."""

    block: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """ACK (RFC 1350 §5). Block 0 acknowledges an OACK (RFC 2347)."""

    block: int


@dataclass(frozen=True, slots=True)
class Error:
    """ERROR (RFC 1350 §5): a code (``ErrorCode`` or any 16-bit value) and a message."""

    code: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class OptionAck:
    """OACK (RFC 2347): the options the server accepted, with their values."""

    options: Options = ()


Packet = ReadRequest | WriteRequest | Data | Ack | Error | OptionAck


def _decode(raw: bytes) -> str:
    return raw.decode(_ENC, _ERRS)


def _encode_str(text: str) -> bytes:
    try:
        raw = text.encode(_ENC, _ERRS)
    except UnicodeEncodeError as exc:  # lone surrogates outside the escape range
        raise ValueError(f"string not encodable: {text!r}") from exc
    if b"\x00" in raw:
        raise ValueError("NUL inside a TFTP string")
    return raw


def _split_strings(body: bytes) -> list[str]:
    """Split NUL-terminated strings; the last one must be terminated too."""
    if not body or body[-1] != 0:
        raise MalformedPacket("unterminated string")
    return [_decode(part) for part in body[:-1].split(b"\x00")]


def _pairs(strings: list[str]) -> Options:
    # Some PXE ROMs pad requests with extra NUL bytes; an odd trailing empty
    # string is padding, not half an option (RFC 2347 defines only pairs).
    while len(strings) % 2 and strings[-1] == "":
        strings.pop()
    if len(strings) % 2:
        raise MalformedPacket("option without a value")
    return tuple((strings[i], strings[i + 1]) for i in range(0, len(strings), 2))


def parse(data: bytes | bytearray | memoryview) -> Packet:
    """Decode one datagram; raise :class:`MalformedPacket` if it is not TFTP."""
    reader = Reader(data)
    opcode = reader.u16()
    if opcode in (Opcode.RRQ, Opcode.WRQ):
        strings = _split_strings(reader.rest())
        if len(strings) < 2:
            raise MalformedPacket("request without filename and mode")
        options = _pairs(strings[2:])
        cls = ReadRequest if opcode == Opcode.RRQ else WriteRequest
        return cls(strings[0], strings[1], options)
    if opcode == Opcode.DATA:
        return Data(reader.u16(), reader.rest())
    if opcode == Opcode.ACK:
        # Trailing bytes after the block number are tolerated (seen from
        # padding clients); they carry nothing in RFC 1350.
        return Ack(reader.u16())
    if opcode == Opcode.ERROR:
        code = reader.u16()
        # Many implementations omit the terminating NUL: accept both.
        message = reader.rest().split(b"\x00", 1)[0]
        return Error(code, _decode(message))
    if opcode == Opcode.OACK:
        body = reader.rest()
        return OptionAck(_pairs(_split_strings(body)) if body else ())
    raise MalformedPacket(f"unknown TFTP opcode {opcode}")


def encode(packet: Packet) -> bytes:
    """Encode *packet*; raise ValueError for fields that cannot go on the wire."""
    w = Writer()
    match packet:
        case ReadRequest() | WriteRequest():
            w.u16(Opcode.RRQ if isinstance(packet, ReadRequest) else Opcode.WRQ)
            w.raw(_encode_str(packet.filename)).u8(0)
            w.raw(_encode_str(packet.mode)).u8(0)
            _put_options(w, packet.options)
        case Data(block=block, data=payload):
            w.u16(Opcode.DATA).u16(_u16(block)).raw(payload)
        case Ack(block=block):
            w.u16(Opcode.ACK).u16(_u16(block))
        case Error(code=code, message=message):
            w.u16(Opcode.ERROR).u16(_u16(code)).raw(_encode_str(message)).u8(0)
        case OptionAck(options=options):
            w.u16(Opcode.OACK)
            _put_options(w, options)
        case _:
            raise TypeError(f"not a TFTP packet: {packet!r}")
    return w.getvalue()


def _u16(value: int) -> int:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"16-bit field out of range: {value}")
    return value


def _put_options(w: Writer, options: Options) -> None:
    for name, value in options:
        w.raw(_encode_str(name)).u8(0).raw(_encode_str(value)).u8(0)


def error_bytes(code: int, message: str) -> bytes:
    """A ready-to-send ERROR datagram."""
    return encode(Error(code, message))
