"""User disk crash safety: power loss at any moment, during I/O and snapshot operations.

Two user disks (two users) live in one PowerLossDir.  Random sequences of
writes, zeroing, flushes, snapshot create / rollback / delete, clean reopens
and kills run on them; the power is cut between operations and *inside* them
(before any file-system call, a "drop", "tear" or "scramble" loss), and some
file-system calls fail (ENOSPC).  After each cut both disks are reopened and
checked against a model:

* reopening succeeds, and leaves exactly one layer directory per snapshot
  plus the live one (what an interrupted operation left is gone);
* the snapshot list is the one before the interrupted operation or the one
  after it; every snapshot operation that returned is there;
* every snapshot reads exactly as the disk was when it was taken;
* every sector of the live disk reads what it held at the last flush, or a
  value a write since gave it (only this disk's own data: writes carry the
  disk, operation and sector in every 16 bytes), or, if a rollback may have
  happened, exactly the snapshot rolled back to;
* what the reopen recovered is durable: an immediate second cut changes nothing.

The kill test runs a user disk in a child process on real files, SIGKILLs it
at random moments (reopening each time) and checks the same things.
"""

from __future__ import annotations

import copy
import errno
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobinux.storage.chain import UserDisk
from mobinux.storage.powerloss import LossMode, PowerCut, PowerLossDir
from tests.fuzz.test_storage_overlay_crash import DiskModel, read_sectors, tag_sector

S = 512
CHUNK = 2048  # 4 sectors
NSECT = 24  # 6 chunks
SIZE = NSECT * S
MODES: list[LossMode] = ["drop", "tear", "scramble"]


@dataclass
class State:
    """One possible durable state of a disk: its live contents and its snapshots."""

    live: DiskModel
    snaps: dict[str, list[bytes]] = field(default_factory=dict)  # oldest first

    def names(self) -> list[str]:
        return list(self.snaps)


def exact(image: list[bytes], disk: int) -> DiskModel:
    m = DiskModel(disk, NSECT, [bytes(S)] * NSECT)
    m.adopt(list(image))
    return m


class Harness:
    def __init__(
        self,
        fs: PowerLossDir,
        *,
        cuts: list[tuple[int, LossMode]] | None = None,
        fails: list[int] | None = None,
    ) -> None:
        self.fs = fs
        self.dirs = [fs.subdir("u0"), fs.subdir("u1")]
        self.disks = [UserDisk.create(d, SIZE, chunk_size=CHUNK) for d in self.dirs]
        self.cur = [State(DiskModel(d, NSECT, [bytes(S)] * NSECT)) for d in (0, 1)]
        # Other states a recovery may show: an operation that was cut short, or
        # whose manifest was renamed but may not be durable.
        self.alts: list[list[State]] = [[], []]
        self.opid = 0
        self.after: State | None = None  # the outcome of the snapshot operation under way
        self.crashes = 0
        self.cuts_inside: list[str] = []
        self.failed: list[str] = []
        self.cut_plan = list(cuts or [])
        self.fail_plan = list(fails or [])
        self._arm()

    def _arm(self) -> None:
        cut_armed, fail_armed = self.fs.armed
        if not cut_armed and self.cut_plan:
            self.fs.cut_after(*self.cut_plan.pop(0))
        if not fail_armed and self.fail_plan:
            self.fs.fail_after(self.fail_plan.pop(0))

    def _open(self, d: int) -> UserDisk:
        try:
            return UserDisk.open(self.dirs[d])
        except OSError:  # an injected failure is one-shot: the retry must work
            return UserDisk.open(self.dirs[d])

    # -- operations -------------------------------------------------------------------

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
        self.after = None
        try:
            self._run(op, d)
        except PowerCut:  # also from inside the recovery of a failed operation
            self.cuts_inside.append(str(kind))
            if self.after is not None:
                self.alts[d].append(self.after)
            self.recover()

    def _run(self, op: tuple[object, ...], d: int) -> None:
        kind = op[0]
        disk, cur = self.disks[d], self.cur[d]
        after: State | None = None  # the state a snapshot operation leads to
        try:
            if kind == "write":
                _, _, sector, count, unaligned = op
                assert isinstance(sector, int) and isinstance(count, int)
                count = min(count, NSECT - sector)
                payload = b"".join(tag_sector(d, self.opid, s) for s in range(sector, sector + count))
                offset = sector * S
                if unaligned:
                    offset, payload = offset + 100, payload[: max(1, len(payload) - 200)]
                cur.live.apply(offset, payload)
                disk.write(offset, payload)
            elif kind == "zero":
                _, _, sector, count, unaligned, discard = op
                assert isinstance(sector, int) and isinstance(count, int)
                count = min(count, NSECT - sector)
                offset, length = sector * S, count * S
                if unaligned:
                    offset, length = offset + 100, max(1, length - 200)
                cur.live.apply(offset, bytes(length))
                (disk.discard if discard else disk.write_zeroes)(offset, length)
            elif kind == "flush":
                disk.flush()
                cur.live.flushed_now()
                self.alts[d] = []
            elif kind == "snap":
                name = f"s{self.opid}"
                after = State(exact(cur.live.current, d), {**cur.snaps, name: list(cur.live.current)})
                self.after = after
                disk.create_snapshot(name, float(self.opid))
                self._done(d, after)
            elif kind in ("rollback", "delete"):
                names = cur.names()
                if not names:
                    return
                pick = op[2]
                assert isinstance(pick, int)
                name = names[pick % len(names)]
                if kind == "rollback":
                    keep = names[: names.index(name) + 1]
                    after = State(exact(cur.snaps[name], d), {n: cur.snaps[n] for n in keep})
                    self.after = after
                    disk.rollback(name)
                else:
                    # The live contents do not change: both states share them.
                    after = State(cur.live, {n: v for n, v in cur.snaps.items() if n != name})
                    self.after = after
                    disk.delete_snapshot(name)
                self._done(d, after)
            elif kind == "reopen":
                try:
                    disk.close()
                except OSError:
                    self.failed.append("close")
                    self._kill(d)
                    return
                cur.live.flushed_now()
                self.alts[d] = []
                self.disks[d] = self._open(d)
                self._check_exact(d)
            elif kind == "kill":
                self._kill(d)
        except OSError as exc:
            self.failed.append(str(kind))
            assert exc.errno is not None
            self.after = None  # known now (below), not a possible outcome of a cut
            self._after_failure(d, after)

    def _done(self, d: int, after: State) -> None:
        # Each operation first makes any earlier uncertain manifest durable and
        # ends with a durable manifest of its own.
        self.cur[d] = after
        self.alts[d] = []
        self._check_snapshot_list(d)

    def _after_failure(self, d: int, after: State | None) -> None:
        """An operation failed: the disk is in the state before or (renamed, not yet
        durable) after it; what it reads now must be allowed."""
        disk, cur = self.disks[d], self.cur[d]
        names = [s.name for s in disk.snapshots()]
        observed = read_sectors(disk, NSECT)
        if (
            after is not None
            and names == after.names()
            # A rollback to the newest snapshot keeps the list: its contents tell.
            and (names != cur.names() or observed == after.live.current)
        ):
            self.alts[d].append(cur)
            self.cur[d] = cur = after
        assert names == cur.names()
        cur.live.check(observed, what="after a failed operation")
        cur.live.current = observed

    def _kill(self, d: int) -> None:
        """The process dies (the page cache survives); recover from the files."""
        self.disks[d] = self._open(d)
        self._adopt(d, "after a kill")

    # -- checks -----------------------------------------------------------------------

    def _check_snapshot_list(self, d: int) -> None:
        assert [s.name for s in self.disks[d].snapshots()] == self.cur[d].names()

    def _check_exact(self, d: int) -> None:
        disk, cur = self.disks[d], self.cur[d]
        self._check_snapshot_list(d)
        assert read_sectors(disk, NSECT) == cur.live.current
        for name, image in cur.snaps.items():
            assert read_snapshot(disk, name) == image, name

    def _adopt(self, d: int, what: str) -> list[bytes]:
        """Check the reopened disk against every state it may be in; adopt the one it is in."""
        disk = self.disks[d]
        names = [s.name for s in disk.snapshots()]
        observed = read_sectors(disk, NSECT)
        snaps = {name: read_snapshot(disk, name) for name in names}
        assert len(self.dirs[d].subdirs()) == len(names) + 1, "leftover layer directories"
        errors = []
        for state in [self.cur[d], *self.alts[d]]:
            if state.names() != names:
                errors.append(f"snapshots {names} are not {state.names()}")
                continue
            bad = [n for n in names if snaps[n] != state.snaps[n]]
            if bad:
                errors.append(f"snapshots {bad} changed")
                continue
            try:
                state.live.check(observed, what=what)
            except AssertionError as exc:
                errors.append(str(exc))
                continue
            live = copy.deepcopy(state.live)
            live.adopt(observed)
            self.cur[d] = State(live, snaps)
            self.alts[d] = []
            return observed
        raise AssertionError(f"{what}: disk {d} is in no allowed state: {errors}")

    def recover(self) -> None:
        self.crashes += 1
        self.fs.reboot()
        recovered = []
        for d in (0, 1):
            self.disks[d] = self._open(d)
            recovered.append(self._adopt(d, f"after power cut {self.crashes}"))
        # What the reopen recovered must itself be durable.
        self.fs.power_cut("scramble")
        self.fs.reboot()
        self.disks = [self._open(d) for d in (0, 1)]
        for d in (0, 1):
            assert read_sectors(self.disks[d], NSECT) == recovered[d], "recovery was not durable"
            self._check_exact(d)
        self._arm()


def read_snapshot(disk: UserDisk, name: str) -> list[bytes]:
    buf = bytearray(SIZE)
    disk.read_snapshot(name, 0, memoryview(buf))
    return [bytes(buf[s * S : (s + 1) * S]) for s in range(NSECT)]


# -- power loss at any moment ---------------------------------------------------------------

sector_st = st.integers(0, NSECT - 1)
count_st = st.integers(1, 10)
disk_st = st.integers(0, 1)
pick_st = st.integers(0, 7)
op_st = st.one_of(
    st.tuples(st.just("write"), disk_st, sector_st, count_st, st.booleans()),
    st.tuples(st.just("write"), disk_st, sector_st, count_st, st.just(False)),
    st.tuples(st.just("zero"), disk_st, sector_st, count_st, st.booleans(), st.booleans()),
    st.tuples(st.just("flush"), disk_st),
    st.tuples(st.just("snap"), disk_st),
    st.tuples(st.just("snap"), disk_st),
    st.tuples(st.just("rollback"), disk_st, pick_st),
    st.tuples(st.just("delete"), disk_st, pick_st),
    st.tuples(st.just("delete"), disk_st, pick_st),
    st.tuples(st.just("reopen"), disk_st),
    st.tuples(st.just("kill"), disk_st),
    st.tuples(st.just("crash"), st.sampled_from(MODES)),
)


def _scenario(
    ops: list[tuple[object, ...]],
    cuts: list[tuple[int, LossMode]],
    fails: list[int],
    final: LossMode,
    seed: int,
) -> Harness:
    fs = PowerLossDir(seed=seed)
    h = Harness(fs, cuts=cuts, fails=fails)
    for op in ops:
        h.run(op)
    fs.power_cut(final)  # finally the power goes off for good
    h.recover()
    return h


@settings(
    max_examples=600,
    deadline=None,
    derandomize=True,  # CI runs a fixed sequence; run it randomised when changing chain.py
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=st.lists(op_st, min_size=8, max_size=40),
    cuts=st.lists(st.tuples(st.integers(0, 120), st.sampled_from(MODES)), max_size=3),
    fails=st.lists(st.integers(0, 120), max_size=3),
    final=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_power_loss_at_any_moment(
    ops: list[tuple[object, ...]],
    cuts: list[tuple[int, LossMode]],
    fails: list[int],
    final: LossMode,
    seed: int,
) -> None:
    _scenario(ops, cuts, fails, final, seed)


# -- every file-system call of a scenario, in turn ---------------------------------------------

SCENARIO: list[tuple[object, ...]] = [
    ("write", 0, 0, 10, False),
    ("write", 1, 4, 6, True),
    ("snap", 0),  # s3
    ("write", 0, 2, 3, True),
    ("zero", 0, 8, 6, False, True),
    ("snap", 0),  # s6
    ("write", 0, 20, 4, False),
    ("flush", 0),
    ("snap", 0),  # s9
    ("zero", 0, 0, 5, True, False),
    ("delete", 0, 1),  # s6: merged into s9's layer
    ("write", 0, 9, 2, False),
    ("rollback", 0, 0),  # back to s3; s9 goes
    ("write", 0, 1, 1, False),
    ("snap", 0),
    ("delete", 0, 0),  # s3: merged into the newest snapshot's layer
    ("delete", 0, 0),  # the last: merged into the live top
    ("flush", 0),
]


def _scenario_calls() -> int:
    fs = PowerLossDir()
    h = Harness(fs)
    start = fs.ops
    for op in SCENARIO:
        h.run(op)
    assert h.crashes == 0 and not h.failed
    assert h.cur[0].names() == [] and h.cur[1].names() == []
    return fs.ops - start


@pytest.mark.parametrize("mode", MODES)
def test_power_cut_before_every_file_system_call_of_a_scenario(mode: LossMode) -> None:
    """Exhaustive: the scenario is cut short before each of its file-system calls in turn."""
    calls = _scenario_calls()
    assert calls > 100
    inside: set[str] = set()
    for n in range(calls):
        h = _scenario(SCENARIO, [(n, mode)], [], mode, n)
        assert h.crashes == 2 and len(h.cuts_inside) == 1
        inside.update(h.cuts_inside)
    assert inside >= {"write", "snap", "delete", "rollback", "flush"}


def test_an_error_at_every_file_system_call_of_a_scenario() -> None:
    """Each file-system call of the scenario fails in turn (ENOSPC), then the power goes."""
    calls = _scenario_calls()
    failed: set[str] = set()
    for n in range(calls):
        h = _scenario(SCENARIO, [], [n], "tear", n)
        # Some calls may fail harmlessly (removing a dropped layer: open removes
        # it later); a failed fdatasync of the live layer fails every later flush
        # too (its pages may be lost) until the disk is reopened.
        failed.update(h.failed[:1])
    assert failed >= {"write", "snap", "delete", "rollback", "flush"}


class LyingDirSync(PowerLossDir):
    """A broken file system whose directory fsync does nothing once armed."""

    lying = False

    def sync_dir(self, prefix: str) -> None:
        if not self.lying:
            super().sync_dir(prefix)


def test_the_check_catches_a_file_system_that_loses_a_snapshot() -> None:
    """The harness can fail: a manifest that never becomes durable loses a snapshot."""
    fs = LyingDirSync(seed=1)
    h = Harness(fs)
    fs.lying = True
    h.run(("write", 0, 0, 4, False))
    h.run(("snap", 0))
    with pytest.raises(AssertionError, match="no allowed state"):
        h.run(("crash", "drop"))


def test_an_honest_file_system_passes_the_same_scenario() -> None:
    h = Harness(PowerLossDir(seed=1))
    h.run(("write", 0, 0, 4, False))
    h.run(("snap", 0))
    h.run(("crash", "drop"))
    assert h.crashes == 1 and h.cur[0].names() == ["s2"]


class FailingDirSync(PowerLossDir):
    """Fails the next fsync of disk 0's directory, once armed."""

    fail_next = False

    def sync_dir(self, prefix: str) -> None:
        if self.fail_next and prefix == "u0/":
            self.fail_next = False
            raise OSError(errno.EIO, "injected directory fsync failure")
        super().sync_dir(prefix)


@pytest.mark.parametrize("op", [("snap", 0), ("rollback", 0, 0), ("delete", 0, 0)])
def test_a_kill_after_a_manifest_that_was_renamed_but_not_synced(op: tuple[object, ...]) -> None:
    """The operation fails at its directory fsync (the new manifest is in place, not
    durable); the process dies; the reopen must make that manifest durable before
    it deletes the layers the old one names, or a power cut brings the old one back
    -- naming deleted layers, or contents the reopened disk no longer showed."""
    fs = FailingDirSync(seed=3)
    h = Harness(fs)
    for setup in [
        ("write", 0, 0, 8, False),
        ("snap", 0),
        ("write", 0, 4, 8, False),
        ("snap", 0),
        ("write", 0, 8, 4, False),
    ]:
        h.run(setup)
    fs.fail_next = True
    h.run(op)
    assert h.failed == [op[0]] and not fs.fail_next
    h.run(("kill", 0))
    h.run(("crash", "drop"))
    assert h.crashes == 1


# -- kill -9 on real files --------------------------------------------------------------------

K_CHUNK = 16 * 1024
K_NSECT = 1024  # 512 KiB
K_MAXC = 48
KILLS = 12

CHILD = textwrap.dedent(
    """
    import random, struct, sys
    from mobinux.storage.chain import UserDisk

    directory, rnd, seed, create = sys.argv[1:]
    rnd = int(rnd)
    S, NSECT, MAXC, CHUNK = 512, {nsect}, {maxc}, {chunk}
    if create == "1":
        disk = UserDisk.create(directory, NSECT * S, chunk_size=CHUNK)
    else:
        disk = UserDisk.open(directory)
    rng = random.Random(int(seed))

    def say(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    say("ready")
    op = 0
    while True:
        op += 1
        r = rng.random()
        sector = rng.randrange(NSECT)
        count = rng.randint(1, min(MAXC, NSECT - sector))
        names = [s.name for s in disk.snapshots()]
        if r < 0.55:
            say(f"B {{op}} w {{sector}} {{count}}")
            disk.write(sector * S, b"".join(
                struct.pack("<4sIII", b"KILL", rnd, op, s) * 32
                for s in range(sector, sector + count)))
        elif r < 0.65:
            say(f"B {{op}} z {{sector}} {{count}}")
            disk.discard(sector * S, count * S)
        elif r < 0.78:
            say(f"B {{op}} f")
            disk.flush()
        elif r < 0.88 or not names:
            say(f"B {{op}} s k{{rnd}}_{{op}}")
            disk.create_snapshot(f"k{{rnd}}_{{op}}", float(op))
        elif r < 0.92:
            name = rng.choice(names)
            say(f"B {{op}} r {{name}}")
            disk.rollback(name)
        else:
            name = rng.choice(names)
            say(f"B {{op}} d {{name}}")
            disk.delete_snapshot(name)
        say(f"E {{op}}")
    """
).format(nsect=K_NSECT, maxc=K_MAXC, chunk=K_CHUNK)


def k_sector(rnd: int, op: int, s: int) -> bytes:
    return struct.pack("<4sIII", b"KILL", rnd, op, s) * 32


def k_read(disk: UserDisk, name: str | None = None) -> list[bytes]:
    buf = bytearray(K_NSECT * S)
    if name is None:
        disk.read_into(0, memoryview(buf))
    else:
        disk.read_snapshot(name, 0, memoryview(buf))
    return [bytes(buf[s * S : (s + 1) * S]) for s in range(K_NSECT)]


def test_kill_9_at_random_moments(tmp_path: Path) -> None:
    """A child process runs random I/O and snapshot operations on a user disk on real
    files and is SIGKILLed at random moments; each reopen must show every completed
    operation, exact snapshots, and only this disk's own data."""
    directory = tmp_path / "alice"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    blank = [bytes(S)] * K_NSECT
    cur = State(DiskModel(0, K_NSECT, blank))
    rng = random.Random(5)
    interrupted: dict[str, int] = {}
    completed: dict[str, int] = {}
    for rnd in range(KILLS):
        child = subprocess.Popen(
            [
                *(sys.executable, str(script), str(directory), str(rnd)),
                *(str(rng.randrange(1 << 30)), "1" if rnd == 0 else "0"),
            ],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        assert child.returncode == -signal.SIGKILL
        after: State | None = None
        pending: list[str] | None = None
        for line in child.stdout.read().decode().splitlines():
            fields = line.split()
            if fields[0] == "B":
                pending = fields
                op, kind = int(fields[1]), fields[2]
                if kind in ("w", "z"):
                    sector, count = int(fields[3]), int(fields[4])
                    if kind == "w":
                        data = b"".join(k_sector(rnd, op, s) for s in range(sector, sector + count))
                    else:
                        data = bytes(count * S)
                    cur.live.apply(sector * S, data)
                elif kind == "s":
                    image = list(cur.live.current)
                    live = DiskModel(0, K_NSECT, blank)
                    live.adopt(image)
                    after = State(live, {**cur.snaps, fields[3]: image})
                elif kind == "r":
                    names = cur.names()
                    keep = names[: names.index(fields[3]) + 1]
                    live = DiskModel(0, K_NSECT, blank)
                    live.adopt(cur.snaps[fields[3]])
                    after = State(live, {n: cur.snaps[n] for n in keep})
                elif kind == "d":
                    after = State(cur.live, {n: v for n, v in cur.snaps.items() if n != fields[3]})
            else:
                assert fields[0] == "E" and pending is not None
                if pending[2] == "f":
                    cur.live.flushed_now()
                elif after is not None:
                    cur, after = after, None
                completed[pending[2]] = completed.get(pending[2], 0) + 1
                pending = None
        child.stdout.close()
        if pending is not None:
            interrupted[pending[2]] = interrupted.get(pending[2], 0) + 1
        disk = UserDisk.open(directory)
        names = [s.name for s in disk.snapshots()]
        state = cur
        if (
            after is not None
            and names == after.names()
            # An interrupted rollback to the newest snapshot keeps the list: contents tell.
            and (names != cur.names() or k_read(disk) == after.live.current)
        ):
            state = after
        assert names == state.names(), f"after kill {rnd + 1}"
        for name in names:
            assert k_read(disk, name) == state.snaps[name], f"snapshot {name} after kill {rnd + 1}"
        observed = k_read(disk)
        state.live.check(observed, what=f"after kill {rnd + 1}")
        state.live.adopt(observed)
        cur = state
        assert len([p for p in directory.iterdir() if p.is_dir()]) == len(names) + 1
        disk.close()
    assert completed.get("s", 0) > 0 and completed.get("d", 0) + completed.get("r", 0) > 0
    assert sum(interrupted.values()) > 0  # some kills landed inside an operation
