"""DHCP message codec (RFC 2131 §2, options per RFC 2132 §2, RFC 3396).

``parse(data)`` turns bytes into a :class:`DhcpPacket` or raises
:class:`~mobinux.errors.MalformedPacket`; ``packet.encode()`` turns it back.

Options are an ordered ``dict`` code -> value. Two transport details are
handled here and never show in that dict:

* RFC 3396 §5/§7: an option longer than 255 octets travels as several
  instances of the same code; ``parse`` concatenates every instance of a code
  (in the order options field, then 'file', then 'sname'), ``encode`` splits.
* RFC 2132 §9.3: option overload (52). ``parse`` reads options from the
  'file' / 'sname' fields when 52 says so (those fields then parse as empty);
  ``encode(max_size=...)`` spills options into empty 'file' / 'sname' fields
  when the options field would otherwise exceed *max_size*.

So ``parse(encode(p)) == p`` for every valid packet. Parsing is written as
explicit bounds-checked loops over ``bytes`` (not through ``_wire.Reader``)
because it runs for every DHCP packet; every read is checked against the end
of the area it belongs to.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from mobinux.dhcp.constants import (
    FIXED_HEADER_LEN,
    MAGIC_COOKIE,
    MIN_MESSAGE_LEN,
    OPTIONS_OFFSET,
    HType,
    Op,
    OptionCode,
    Overload,
)
from mobinux.errors import MalformedPacket

__all__ = ["ZERO", "DhcpPacket", "PacketTooLarge", "parse"]

# RFC 2131 §2, figure 1: op htype hlen hops xid secs flags ciaddr yiaddr siaddr
# giaddr chaddr(16) sname(64) file(128).
_HEADER = struct.Struct("!BBBBIHHIIII16s64s128s")
assert _HEADER.size == FIXED_HEADER_LEN

ZERO = IPv4Address(0)
_SNAME_LEN = 64
_FILE_LEN = 128
_CHADDR_LEN = 16
_END = OptionCode.END
_PAD = OptionCode.PAD
_OVERLOAD = OptionCode.OPTION_OVERLOAD
_SNAME_SLICE = slice(44, 44 + _SNAME_LEN)
_FILE_SLICE = slice(108, 108 + _FILE_LEN)


class PacketTooLarge(ValueError):
    """The options do not fit in the requested maximum message size."""


def _addr(value: int) -> IPv4Address:
    return ZERO if value == 0 else IPv4Address(value)


@dataclass(slots=True)
class DhcpPacket:
    """One DHCP message (RFC 2131 §2).

    ``chaddr`` is always the full 16-octet field (shorter values are padded);
    ``sname`` and ``file`` are the field contents without trailing NULs.
    ``options`` maps option code to its (concatenated) value, in wire order.
    """

    op: int = Op.BOOTREQUEST
    htype: int = HType.ETHERNET
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = ZERO
    yiaddr: IPv4Address = ZERO
    siaddr: IPv4Address = ZERO
    giaddr: IPv4Address = ZERO
    chaddr: bytes = b""
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.chaddr) != _CHADDR_LEN:
            if len(self.chaddr) > _CHADDR_LEN:
                raise ValueError("chaddr longer than 16 octets")
            self.chaddr = self.chaddr.ljust(_CHADDR_LEN, b"\0")
        if self.sname.endswith(b"\0"):
            self.sname = self.sname.rstrip(b"\0")
        if self.file.endswith(b"\0"):
            self.file = self.file.rstrip(b"\0")

    # -- convenience accessors -------------------------------------------------

    @property
    def hwaddr(self) -> bytes:
        """The client hardware address: the first ``hlen`` octets of chaddr."""
        return self.chaddr[: min(self.hlen, _CHADDR_LEN)]

    @property
    def mac(self) -> str:
        """Hardware address as lower-case colon-separated hex ("52:54:00:...")."""
        return self.hwaddr.hex(":")

    @property
    def message_type(self) -> int | None:
        """Option 53 (RFC 2132 §9.6), or None for BOOTP / a malformed value."""
        v = self.options.get(53)
        if v is None or len(v) != 1:
            return None
        return v[0]

    def option_address(self, code: int) -> IPv4Address | None:
        """An option holding one IPv4 address (e.g. 50, 54), None if absent or bad."""
        v = self.options.get(code)
        if v is None or len(v) != 4:
            return None
        return IPv4Address(v)

    # -- encoding ----------------------------------------------------------------

    def encode(self, max_size: int | None = None) -> bytes:
        """The wire form; raises ``ValueError`` for an unencodable packet.

        *max_size* limits the whole DHCP message (UDP payload). When the
        options do not fit, they spill into 'file' and 'sname' if those are
        empty (RFC 2132 §9.3); :class:`PacketTooLarge` when even that fails.
        """
        body = bytearray()
        for code, value in self.options.items():
            if not 0 < code < 255 or code == _OVERLOAD:
                raise ValueError(f"option code {code} cannot be set directly")
            n = len(value)
            if n <= 255:
                body.append(code)
                body.append(n)
                body += value
            else:
                # RFC 3396 §7: split into instances of at most 255 octets, in order.
                for i in range(0, n, 255):
                    chunk = value[i : i + 255]
                    body.append(code)
                    body.append(len(chunk))
                    body += chunk
        sname = self.sname
        file = self.file
        if len(sname) > _SNAME_LEN or len(file) > _FILE_LEN:
            raise ValueError("sname or file too long")
        overload = 0
        if max_size is not None and OPTIONS_OFFSET + len(body) + 1 > max_size:
            body, file, sname = self._overload(self._instances(body), max_size)
            overload = 1
        head = _HEADER.pack(
            self.op,
            self.htype,
            self.hlen,
            self.hops,
            self.xid,
            self.secs,
            self.flags,
            int(self.ciaddr),
            int(self.yiaddr),
            int(self.siaddr),
            int(self.giaddr),
            self.chaddr,
            sname,
            file,
        )
        out = head + MAGIC_COOKIE + body + b"\xff"
        if overload:
            return out
        if len(out) < MIN_MESSAGE_LEN:
            out += bytes(MIN_MESSAGE_LEN - len(out))
        return out

    @staticmethod
    def _instances(body: bytearray) -> list[bytes]:
        """Cut an encoded option sequence back into its instances."""
        out = []
        i = 0
        while i < len(body):
            j = i + 2 + body[i + 1]
            out.append(bytes(body[i:j]))
            i = j
        return out

    def _overload(self, instances: list[bytes], max_size: int) -> tuple[bytearray, bytes, bytes]:
        # Areas in RFC 3396 §6 order: options, then file, then sname. Each area
        # ends with END (RFC 2132 §9.3); the options field also carries 52 (3 octets).
        caps = [max_size - OPTIONS_OFFSET - 1 - 3]
        names = ["options"]
        if not self.file:
            caps.append(_FILE_LEN - 1)
            names.append("file")
        if not self.sname:
            caps.append(_SNAME_LEN - 1)
            names.append("sname")
        areas: list[list[bytes]] = [[] for _ in caps]
        used = [0] * len(caps)
        k = 0
        for inst in instances:
            while k < len(caps) and used[k] + len(inst) > caps[k]:
                k += 1
            if k == len(caps):
                raise PacketTooLarge(f"options do not fit in {max_size} octets")
            areas[k].append(inst)
            used[k] += len(inst)
        flag = 0
        file = self.file
        sname = self.sname
        for name, area in zip(names[1:], areas[1:], strict=True):
            if not area:
                continue
            data = b"".join(area) + b"\xff"
            if name == "file":
                flag |= Overload.FILE
                file = data.ljust(_FILE_LEN, b"\0")
            else:
                flag |= Overload.SNAME
                sname = data.ljust(_SNAME_LEN, b"\0")
        body = bytearray(b"".join(areas[0]))
        if flag:
            body += bytes((_OVERLOAD, 1, flag))
        return body, file, sname


def _parse_area(data: bytes, start: int, end: int, opts: dict[int, bytes]) -> int:
    """Parse options in data[start:end] into *opts*; return option 52's value or 0."""
    overload = 0
    i = start
    while i < end:
        code = data[i]
        if code == _PAD:
            i += 1
            continue
        if code == _END:
            break
        if i + 1 >= end:
            raise MalformedPacket(f"option {code} at offset {i} has no length")
        n = data[i + 1]
        j = i + 2 + n
        if j > end:
            raise MalformedPacket(f"option {code} at offset {i} overruns its area")
        value = data[i + 2 : j]
        if code == _OVERLOAD:
            if n != 1 or not 1 <= value[0] <= 3:
                raise MalformedPacket("bad option overload value")
            overload = value[0]
        elif code in opts:
            # RFC 3396 §5: every instance of one code is concatenated, in order.
            opts[code] += value
        else:
            opts[code] = value
        i = j
    return overload


def parse(data: bytes | bytearray | memoryview) -> DhcpPacket:
    """Decode one DHCP message; raises :class:`MalformedPacket` if it is not one."""
    if not isinstance(data, bytes):
        data = bytes(data)
    n = len(data)
    if n < OPTIONS_OFFSET:
        raise MalformedPacket(f"DHCP message too short: {n} octets")
    if data[FIXED_HEADER_LEN:OPTIONS_OFFSET] != MAGIC_COOKIE:
        raise MalformedPacket("no DHCP magic cookie (BOOTP or garbage)")
    (op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file) = (
        _HEADER.unpack_from(data)
    )
    opts: dict[int, bytes] = {}
    overload = _parse_area(data, OPTIONS_OFFSET, n, opts)
    if overload:
        # RFC 2132 §9.3 / RFC 3396 §6: options continue in 'file', then 'sname'.
        # An overload option inside these areas is ignored.
        if overload & Overload.FILE:
            _parse_area(data, _FILE_SLICE.start, _FILE_SLICE.stop, opts)
            file = b""
        if overload & Overload.SNAME:
            _parse_area(data, _SNAME_SLICE.start, _SNAME_SLICE.stop, opts)
            sname = b""
    return DhcpPacket(
        op=op,
        htype=htype,
        hlen=hlen,
        hops=hops,
        xid=xid,
        secs=secs,
        flags=flags,
        ciaddr=_addr(ci),
        yiaddr=_addr(yi),
        siaddr=_addr(si),
        giaddr=_addr(gi),
        chaddr=chaddr,
        sname=sname.rstrip(b"\0"),
        file=file.rstrip(b"\0"),
        options=opts,
    )
