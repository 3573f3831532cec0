"""DHCP leases: the in-memory table the core works on, and its SQLite store.

:class:`LeaseTable` is pure (no I/O, time is a parameter). It answers "which
lease does this client have" and "who holds this address" with dict lookups
and hands out free addresses without scanning the pool per request:

* addresses of the pool never used yet come from a cursor that walks the
  pool once (skipping addresses that already have a record);
* once that is exhausted, addresses whose lease ended (expired, released,
  declined and out of quarantine, offers not taken up) come from a min-heap
  ordered by the time the lease ended, so the address unused for the longest
  time is reused first (RFC 2131 §4.3.1: keep an expired client's address
  for it as long as possible). Heap entries are checked lazily against the
  table, so an update is one push and no search.

Persisted changes (bindings, releases, declines; not offers, which are
short-lived reservations) are collected in a dirty set that the adapter
takes after each batch and commits with :class:`LeaseStore` in one
transaction before any reply of that batch leaves.

:class:`LeaseStore` keeps one row per address in SQLite (WAL,
``synchronous=FULL``: the WAL is fsync'ed at every commit, so a committed
lease survives ``kill -9`` and power loss alike; group commit makes that one
fsync per batch of packets, not per lease). :func:`read_leases` reads the same
file from another process while the server runs (WAL readers never block the
writer).
"""

from __future__ import annotations

import enum
import heapq
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from mobinux.errors import LocalError

__all__ = ["Lease", "LeaseState", "LeaseStore", "LeaseTable", "read_leases"]


class LeaseState(enum.Enum):
    """Where a lease stands (RFC 2131 §4.3: offered, bound, released, declined)."""

    OFFERED = "offered"
    BOUND = "bound"
    RELEASED = "released"
    DECLINED = "declined"  # RFC 2131 §4.3.3: address in quarantine until ``expires``


@dataclass(frozen=True, slots=True)
class Lease:
    """One address binding. ``expires`` is unix time (seconds)."""

    ip: IPv4Address
    mac: str
    client_id: bytes
    hostname: str | None
    expires: float
    state: LeaseState

    def holds(self, now: float) -> bool:
        """True while the address is taken (bound, offered or quarantined)."""
        return self.expires > now and self.state is not LeaseState.RELEASED


class LeaseTable:
    """In-memory leases of one pool, indexed by client id and by address."""

    def __init__(
        self,
        pool_first: IPv4Address | None = None,
        pool_last: IPv4Address | None = None,
        leases: Iterable[Lease] = (),
    ) -> None:
        self._first = int(pool_first) if pool_first is not None else 1
        self._last = int(pool_last) if pool_last is not None else 0
        if pool_first is None or pool_last is None:
            self._first, self._last = 1, 0  # empty pool
        self._cursor = self._first
        self._by_ip: dict[int, Lease] = {}
        self._by_client: dict[bytes, Lease] = {}
        self._heap: list[tuple[float, int]] = []
        self._dirty: dict[int, Lease] = {}
        for lease in leases:
            self._put(lease)
        self._dirty.clear()

    # -- lookups ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_ip)

    def all(self) -> list[Lease]:
        return list(self._by_ip.values())

    def by_client(self, client_id: bytes) -> Lease | None:
        """The lease record of this client (any state), if its address is still its own."""
        return self._by_client.get(client_id)

    def by_ip(self, ip: IPv4Address) -> Lease | None:
        return self._by_ip.get(int(ip))

    def in_pool(self, ip: IPv4Address) -> bool:
        return self._first <= int(ip) <= self._last

    def is_free_for(self, ip: IPv4Address, client_id: bytes, now: float) -> bool:
        """True when nobody but *client_id* holds *ip* at *now*."""
        lease = self._by_ip.get(int(ip))
        if lease is None or not lease.holds(now):
            return True
        # A quarantined (declined) address is refused to its decliner too.
        return lease.client_id == client_id and lease.state is not LeaseState.DECLINED

    # -- changes ----------------------------------------------------------------

    def put(self, lease: Lease, persist: bool = True) -> None:
        """Record *lease* (replacing whatever held its address)."""
        self._put(lease)
        if persist:
            self._dirty[int(lease.ip)] = lease

    def _put(self, lease: Lease) -> None:
        key = int(lease.ip)
        old = self._by_ip.get(key)
        if old is not None and self._by_client.get(old.client_id) is old:
            del self._by_client[old.client_id]
        self._by_ip[key] = lease
        if lease.state is not LeaseState.DECLINED:
            # A declined address belongs to nobody (RFC 2131 §4.3.3).
            self._by_client[lease.client_id] = lease
        heapq.heappush(self._heap, (lease.expires, key))
        if len(self._heap) > 2 * len(self._by_ip) + 1024:
            self._compact()

    def _compact(self) -> None:
        self._heap = [(lease.expires, k) for k, lease in self._by_ip.items()]
        heapq.heapify(self._heap)

    def allocate(self, now: float, acceptable: Callable[[IPv4Address], bool]) -> IPv4Address | None:
        """A free pool address that *acceptable* allows, or None when the pool is full.

        The address is not reserved until the caller ``put``s a lease on it.
        """
        by_ip = self._by_ip
        while self._cursor <= self._last:
            key = self._cursor
            self._cursor += 1
            if key in by_ip:
                continue
            ip = IPv4Address(key)
            if acceptable(ip):
                return ip
            # Refused (server address, reserved for another node): the
            # cursor has passed it; it stays unused, which is what we want.
        heap = self._heap
        skipped: list[tuple[float, int]] = []
        found: IPv4Address | None = None
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            lease = by_ip.get(key)
            if lease is None or lease.expires != expires or not self._first <= key <= self._last:
                continue  # stale entry: the lease changed after this push
            ip = lease.ip
            if acceptable(ip):
                found = ip
                # Keep the entry: the address stays reusable until someone puts a lease on it.
                skipped.append((expires, key))
                break
            skipped.append((expires, key))
        for item in skipped:
            heapq.heappush(heap, item)
        return found

    def take_dirty(self) -> list[Lease]:
        """Leases changed since the last call, to be persisted (then forgotten here)."""
        if not self._dirty:
            return []
        out = list(self._dirty.values())
        self._dirty.clear()
        return out

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)


# -- persistence ------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    ip        INTEGER PRIMARY KEY,   -- IPv4 address as an integer
    client_id BLOB NOT NULL,         -- option 61, or htype + chaddr
    mac       TEXT NOT NULL,         -- "52:54:00:00:00:01"
    hostname  TEXT,                  -- option 12
    expires   REAL NOT NULL,         -- unix time
    state     TEXT NOT NULL          -- LeaseState value
);
"""

_UPSERT = (
    "INSERT OR REPLACE INTO leases (ip, client_id, mac, hostname, expires, state)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


def _row(lease: Lease) -> tuple[int, bytes, str, str | None, float, str]:
    return (
        int(lease.ip),
        lease.client_id,
        lease.mac,
        lease.hostname,
        lease.expires,
        lease.state.value,
    )


def _lease(row: tuple[int, bytes, str, str | None, float, str]) -> Lease:
    ip, client_id, mac, hostname, expires, state = row
    return Lease(
        IPv4Address(ip), mac, bytes(client_id), hostname, float(expires), LeaseState(state)
    )


class LeaseStore:
    """SQLite file of leases (one row per address); used from one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsync'ed at every commit, so a commit that has
            # returned is on disk before the ACK it covers is sent.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise LocalError(f"cannot open lease database {self.path}: {e}") from e

    def load(self) -> list[Lease]:
        try:
            rows = self._db.execute(
                "SELECT ip, client_id, mac, hostname, expires, state FROM leases ORDER BY expires"
            ).fetchall()
        except sqlite3.Error as e:
            raise LocalError(f"cannot read lease database {self.path}: {e}") from e
        out = []
        for row in rows:
            try:
                out.append(_lease(row))
            except ValueError:
                continue  # a row from a future version with an unknown state
        return out

    def commit(self, leases: Iterable[Lease]) -> None:
        """Write *leases* in one transaction; returns once it is durable."""
        rows = [_row(lease) for lease in leases]
        if not rows:
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_UPSERT, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise LocalError(f"cannot write lease database {self.path}: {e}") from e

    def close(self) -> None:
        self._db.close()


def read_leases(path: Path) -> list[Lease]:
    """Every lease row in the database at *path*, by address (safe while the server runs)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(path, timeout=5.0)
        try:
            db.execute("PRAGMA query_only=1")
            rows = db.execute(
                "SELECT ip, client_id, mac, hostname, expires, state FROM leases ORDER BY ip"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise LocalError(f"cannot read lease database {path}: {e}") from e
    out = []
    for row in rows:
        try:
            out.append(_lease(row))
        except ValueError:
            continue
    return out
