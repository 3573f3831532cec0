"""Compression formats of initrd segments: detection by magic, streaming codecs.

What the kernel can decompress (``lib/decompress.c``) and what Mobinux does
with it:

=========  ==========================  ==========================================
format     magic                       Mobinux
=========  ==========================  ==========================================
gzip       ``1f 8b``                   read + write (zlib; reproducible header)
xz         ``fd 37 7a 58 5a 00``       read + write (CRC32 check: the kernel's
                                       xz decoder does not verify SHA-256)
zstd       ``28 b5 2f fd``             read + write (``zstandard``)
lzma       ``5d 00 00``                read + write (legacy .lzma, stdlib)
bzip2      ``42 5a 68`` ("BZh")        read + write (stdlib)
lz4        ``02 21 4c 18``             read + write of the *legacy* frame the
                                       kernel uses (``lz4 -l``), blocks by liblz4
                                       (the ``lz4`` package). A legacy frame has no end marker: it must
                                       be the last segment or be followed by
                                       NUL padding, as for the kernel.
lzo        ``89 4c 5a 4f``             detected only; refused with a clear error
=========  ==========================  ==========================================

Every decoder is driven with an output limit, so a small "bomb" never becomes
a large allocation: gzip, xz, lzma and bzip2 natively (``max_length``), zstd
by feeding it 256 bytes of input at a time (a 4-byte zstd block expands to
at most 128 KiB, so one call yields at most ~8 MiB), lz4 per 8 MiB block.

gzip output is reproducible: the header carries no file name and mtime 0, as
``gzip -n`` writes it.
"""

from __future__ import annotations

import bz2
import enum
import io
import lzma
import struct
import zlib
from typing import Protocol

import lz4.block
import zstandard

from mobinux.errors import ImageError
from mobinux.images.cpio import SupportsRead, SupportsWrite


class Compression(enum.StrEnum):
    NONE = "none"
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"
    LZMA = "lzma"
    BZIP2 = "bzip2"
    LZ4 = "lz4"
    LZO = "lzo"


#: Formats Mobinux can both read and write.
SUPPORTED: frozenset[Compression] = frozenset(Compression) - {Compression.LZO}

_ALIASES = {
    "gz": Compression.GZIP,
    "zst": Compression.ZSTD,
    "bz2": Compression.BZIP2,
    "cat": Compression.NONE,
    "uncompressed": Compression.NONE,
    "lz4-legacy": Compression.LZ4,
}

#: Bytes of look-ahead :func:`detect` needs.
MAGIC_SIZE = 6

_MAGICS: tuple[tuple[bytes, Compression], ...] = (
    (b"0707", Compression.NONE),  # a cpio header: the kernel reads it as is
    (b"\x1f\x8b", Compression.GZIP),
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
    (b"\x5d\x00\x00", Compression.LZMA),
    (b"BZh", Compression.BZIP2),
    (b"\x02\x21\x4c\x18", Compression.LZ4),
    (b"\x89LZO", Compression.LZO),
)

DEFAULT_LEVEL = {
    Compression.GZIP: 9,
    Compression.XZ: 6,
    Compression.ZSTD: 10,
    Compression.LZMA: 6,
    Compression.BZIP2: 9,
}

CHUNK = 1 << 16
# Bounds on what a decoder may allocate, whatever the stream header claims.
_XZ_MEMLIMIT = 512 << 20
_ZSTD_MAX_WINDOW = 1 << 27
_ZSTD_FEED = 256
_LZ4_MAGIC = 0x184C2102
_LZ4_BLOCK = 8 << 20  # legacy frame: each block decompresses to at most 8 MiB
_LZ4_BOUND = _LZ4_BLOCK + _LZ4_BLOCK // 255 + 16  # LZ4_compressBound(8 MiB)


def parse_compression(name: str) -> Compression:
    """A compression name as a user types it ("gzip", "gz", "zstd", "none", ...)."""
    key = name.strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    try:
        kind = Compression(key)
    except ValueError:
        choices = ", ".join(sorted(c.value for c in SUPPORTED))
        raise ImageError(f"unknown compression {name!r} (choose from {choices})") from None
    if kind not in SUPPORTED:
        raise ImageError(f"{kind} compression is not supported")
    return kind


def detect(head: bytes) -> Compression | None:
    """The format whose magic starts *head* (``NONE`` for a bare cpio header), or None."""
    for magic, kind in _MAGICS:
        if head.startswith(magic):
            return kind
    return None


# ---------------------------------------------------------------- decoders


class Decoder(Protocol):
    """Incremental decompressor with a bound on each call's output."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    @property
    def needs_input(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int) -> bytes: ...

    def end_of_input(self) -> bool:
        """The input is exhausted: may the stream end here? (Sets ``eof`` if so.)"""
        ...


class _ZlibDecoder:
    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)  # 31: gzip wrapper only
        self._tail = b""

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused_data(self) -> bytes:
        # Once the stream has ended, CPython may leave a stale copy of the
        # leftover input in unconsumed_tail: unused_data alone is authoritative.
        return self._d.unused_data

    @property
    def needs_input(self) -> bool:
        return not self._tail

    def decompress(self, data: bytes, max_length: int) -> bytes:
        out = self._d.decompress(self._tail + data, max_length)
        self._tail = b"" if self._d.eof else self._d.unconsumed_tail
        return out

    def end_of_input(self) -> bool:
        return self._d.eof


class _StdlibDecoder:
    """lzma.LZMADecompressor and bz2.BZ2Decompressor share this interface."""

    def __init__(self, d: lzma.LZMADecompressor | bz2.BZ2Decompressor) -> None:
        self._d = d

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    @property
    def needs_input(self) -> bool:
        return self._d.needs_input

    def decompress(self, data: bytes, max_length: int) -> bytes:
        try:
            return self._d.decompress(data, max_length)
        except EOFError:
            return b""

    def end_of_input(self) -> bool:
        return self._d.eof


class _ZstdDecoder:
    """zstandard's decompressobj has no output limit: feed it small pieces instead."""

    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).decompressobj()
        self._in = b""
        self._out = b""
        self._pos = 0
        self._done = False

    @property
    def eof(self) -> bool:
        return self._done and self._pos == len(self._out)

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data + self._in if self._done else b""

    @property
    def needs_input(self) -> bool:
        return not self._in and self._pos == len(self._out) and not self._done

    def decompress(self, data: bytes, max_length: int) -> bytes:
        self._in += data
        while self._pos == len(self._out) and self._in and not self._done:
            piece, self._in = self._in[:_ZSTD_FEED], self._in[_ZSTD_FEED:]
            self._out = self._d.decompress(piece)
            self._pos = 0
            if self._d.eof:
                self._done = True
        out = self._out[self._pos : self._pos + max_length]
        self._pos += len(out)
        return out

    def end_of_input(self) -> bool:
        return self.eof


class _Lz4LegacyDecoder:
    """The legacy LZ4 frame: magic, then (u32 LE size, LZ4 block) until the end."""

    def __init__(self) -> None:
        self._in = bytearray()
        self._out = b""
        self._magic_seen = False
        self._done = False

    @property
    def eof(self) -> bool:
        return self._done and not self._out

    @property
    def unused_data(self) -> bytes:
        return bytes(self._in) if self._done else b""

    @property
    def needs_input(self) -> bool:
        return not self._out and not self._done

    def decompress(self, data: bytes, max_length: int) -> bytes:
        self._in += data
        while not self._out and not self._done:
            if not self._magic_seen:
                if len(self._in) < 4:
                    break
                if struct.unpack_from("<I", self._in)[0] != _LZ4_MAGIC:
                    raise ImageError("lz4 stream without the legacy frame magic")
                del self._in[:4]
                self._magic_seen = True
                continue
            if len(self._in) < 4:
                break
            size = struct.unpack_from("<I", self._in)[0]
            if size == _LZ4_MAGIC:  # a concatenated legacy stream continues this one
                del self._in[:4]
                continue
            if size == 0 or size > _LZ4_BOUND:
                # Not a block size: the frame has ended (padding or the next segment).
                self._done = True
                break
            if len(self._in) < 4 + size:
                break
            block = bytes(self._in[4 : 4 + size])
            del self._in[: 4 + size]
            self._out = lz4_block_decompress(block, _LZ4_BLOCK)
        out, self._out = self._out[:max_length], self._out[max_length:]
        return out

    def end_of_input(self) -> bool:
        if self._magic_seen and not self._in and not self._out:
            self._done = True
        return self.eof


def new_decoder(kind: Compression) -> Decoder:
    if kind is Compression.GZIP:
        return _ZlibDecoder()
    if kind is Compression.XZ:
        return _StdlibDecoder(lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT))
    if kind is Compression.LZMA:
        return _StdlibDecoder(lzma.LZMADecompressor(lzma.FORMAT_ALONE, memlimit=_XZ_MEMLIMIT))
    if kind is Compression.BZIP2:
        return _StdlibDecoder(bz2.BZ2Decompressor())
    if kind is Compression.ZSTD:
        return _ZstdDecoder()
    if kind is Compression.LZ4:
        return _Lz4LegacyDecoder()
    raise ImageError(f"cannot decompress {kind} data")


# ---------------------------------------------------------------- encoders


class Encoder(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _GzipEncoder:
    """RFC 1952 member with mtime 0, no name, OS 3 (Unix): what ``gzip -n`` writes."""

    def __init__(self, level: int) -> None:
        self._c = zlib.compressobj(level, zlib.DEFLATED, -15)
        self._crc = 0
        self._size = 0
        xfl = 2 if level == 9 else 4 if level == 1 else 0
        self._header: bytes | None = b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + bytes([xfl, 3])

    def _take_header(self) -> bytes:
        head, self._header = self._header or b"", None
        return head

    def compress(self, data: bytes) -> bytes:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        return self._take_header() + self._c.compress(data)

    def flush(self) -> bytes:
        tail = struct.pack("<II", self._crc, self._size & 0xFFFFFFFF)
        return self._take_header() + self._c.flush() + tail


class _StdlibEncoder:
    def __init__(self, c: lzma.LZMACompressor | bz2.BZ2Compressor) -> None:
        self._c = c

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


class _ZstdEncoder:
    def __init__(self, level: int) -> None:
        # threads=0: single-threaded, so the output does not depend on the machine.
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0)
        self._c = cctx.compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


class _Lz4LegacyEncoder:
    def __init__(self) -> None:
        self._pending = bytearray()
        self._started = False

    def _blocks(self, final: bool) -> bytes:
        out = bytearray()
        if not self._started:
            out += struct.pack("<I", _LZ4_MAGIC)
            self._started = True
        while len(self._pending) >= _LZ4_BLOCK or (final and self._pending):
            block = bytes(self._pending[:_LZ4_BLOCK])
            del self._pending[:_LZ4_BLOCK]
            packed = lz4_block_compress(block)
            out += struct.pack("<I", len(packed)) + packed
        return bytes(out)

    def compress(self, data: bytes) -> bytes:
        self._pending += data
        return self._blocks(final=False)

    def flush(self) -> bytes:
        return self._blocks(final=True)


def new_encoder(kind: Compression, level: int | None = None) -> Encoder:
    if level is None:
        level = DEFAULT_LEVEL.get(kind, 0)
    if kind is Compression.NONE:
        return _Identity()
    if kind is Compression.GZIP:
        return _GzipEncoder(level)
    if kind is Compression.XZ:
        # The kernel's XZ embedded decoder supports CRC32/CRC64 checks, not SHA-256.
        return _StdlibEncoder(
            lzma.LZMACompressor(lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=level)
        )
    if kind is Compression.LZMA:
        return _StdlibEncoder(lzma.LZMACompressor(lzma.FORMAT_ALONE, preset=level))
    if kind is Compression.BZIP2:
        return _StdlibEncoder(bz2.BZ2Compressor(level))
    if kind is Compression.ZSTD:
        return _ZstdEncoder(level)
    if kind is Compression.LZ4:
        return _Lz4LegacyEncoder()
    raise ImageError(f"cannot compress to {kind}")


# ---------------------------------------------------------------- streams


class ByteSource:
    """A readable with look-ahead and push-back, counting the bytes consumed.

    Segments of an initrd follow each other without lengths: a decoder learns
    where its stream ended only after reading past it, and gives the excess
    back with :meth:`unread`.
    """

    def __init__(self, raw: SupportsRead, offset: int = 0) -> None:
        self._raw = raw
        self._buf = b""
        self._offset = offset

    @property
    def offset(self) -> int:
        return self._offset

    def read(self, size: int) -> bytes:
        if size <= 0:
            return b""
        if self._buf:
            out, self._buf = self._buf[:size], self._buf[size:]
        else:
            out = self._raw.read(size)[:size]
        self._offset += len(out)
        return out

    def peek(self, size: int) -> bytes:
        while len(self._buf) < size:
            more = self._raw.read(max(size - len(self._buf), CHUNK))
            if not more:
                break
            self._buf += more
        return self._buf[:size]

    def unread(self, data: bytes) -> None:
        if data:
            self._buf = data + self._buf
            self._offset -= len(data)

    def skip_nuls(self) -> int:
        """Consume NUL bytes; return how many."""
        skipped = 0
        while True:
            head = self.peek(CHUNK)
            if not head:
                return skipped
            rest = head.lstrip(b"\x00")
            n = len(head) - len(rest)
            self.read(n)
            skipped += n
            if rest:
                return skipped


class DecompressingReader:
    """Decompressed bytes of the one stream starting at *source*'s position.

    Reading stops at the end of the compressed stream; the compressed bytes
    after it are pushed back into *source*, which then stands right after the
    stream (``compressed_size`` tells how long the stream was).
    """

    def __init__(self, source: ByteSource, kind: Compression) -> None:
        self._src = source
        self._kind = kind
        self._dec = new_decoder(kind)
        self._start = source.offset
        self._eof = False
        self.compressed_size = 0
        self.decompressed_size = 0

    @property
    def eof(self) -> bool:
        return self._eof

    def _finish(self) -> None:
        self._eof = True
        self._src.unread(self._dec.unused_data)
        self.compressed_size = self._src.offset - self._start

    def read(self, size: int) -> bytes:
        size = max(1, min(size, CHUNK))
        idle = 0
        try:
            while not self._eof:
                if not self._dec.needs_input:
                    out = self._dec.decompress(b"", size)
                    idle = 0 if out else idle + 1
                    if idle > 1000:  # a decoder that neither wants input nor yields output
                        raise ImageError(
                            f"{self._kind} decoder stalled at offset {self._src.offset}"
                        )
                else:
                    data = self._src.read(CHUNK)
                    out = self._dec.decompress(data, size)
                    if not data and not out:
                        if self._dec.end_of_input():
                            self._finish()
                            break
                        raise ImageError(
                            f"{self._kind} stream starting at offset {self._start} is truncated"
                        )
                if self._dec.eof:
                    self._finish()
                if out:
                    self.decompressed_size += len(out)
                    return out
        except (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError) as exc:
            raise ImageError(
                f"corrupt {self._kind} stream starting at offset {self._start}: {exc}"
            ) from exc
        return b""

    def drain(self) -> int:
        """Read to the end of the stream; return how many decompressed bytes that was."""
        n = 0
        while chunk := self.read(CHUNK):
            n += len(chunk)
        return n


class CompressingWriter:
    """Compresses what is written into *stream*; :meth:`close` ends the stream."""

    def __init__(self, stream: SupportsWrite, kind: Compression, level: int | None = None) -> None:
        self._stream = stream
        self._enc = new_encoder(kind, level)
        self.raw_bytes = 0
        self.compressed_bytes = 0
        self._closed = False

    def _put(self, data: bytes) -> None:
        if data:
            self._stream.write(data)
            self.compressed_bytes += len(data)

    def write(self, data: bytes) -> int:
        if self._closed:
            raise ImageError("write to a closed compressed stream")
        self.raw_bytes += len(data)
        self._put(self._enc.compress(bytes(data)))
        return len(data)

    def close(self) -> None:
        if not self._closed:
            self._put(self._enc.flush())
            self._closed = True


def compress_bytes(data: bytes, kind: Compression, level: int | None = None) -> bytes:
    enc = new_encoder(kind, level)
    return enc.compress(data) + enc.flush()


def decompress_bytes(data: bytes, kind: Compression, *, max_size: int) -> bytes:
    """Decompress one stream held in memory, refusing output above *max_size* bytes.

    Data after the end of the stream is ignored (use :class:`DecompressingReader`
    to find where it starts).
    """
    if kind is Compression.NONE:
        if len(data) > max_size:
            raise ImageError(f"data larger than {max_size} bytes")
        return data
    reader = DecompressingReader(ByteSource(io.BytesIO(data)), kind)
    parts: list[bytes] = []
    total = 0
    while chunk := reader.read(CHUNK):
        total += len(chunk)
        if total > max_size:
            raise ImageError(f"{kind} data decompresses to more than {max_size} bytes")
        parts.append(chunk)
    return b"".join(parts)


# ---------------------------------------------------------------- LZ4 blocks
# The block codec is liblz4 through the lz4 package; only the legacy frame
# around the blocks (magic, u32 sizes) is written here.


def lz4_block_decompress(src: bytes, max_out: int) -> bytes:
    """Decode one raw LZ4 block (lz4's doc/lz4_Block_format.md) of at most *max_out* bytes."""
    try:
        return bytes(lz4.block.decompress(src, uncompressed_size=max_out))
    except lz4.block.LZ4BlockError as exc:
        raise ImageError(f"lz4 block: corrupt, or larger than the block limit of {max_out} bytes "
                         f"({exc})") from None


def lz4_block_compress(src: bytes) -> bytes:
    """One raw LZ4 block, high compression (as ``lz4 -l -9``, what kernels' initramfs use)."""
    return bytes(lz4.block.compress(src, store_size=False, mode="high_compression", compression=9))
