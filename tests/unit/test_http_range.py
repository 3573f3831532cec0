"""Byte-range selection (RFC 9110 §14): examples and the slicing property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mobinux.http.ranges import UNSATISFIABLE, ByteRange, select_range, unsatisfied_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-99", 1000, ByteRange(0, 100, 1000)),
        ("bytes=100-", 1000, ByteRange(100, 1000, 1000)),
        ("bytes=-50", 1000, ByteRange(950, 1000, 1000)),
        ("bytes=-5000", 1000, ByteRange(0, 1000, 1000)),
        ("bytes=990-2000", 1000, ByteRange(990, 1000, 1000)),
        ("bytes=999-999", 1000, ByteRange(999, 1000, 1000)),
        ("BYTES = 1-2", 1000, ByteRange(1, 3, 1000)),
        ("bytes=1-2, ", 1000, ByteRange(1, 3, 1000)),
        ("bytes=0-0", 1, ByteRange(0, 1, 1)),
    ],
)
def test_satisfiable(header: str, size: int, expected: ByteRange) -> None:
    assert select_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=1000-", 1000),
        ("bytes=1000-2000", 1000),
        ("bytes=-0", 1000),
        ("bytes=0-", 0),
        ("bytes=-1", 0),
        ("bytes=5000-6000,7000-", 1000),
    ],
)
def test_unsatisfiable(header: str, size: int) -> None:
    assert select_range(header, size) is UNSATISFIABLE


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes",
        "bytes=",
        "items=0-1",
        "bytes=5-1",  # first > last: invalid, so ignored
        "bytes=a-b",
        "bytes=+1-2",
        "bytes=1_0-20",
        "bytes=\u0661-2",  # Arabic-Indic digit one: int() would accept it
        "bytes=--1",
        "bytes=1-2-3",
        "bytes=-",
        "bytes=0-1,x",
        "bytes=0-9,20-29",  # several ranges: full 200 body
        "bytes=" + ",".join(["0-0"] * 200),
    ],
)
def test_ignored(header: str | None) -> None:
    assert select_range(header, 1000) is None


def test_header_strings() -> None:
    assert ByteRange(0, 100, 1000).content_range() == "bytes 0-99/1000"
    assert ByteRange(0, 100, 1000).length == 100
    assert unsatisfied_range(1000) == "bytes */1000"


def python_slice(spec: tuple[int | None, int | None], data: bytes) -> bytes:
    """What Python slicing says the range-spec selects."""
    first, last = spec
    if first is None:
        assert last is not None
        return data[-last:] if last else b""
    return data[first:] if last is None else data[first : last + 1]


def spec_text(spec: tuple[int | None, int | None]) -> str:
    first, last = spec
    if first is None:
        return f"-{last}"
    return f"{first}-" if last is None else f"{first}-{last}"


positions = st.integers(min_value=0, max_value=3000)
specs = st.one_of(
    st.tuples(positions, st.none()),
    st.tuples(st.none(), positions),
    st.tuples(positions, positions).map(lambda ab: (min(ab), max(ab))),
)


@given(size=st.integers(min_value=0, max_value=2000), spec=specs)
def test_single_range_matches_python_slicing(
    size: int, spec: tuple[int | None, int | None]
) -> None:
    data = bytes(i % 251 for i in range(size))
    expected = python_slice(spec, data)
    choice = select_range(f"bytes={spec_text(spec)}", size)
    if not expected:
        assert choice is UNSATISFIABLE
        return
    assert isinstance(choice, ByteRange)
    assert 0 <= choice.start < choice.stop <= size
    assert choice.size == size
    assert data[choice.start : choice.stop] == expected
    first_last = choice.content_range().removeprefix("bytes ").split("/")[0]
    first, last = (int(x) for x in first_last.split("-"))
    assert data[first : last + 1] == expected


@given(size=st.integers(min_value=0, max_value=10**12), header=st.text(max_size=60))
def test_any_header_gives_a_slice_within_the_file(size: int, header: str) -> None:
    choice = select_range(header, size)
    assert choice is None or choice is UNSATISFIABLE or isinstance(choice, ByteRange)
    if isinstance(choice, ByteRange):
        assert 0 <= choice.start < choice.stop <= size


@given(
    size=st.integers(min_value=0, max_value=2000), spec_list=st.lists(specs, min_size=2, max_size=5)
)
def test_several_ranges_give_full_body_or_416(
    size: int, spec_list: list[tuple[int | None, int | None]]
) -> None:
    data = bytes(size)
    header = "bytes=" + ", ".join(spec_text(spec) for spec in spec_list)
    choice = select_range(header, size)
    if any(python_slice(spec, data) for spec in spec_list):
        assert choice is None
    else:
        assert choice is UNSATISFIABLE
