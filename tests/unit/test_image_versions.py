"""Disk image versions: an overlay's flushed state read from outside, applied to a copy
of its base; versions nobody uses are removed."""

from __future__ import annotations

import os
from pathlib import Path

from mobinux.images.versions import build_version, collect_unused, referenced_bases
from mobinux.storage.file import FileDevice
from mobinux.storage.overlay import Overlay
from mobinux.storage.overlay_reader import DATA, ZERO, read_overlay_map

MiB = 1 << 20


def _base(path: Path) -> Path:
    """A 4 MiB base: 1 MiB of 0x11, a 2 MiB hole, 1 MiB of 0x44."""
    with open(path, "wb") as f:
        f.write(b"\x11" * MiB)
        f.seek(3 * MiB)
        f.write(b"\x44" * MiB)
    return path


def _read(path: Path) -> bytes:
    return path.read_bytes()


def test_overlay_map_is_the_flushed_state_and_build_applies_it(tmp_path: Path) -> None:
    base_path = _base(tmp_path / "base.raw")
    base = FileDevice(base_path, readonly=True)
    ov = Overlay.create(base, tmp_path / "ov", chunk_size=65536)
    try:
        ov.write(100, b"A" * 1000)  # inside the first chunk: copied up with base bytes around it
        ov.write(2 * MiB, b"B" * 65536)  # into the hole
        ov.discard(3 * MiB, 65536 * 2)  # whole chunks: ZERO, never base data
        ov.flush()
        ov.write(MiB + 512, b"U" * 512)  # never flushed: not part of the committed state
        expected = bytearray(_read(base_path))
        expected[100:1100] = b"A" * 1000
        expected[2 * MiB : 2 * MiB + 65536] = b"B" * 65536
        expected[3 * MiB : 3 * MiB + 131072] = bytes(131072)
        snapshot = read_overlay_map(tmp_path / "ov")  # while the overlay is open, as in a server
        try:
            assert snapshot.runs(DATA) == [(0, 1), (32, 1)]
            assert snapshot.runs(ZERO) == [(48, 2)]
            out = tmp_path / "v2.raw"
            seen: list[tuple[int, int]] = []
            size = build_version(base_path, snapshot, out, progress=lambda d, t: seen.append((d, t)))
        finally:
            snapshot.close()
    finally:
        ov.close()
        base.close()
    assert size == 4 * MiB
    assert _read(out) == bytes(expected)
    assert _read(base_path)[:1100] == b"\x11" * 1100  # the base is untouched
    assert seen and seen[-1][0] == seen[-1][1]  # progress reached the total
    # holes stay holes: the copy allocates about what the base and the overlay hold
    assert os.stat(out).st_blocks * 512 <= 2 * MiB + 3 * 65536
    assert not list(tmp_path.glob(".*.tmp"))


def test_build_without_overlay_copies_sparsely(tmp_path: Path) -> None:
    base = _base(tmp_path / "base.raw")
    out = tmp_path / "copy.raw"
    build_version(base, None, out)
    assert _read(out) == _read(base)
    assert os.stat(out).st_blocks * 512 <= 2 * MiB + 65536


def test_unused_versions_are_removed_and_used_ones_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    img = data / "disks" / "desk"
    img.mkdir(parents=True)
    for name in ("disk.raw", "v2.raw", "v3.raw", "notes.txt"):
        (img / name).write_bytes(b"x")
    node = data / "overlays" / "525400000001" / "b-1"
    node.mkdir(parents=True)
    (node / "base").write_text("disks/desk/v2.raw\n")  # a node still runs version 2
    assert referenced_bases(data) == {"disks/desk/v2.raw"}
    removed = collect_unused(data, {"disks/desk/v3.raw"})
    assert removed == ["disks/desk/disk.raw"]
    assert sorted(p.name for p in img.iterdir()) == ["notes.txt", "v2.raw", "v3.raw"]
    (node / "base").write_text("disks/desk/v3.raw\n")  # it booted again, onto the current one
    assert collect_unused(data, {"disks/desk/v3.raw"}) == ["disks/desk/v2.raw"]
