"""iSCSI PDU framing (RFC 7143 §11.2): split a byte stream into PDUs, and build them.

A PDU is a 48-byte Basic Header Segment (BHS), optional Additional Header
Segments (TotalAHSLength in 4-byte words), an optional header digest, a data
segment padded to a multiple of 4 bytes, and an optional data digest
(§11.2). This module knows the generic layout only; what the fields of each
opcode mean is read by the modules that handle them, through the accessors of
:class:`Pdu` and the ``u32``/``u16`` helpers.

:class:`PduReader` is sans-I/O: ``feed(bytes)`` then ``next_pdu()`` until it
returns None. It checks digests once they are enabled and refuses data
segments longer than this side declared in MaxRecvDataSegmentLength, so a
peer cannot make it buffer without bound (§13.12). Every violation raises
:class:`~mobinux.errors.MalformedPacket`; the caller drops the connection
(ErrorRecoveryLevel 0, §7.1.4).
"""

from __future__ import annotations

import struct

import crc32c as _crc32c

from mobinux.errors import MalformedPacket
from mobinux.iscsi.constants import BHS_LEN, DIGEST_LEN, FINAL_BIT, IMMEDIATE_BIT, OPCODE_MASK

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_LE32 = struct.Struct("<I")
# TotalAHSLength is one byte of 4-byte words (§11.2.1.4).
MAX_AHS_LEN = 255 * 4


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C (Castagnoli) as iSCSI digests use it (§12.1), from a C implementation."""
    return int(_crc32c.crc32c(data, value))


def digest_bytes(*parts: bytes | bytearray | memoryview) -> bytes:
    """The 4 digest bytes over *parts*, in the order the wire carries them.

    iSCSI sends the CRC32C least significant byte first (§12.1 and the
    examples in Appendix B.4 of RFC 3720/§13.1 of RFC 7143).
    """
    crc = 0
    for part in parts:
        crc = _crc32c.crc32c(part, crc)
    return _LE32.pack(crc)


def pad_len(n: int) -> int:
    """Bytes of padding after a data segment of *n* bytes (§11.2.3: to a 4-byte boundary)."""
    return -n & 3


_PADDING = (b"", b"\0\0\0", b"\0\0", b"\0")


class Pdu:
    """One received PDU: the BHS, the AHS bytes and the data segment (without padding or digests).

    Fields are read straight from the BHS; no parsing beyond the generic
    layout happens until a handler asks for a field.
    """

    __slots__ = ("ahs", "bhs", "data")

    def __init__(self, bhs: bytes, ahs: bytes = b"", data: bytes = b"") -> None:
        if len(bhs) != BHS_LEN:
            raise MalformedPacket(f"BHS must be {BHS_LEN} bytes, got {len(bhs)}")
        self.bhs = bhs
        self.ahs = ahs
        self.data = data

    @property
    def opcode(self) -> int:
        return self.bhs[0] & OPCODE_MASK

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & IMMEDIATE_BIT)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & FINAL_BIT)

    @property
    def itt(self) -> int:
        return self.u32(16)

    @property
    def lun(self) -> int:
        """The LUN field (bytes 8-15) decoded in the flat and peripheral addressing SAM uses.

        Only single-level LUNs exist here (SAM-5 §4.7): peripheral device
        addressing on bus 0 or flat space addressing in the first two bytes,
        the rest zero. Anything else is -1, which matches no LUN.
        """
        first, second = self.bhs[8], self.bhs[9]
        if any(self.bhs[10:16]):
            return -1  # a multi-level LUN never matches a configured one
        method = first >> 6
        if method == 0:  # peripheral device addressing: bus 0 only
            return second if first == 0 else -1
        if method == 1:  # flat space addressing: a 14-bit LUN
            return ((first & 0x3F) << 8) | second
        return -1

    @property
    def lun_bytes(self) -> bytes:
        return self.bhs[8:16]

    def u32(self, offset: int) -> int:
        return int(_U32.unpack_from(self.bhs, offset)[0])

    def u16(self, offset: int) -> int:
        return int(_U16.unpack_from(self.bhs, offset)[0])

    def __repr__(self) -> str:
        return f"Pdu(opcode=0x{self.opcode:02x}, itt=0x{self.itt:08x}, data={len(self.data)})"


class PduReader:
    """Reassembles PDUs from a TCP byte stream (sans-I/O).

    ``max_data_segment`` is the MaxRecvDataSegmentLength this side declared
    (8192 during login, §13.12); a longer data segment is a protocol error.
    Digests are switched on with :meth:`enable_digests` after login, since
    they apply from the first PDU of the full-feature phase (§13.1).
    """

    __slots__ = ("_buf", "_pos", "data_digest", "header_digest", "max_data_segment")

    def __init__(self, max_data_segment: int = 8192) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_data_segment = max_data_segment
        self.header_digest = False
        self.data_digest = False

    def enable_digests(self, header: bool, data: bool) -> None:
        self.header_digest = header
        self.data_digest = data

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos:
            # Compact lazily: drop consumed bytes only when new ones arrive.
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_pdu(self) -> Pdu | None:
        """The next complete PDU, or None when more bytes are needed."""
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < BHS_LEN:
            return None
        ahs_len = buf[pos + 4] * 4
        data_len = (buf[pos + 5] << 16) | (buf[pos + 6] << 8) | buf[pos + 7]
        if data_len > self.max_data_segment:
            raise MalformedPacket(
                f"data segment of {data_len} bytes exceeds MaxRecvDataSegmentLength {self.max_data_segment}"
            )
        hd = DIGEST_LEN if self.header_digest else 0
        dd = DIGEST_LEN if self.data_digest and data_len else 0
        total = BHS_LEN + ahs_len + hd + data_len + pad_len(data_len) + dd
        if avail < total:
            return None
        header_end = pos + BHS_LEN + ahs_len
        view = memoryview(buf)
        try:
            if hd:
                want = _LE32.unpack_from(buf, header_end)[0]
                if _crc32c.crc32c(view[pos:header_end]) != want:
                    raise MalformedPacket("header digest mismatch")
            data_start = header_end + hd
            data_end = data_start + data_len
            if dd:
                padded_end = data_end + pad_len(data_len)
                want = _LE32.unpack_from(buf, padded_end)[0]
                if _crc32c.crc32c(view[data_start:padded_end]) != want:
                    raise DataDigestError("data digest mismatch")
            pdu = Pdu(
                bytes(view[pos : pos + BHS_LEN]),
                bytes(view[pos + BHS_LEN : header_end]),
                bytes(view[data_start:data_end]),
            )
        finally:
            view.release()
        self._pos = pos + total
        return pdu


class DataDigestError(MalformedPacket):
    """A data digest did not match (§7.8: the PDU is discarded; at ERL 0 the connection drops)."""


def encode_pdu(
    bhs: bytearray,
    data: bytes | bytearray | memoryview = b"",
    *,
    header_digest: bool = False,
    data_digest: bool = False,
) -> list[bytes | bytearray | memoryview]:
    """Wire buffers for one PDU: *bhs* (48 bytes, DataSegmentLength filled in here), padding, digests.

    Returns a list for ``transport.writelines`` so a large data segment is
    never copied into a new buffer.
    """
    n = len(data)
    bhs[4] = 0  # no AHS on target PDUs
    bhs[5] = (n >> 16) & 0xFF
    bhs[6] = (n >> 8) & 0xFF
    bhs[7] = n & 0xFF
    out: list[bytes | bytearray | memoryview] = [bhs]
    if header_digest:
        out.append(digest_bytes(bhs))
    if n:
        out.append(data)
        pad = _PADDING[n & 3]
        if pad:
            out.append(pad)
        if data_digest:
            out.append(digest_bytes(data, pad))
    return out


def new_bhs(opcode: int, flags: int = 0) -> bytearray:
    """A zeroed 48-byte BHS with the opcode and byte-1 flags set."""
    bhs = bytearray(BHS_LEN)
    bhs[0] = opcode
    bhs[1] = flags
    return bhs


def put_u32(bhs: bytearray, offset: int, value: int) -> None:
    _U32.pack_into(bhs, offset, value & 0xFFFFFFFF)


def put_u16(bhs: bytearray, offset: int, value: int) -> None:
    _U16.pack_into(bhs, offset, value & 0xFFFF)


def encode_lun(lun: int) -> bytes:
    """The 8-byte LUN field for a single-level LUN (SAM-5 §4.7.7: peripheral below 256, flat above)."""
    if lun < 256:
        return bytes([0, lun]) + b"\0" * 6
    return bytes([0x40 | (lun >> 8), lun & 0xFF]) + b"\0" * 6
