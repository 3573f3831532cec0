"""Byte-range selection for GET (RFC 9110 §14).

:func:`select_range` turns a ``Range`` header value and the size of the
representation into what to send:

* ``None``: ignore the header and send the whole body with 200 (no header, a
  unit other than ``bytes``, a syntactically invalid value, which RFC 9110
  §14.2 lets a server ignore, or several ranges, see below);
* a :class:`ByteRange`: send that slice with 206 and ``Content-Range``;
* :data:`UNSATISFIABLE`: answer 416 with ``Content-Range: bytes */size``.

For one range-spec the selected slice equals Python slicing of the body:
``a-b`` is ``body[a:b + 1]``, ``a-`` is ``body[a:]``, ``-n`` is ``body[-n:]``
(n > 0), and the range is unsatisfiable exactly when that slice is empty.

Several ranges (``bytes=0-9,20-29``) are answered with the full 200 body when
at least one of them is satisfiable, which RFC 9110 §14.2 allows ("a server
MAY ignore the Range header field"); no boot client asks for several ranges,
so multipart/byteranges is not worth its code. When none is satisfiable, 416.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final, Literal

# range-spec = int-range / suffix-range (RFC 9110 §14.1.1); ASCII digits only,
# so int() never sees "+5", "5_0" or non-ASCII digits.
_SPEC = re.compile(r"([0-9]+)-([0-9]*)|-([0-9]+)")
_MAX_SPECS = 100  # a longer list is treated as invalid (and ignored), not parsed


@dataclass(frozen=True, slots=True)
class ByteRange:
    """The half-open slice ``[start, stop)`` of a representation of *size* bytes."""

    start: int
    stop: int
    size: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def content_range(self) -> str:
        """The ``Content-Range`` value of a 206 reply (last-pos is inclusive)."""
        return f"bytes {self.start}-{self.stop - 1}/{self.size}"


class _Unsatisfiable(enum.Enum):
    UNSATISFIABLE = "unsatisfiable"


UNSATISFIABLE: Final = _Unsatisfiable.UNSATISFIABLE
RangeChoice = ByteRange | Literal[_Unsatisfiable.UNSATISFIABLE] | None


def unsatisfied_range(size: int) -> str:
    """The ``Content-Range`` value of a 416 reply (RFC 9110 §14.4)."""
    return f"bytes */{size}"


def select_range(header: str | None, size: int) -> RangeChoice:
    """What to send for ``Range: header`` on a body of *size* bytes (see module doc)."""
    if header is None:
        return None
    unit, equals, range_set = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    specs = [item.strip() for item in range_set.split(",")]
    # empty list elements are allowed and ignored (RFC 9110 §5.6.1)
    specs = [spec for spec in specs if spec]
    if not specs or len(specs) > _MAX_SPECS:
        return None
    chosen: list[ByteRange] = []
    for spec in specs:
        parsed = _parse_spec(spec)
        if parsed is None:
            return None
        start, last = parsed
        selected = _satisfy(start, last, size)
        if selected is not None:
            chosen.append(selected)
    if not chosen:
        return UNSATISFIABLE
    if len(specs) > 1:
        return None
    return chosen[0]


def _parse_spec(spec: str) -> tuple[int | None, int | None] | None:
    """``(first, last)`` of an int-range, ``(None, suffix)`` of a suffix-range, None if invalid."""
    matched = _SPEC.fullmatch(spec)
    if matched is None:
        return None
    first, last, suffix = matched.groups()
    if suffix is not None:
        return None, int(suffix)
    start = int(first)
    if last:
        end = int(last)
        if end < start:
            # first-pos > last-pos makes the range-spec invalid (RFC 9110 §14.1.1)
            return None
        return start, end
    return start, None


def _satisfy(first: int | None, last: int | None, size: int) -> ByteRange | None:
    if first is None:
        # suffix-range: the last *last* bytes; a zero-length suffix is unsatisfiable
        suffix = last if last is not None else 0
        if suffix == 0 or size == 0:
            return None
        return ByteRange(max(size - suffix, 0), size, size)
    if first >= size:
        return None
    stop = size if last is None else min(last + 1, size)
    return ByteRange(first, stop, size)
