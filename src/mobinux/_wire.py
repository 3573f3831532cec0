"""Bounded binary reader and writer shared by every packet codec.

The reader never reads past the end of its buffer (or of a declared sub-length):
any attempt raises :class:`MalformedPacket`, so codecs cannot over-read on
truncated or lying input.
"""

from __future__ import annotations

import struct

from mobinux.errors import MalformedPacket

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class Reader:
    __slots__ = ("_buf", "_end", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> None:
        self._buf = memoryview(data)
        self._pos = start
        self._end = len(self._buf) if end is None else end
        if not 0 <= self._pos <= self._end <= len(self._buf):
            raise MalformedPacket("reader bounds outside buffer")

    @property
    def pos(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > self._end:
            raise MalformedPacket(f"truncated: need {n} bytes at offset {self._pos}, have {self._end - self._pos}")
        view = self._buf[self._pos : self._pos + n]
        self._pos += n
        return view

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def raw(self, n: int) -> bytes:
        return bytes(self._take(n))

    def rest(self) -> bytes:
        return self.raw(self.remaining)

    def sub(self, n: int) -> Reader:
        """A reader over the next *n* bytes; this reader skips past them."""
        start = self._pos
        self._take(n)
        return Reader(self._buf, start, start + n)


class Writer:
    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def u8(self, v: int) -> Writer:
        self._buf.append(v)
        return self

    def u16(self, v: int) -> Writer:
        self._buf += _U16.pack(v)
        return self

    def u32(self, v: int) -> Writer:
        self._buf += _U32.pack(v)
        return self

    def raw(self, b: bytes | bytearray | memoryview) -> Writer:
        self._buf += b
        return self

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)
