"""Overlay crash safety: power loss at any moment, and kill -9 of a real process.

The power-loss test runs random operation sequences on two overlays (two
"disks" over one base) whose files live in one PowerLossDir, cuts the power
between or *inside* operations (before any file-system call), recovers with
Overlay.open and checks every 512-byte sector of both disks against a model:

* a sector reads exactly what it held at the last successful flush, or a value
  an operation since then gave it (writes may be lost or half done, but only
  at sector granularity) -- never garbage, never the other disk's data;
* after an interrupted reset, the disk is either wholly the old one (as above)
  or wholly the base;
* what Overlay.open recovered is itself durable: an immediate second power
  cut changes nothing.

The kill test runs the overlay in a child process on real files, SIGKILLs it
at random moments 20 times (reopening each time) and checks the same model.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobinux.storage.device import BlockDevice
from mobinux.storage.file import FileDevice
from mobinux.storage.memory import MemoryDevice
from mobinux.storage.overlay import Overlay
from mobinux.storage.overlay_dir import DataFile
from mobinux.storage.powerloss import LossMode, PowerCut, PowerLossDir

S = 512
CHUNK = 2048  # 4 sectors
NSECT = 34  # 8.5 chunks: the last one is short
SIZE = NSECT * S
MODES: list[LossMode] = ["drop", "tear", "scramble"]


def base_sector(s: int) -> bytes:
    return (b"BASE%04d" % s) * (S // 8)


BASE_BYTES = b"".join(base_sector(s) for s in range(NSECT))


def tag_sector(disk: int, op: int, s: int) -> bytes:
    return struct.pack("<4sHHII", b"DISK", disk, 0, op, s) * (S // 16)


class DiskModel:
    """What each sector of one disk may read as."""

    def __init__(self, disk: int, nsect: int, base: list[bytes]) -> None:
        self.disk = disk
        self.base = base
        self.current = list(base)  # what reads return now
        self.flushed = list(base)  # what the last acknowledged flush made durable
        self.since: list[set[bytes]] = [set() for _ in range(nsect)]  # values given since
        self.reset_maybe = False  # a reset began but was not acknowledged

    def apply(self, offset: int, payload: bytes) -> None:
        """An operation (about to be) issued: its values become possible."""
        end = offset + len(payload)
        for s in range(offset // S, (end - 1) // S + 1):
            a, b = max(offset, s * S), min(end, (s + 1) * S)
            value = bytearray(self.current[s])
            value[a - s * S : b - s * S] = payload[a - offset : b - offset]
            self.current[s] = bytes(value)
            self.since[s].add(self.current[s])

    def flushed_now(self) -> None:
        self.flushed = list(self.current)
        self.since = [set() for _ in self.current]
        self.reset_maybe = False

    def reset_done(self) -> None:
        self.current = list(self.base)
        self.flushed_now()

    def adopt(self, observed: list[bytes]) -> None:
        """Recovery read *observed* (checked already); that is now the durable state."""
        self.current = list(observed)
        self.flushed_now()

    def check(self, observed: list[bytes], *, what: str) -> None:
        if self.reset_maybe and observed == self.base:
            return
        for s, value in enumerate(observed):
            if value != self.flushed[s] and value not in self.since[s]:
                raise AssertionError(
                    f"{what}: disk {self.disk} sector {s} reads {value[:16]!r}..., "
                    f"flushed {self.flushed[s][:16]!r}, "
                    f"since {sorted(v[:16] for v in self.since[s])}"
                )


def read_sectors(dev: BlockDevice, nsect: int) -> list[bytes]:
    buf = bytearray(nsect * S)
    dev.read_into(0, memoryview(buf))
    return [bytes(buf[s * S : (s + 1) * S]) for s in range(nsect)]


# -- power loss ------------------------------------------------------------------------

sector_st = st.integers(0, NSECT - 1)
count_st = st.integers(1, 12)
disk_st = st.integers(0, 1)
op_st = st.one_of(
    st.tuples(st.just("write"), disk_st, sector_st, count_st, st.booleans()),
    st.tuples(st.just("write"), disk_st, sector_st, count_st, st.just(False)),
    st.tuples(st.just("zero"), disk_st, sector_st, count_st, st.booleans(), st.booleans()),
    st.tuples(st.just("flush"), disk_st),
    st.tuples(st.just("flush"), disk_st),
    st.tuples(st.just("reset"), disk_st),
    st.tuples(st.just("reopen"), disk_st),
    st.tuples(st.just("kill"), disk_st),
    st.tuples(st.just("read"), disk_st),
    st.tuples(st.just("crash"), st.sampled_from(MODES)),
)


class Harness:
    def __init__(
        self,
        fs: PowerLossDir,
        *,
        small_journal: bool,
        cuts: list[tuple[int, LossMode]] | None = None,
        fails: list[int] | None = None,
    ) -> None:
        self.fs = fs
        self.base = MemoryDevice(SIZE)
        self.base.write(0, BASE_BYTES)
        self.small_journal = small_journal
        base = [base_sector(s) for s in range(NSECT)]
        self.models = [DiskModel(d, NSECT, base) for d in (0, 1)]
        self.dirs = [fs.subdir("a"), fs.subdir("b")]
        self.ovs = [self._tune(Overlay.create(self.base, d, chunk_size=CHUNK)) for d in self.dirs]
        self.opid = 0
        self.crashes = 0
        self.cuts_inside: list[str] = []  # operations a power cut interrupted
        self.failed: list[str] = []  # operations an injected failure made fail
        # Power cuts and failures to arm one after the other: (file-system calls from now, ...)
        self.cut_plan = list(cuts or [])
        self.fail_plan = list(fails or [])
        self._arm()

    def _arm(self) -> None:
        cut_armed, fail_armed = self.fs.armed
        if not cut_armed and self.cut_plan:
            self.fs.cut_after(*self.cut_plan.pop(0))
        if not fail_armed and self.fail_plan:
            self.fs.fail_after(self.fail_plan.pop(0))

    def _tune(self, ov: Overlay) -> Overlay:
        if self.small_journal:
            ov.COMPACT_MIN = 0  # compact at almost every flush
        return ov

    def _open(self, d: int) -> Overlay:
        try:
            return self._tune(Overlay.open(self.base, self.dirs[d]))
        except OSError:  # an injected failure is one-shot: the retry must work
            return self._tune(Overlay.open(self.base, self.dirs[d]))

    def _resync(self, d: int) -> None:
        """After a failed (unacknowledged) operation: what reads return now must be allowed."""
        observed = read_sectors(self.ovs[d], NSECT)
        self.models[d].check(observed, what="after a failed operation")
        self.models[d].current = observed

    def run(self, op: tuple[object, ...]) -> None:
        self.opid += 1
        self._arm()
        kind = op[0]
        if kind == "crash":
            mode = cast(LossMode, op[1])
            assert mode in MODES
            self.fs.power_cut(mode)
            self.recover()
            return
        d = op[1]
        assert isinstance(d, int)
        model, ov = self.models[d], self.ovs[d]
        try:
            if kind == "write":
                _, _, sector, count, unaligned = op
                assert isinstance(sector, int) and isinstance(count, int)
                count = min(count, NSECT - sector)
                payload = b"".join(
                    tag_sector(d, self.opid, s) for s in range(sector, sector + count)
                )
                offset = sector * S
                if unaligned:
                    offset, payload = offset + 100, payload[: max(1, len(payload) - 200)]
                model.apply(offset, payload)
                ov.write(offset, payload)
            elif kind == "zero":
                _, _, sector, count, unaligned, discard = op
                assert isinstance(sector, int) and isinstance(count, int)
                count = min(count, NSECT - sector)
                offset, length = sector * S, count * S
                if unaligned:
                    offset, length = offset + 100, max(1, length - 200)
                model.apply(offset, bytes(length))
                (ov.discard if discard else ov.write_zeroes)(offset, length)
            elif kind == "flush":
                ov.flush()
                model.flushed_now()
            elif kind == "reset":
                model.reset_maybe = True
                ov.reset()
                model.reset_done()
            elif kind == "reopen":
                try:
                    ov.close()
                except OSError:
                    self.ovs[d] = self._open(d)
                    self._resync(d)
                    return
                model.flushed_now()
                self.ovs[d] = self._open(d)
                assert read_sectors(self.ovs[d], NSECT) == model.current
            elif kind == "kill":
                # The process dies (its page cache survives): abandon the
                # overlay without closing it and recover from the files.
                self.ovs[d] = self._open(d)
                observed = read_sectors(self.ovs[d], NSECT)
                model.check(observed, what="after a kill")
                model.adopt(observed)  # the next power cut must not change it
            elif kind == "read":
                assert read_sectors(ov, NSECT) == model.current
        except PowerCut:
            self.cuts_inside.append(str(kind))
            self.recover()
        except OSError as exc:
            assert exc.errno in (errno.ENOSPC, errno.EIO), exc
            self.failed.append(str(kind))
            self._resync(d)

    def recover(self) -> None:
        self.crashes += 1
        self.fs.reboot()
        recovered = []
        for d, model in enumerate(self.models):
            ov = self._open(d)
            observed = read_sectors(ov, NSECT)
            model.check(observed, what=f"after power cut {self.crashes}")
            model.adopt(observed)
            recovered.append(observed)
        # What open recovered must itself be durable.
        self.fs.power_cut("scramble")
        self.fs.reboot()
        self.ovs = [self._open(d) for d in (0, 1)]
        for d in (0, 1):
            assert read_sectors(self.ovs[d], NSECT) == recovered[d], "recovery was not durable"
        self._arm()


@settings(
    max_examples=200,
    deadline=None,
    # Fixed example sequence in CI (deterministic); run it randomised with many
    # examples when changing the overlay or PowerLossDir (see the regressions below).
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=st.lists(op_st, min_size=8, max_size=50),
    cuts=st.lists(st.tuples(st.integers(0, 60), st.sampled_from(MODES)), max_size=3),
    fails=st.lists(st.integers(0, 60), max_size=3),
    final=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
    small_journal=st.booleans(),
)
def test_power_loss_at_any_moment(
    ops: list[tuple[object, ...]],
    cuts: list[tuple[int, LossMode]],
    fails: list[int],
    final: LossMode,
    seed: int,
    small_journal: bool,
) -> None:
    _power_loss_scenario(ops, cuts, fails, final, seed, small_journal)


def _power_loss_scenario(
    ops: list[tuple[object, ...]],
    cuts: list[tuple[int, LossMode]],
    fails: list[int],
    final: LossMode,
    seed: int,
    small_journal: bool,
) -> None:
    fs = PowerLossDir(seed=seed)
    h = Harness(fs, small_journal=small_journal, cuts=cuts, fails=fails)
    for op in ops:
        h.run(op)
    # Finally the power goes off for good.
    fs.power_cut(final)
    h.recover()


def test_torn_power_cut_after_repeated_writes_regression() -> None:
    """Found by a randomised run: two unflushed writes to one flushed sector, the
    last one partial, then a torn cut.  PowerLossDir's "tear" pasted the last
    write's bytes onto the *synced* sector, a value the sector never held (a
    sector reaches the media whole, as the page cache holds it); the overlay was
    right.  Fixed in powerloss.py, checked directly below."""
    ops: list[tuple[object, ...]] = [
        ("write", 0, 0, 1, False), ("write", 1, 0, 1, False), ("flush", 1),
        ("write", 0, 0, 1, False), ("write", 0, 0, 1, False), ("write", 0, 0, 1, False),
        ("write", 0, 0, 1, False), ("write", 1, 0, 1, False), ("write", 1, 0, 1, True),
    ]
    _power_loss_scenario(ops, [], [], "tear", 22, False)



def test_each_directory_syncs_only_its_own_names() -> None:
    """PowerLossDir's subdirectories: a name is durable at its own directory's sync."""
    fs = PowerLossDir()
    a, b = fs.subdir("a"), fs.subdir("b")
    a.create("x").close()
    b.create("y").close()
    fs.create("top").close()
    assert fs.listdir() == ["top"] and fs.subdirs() == ["a", "b"]
    assert a.listdir() == ["x"] and a.subdir("deep").listdir() == []
    a.sync()
    fs.power_cut("drop")
    fs.reboot()
    assert sorted(fs.snapshot()) == ["a/x"]
    b.create("y").close()
    b.sync()
    b.remove_subdir("nothing")
    fs.remove_subdir("a")
    fs.sync()  # the root's sync does not make a's unlink durable
    fs.power_cut("drop")
    fs.reboot()
    assert sorted(fs.snapshot()) == ["a/x", "b/y"]

def test_open_with_a_full_directory_makes_what_it_recovered_durable() -> None:
    """Found by a randomised run: disk 1's flush fails at the journal fsync (its
    record stays in the page cache), the process dies, and Overlay.open cannot
    write its checkpoint (the directory fsync fails: ENOSPC).  Open fell back to
    the old journal without fsyncing it, so what it recovered -- and served --
    was lost by the next power cut.  Open now fsyncs that journal."""
    ops: list[tuple[object, ...]] = [
        ("kill", 0), ("flush", 0), ("write", 1, 17, 12, False), ("flush", 1),
        ("write", 0, 29, 8, False), ("reopen", 0), ("kill", 1),
    ]
    _power_loss_scenario(ops, [(8, "scramble")], [22, 7, 23], "drop", 23119, False)


def test_open_makes_the_checkpoint_it_read_durable_before_serving_it() -> None:
    """Found by a randomised run: a reset renames its empty checkpoint into place
    but its directory fsync fails, so the reset fails (the overlay keeps the old
    generation); the process dies; Overlay.open reads the *new* (empty)
    checkpoint, deletes the old generation's files and serves an empty disk --
    then a power cut brings the old checkpoint back, with contents open never
    showed (or files it deleted).  Open now fsyncs the directory first."""
    ops: list[tuple[object, ...]] = [
        ("write", 0, 15, 6, False), ("write", 1, 6, 10, False), ("write", 0, 10, 9, False),
        ("flush", 0), ("reset", 0), ("flush", 1), ("kill", 0),
    ]
    _power_loss_scenario(ops, [], [7, 11, 11], "drop", 3364, False)

@pytest.mark.parametrize("mode", MODES)
def test_a_power_cut_leaves_each_sector_at_a_value_it_held(mode: LossMode) -> None:
    """PowerLossDir itself: after any cut, every sector of a file is whole -- its
    synced value or a value it held after some unsynced write -- never a piece of
    a write pasted onto an older value."""
    for seed in range(200):
        fs = PowerLossDir(seed=seed)
        fs.create_data("f", 4 * S)
        fs.sync()
        f = fs.open_data("f")
        f.write(0, b"A" * (4 * S))
        f.flush()
        held: list[set[bytes]] = [{b"A" * S} for _ in range(4)]
        rng = random.Random(seed)
        for i in range(rng.randint(1, 4)):
            offset = rng.randrange(4 * S)
            n = rng.randint(1, 4 * S - offset)
            f.write(offset, bytes([0x61 + i]) * n)
            snap = fs.snapshot()["f"]
            for s in range(4):
                held[s].add(snap[s * S : (s + 1) * S])
        fs.power_cut(mode)
        fs.reboot()
        after = fs.read("f")
        for s in range(4):
            assert after[s * S : (s + 1) * S] in held[s], (seed, s)


SCENARIO: list[tuple[object, ...]] = [
    ("write", 0, 0, 6, False),
    ("write", 1, 2, 3, True),
    ("zero", 0, 4, 2, True, True),
    ("flush", 0),
    ("write", 0, 8, 8, False),
    ("zero", 0, 0, 4, False, True),
    ("flush", 0),
    ("flush", 1),
    ("write", 0, 3, 2, True),
    ("zero", 1, 0, 12, False, False),
    ("flush", 0),
    ("reset", 1),
    ("write", 1, 30, 4, False),
    ("reopen", 0),
    ("write", 0, 20, 10, False),
    ("write", 0, 6, 1, False),  # in place, into a flushed DATA chunk
    ("kill", 0),
    ("write", 0, 21, 1, False),
    ("flush", 0),
    ("flush", 1),
    ("reset", 0),
    ("write", 0, 5, 5, False),
    ("flush", 0),
]


def _scenario_calls(small_journal: bool) -> int:
    fs = PowerLossDir()
    h = Harness(fs, small_journal=small_journal)
    start = fs.ops
    for op in SCENARIO:
        h.run(op)
    assert h.crashes == 0
    return fs.ops - start


@pytest.mark.parametrize("small_journal", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_power_cut_before_every_file_system_call_of_a_scenario(
    mode: LossMode, small_journal: bool
) -> None:
    """Exhaustive: the scenario is cut short before each of its file-system calls in turn."""
    calls = _scenario_calls(small_journal)
    assert calls > 80
    for n in range(calls):
        for seed in range(1 if mode == "drop" else 3):
            fs = PowerLossDir(seed=n * 3 + seed)
            h = Harness(fs, small_journal=small_journal, cuts=[(n, mode)])
            for op in SCENARIO:
                h.run(op)
            assert h.crashes == 1 and len(h.cuts_inside) == 1
            fs.power_cut(mode)
            h.recover()


class LyingDataSync(PowerLossDir):
    """A broken file system whose data-file fdatasync does nothing."""

    def open_data(self, name: str) -> DataFile:
        data = super().open_data(name)
        data.flush = lambda: None  # type: ignore[method-assign]
        return data


class LyingDirSync(PowerLossDir):
    """A broken file system whose directory fsync does nothing (once the overlays exist)."""

    lying = False

    def sync_dir(self, prefix: str) -> None:
        if not self.lying:
            super().sync_dir(prefix)


def _scenario(h: Harness) -> None:
    for i in range(6):
        h.run(("write", 0, (i * 5) % NSECT, 4, False))
        h.run(("flush", 0))
    h.run(("crash", "drop"))


@pytest.mark.parametrize("fs_class", [LyingDataSync, LyingDirSync])
def test_the_check_catches_a_file_system_that_loses_synced_data(
    fs_class: type[PowerLossDir],
) -> None:
    """The harness can fail: the same scenario on a file system that ignores a sync."""
    fs = fs_class(seed=1)
    h = Harness(fs, small_journal=True)
    if isinstance(fs, LyingDirSync):
        fs.lying = True
    with pytest.raises(AssertionError, match="after power cut"):
        _scenario(h)


def test_an_honest_file_system_passes_the_same_scenario() -> None:
    h = Harness(PowerLossDir(seed=1), small_journal=True)
    _scenario(h)
    assert h.crashes == 1
    assert h.models[0].current[25] == tag_sector(0, 11, 25)


# -- kill -9 ----------------------------------------------------------------------------------

K_CHUNK = 16 * 1024
K_NSECT = 2048  # 1 MiB
K_MAXC = 64
KILLS = 20

CHILD = textwrap.dedent(
    """
    import random, struct, sys
    from mobinux.storage.file import FileDevice
    from mobinux.storage.overlay import Overlay

    directory, base_path, rnd, seed, create = sys.argv[1:]
    rnd = int(rnd)
    S, NSECT, MAXC, CHUNK = 512, {nsect}, {maxc}, {chunk}
    base = FileDevice(base_path, readonly=True)
    if create == "1":
        ov = Overlay.create(base, directory, chunk_size=CHUNK)
    else:
        ov = Overlay.open(base, directory)
    rng = random.Random(int(seed))

    def say(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    def payload(op, sector, count):
        return b"".join(
            struct.pack("<4sIII", b"KILL", rnd, op, s) * 32 for s in range(sector, sector + count)
        )

    say("ready")
    op = 0
    while True:
        op += 1
        r = rng.random()
        sector = rng.randrange(NSECT)
        count = rng.randint(1, min(MAXC, NSECT - sector))
        if r < 0.55:
            say(f"B {{op}} w {{sector}} {{count}}")
            ov.write(sector * S, payload(op, sector, count))
        elif r < 0.7:
            say(f"B {{op}} z {{sector}} {{count}}")
            if rng.random() < 0.5:
                ov.discard(sector * S, count * S)
            else:
                ov.write_zeroes(sector * S, count * S)
        elif r < 0.96:
            say(f"B {{op}} f")
            ov.flush()
        else:
            say(f"B {{op}} r")
            ov.reset()
        say(f"E {{op}}")
    """
).format(nsect=K_NSECT, maxc=K_MAXC, chunk=K_CHUNK)


def k_base_sector(s: int) -> bytes:
    return (b"kbase%05d|" % s) * 46 + b"\x5a" * 6


def k_payload_sector(rnd: int, op: int, s: int) -> bytes:
    return struct.pack("<4sIII", b"KILL", rnd, op, s) * 32


def test_kill_9_at_random_moments(tmp_path: Path) -> None:
    base_path = tmp_path / "base.img"
    base_path.write_bytes(b"".join(k_base_sector(s) for s in range(K_NSECT)))
    directory = tmp_path / "overlay"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    model = DiskModel(0, K_NSECT, [k_base_sector(s) for s in range(K_NSECT)])
    rng = random.Random(4)
    interrupted = {"w": 0, "z": 0, "f": 0, "r": 0}
    flushes = 0
    base = FileDevice(base_path, readonly=True)
    for rnd in range(KILLS):
        child = subprocess.Popen(
            [
                *(sys.executable, str(script), str(directory), str(base_path), str(rnd)),
                *(str(rng.randrange(1 << 30)), "1" if rnd == 0 else "0"),
            ],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        assert child.returncode == -signal.SIGKILL
        in_progress: list[str] | None = None
        for line in child.stdout.read().decode().splitlines():
            fields = line.split()
            if fields[0] == "B":
                in_progress = fields
                op, kind = int(fields[1]), fields[2]
                if kind in ("w", "z"):
                    sector, count = int(fields[3]), int(fields[4])
                    if kind == "w":
                        data = b"".join(
                            k_payload_sector(rnd, op, s) for s in range(sector, sector + count)
                        )
                    else:
                        data = bytes(count * S)
                    model.apply(sector * S, data)
                elif kind == "r":
                    model.reset_maybe = True
            else:
                assert fields[0] == "E" and in_progress is not None
                if in_progress[2] == "f":
                    model.flushed_now()
                    flushes += 1
                elif in_progress[2] == "r":
                    model.reset_done()
                in_progress = None
        child.stdout.close()
        if in_progress is not None:
            interrupted[in_progress[2]] += 1
        ov = Overlay.open(base, directory)
        observed = read_sectors(ov, K_NSECT)
        model.check(observed, what=f"after kill {rnd + 1}")
        model.adopt(observed)
        assert ov.allocated_bytes <= K_NSECT * S
        ov.close()
    base.close()
    assert flushes > 0
    assert sum(interrupted.values()) > 0  # some kills landed inside an operation
    files = sorted(os.listdir(directory))
    assert files[-1] == "meta" and len(files) == 3, files
