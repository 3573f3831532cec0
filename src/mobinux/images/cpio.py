"""The SVR4 "newc" cpio format, as the Linux kernel unpacks it into rootfs.

Format (Documentation/driver-api/early-userspace/buffer-format.rst in the
kernel tree; cpio(5)): every entry is a 110-byte ASCII header, the
NUL-terminated name, NULs up to a multiple of 4 bytes, the file data, NULs up
to a multiple of 4 again. The header is the magic ``070701`` (or ``070702``:
same layout, ``check`` holds the 32-bit sum of the data bytes of a regular
file) followed by 13 fields of 8 hexadecimal digits. An entry named
``TRAILER!!!`` ends the archive.

Hard links (newc, as GNU cpio writes them and ``init/initramfs.c`` expects):
every name of a multiply-linked regular file has the same ``ino`` and an
``nlink`` above 1; only the *last* of them carries the data, the others have
``filesize`` 0. The kernel creates the first name and links the others to it,
so the data lands in the shared inode.

Both the reader and the writer stream: the reader hands out a header, then the
data in bounded chunks; the writer copies file data from a readable object.
Nothing here trusts a length field beyond the bytes actually present: a name
longer than ``PATH_MAX`` is refused before it is read, file data is consumed in
chunks of at most :data:`CHUNK` bytes, and running out of input raises
:class:`~mobinux.errors.ImageError` with the offset of the failure.
"""

from __future__ import annotations

import io
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

from mobinux.errors import ImageError

NEWC_MAGIC = b"070701"
CRC_MAGIC = b"070702"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
#: Longest name accepted, NUL included: the kernel's PATH_MAX (init/initramfs.c
#: refuses longer names too).
MAX_NAME_SIZE = 4096
#: Largest piece of file data read or written at once.
CHUNK = 1 << 16
_U32_MAX = 0xFFFFFFFF
_HEX_FIELDS = re.compile(rb"[0-9A-Fa-f]{104}")
_FIELD_NAMES = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "dev_major",
    "dev_minor",
    "rdev_major",
    "rdev_minor",
    "namesize",
    "check",
)


class SupportsRead(Protocol):
    """Anything with ``read(n)`` returning at most *n* bytes (b"" at the end)."""

    def read(self, size: int, /) -> bytes: ...


class SupportsWrite(Protocol):
    def write(self, data: bytes, /) -> object: ...


def encode_name(name: str) -> bytes:
    """Archive names are bytes; Mobinux carries them as UTF-8 ``str`` with
    ``surrogateescape``, a lossless mapping for any byte string."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ImageError(f"name {name!r} cannot be encoded") from exc


def decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _align4(n: int) -> int:
    return (-n) & 3


@dataclass(frozen=True, slots=True)
class CpioHeader:
    """One newc header. ``mode`` holds the file type bits and the permissions."""

    name: str
    mode: int
    ino: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = 0
    filesize: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0
    check: int = 0

    @property
    def file_type(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def permissions(self) -> int:
        return stat.S_IMODE(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def encode(self, *, crc: bool = False) -> bytes:
        """Header, name, and the NULs that align the data to 4 bytes."""
        raw_name = encode_name(self.name)
        if not raw_name or b"\x00" in raw_name:
            raise ImageError(f"invalid cpio entry name {self.name!r}")
        namesize = len(raw_name) + 1
        if namesize > MAX_NAME_SIZE:
            raise ImageError(
                f"cpio entry name longer than {MAX_NAME_SIZE - 1} bytes: {self.name[:60]!r}..."
            )
        values = (
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.mtime,
            self.filesize,
            self.dev_major,
            self.dev_minor,
            self.rdev_major,
            self.rdev_minor,
            namesize,
            self.check if crc else 0,
        )
        for fname, value in zip(_FIELD_NAMES, values, strict=True):
            if not 0 <= value <= _U32_MAX:
                raise ImageError(
                    f"cpio field {fname}={value} of {self.name!r} does not fit in 32 bits"
                )
        head = (CRC_MAGIC if crc else NEWC_MAGIC) + b"".join(b"%08X" % v for v in values)
        return head + raw_name + b"\x00" * (1 + _align4(HEADER_SIZE + namesize))


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """A header and its whole data, for archives small enough to hold in memory."""

    header: CpioHeader
    data: bytes = field(default=b"")

    def __post_init__(self) -> None:
        if self.header.filesize != len(self.data):
            raise ValueError(f"filesize {self.header.filesize} != len(data) {len(self.data)}")


def data_checksum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The ``070702`` check value: the sum of the bytes, modulo 2**32."""
    return (start + sum(data)) & _U32_MAX


class CpioReader:
    """Reads one archive from *stream*, entry by entry, up to its trailer.

    ``next()`` returns the next :class:`CpioHeader` (``None`` after the
    trailer); the entry's data is then available through :meth:`read` /
    :meth:`iter_data` / :meth:`read_all`, and whatever is left unread is
    skipped by the next call to ``next()``. The reader never reads past the
    trailer's padding, so several archives (or other data) may follow in the
    same stream. *base_offset* is added to offsets reported in errors.

    ``070702`` checksums of regular files are verified once their data has
    been consumed (read or skipped).
    """

    def __init__(
        self, stream: SupportsRead, *, base_offset: int = 0, verify_checksum: bool = True
    ) -> None:
        self._stream = stream
        self._offset = base_offset
        self._remaining = 0  # data bytes of the current entry not consumed yet
        self._padding = 0  # NULs after the current entry's data
        self._current: CpioHeader | None = None
        self._crc_format = False
        self._sum = 0
        self._verify = verify_checksum
        self._finished = False

    @property
    def offset(self) -> int:
        """Offset (from the start of the stream plus *base_offset*) of the next byte to read."""
        return self._offset

    @property
    def finished(self) -> bool:
        """True once the trailer has been read."""
        return self._finished

    @property
    def crc_format(self) -> bool:
        """True if the last header read was a ``070702`` header."""
        return self._crc_format

    def _read_exact(self, n: int, what: str) -> bytes:
        start = self._offset
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = self._stream.read(n - got)
            if not chunk:
                raise ImageError(
                    f"cpio archive truncated in {what} at offset {start} (need {n} bytes, have {got})"
                )
            if len(chunk) > n - got:  # a misbehaving stream must not make us over-count
                raise ImageError(f"reader returned more than asked at offset {self._offset}")
            parts.append(chunk)
            got += len(chunk)
            self._offset += len(chunk)
        return b"".join(parts)

    def _consume_data(self, n: int) -> bytes:
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        data = self._read_exact(n, "file data")
        self._remaining -= n
        current = self._current
        if self._crc_format and current is not None and current.is_regular:
            self._sum = data_checksum(data, self._sum)
            if self._remaining == 0 and self._verify and self._sum != current.check:
                raise ImageError(
                    f"cpio checksum mismatch for {current.name!r} before offset {self._offset}: "
                    f"header says {current.check:#010x}, data sums to {self._sum:#010x}"
                )
        return data

    def _finish_entry(self) -> None:
        while self._remaining:
            self._consume_data(CHUNK)
        if self._padding:
            self._read_exact(self._padding, "data padding")
            self._padding = 0
        self._current = None

    def next(self) -> CpioHeader | None:
        """The next header, or ``None`` once the trailer has been read."""
        if self._finished:
            return None
        self._finish_entry()
        start = self._offset
        raw = self._read_exact(HEADER_SIZE, "header")
        magic = raw[:6]
        if magic == NEWC_MAGIC:
            crc = False
        elif magic == CRC_MAGIC:
            crc = True
        else:
            raise ImageError(
                f"bad cpio magic {magic!r} at offset {start} (only newc 070701/070702 is supported)"
            )
        digits = raw[6:]
        if not _HEX_FIELDS.fullmatch(digits):
            raise ImageError(f"cpio header at offset {start} has a non-hexadecimal field")
        values = [int(digits[i : i + 8], 16) for i in range(0, 104, 8)]
        fields = dict(zip(_FIELD_NAMES, values, strict=True))
        namesize = fields.pop("namesize")
        if namesize < 2 or namesize > MAX_NAME_SIZE:
            raise ImageError(f"cpio header at offset {start}: invalid name size {namesize}")
        raw_name = self._read_exact(namesize + _align4(HEADER_SIZE + namesize), "name")
        name_bytes = raw_name[: namesize - 1]
        if raw_name[namesize - 1] != 0 or b"\x00" in name_bytes:
            raise ImageError(f"cpio entry name at offset {start} is not a NUL-terminated string")
        header = CpioHeader(name=decode_name(name_bytes), **fields)
        self._crc_format = crc
        if header.name == TRAILER:
            # The trailer normally has no data; skip any it claims, bounded by the input.
            self._current = header
            self._remaining = header.filesize
            self._padding = _align4(header.filesize)
            self._finish_entry()
            self._finished = True
            return None
        self._current = header
        self._remaining = header.filesize
        self._padding = _align4(header.filesize)
        self._sum = 0
        if (
            self._remaining == 0
            and crc
            and header.is_regular
            and self._verify
            and header.check != 0
        ):
            raise ImageError(
                f"cpio checksum mismatch for empty file {header.name!r} at offset {start}"
            )
        return header

    def __iter__(self) -> Iterator[CpioHeader]:
        while (header := self.next()) is not None:
            yield header

    @property
    def data_remaining(self) -> int:
        return self._remaining

    def read(self, size: int = CHUNK) -> bytes:
        """Up to *size* bytes (at most :data:`CHUNK`) of the current entry's data; b"" at its end."""
        return self._consume_data(min(size, CHUNK))

    def iter_data(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk

    def read_all(self, limit: int) -> bytes:
        """The current entry's whole data, refusing entries that claim more than *limit* bytes."""
        if self._remaining > limit:
            name = self._current.name if self._current else "?"
            raise ImageError(
                f"cpio entry {name!r} data too large ({self._remaining} > {limit} bytes)"
            )
        return b"".join(self.iter_data())

    def close_entry(self) -> None:
        """Consume what is left of the current entry (data and padding)."""
        self._finish_entry()


class CpioWriter:
    """Writes one newc archive to *stream*; :meth:`close` appends the trailer.

    Headers are written as given: sorting, inode numbering and hard link
    layout are the caller's decisions (see :mod:`mobinux.images.ramdisk`).
    With ``crc=True`` the ``070702`` format is written and the checksum of
    each regular file is computed here (a stream must then be seekable).
    """

    def __init__(self, stream: SupportsWrite, *, crc: bool = False) -> None:
        self._stream = stream
        self._crc = crc
        self._written = 0
        self._closed = False
        self._entries = 0

    @property
    def bytes_written(self) -> int:
        return self._written

    @property
    def entries(self) -> int:
        return self._entries

    def _emit(self, data: bytes) -> None:
        if data:
            self._stream.write(data)
            self._written += len(data)

    @property
    def crc(self) -> bool:
        return self._crc

    def add(
        self,
        header: CpioHeader,
        data: bytes | bytearray | memoryview | SupportsRead = b"",
        *,
        checksum: int | None = None,
    ) -> None:
        """Append one entry; *data* holds exactly ``header.filesize`` bytes (or more, unread).

        In the ``070702`` format a caller streaming a regular file may pass its
        *checksum* (:func:`data_checksum`); otherwise it is computed here.
        """
        if self._closed:
            raise ImageError("cpio archive already closed")
        if header.name == TRAILER:
            raise ImageError(f"an entry may not be named {TRAILER!r}")
        if isinstance(data, bytes | bytearray | memoryview):
            if len(data) != header.filesize:
                raise ImageError(
                    f"{header.name!r}: filesize {header.filesize} but {len(data)} data bytes"
                )
            if self._crc:
                check = data_checksum(data) if header.is_regular else 0
                header = _replace_check(header, check)
            self._emit(header.encode(crc=self._crc))
            self._emit(bytes(data))
        else:
            if self._crc:
                if not header.is_regular:
                    check = 0
                elif checksum is not None:
                    check = checksum
                else:
                    check = _stream_checksum(data, header)
                header = _replace_check(header, check)
            self._emit(header.encode(crc=self._crc))
            left = header.filesize
            while left:
                chunk = data.read(min(left, CHUNK))
                if not chunk:
                    raise ImageError(
                        f"{header.name!r}: data ended {left} bytes short of filesize {header.filesize}"
                    )
                chunk = chunk[:left]
                self._emit(chunk)
                left -= len(chunk)
        self._emit(b"\x00" * _align4(header.filesize))
        self._entries += 1

    def close(self) -> None:
        """Write the trailer (padded to 4 bytes). Does not close the stream."""
        if self._closed:
            return
        self._emit(CpioHeader(name=TRAILER, mode=0, nlink=1).encode(crc=self._crc))
        self._closed = True


def _replace_check(header: CpioHeader, check: int) -> CpioHeader:
    return replace(header, check=check)


def stream_checksum(data: SupportsRead, size: int) -> int:
    """:func:`data_checksum` of the next *size* bytes of a seekable stream, which is then rewound."""
    if not (isinstance(data, io.IOBase) and data.seekable()):
        raise ImageError("the 070702 format needs a seekable data stream (or a checksum)")
    pos = data.tell()
    total = 0
    left = size
    while left:
        chunk = data.read(min(left, CHUNK))
        if not chunk:
            break
        total = data_checksum(chunk, total)
        left -= len(chunk)
    data.seek(pos)
    return total


def _stream_checksum(data: SupportsRead, header: CpioHeader) -> int:
    try:
        return stream_checksum(data, header.filesize)
    except ImageError as exc:
        raise ImageError(f"{header.name!r}: {exc}") from None


def read_archive(data: bytes | bytearray | memoryview) -> list[CpioEntry]:
    """Parse a whole in-memory archive. Only NULs may follow the trailer."""
    buf = io.BytesIO(bytes(data))
    reader = CpioReader(buf)
    entries = [CpioEntry(h, reader.read_all(len(data))) for h in reader]
    if not reader.finished:
        raise ImageError(f"cpio archive has no trailer (ended at offset {reader.offset})")
    rest = buf.read()
    if rest.strip(b"\x00"):
        raise ImageError(f"data after the cpio trailer at offset {reader.offset}")
    return entries


def write_archive(entries: Iterable[CpioEntry], *, crc: bool = False) -> bytes:
    """Encode *entries* plus a trailer as one archive."""
    buf = io.BytesIO()
    writer = CpioWriter(buf, crc=crc)
    for entry in entries:
        writer.add(entry.header, entry.data)
    writer.close()
    return buf.getvalue()
