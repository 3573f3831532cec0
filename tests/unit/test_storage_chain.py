"""User disks with snapshots (storage/chain.py): layers, the manifest, snapshot operations.

Plus a stateful hypothesis test against a bytearray model.  Crash safety is in
tests/fuzz/test_storage_chain_crash.py.
"""

from __future__ import annotations

import errno
import json
import random
import struct
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mobinux.errors import LocalError
from mobinux.storage.chain import (
    MANIFEST,
    InvalidSnapshotName,
    SnapshotError,
    SnapshotExists,
    SnapshotNotFound,
    UserDisk,
    _decode_manifest,
    _encode_manifest,
    _Gate,
    _Layer,
    _Manifest,
    check_snapshot_name,
)
from mobinux.storage.device import WouldBlock
from mobinux.storage.memory import ZeroDevice
from mobinux.storage.powerloss import PowerLossDir

KiB = 1024
CS = 4 * KiB
SIZE = 64 * KiB  # 16 chunks


def read(dev: UserDisk, offset: int = 0, length: int = SIZE) -> bytes:
    buf = bytearray(length)
    dev.read_into(offset, memoryview(buf))
    return bytes(buf)


def read_snap(dev: UserDisk, name: str) -> bytes:
    buf = bytearray(dev.size)
    dev.read_snapshot(name, 0, memoryview(buf))
    return bytes(buf)


def pattern(tag: int, n: int) -> bytes:
    return bytes((tag + i) % 251 + 1 for i in range(n))  # never zero


@pytest.fixture
def fs() -> PowerLossDir:
    return PowerLossDir()


@pytest.fixture
def disk(fs: PowerLossDir) -> UserDisk:
    return UserDisk.create(fs.subdir("u"), SIZE, chunk_size=CS)


def layer_dirs(fs: PowerLossDir) -> list[str]:
    return fs.subdir("u").subdirs()


# -- the manifest ---------------------------------------------------------------------

name_st = st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z")
time_st = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)


@st.composite
def manifests(draw: st.DrawFn) -> _Manifest:
    names = draw(st.lists(name_st, unique=True, max_size=6))
    numbers = draw(st.lists(st.integers(1, 10**6), unique=True, min_size=len(names) + 1,
                            max_size=len(names) + 1))
    layers = [_Layer(f"l{n}", name, draw(time_st)) for n, name in zip(numbers, names, strict=False)]
    layers.append(_Layer(f"l{numbers[-1]}"))
    size = draw(st.integers(1, 1 << 40)) * 512
    chunk = 1 << draw(st.integers(9, 24))
    return _Manifest(size, chunk, max(numbers) + draw(st.integers(1, 5)), tuple(layers))


@given(manifests())
def test_the_manifest_round_trips(m: _Manifest) -> None:
    assert _decode_manifest(_encode_manifest(m)) == m


def test_the_manifest_header_documents_itself() -> None:
    m = _Manifest(SIZE, CS, 5, (_Layer("l1", "a", 1.5), _Layer("l4")))
    blob = _encode_manifest(m)
    magic, version, n = struct.unpack_from("<8sII", blob)
    assert (magic, version) == (b"MBXCHAIN", 1)
    body = json.loads(blob[16 : 16 + n])
    assert body == {
        "size": SIZE,
        "chunk_size": CS,
        "next_layer": 5,
        "layers": [{"dir": "l1", "snapshot": "a", "created": 1.5}, {"dir": "l4"}],
    }
    assert struct.unpack_from("<I", blob, 16 + n)[0] == zlib.crc32(blob[: 16 + n])


@given(manifests(), st.data())
def test_any_damage_to_the_manifest_is_refused(m: _Manifest, data: st.DataObject) -> None:
    blob = bytearray(_encode_manifest(m))
    how = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)) :]
    else:
        blob += b"\0"
    with pytest.raises(OSError) as info:
        _decode_manifest(bytes(blob))
    assert info.value.errno in (errno.EIO, errno.EINVAL)


def _signed(body: object, version: int = 1) -> bytes:
    raw = json.dumps(body).encode()
    blob = struct.pack("<8sII", b"MBXCHAIN", version, len(raw)) + raw
    return blob + struct.pack("<I", zlib.crc32(blob))


GOOD = {"size": SIZE, "chunk_size": CS, "next_layer": 3,
        "layers": [{"dir": "l1", "snapshot": "a", "created": 1.0}, {"dir": "l2"}]}


@pytest.mark.parametrize(
    "change",
    [
        {"size": 1000},
        {"size": 0},
        {"chunk_size": 3000},
        {"next_layer": 2},  # a layer numbered past next_layer: names could be reused
        {"layers": []},
        {"layers": [{"dir": "l1", "snapshot": "a", "created": 1.0}]},  # top is a snapshot
        {"layers": [{"dir": "l1"}, {"dir": "l2"}]},  # a frozen layer without a snapshot
        {"layers": [{"dir": "../x", "snapshot": "a", "created": 1.0}, {"dir": "l2"}]},
        {"layers": [{"dir": "l1", "snapshot": "a/b", "created": 1.0}, {"dir": "l2"}]},
        {"layers": [{"dir": "l1", "snapshot": "a", "created": "1"}, {"dir": "l2"}]},
        {"layers": [{"dir": "l1", "snapshot": "a", "created": 1.0}, {"dir": "l1"}]},
        {"layers": [{"dir": "l1", "snapshot": "a", "created": 1.0},
                    {"dir": "l2", "snapshot": "a", "created": 2.0}, {"dir": "l0"}]},
        {"size": True},
    ],
)
def test_a_manifest_with_a_good_crc_but_impossible_contents_is_refused(
    change: dict[str, object],
) -> None:
    assert _decode_manifest(_signed(GOOD)).layers[0].snapshot == "a"  # the control
    with pytest.raises(OSError) as info:
        _decode_manifest(_signed({**GOOD, **change}))
    assert info.value.errno == errno.EIO


def test_a_manifest_of_a_later_version_is_refused_as_unsupported() -> None:
    with pytest.raises(OSError) as info:
        _decode_manifest(_signed(GOOD, version=2))
    assert info.value.errno == errno.EINVAL


def test_manifest_transitions() -> None:
    m = _Manifest(SIZE, CS, 2, (_Layer("l1"),))
    m = m.with_snapshot("a", 1.0)
    assert m.layers == (_Layer("l1", "a", 1.0), _Layer("l2")) and m.next_layer == 3
    m = m.with_snapshot("b", 2.0).with_snapshot("c", 3.0)
    assert [layer.dir for layer in m.layers] == ["l1", "l2", "l3", "l4"]
    assert m.index("b") == 1
    back = m.rolled_back(m.index("a"))
    assert back.layers == (_Layer("l1", "a", 1.0), _Layer("l5")) and back.next_layer == 6
    gone = m.without(m.index("b"))
    assert [layer.snapshot for layer in gone.layers] == ["a", "c", None]
    assert gone.next_layer == m.next_layer
    with pytest.raises(SnapshotNotFound):
        m.index("zz")


# -- names and errors ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "A.b_c-9", "x" * 64, "..", "-"])
def test_valid_names(name: str) -> None:
    check_snapshot_name(name)


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a/b", "é", "a\n", "a\0"])
def test_invalid_names_are_refused(disk: UserDisk, name: str) -> None:
    with pytest.raises(InvalidSnapshotName):
        disk.create_snapshot(name, 1.0)
    assert disk.snapshots() == []


def test_errors_belong_to_the_project_tree(disk: UserDisk) -> None:
    disk.create_snapshot("a", 1.0)
    with pytest.raises(SnapshotExists, match="'a' exists already") as exists:
        disk.create_snapshot("a", 2.0)
    with pytest.raises(SnapshotNotFound, match="no snapshot named 'b'") as missing:
        disk.rollback("b")
    with pytest.raises(SnapshotNotFound):
        disk.delete_snapshot("b")
    with pytest.raises(SnapshotNotFound):
        read_snap(disk, "b")
    for exc in (exists.value, missing.value):
        assert isinstance(exc, SnapshotError) and isinstance(exc, LocalError)
    assert isinstance(exists.value, ValueError) and isinstance(missing.value, LookupError)
    with pytest.raises(ValueError, match="finite"):
        disk.create_snapshot("c", float("nan"))
    assert [s.name for s in disk.snapshots()] == ["a"]


def test_create_refuses_bad_sizes_and_an_existing_disk(fs: PowerLossDir) -> None:
    with pytest.raises(ValueError):
        UserDisk.create(fs.subdir("u"), 1000)
    with pytest.raises(ValueError):
        UserDisk.create(fs.subdir("u"), SIZE, chunk_size=3000)
    UserDisk.create(fs.subdir("u"), SIZE).close()
    with pytest.raises(FileExistsError):
        UserDisk.create(fs.subdir("u"), SIZE)
    with pytest.raises(FileNotFoundError):
        UserDisk.open(fs.subdir("nothing"))


# -- the disk ---------------------------------------------------------------------------


def test_a_new_disk_is_blank_and_holds_nothing(disk: UserDisk) -> None:
    assert disk.size == SIZE and not disk.readonly
    assert read(disk) == bytes(SIZE)
    assert disk.allocated_bytes == 0
    assert disk.extents(0, SIZE) == [(0, SIZE, False)]


def test_zero_device() -> None:
    z = ZeroDevice(4096)
    buf = bytearray(b"x" * 1024)
    z.read_into(1024, memoryview(buf))
    assert buf == bytes(1024) and z.readonly and z.extents(0, 4096) == [(0, 4096, False)]
    with pytest.raises(OSError) as info:
        z.write(0, b"a")
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        z.discard(0, 512)
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        z.write_zeroes(0, 512)
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError):
        z.read_into(4000, memoryview(bytearray(512)))


def test_reopen_on_real_files_keeps_data_and_snapshots(tmp_path: Path) -> None:
    d = UserDisk.create(tmp_path / "alice", SIZE, chunk_size=CS)
    d.write(100, b"one")
    d.create_snapshot("first", 1700000000.25)
    d.write(100, b"two")
    d.write(SIZE - 3, b"end")
    d.close()
    d.close()  # idempotent
    with pytest.raises(OSError) as info:
        read(d)
    assert info.value.errno == errno.EBADF
    again = UserDisk.open(tmp_path / "alice")
    assert read(again, 100, 3) == b"two" and read(again, SIZE - 3, 3) == b"end"
    assert read_snap(again, "first")[100:103] == b"one"
    [info_first] = again.snapshots()
    assert (info_first.name, info_first.created) == ("first", 1700000000.25)
    again.close()
    assert sorted(p.name for p in (tmp_path / "alice").iterdir()) == ["l1", "l2", MANIFEST]


def test_list_snapshots_reads_without_opening(tmp_path: Path) -> None:
    d = UserDisk.create(tmp_path / "bob", SIZE, chunk_size=CS)
    d.write(0, pattern(1, 2 * CS + 1))
    d.create_snapshot("a", 5.0)
    d.write(0, b"x")
    d.create_snapshot("b", 6.0)
    d.write(SIZE - 1, b"y")
    before = sorted(p.name for p in (tmp_path / "bob" / "l1").iterdir())
    listed = UserDisk.list_snapshots(tmp_path / "bob")  # while d has the disk open
    assert listed == d.snapshots()
    assert [(s.name, s.created, s.used_bytes) for s in listed] == [("a", 5.0, 3 * CS), ("b", 6.0, CS)]
    assert sorted(p.name for p in (tmp_path / "bob" / "l1").iterdir()) == before
    d.delete_snapshot("a")
    assert UserDisk.list_snapshots(tmp_path / "bob") == d.snapshots()
    d.close()
    with pytest.raises(FileNotFoundError):
        UserDisk.list_snapshots(tmp_path / "nobody")


def test_snapshots_freeze_the_disk_and_report_their_space(disk: UserDisk) -> None:
    disk.write(0, pattern(1, 3 * CS))  # 3 chunks
    info = disk.create_snapshot("a", 10.0)
    assert (info.name, info.created, info.used_bytes) == ("a", 10.0, 3 * CS)
    disk.write(CS, pattern(2, 100))  # 1 chunk
    disk.create_snapshot("b", 20.0)
    disk.write(5 * CS, b"x")
    assert [(s.name, s.created, s.used_bytes) for s in disk.snapshots()] == [
        ("a", 10.0, 3 * CS),
        ("b", 20.0, CS),
    ]
    assert disk.allocated_bytes == 5 * CS
    first = pattern(1, 3 * CS) + bytes(SIZE - 3 * CS)
    assert read_snap(disk, "a") == first
    second = bytearray(first)
    second[CS : CS + 100] = pattern(2, 100)
    assert read_snap(disk, "b") == bytes(second)
    second[5 * CS] = ord("x")
    assert read(disk) == bytes(second)


@pytest.mark.parametrize("op", ["discard", "write_zeroes"])
def test_zeroed_ranges_never_show_older_layers(disk: UserDisk, op: str) -> None:
    disk.write(0, pattern(3, SIZE))
    disk.create_snapshot("full", 1.0)
    getattr(disk, op)(CS // 2, 3 * CS)  # partial chunks at both ends
    expect = bytearray(pattern(3, SIZE))
    expect[CS // 2 : CS // 2 + 3 * CS] = bytes(3 * CS)
    assert read(disk) == bytes(expect)
    disk.create_snapshot("holes", 2.0)
    disk.delete_snapshot("full")  # merging must keep the holes holes
    assert read(disk) == bytes(expect) == read_snap(disk, "holes")
    disk.close()


def _fs_calls(fs: PowerLossDir, fn: object) -> int:
    assert callable(fn)
    before = fs.ops
    fn()
    return fs.ops - before


@pytest.mark.parametrize("written", [CS, SIZE])
def test_snapshot_and_rollback_cost_the_same_however_much_was_written(written: int) -> None:
    """O(1): the same file-system calls (and no data written) for 1 chunk or the whole disk."""
    costs = []
    for amount in (CS, written):
        fs = PowerLossDir()
        d = UserDisk.create(fs.subdir("u"), SIZE, chunk_size=CS)
        d.write(0, pattern(4, amount))
        d.flush()
        snap = _fs_calls(fs, lambda d=d: d.create_snapshot("s", 1.0))
        d.write(0, pattern(5, amount))
        d.flush()
        back = _fs_calls(fs, lambda d=d: d.rollback("s"))
        assert read(d, 0, amount) == pattern(4, amount)
        costs.append((snap, back))
    assert costs[0] == costs[1]


def test_rollback_deletes_later_snapshots_and_frees_their_space(
    disk: UserDisk, fs: PowerLossDir
) -> None:
    disk.write(0, pattern(1, CS))
    disk.create_snapshot("a", 1.0)
    disk.write(CS, pattern(2, 4 * CS))
    disk.create_snapshot("b", 2.0)
    disk.write(8 * CS, pattern(3, 4 * CS))
    disk.create_snapshot("c", 3.0)
    disk.write(0, b"live")
    assert len(layer_dirs(fs)) == 4 and disk.allocated_bytes == 10 * CS
    disk.rollback("a")
    assert [s.name for s in disk.snapshots()] == ["a"]
    assert read(disk) == pattern(1, CS) + bytes(SIZE - CS)
    assert disk.allocated_bytes == CS
    # The dropped layers' files are gone: only "a"'s layer and the new top remain.
    assert {name.split("/")[1] for name in fs.snapshot() if name.startswith("u/l")} == {"l1", "l5"}
    disk.write(0, b"again")  # the new top takes writes; "a" stays as it was
    assert read_snap(disk, "a")[:5] == pattern(1, 5)
    disk.rollback("a")  # rolling back to the same snapshot twice works
    assert read(disk, 0, 5) == pattern(1, 5)


@pytest.mark.parametrize("which", ["a", "b", "c"])
def test_delete_keeps_the_disk_and_the_other_snapshots(
    disk: UserDisk, fs: PowerLossDir, which: str
) -> None:
    rng = random.Random(which)
    images: dict[str, bytes] = {}
    for name in ("a", "b", "c"):
        for _ in range(4):
            off = rng.randrange(SIZE - 2 * CS)
            disk.write(off, pattern(rng.randrange(200), rng.randrange(1, 2 * CS)))
        disk.discard(rng.randrange(4) * CS, CS)
        images[name] = read(disk)
        disk.create_snapshot(name, 1.0)
    disk.write(3, b"live")
    live = read(disk)
    used = {s.name: s.used_bytes for s in disk.snapshots()}
    total = disk.allocated_bytes
    disk.delete_snapshot(which)
    assert [s.name for s in disk.snapshots()] == [n for n in "abc" if n != which]
    assert read(disk) == live
    for name in images:
        if name != which:
            assert read_snap(disk, name) == images[name]
    # The deleted layer's space went or moved up; nothing was copied twice.
    assert disk.allocated_bytes <= total
    assert len(layer_dirs(fs)) == 3
    disk.close()
    again = UserDisk.open(fs.subdir("u"))
    assert read(again) == live
    for name in images:
        if name != which:
            assert read_snap(again, name) == images[name]
    assert {s.name: s.used_bytes for s in again.snapshots()}.keys() == used.keys() - {which}


def test_delete_copies_only_what_the_layer_above_does_not_hold(disk: UserDisk) -> None:
    disk.write(0, pattern(1, 6 * CS))  # "a" holds chunks 0-5
    disk.create_snapshot("a", 1.0)
    disk.write(0, pattern(2, 4 * CS))  # the top holds 0-3 itself
    disk.discard(4 * CS, CS)  # and hides chunk 4
    assert disk.allocated_bytes == 10 * CS
    disk.delete_snapshot("a")
    # Only chunk 5 was copied up; chunks 0-4 of "a" were freed.
    assert disk.allocated_bytes == 5 * CS
    assert read(disk, 0, 6 * CS) == pattern(2, 4 * CS) + bytes(CS) + pattern(1, 6 * CS)[5 * CS :]


def test_merging_a_layer_of_zeros_costs_no_space(disk: UserDisk) -> None:
    disk.write(0, pattern(1, 4 * CS))
    disk.create_snapshot("a", 1.0)
    disk.write(0, bytes(2 * CS))  # written zeros are DATA in "b"...
    disk.create_snapshot("b", 2.0)
    disk.delete_snapshot("b")  # ...and need no DATA once merged into the empty top
    assert read(disk, 0, 4 * CS) == bytes(2 * CS) + pattern(1, 4 * CS)[2 * CS :]
    assert disk.allocated_bytes == 4 * CS  # only "a"'s chunks


def test_open_removes_what_interrupted_operations_left(fs: PowerLossDir) -> None:
    d = UserDisk.create(fs.subdir("u"), SIZE, chunk_size=CS)
    d.write(0, b"keep")
    d.create_snapshot("a", 1.0)
    d.close()
    u = fs.subdir("u")
    stray = u.subdir("l7").create("meta")  # an unnamed layer directory
    stray.close()
    u.subdir("lost+found").create("x").close()  # not ours: left alone
    u.create("manifest.tmp").close()
    again = UserDisk.open(u)
    assert u.subdirs() == ["l1", "l2", "lost+found"]
    assert "manifest.tmp" not in u.listdir()
    assert read(again, 0, 4) == b"keep"
    again.close()


def test_a_missing_layer_refuses_the_open(fs: PowerLossDir) -> None:
    d = UserDisk.create(fs.subdir("u"), SIZE, chunk_size=CS)
    d.create_snapshot("a", 1.0)
    d.close()
    fs.subdir("u").remove_subdir("l1")
    with pytest.raises(OSError, match="l1 is missing") as info:
        UserDisk.open(fs.subdir("u"))
    assert info.value.errno == errno.EIO


class FailingDirSync(PowerLossDir):
    """Fails the next fsync of the user disk's directory when armed."""

    fail_next = False

    def sync_dir(self, prefix: str) -> None:
        if self.fail_next and prefix == "u/":
            self.fail_next = False
            raise OSError(errno.EIO, "injected directory fsync failure")
        super().sync_dir(prefix)


@pytest.mark.parametrize("op", ["snapshot", "rollback", "delete"])
def test_a_failed_directory_fsync_keeps_the_new_state_and_the_next_flush_makes_it_durable(
    op: str,
) -> None:
    fs = FailingDirSync()
    d = UserDisk.create(fs.subdir("u"), SIZE, chunk_size=CS)
    d.write(0, b"one")
    d.create_snapshot("a", 1.0)
    d.write(0, b"two")
    d.create_snapshot("b", 2.0)
    d.write(0, b"six")
    fs.fail_next = True
    with pytest.raises(OSError, match="injected"):
        if op == "snapshot":
            d.create_snapshot("c", 3.0)
        elif op == "rollback":
            d.rollback("a")
        else:
            d.delete_snapshot("a")
    names = {"snapshot": ["a", "b", "c"], "rollback": ["a"], "delete": ["b"]}[op]
    live = {"snapshot": b"six", "rollback": b"one", "delete": b"six"}[op]
    # The manifest was renamed into place: the operation happened, in memory too.
    assert [s.name for s in d.snapshots()] == names and read(d, 0, 3) == live
    dirs = layer_dirs(fs)
    d.flush()  # writes the manifest again; now old layers can go
    fs.power_cut("drop")
    fs.reboot()
    again = UserDisk.open(fs.subdir("u"))
    assert [s.name for s in again.snapshots()] == names and read(again, 0, 3) == live
    assert len(layer_dirs(fs)) == len(names) + 1 <= len(dirs)


def test_a_failed_snapshot_changes_nothing_unless_its_manifest_was_renamed() -> None:
    """An error at each file-system call of create_snapshot in turn."""
    outcomes = set()
    for n in range(60):
        fs = PowerLossDir(seed=n)
        d = UserDisk.create(fs.subdir("u"), SIZE, chunk_size=CS)
        d.write(0, b"one")
        d.create_snapshot("a", 1.0)
        d.write(0, b"two")
        d.flush()
        fs.fail_after(n, errno.ENOSPC)
        try:
            d.create_snapshot("b", 2.0)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        else:
            assert fs.armed == (False, True)  # every call of it ran: done
            break
        fs.fail_after(None)
        names = [s.name for s in d.snapshots()]
        outcomes.add(tuple(names))
        assert read(d, 0, 3) == b"two"
        # Whatever the failure left is cleaned up by the next open.
        fs.power_cut("drop")
        fs.reboot()
        again = UserDisk.open(fs.subdir("u"))
        assert [s.name for s in again.snapshots()] in (["a"], ["a", "b"])
        if names == ["a"]:
            assert [s.name for s in again.snapshots()] == ["a"]
        assert len(layer_dirs(fs)) == len(again.snapshots()) + 1
        assert read(again, 0, 3) == b"two"
    else:
        pytest.fail("create_snapshot never succeeded")
    assert outcomes == {("a",), ("a", "b")}  # failures before and after the rename


def test_io_runs_during_delete_and_snapshots(disk: UserDisk) -> None:
    """Writers on disjoint ranges keep going while snapshots are taken and deleted."""
    disk.write(0, pattern(9, SIZE))
    disk.create_snapshot("base", 0.0)
    stop = threading.Event()
    errors: list[BaseException] = []
    last: dict[int, bytes] = {}

    def writer(t: int) -> None:
        try:
            i = 0
            while not stop.is_set():
                i += 1
                data = struct.pack("<II", t, i) * (CS // 16)
                disk.write(t * 2 * CS + 100, data)
                last[t] = data
                assert read(disk, t * 2 * CS + 100, len(data)) == data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for i in range(15):
        disk.create_snapshot(f"s{i}", float(i))
        if i % 2:
            disk.delete_snapshot(f"s{i - 1}")
    disk.delete_snapshot("base")
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for t, data in last.items():
        assert read(disk, t * 2 * CS + 100, len(data)) == data
    disk.close()


def test_the_gate_makes_nowait_io_wait_out_a_switch() -> None:
    gate = _Gate()
    gate.enter(True)
    gate.leave()
    entered = threading.Event()
    release = threading.Event()

    def switch() -> None:
        with gate.exclusive():
            entered.set()
            release.wait(5)

    t = threading.Thread(target=switch)
    t.start()
    assert entered.wait(5)
    with pytest.raises(WouldBlock):
        gate.enter(True)
    release.set()
    t.join()
    gate.enter(True)
    gate.leave()


# -- stateful: against a bytearray model -------------------------------------------------


class ChainModel(RuleBasedStateMachine):
    """Random writes, zeroing, flushes, snapshots, rollbacks, deletes and reopens."""

    SIZE = 40 * 512  # 10 chunks of 2 KiB, so layers overlap a lot
    CHUNK = 2048

    def __init__(self) -> None:
        super().__init__()
        self.fs = PowerLossDir()
        self.disk = UserDisk.create(self.fs.subdir("u"), self.SIZE, chunk_size=self.CHUNK)
        self.model = bytearray(self.SIZE)
        self.snaps: dict[str, tuple[bytes, float]] = {}  # in creation order
        self.clock = 0.0
        self.tag = 0

    @initialize()
    def start(self) -> None:
        pass

    def teardown(self) -> None:
        self.disk.close()

    offsets = st.integers(0, SIZE - 1)

    @rule(offset=offsets, length=st.integers(1, 3 * 2048))
    def write(self, offset: int, length: int) -> None:
        length = min(length, self.SIZE - offset)
        self.tag += 1
        data = pattern(self.tag, length)
        self.disk.write(offset, data)
        self.model[offset : offset + length] = data

    @rule(offset=offsets, length=st.integers(1, 4 * 2048), discard=st.booleans())
    def zero(self, offset: int, length: int, discard: bool) -> None:
        length = min(length, self.SIZE - offset)
        (self.disk.discard if discard else self.disk.write_zeroes)(offset, length)
        self.model[offset : offset + length] = bytes(length)

    @rule()
    def flush(self) -> None:
        self.disk.flush()

    @rule(name=st.sampled_from(["a", "b", "c", "d", "e"]))
    def snapshot(self, name: str) -> None:
        self.clock += 1.5
        if name in self.snaps:
            with pytest.raises(SnapshotExists):
                self.disk.create_snapshot(name, self.clock)
            return
        self.disk.create_snapshot(name, self.clock)
        self.snaps[name] = (bytes(self.model), self.clock)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.disk.rollback(name)
        names = list(self.snaps)
        for later in names[names.index(name) + 1 :]:
            del self.snaps[later]
        self.model[:] = self.snaps[name][0]
        assert len(self.fs.subdir("u").subdirs()) == len(self.snaps) + 1

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        before = self.disk.allocated_bytes
        self.disk.delete_snapshot(name)
        del self.snaps[name]
        assert self.disk.allocated_bytes <= before
        assert len(self.fs.subdir("u").subdirs()) == len(self.snaps) + 1

    @rule(name=st.sampled_from(["zz", "a"]))
    def unknown(self, name: str) -> None:
        if name not in self.snaps:
            with pytest.raises(SnapshotNotFound):
                self.disk.rollback(name)

    @rule(kill=st.booleans())
    def reopen(self, kill: bool) -> None:
        if kill:
            self.disk.flush()  # a kill keeps the page cache; flushed is what counts below
        else:
            self.disk.close()
        self.disk = UserDisk.open(self.fs.subdir("u"))

    @invariant()
    def reads_match(self) -> None:
        assert read(self.disk, 0, self.SIZE) == bytes(self.model)

    @invariant()
    def snapshots_match(self) -> None:
        infos = self.disk.snapshots()
        assert [(s.name, s.created) for s in infos] == [(n, t) for n, (_, t) in self.snaps.items()]
        assert sum(s.used_bytes for s in infos) <= self.disk.allocated_bytes
        for name, (image, _) in self.snaps.items():
            assert read_snap(self.disk, name) == image


ChainModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
test_chain_against_a_model = ChainModel.TestCase
