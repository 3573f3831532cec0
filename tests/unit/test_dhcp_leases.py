"""Lease table (allocation, lookups) and SQLite store (durability, kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from mobinux.dhcp.leases import Lease, LeaseState, LeaseStore, LeaseTable, read_leases
from mobinux.errors import LocalError

A = IPv4Address
T0 = 1_700_000_000.0


def lease(
    ip: str, n: int, expires: float = T0 + 3600, state: LeaseState = LeaseState.BOUND
) -> Lease:
    mac = f"52:54:00:00:00:{n:02x}"
    return Lease(
        A(ip), mac, b"\x01" + bytes.fromhex(mac.replace(":", "")), f"host{n}", expires, state
    )


def test_allocate_walks_pool_then_reuses_oldest_freed() -> None:
    t = LeaseTable(A("10.0.0.10"), A("10.0.0.12"))
    got = []
    for n in range(3):
        ip = t.allocate(T0, lambda a: True)
        assert ip is not None
        t.put(lease(str(ip), n, expires=T0 + 100 + n))
        got.append(ip)
    assert got == [A("10.0.0.10"), A("10.0.0.11"), A("10.0.0.12")]
    assert t.allocate(T0, lambda a: True) is None
    # After expiry the address that ended first is reused first.
    assert t.allocate(T0 + 101.5, lambda a: True) == A("10.0.0.10")
    assert t.allocate(T0 + 1000, lambda a: a != A("10.0.0.10")) == A("10.0.0.11")
    # Renewal pushes the expiry: the stale heap entry is ignored.
    t.put(lease("10.0.0.10", 0, expires=T0 + 5000))
    assert t.allocate(T0 + 1000, lambda a: True) == A("10.0.0.11")


def test_allocate_skips_refused_and_recorded_addresses() -> None:
    t = LeaseTable(A("10.0.0.10"), A("10.0.0.13"), [lease("10.0.0.11", 1)])
    assert t.allocate(T0, lambda a: a != A("10.0.0.10")) == A("10.0.0.12")


def test_empty_pool() -> None:
    t = LeaseTable(None, None)
    assert t.allocate(T0, lambda a: True) is None
    assert not t.in_pool(A("10.0.0.1"))


def test_lookups_and_reassignment() -> None:
    t = LeaseTable(A("10.0.0.10"), A("10.0.0.20"))
    a = lease("10.0.0.10", 1)
    t.put(a)
    assert t.by_ip(A("10.0.0.10")) == a
    assert t.by_client(a.client_id) == a
    assert t.take_dirty() == [a] and t.take_dirty() == []
    # Address passes to another client: the old client loses its record.
    b = lease("10.0.0.10", 2)
    t.put(b, persist=False)
    assert t.by_client(a.client_id) is None
    assert t.by_client(b.client_id) == b
    assert t.take_dirty() == []
    assert not t.is_free_for(A("10.0.0.10"), a.client_id, T0)
    assert t.is_free_for(A("10.0.0.10"), b.client_id, T0)
    assert t.is_free_for(A("10.0.0.10"), a.client_id, T0 + 3600)


def test_declined_address_belongs_to_nobody() -> None:
    t = LeaseTable(A("10.0.0.10"), A("10.0.0.20"))
    a = lease("10.0.0.10", 1)
    t.put(a)
    t.put(lease("10.0.0.10", 1, expires=T0 + 600, state=LeaseState.DECLINED))
    assert t.by_client(a.client_id) is None
    assert not t.is_free_for(A("10.0.0.10"), a.client_id, T0)
    assert t.is_free_for(A("10.0.0.10"), a.client_id, T0 + 601)


def test_heap_stays_bounded_under_renewals() -> None:
    t = LeaseTable(A("10.0.0.10"), A("10.0.0.20"))
    for i in range(20000):
        t.put(lease("10.0.0.10", 1, expires=T0 + i), persist=False)
    assert len(t._heap) <= 2 * len(t) + 1025


def test_store_round_trip(tmp_path: Path) -> None:
    db = tmp_path / "leases.db"
    store = LeaseStore(db)
    leases = [lease(f"10.0.0.{i}", i) for i in range(1, 6)]
    store.commit(leases)
    store.commit([lease("10.0.0.1", 1, state=LeaseState.RELEASED, expires=T0)])
    # Readable from another connection while the writer is open.
    got = read_leases(db)
    assert [x.ip for x in got] == [x.ip for x in leases]
    assert got[0].state is LeaseState.RELEASED and got[0].expires == T0
    assert got[1] == leases[1]
    store.close()
    again = LeaseStore(db)
    assert sorted(again.load(), key=lambda x: x.ip) == got
    again.close()
    t = LeaseTable(A("10.0.0.1"), A("10.0.0.9"), got)
    assert t.by_client(leases[2].client_id) == leases[2]


def test_store_is_wal_with_full_sync(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_read_leases_missing_file(tmp_path: Path) -> None:
    assert read_leases(tmp_path / "none.db") == []


def test_store_errors_are_local_errors(tmp_path: Path) -> None:
    bad = tmp_path / "dir.db"
    bad.mkdir()
    with pytest.raises(LocalError):
        LeaseStore(bad)


_WRITER = textwrap.dedent(
    """
    import sys
    import time
    from ipaddress import IPv4Address
    from pathlib import Path
    from mobinux.dhcp.leases import Lease, LeaseState, LeaseStore

    store = LeaseStore(Path(sys.argv[1]))
    i = 0
    end = time.monotonic() + 30  # bounded even if nobody kills us
    while time.monotonic() < end and i < 50000:
        batch = []
        for _ in range(7):
            ip = IPv4Address(0x0A000000 + (i % 60000) + 1)
            batch.append(Lease(ip, "52:54:00:00:00:01", i.to_bytes(4, "big"), None, float(i), LeaseState.BOUND))
            i += 1
        store.commit(batch)
        # Acknowledged: everything up to i - 1 is committed.
        sys.stdout.write(f"{i - 1}\\n")
        sys.stdout.flush()
    """
)


@pytest.mark.parametrize("run", range(3))
def test_acknowledged_leases_survive_kill_9(tmp_path: Path, run: int) -> None:
    db = tmp_path / "leases.db"
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout is not None
    acked = -1
    deadline = time.monotonic() + 10
    target = 50 + 70 * run
    while acked < target and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    # Whatever was printed before the kill arrived is acknowledged too.
    rest = proc.stdout.read()
    proc.wait(timeout=10)
    for line in rest.split():
        acked = max(acked, int(line))
    assert acked >= target, "writer made no progress"
    got = {x.expires for x in read_leases(db)}
    missing = [i for i in range(acked + 1) if float(i) not in got]
    assert missing == []
    # And the database reopens for writing.
    store = LeaseStore(db)
    store.commit([lease("10.0.0.1", 1)])
    store.close()
