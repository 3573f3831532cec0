"""User disks (storage/chain.py) driven as the CLI and server use them, against a bytearray model."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from mobinux.storage.chain import SnapshotError, UserDisk

SIZE = 8 * 65536 + 4096  # eight chunks and a short last one
SECTOR = 512


def _read(disk: UserDisk, offset: int = 0, n: int = SIZE) -> bytes:
    buf = bytearray(n)
    disk.read_into(offset, memoryview(buf))
    return bytes(buf)


def test_snapshot_rollback_delete_keep_each_state(tmp_path: Path) -> None:
    disk = UserDisk.create(tmp_path / "d", SIZE)
    try:
        disk.write(0, b"A" * 4096)
        disk.create_snapshot("one", 100.0)
        disk.write(0, b"B" * 512)
        disk.discard(65536, 65536)
        disk.create_snapshot("two", 200.0)
        disk.write(70000 // 512 * 512, b"C" * 512)
        assert [s.name for s in disk.snapshots()] == ["one", "two"]
        assert disk.snapshots()[0].used_bytes >= 4096
        disk.rollback("one")  # back to A..., "two" is gone with its layer
        assert _read(disk, 0, 4096) == b"A" * 4096
        assert [s.name for s in disk.snapshots()] == ["one"]
        with pytest.raises(SnapshotError, match="two"):
            disk.rollback("two")
        with pytest.raises(SnapshotError):
            disk.create_snapshot("one", 300.0)
        with pytest.raises(SnapshotError):
            disk.create_snapshot("bad/name", 300.0)
        disk.write(4096, b"D" * 4096)
        disk.delete_snapshot("one")
        assert disk.snapshots() == []
        assert _read(disk, 0, 8192) == b"A" * 4096 + b"D" * 4096
    finally:
        disk.close()
    again = UserDisk.open(tmp_path / "d")
    try:
        assert _read(again, 0, 8192) == b"A" * 4096 + b"D" * 4096
    finally:
        again.close()
    info = UserDisk.list_snapshots(tmp_path / "d")  # from outside, as `snapshot list` does
    assert info == []


offsets = st.integers(0, SIZE // SECTOR - 1).map(lambda s: s * SECTOR)


class UserDiskMachine(RuleBasedStateMachine):
    """Every operation on the disk and on a model; reads must always agree."""

    snaps = Bundle("snaps")

    @initialize()
    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mbxuserdisk-"))
        self.disk = UserDisk.create(self.dir / "d", SIZE)
        self.model = bytearray(SIZE)
        self.saved: dict[str, bytes] = {}
        self.order: list[str] = []
        self.count = 0

    def teardown(self) -> None:
        if hasattr(self, "disk"):
            self.disk.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(offset=offsets, n=st.integers(1, 40), byte=st.integers(1, 255))
    def write(self, offset: int, n: int, byte: int) -> None:
        n = min(n * SECTOR, SIZE - offset)
        self.disk.write(offset, bytes([byte]) * n)
        self.model[offset : offset + n] = bytes([byte]) * n

    @rule(offset=offsets, n=st.integers(1, 300), zeroes=st.booleans())
    def zero(self, offset: int, n: int, zeroes: bool) -> None:
        n = min(n * SECTOR, SIZE - offset)
        (self.disk.write_zeroes if zeroes else self.disk.discard)(offset, n)
        self.model[offset : offset + n] = bytes(n)

    @rule(target=snaps)
    def snapshot(self) -> str:
        self.count += 1
        name = f"s{self.count}"
        self.disk.create_snapshot(name, float(self.count))
        self.saved[name] = bytes(self.model)
        self.order.append(name)
        return name

    @rule(name=snaps)
    def rollback(self, name: str) -> None:
        if name not in self.saved:
            with pytest.raises(SnapshotError):
                self.disk.rollback(name)
            return
        self.disk.rollback(name)
        self.model = bytearray(self.saved[name])
        for later in self.order[self.order.index(name) + 1 :]:
            del self.saved[later]
        self.order = self.order[: self.order.index(name) + 1]

    @rule(name=consumes(snaps))
    def delete(self, name: str) -> None:
        if name not in self.saved:
            return
        self.disk.delete_snapshot(name)
        del self.saved[name]
        self.order.remove(name)

    @rule()
    def reopen(self) -> None:
        self.disk.close()
        self.disk = UserDisk.open(self.dir / "d")

    @invariant()
    def agrees(self) -> None:
        if hasattr(self, "disk"):
            assert _read(self.disk) == bytes(self.model)
            assert [s.name for s in self.disk.snapshots()] == self.order
            layers = sorted(p.name for p in (self.dir / "d").iterdir() if p.is_dir())
            assert len(layers) == len(self.order) + 1  # freed when their snapshot goes

    @rule(name=snaps)
    def snapshot_still_reads_as_taken(self, name: str) -> None:
        if name not in self.saved:
            return
        # A rollback to it (then back) would change state; compare through a copy instead.
        copy = self.dir / "copy"
        shutil.copytree(self.dir / "d", copy)
        other = UserDisk.open(copy)
        try:
            other.rollback(name)
            assert _read(other) == self.saved[name]
        finally:
            other.close()
            shutil.rmtree(copy)


UserDiskMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("MBX_USERDISK_EXAMPLES", "40")), stateful_step_count=25,
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
test_user_disk_matches_model = UserDiskMachine.TestCase


def test_time_is_given_not_read(tmp_path: Path) -> None:
    disk = UserDisk.create(tmp_path / "d", SIZE)
    try:
        disk.create_snapshot("t", 42.0)
        assert disk.snapshots()[0].created == 42.0
        assert abs(time.time() - 42.0) > 1
    finally:
        disk.close()
