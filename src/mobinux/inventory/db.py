"""The inventory database: nodes, images and policies in ``<data-dir>/mobinux.db``.

SQLite in WAL mode so the CLI can write while ``mobinux serve`` reads; the
server notices changes through ``PRAGMA data_version`` (see
:meth:`Inventory.generation`) and never needs a restart. Every write is one
transaction, so ``kill -9`` at any moment leaves either the old or the new
state. Schema changes are numbered migrations applied in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mobinux.errors import InventoryError, LocalError

DB_NAME = "mobinux.db"

_MIGRATIONS: tuple[str, ...] = (
    # 1: first schema
    """
    CREATE TABLE images (
        name      TEXT PRIMARY KEY,
        kind      TEXT NOT NULL,            -- 'ramdisk'
        kernel    TEXT NOT NULL,            -- path relative to the data dir
        initrd    TEXT,                     -- path relative to the data dir
        cmdline   TEXT NOT NULL DEFAULT '',
        size      INTEGER NOT NULL DEFAULT 0,
        sha256    TEXT NOT NULL DEFAULT '',
        created   REAL NOT NULL
    );
    CREATE TABLE nodes (
        name      TEXT PRIMARY KEY,
        mac       TEXT NOT NULL UNIQUE,
        ip        TEXT UNIQUE,
        images    TEXT NOT NULL DEFAULT '[]',  -- JSON list of image names, first = default
        boot      TEXT NOT NULL DEFAULT 'ramdisk',
        loader    TEXT NOT NULL DEFAULT 'ipxe',
        cmdline   TEXT NOT NULL DEFAULT '',
        created   REAL NOT NULL
    );
    CREATE TABLE settings (
        key       TEXT PRIMARY KEY,
        value     TEXT NOT NULL
    );
    CREATE TABLE boot_steps (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        mac       TEXT,
        ip        TEXT,
        time      REAL NOT NULL,
        step      TEXT NOT NULL
    );
    CREATE INDEX boot_steps_mac ON boot_steps(mac, id);
    """,
    # 2: iSCSI: disk images, exported targets, the server's live sessions
    """
    ALTER TABLE images ADD COLUMN disk TEXT;    -- disk images: path relative to the data dir
    CREATE TABLE targets (
        name          TEXT PRIMARY KEY,
        file          TEXT NOT NULL,            -- absolute path, exported in place
        readonly      INTEGER NOT NULL DEFAULT 0,
        chap_user     TEXT,
        chap_secret   TEXT,
        mutual_user   TEXT,
        mutual_secret TEXT,
        allow         TEXT NOT NULL DEFAULT '[]',  -- JSON list of InitiatorNames, [] = anyone
        created       REAL NOT NULL
    );
    CREATE TABLE iscsi_sessions (               -- rewritten by `mobinux serve` as sessions come and go
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        initiator TEXT NOT NULL,
        target    TEXT NOT NULL,
        node      TEXT,
        peer      TEXT NOT NULL,
        since     REAL NOT NULL,
        kind      TEXT NOT NULL
    );
    """,
    # 3: per-node disks through copy-on-write overlays
    """
    ALTER TABLE nodes ADD COLUMN disk TEXT;               -- disk image name (NULL: the boot image's)
    ALTER TABLE nodes ADD COLUMN persistent INTEGER NOT NULL DEFAULT 0;  -- keep the overlay at boot
    ALTER TABLE nodes ADD COLUMN overlay_limit INTEGER;  -- bytes, NULL = no cap
    CREATE TABLE node_resets (                           -- `mobinux node reset` asks the server
        mac       TEXT PRIMARY KEY,
        requested REAL NOT NULL
    );
    """,
    # 4: disk image versions (image commit, image import --update)
    """
    ALTER TABLE images ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    """,
    # 5: users with persistent disks, attached to a node as its LUN 1
    """
    CREATE TABLE users (
        name      TEXT PRIMARY KEY,
        password  TEXT,                        -- scrypt hash (users/passwords.py), NULL = no login
        size      INTEGER NOT NULL,            -- bytes
        format    TEXT,                        -- file system made at creation, NULL = blank
        created   REAL NOT NULL
    );
    ALTER TABLE nodes ADD COLUMN user TEXT REFERENCES users(name);
    CREATE UNIQUE INDEX nodes_user ON nodes(user) WHERE user IS NOT NULL;
    ALTER TABLE nodes ADD COLUMN login INTEGER NOT NULL DEFAULT 0;  -- ask for a user at boot
    CREATE TABLE boot_logins (                 -- who logged in at a node's current boot
        mac         TEXT PRIMARY KEY,
        user        TEXT NOT NULL UNIQUE REFERENCES users(name) ON DELETE CASCADE,
        chap_user   TEXT NOT NULL,             -- one-boot CHAP credentials of the node's target
        chap_secret TEXT NOT NULL,
        since       REAL NOT NULL
    );
    CREATE TABLE disk_requests (               -- the CLI asks the running server to do disk work
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        kind      TEXT NOT NULL,               -- snapshot-create | snapshot-rollback | snapshot-delete
        subject   TEXT NOT NULL,               -- the user
        arg       TEXT NOT NULL DEFAULT '',    -- the snapshot name
        requested REAL NOT NULL,
        finished  REAL,
        error     TEXT                         -- NULL when it worked
    );
    """,
)

BOOT_MODES = ("ramdisk", "kernel", "iscsi", "local")
IMAGE_KINDS = ("ramdisk", "disk")
LOADERS = ("ipxe", "pxelinux")
UNKNOWN_POLICIES = ("deny", "default", "enroll")


@dataclass(frozen=True)
class Image:
    name: str
    kind: str
    kernel: str
    initrd: str | None
    cmdline: str
    size: int
    sha256: str
    created: float
    disk: str | None = None  # a disk image's current version, relative to the data directory
    version: int = 1

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "kernel": self.kernel or None,
            "initrd": self.initrd,
            "disk": self.disk,
            "version": self.version,
            "cmdline": self.cmdline,
            "size": self.size,
            "sha256": self.sha256,
            "created": self.created,
        }


@dataclass(frozen=True)
class Target:
    """A file exported over iSCSI in place (``mobinux target add``)."""

    name: str
    file: str
    readonly: bool = False
    chap_user: str | None = None
    chap_secret: str | None = field(default=None, repr=False)
    mutual_user: str | None = None
    mutual_secret: str | None = field(default=None, repr=False)
    allow: tuple[str, ...] = ()
    created: float = 0.0


@dataclass(frozen=True)
class User:
    """A user with a persistent disk (``users/<name>/``)."""

    name: str
    size: int
    password: str | None = field(default=None, repr=False)  # scrypt hash
    format: str | None = None
    created: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "size": self.size, "format": self.format,
                "login": self.password is not None, "created": self.created}


def _user_from_row(row: sqlite3.Row) -> User:
    return User(row["name"], row["size"], row["password"], row["format"], row["created"])


@dataclass(frozen=True)
class BootLogin:
    """A user logged in at a node's current boot: their disk is its LUN 1 until it reboots."""

    mac: str
    user: str
    chap_user: str
    chap_secret: str = field(repr=False)
    since: float = 0.0


@dataclass(frozen=True)
class IscsiSessionRecord:
    """A live iSCSI session as the server last recorded it (for ``mobinux status``)."""

    initiator: str
    target: str
    node: str | None
    peer: str
    since: float
    kind: str


@dataclass(frozen=True)
class Node:
    name: str
    mac: str
    ip: str | None
    images: tuple[str, ...]
    boot: str = "ramdisk"
    loader: str = "ipxe"
    cmdline: str = ""
    created: float = field(default=0.0)
    disk: str | None = None  # disk image served as the node's own iSCSI disk (None: see disk_image)
    persistent: bool = False  # keep the overlay across boots
    overlay_limit: int | None = None  # bytes the overlay may hold; None = no cap
    user: str | None = None  # whose disk is attached as LUN 1
    login: bool = False  # ask for a user name and password at boot

    @property
    def image(self) -> str | None:
        return self.images[0] if self.images else None

    @property
    def disk_image(self) -> str | None:
        """The image behind the node's own iSCSI disk: ``--disk``, else the boot image of a
        ``--boot iscsi`` or ``--boot kernel`` node (which may or may not be a disk image)."""
        if self.disk is not None:
            return self.disk
        return self.image if self.boot in ("iscsi", "kernel") else None


@dataclass(frozen=True)
class UnknownPolicy:
    action: str  # deny | default | enroll
    image: str | None


@dataclass(frozen=True)
class BootStep:
    mac: str | None
    ip: str | None
    time: float
    step: str


def _node_from_row(row: sqlite3.Row) -> Node:
    return Node(
        name=row["name"],
        mac=row["mac"],
        ip=row["ip"],
        images=tuple(json.loads(row["images"])),
        boot=row["boot"],
        loader=row["loader"],
        cmdline=row["cmdline"],
        created=row["created"],
        disk=row["disk"],
        persistent=bool(row["persistent"]),
        overlay_limit=row["overlay_limit"],
        user=row["user"],
        login=bool(row["login"]),
    )


def _image_from_row(row: sqlite3.Row) -> Image:
    return Image(
        name=row["name"],
        kind=row["kind"],
        kernel=row["kernel"],
        initrd=row["initrd"],
        cmdline=row["cmdline"],
        size=row["size"],
        sha256=row["sha256"],
        created=row["created"],
        disk=row["disk"],
        version=row["version"],
    )


def _target_from_row(row: sqlite3.Row) -> Target:
    return Target(
        name=row["name"],
        file=row["file"],
        readonly=bool(row["readonly"]),
        chap_user=row["chap_user"],
        chap_secret=row["chap_secret"],
        mutual_user=row["mutual_user"],
        mutual_secret=row["mutual_secret"],
        allow=tuple(json.loads(row["allow"])),
        created=row["created"],
    )


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only: it holds CHAP secrets
    (SQLite gives the -wal and -shm files the same mode).

    Only when it does not exist yet: opening and closing a descriptor of a
    database another connection of this process holds would drop that
    connection's POSIX locks (fcntl locks belong to the process and file).
    """
    if path.exists():
        return
    with contextlib.suppress(FileExistsError):  # created meanwhile by someone else
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))


class Inventory:
    """Typed access to ``mobinux.db``. One instance per process (not thread-safe)."""

    def __init__(self, data_dir: Path, *, any_thread: bool = False) -> None:
        """*any_thread*: the connection may be used from one thread at a time, any thread
        (the server's boot-step writer, run with ``asyncio.to_thread``)."""
        self.data_dir = data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            _create_private(data_dir / DB_NAME)
            self._db = sqlite3.connect(data_dir / DB_NAME, isolation_level=None, timeout=10.0,
                                       check_same_thread=not any_thread)
        except (OSError, sqlite3.Error) as exc:
            raise LocalError(f"cannot open the data directory {data_dir}: {exc}") from exc
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > len(_MIGRATIONS):
                raise LocalError(
                    f"{self.data_dir / DB_NAME} was written by a newer Mobinux "
                    f"(schema {version}); upgrade mobinux"
                )
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={number}")

    def generation(self) -> tuple[int, int]:
        """Changes whenever anyone commits (cheap; used to refresh caches).

        ``PRAGMA data_version`` moves on commits by other connections (the CLI),
        ``total_changes`` on this connection's own.
        """
        return int(self._db.execute("PRAGMA data_version").fetchone()[0]), self._db.total_changes

    # -- images -----------------------------------------------------------

    def add_image(self, image: Image) -> None:
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO images (name, kind, kernel, initrd, cmdline, size, sha256, created,"
                    " disk, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (image.name, image.kind, image.kernel, image.initrd, image.cmdline,
                     image.size, image.sha256, image.created, image.disk, image.version),
                )
        except sqlite3.IntegrityError:
            raise InventoryError(
                f"image {image.name!r} already exists; remove it first "
                f"(mobinux image remove {image.name})"
            ) from None

    def new_disk_version(self, name: str, expected: int, disk: str, size: int) -> None:
        """Make *disk* version ``expected + 1`` of disk image *name*, unless someone else
        made a new version since the caller read version *expected*."""
        with self._tx() as db:
            row = db.execute("SELECT version FROM images WHERE name = ? AND kind = 'disk'",
                             (name,)).fetchone()
            if row is None:
                raise InventoryError(f"no disk image named {name!r} (see: mobinux image list)")
            if row["version"] != expected:
                raise InventoryError(f"image {name!r} got version {row['version']} meanwhile; "
                                     "run the command again")
            db.execute("UPDATE images SET disk = ?, size = ?, version = ?, created = ? WHERE name = ?",
                       (disk, size, expected + 1, time.time(), name))

    def get_image(self, name: str) -> Image | None:
        row = self._db.execute("SELECT * FROM images WHERE name = ?", (name,)).fetchone()
        return None if row is None else _image_from_row(row)

    def images(self) -> list[Image]:
        return [_image_from_row(r) for r in self._db.execute("SELECT * FROM images ORDER BY name")]

    def remove_image(self, name: str) -> Image:
        with self._tx() as db:
            row = db.execute("SELECT * FROM images WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise InventoryError(f"no image named {name!r} (see: mobinux image list)")
            users = [
                r["name"]
                for r in db.execute("SELECT name, images, disk FROM nodes")
                if name in json.loads(r["images"]) or r["disk"] == name
            ]
            if users:
                raise InventoryError(
                    f"image {name!r} is used by node(s) {', '.join(sorted(users))}; "
                    "give them another image first (mobinux node set NAME --image OTHER)"
                )
            policy = self.unknown_policy()
            if policy.image == name and policy.action != "deny":
                raise InventoryError(
                    f"image {name!r} is the unknown-client policy's image; "
                    "change it first (mobinux policy unknown ...)"
                )
            db.execute("DELETE FROM images WHERE name = ?", (name,))
            return _image_from_row(row)

    # -- nodes ------------------------------------------------------------

    def add_node(self, node: Node) -> None:
        with self._tx() as db:
            self._check_node_conflicts(db, node, replacing=None)
            db.execute(
                "INSERT INTO nodes (name, mac, ip, images, boot, loader, cmdline, created, disk,"
                " persistent, overlay_limit, user, login)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (node.name, node.mac, node.ip, json.dumps(list(node.images)), node.boot,
                 node.loader, node.cmdline, node.created or time.time(), node.disk,
                 int(node.persistent), node.overlay_limit, node.user, int(node.login)),
            )

    def replace_node(self, old_name: str, node: Node) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM nodes WHERE name = ?", (old_name,)).fetchone() is None:
                raise InventoryError(f"no node named {old_name!r} (see: mobinux node list)")
            self._check_node_conflicts(db, node, replacing=old_name)
            db.execute(
                "UPDATE nodes SET name=?, mac=?, ip=?, images=?, boot=?, loader=?, cmdline=?,"
                " disk=?, persistent=?, overlay_limit=?, user=?, login=? WHERE name = ?",
                (node.name, node.mac, node.ip, json.dumps(list(node.images)), node.boot,
                 node.loader, node.cmdline, node.disk, int(node.persistent), node.overlay_limit,
                 node.user, int(node.login), old_name),
            )

    def _check_node_conflicts(self, db: sqlite3.Connection, node: Node, replacing: str | None) -> None:
        if node.user is not None:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (node.user,)).fetchone() is None:
                raise InventoryError(f"no user named {node.user!r} (see: mobinux user list)")
            row = db.execute("SELECT name FROM nodes WHERE user = ?", (node.user,)).fetchone()
            if row is not None and row["name"] != replacing:
                raise InventoryError(f"user {node.user!r}'s disk is attached to node {row['name']!r}; "
                                     f"a user disk is attached to one node at a time (mobinux node "
                                     f"set {row['name']} --user none)")
        for column, value, what in (("name", node.name, "name"), ("mac", node.mac, "MAC address"),
                                    ("ip", node.ip, "IP address")):
            if value is None:
                continue
            row = db.execute(f"SELECT name FROM nodes WHERE {column} = ?", (value,)).fetchone()
            if row is not None and row["name"] != replacing:
                raise InventoryError(f"node {row['name']!r} already has the {what} {value}")
        for image in node.images + ((node.disk,) if node.disk else ()):
            if db.execute("SELECT 1 FROM images WHERE name = ?", (image,)).fetchone() is None:
                raise InventoryError(f"no image named {image!r} (see: mobinux image list)")

    def get_node(self, name: str) -> Node | None:
        row = self._db.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
        return None if row is None else _node_from_row(row)

    def node_by_mac(self, mac: str) -> Node | None:
        row = self._db.execute("SELECT * FROM nodes WHERE mac = ?", (mac,)).fetchone()
        return None if row is None else _node_from_row(row)

    def nodes(self) -> list[Node]:
        return [_node_from_row(r) for r in self._db.execute("SELECT * FROM nodes ORDER BY name")]

    def remove_node(self, name: str) -> Node:
        with self._tx() as db:
            row = db.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise InventoryError(f"no node named {name!r} (see: mobinux node list)")
            db.execute("DELETE FROM nodes WHERE name = ?", (name,))
            return _node_from_row(row)

    # -- policy -----------------------------------------------------------

    def unknown_policy(self) -> UnknownPolicy:
        rows = dict(
            (r["key"], r["value"])
            for r in self._db.execute(
                "SELECT key, value FROM settings WHERE key IN ('unknown.action', 'unknown.image')"
            )
        )
        return UnknownPolicy(rows.get("unknown.action", "deny"), rows.get("unknown.image"))

    def set_unknown_policy(self, policy: UnknownPolicy) -> None:
        if policy.action not in UNKNOWN_POLICIES:
            raise InventoryError(f"unknown policy {policy.action!r}: use deny, default or enroll")
        with self._tx() as db:
            if policy.image is not None and db.execute(
                "SELECT 1 FROM images WHERE name = ?", (policy.image,)
            ).fetchone() is None:
                raise InventoryError(f"no image named {policy.image!r} (see: mobinux image list)")
            db.execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES ('unknown.action', ?)",
                (policy.action,),
            )
            if policy.image is None:
                db.execute("DELETE FROM settings WHERE key = 'unknown.image'")
            else:
                db.execute(
                    "INSERT OR REPLACE INTO settings (key, value) VALUES ('unknown.image', ?)",
                    (policy.image,),
                )

    # -- iSCSI targets ----------------------------------------------------

    def add_target(self, target: Target) -> None:
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO targets (name, file, readonly, chap_user, chap_secret, mutual_user,"
                    " mutual_secret, allow, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (target.name, target.file, int(target.readonly), target.chap_user,
                     target.chap_secret, target.mutual_user, target.mutual_secret,
                     json.dumps(list(target.allow)), target.created or time.time()),
                )
        except sqlite3.IntegrityError:
            raise InventoryError(
                f"target {target.name!r} already exists; remove it first "
                f"(mobinux target remove {target.name})"
            ) from None

    def get_target(self, name: str) -> Target | None:
        row = self._db.execute("SELECT * FROM targets WHERE name = ?", (name,)).fetchone()
        return None if row is None else _target_from_row(row)

    def targets(self) -> list[Target]:
        return [_target_from_row(r) for r in self._db.execute("SELECT * FROM targets ORDER BY name")]

    def remove_target(self, name: str) -> Target:
        with self._tx() as db:
            row = db.execute("SELECT * FROM targets WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise InventoryError(f"no target named {name!r} (see: mobinux target list)")
            db.execute("DELETE FROM targets WHERE name = ?", (name,))
            return _target_from_row(row)

    def set_iscsi_sessions(self, sessions: list[IscsiSessionRecord]) -> None:
        """Replace the recorded live sessions (the server calls this when they change)."""
        with self._tx() as db:
            db.execute("DELETE FROM iscsi_sessions")
            db.executemany(
                "INSERT INTO iscsi_sessions (initiator, target, node, peer, since, kind)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(s.initiator, s.target, s.node, s.peer, s.since, s.kind) for s in sessions],
            )

    def iscsi_sessions(self) -> list[IscsiSessionRecord]:
        return [
            IscsiSessionRecord(r["initiator"], r["target"], r["node"], r["peer"], r["since"], r["kind"])
            for r in self._db.execute("SELECT * FROM iscsi_sessions ORDER BY since, id")
        ]

    # -- users ----------------------------------------------------------------

    def add_user(self, user: User) -> None:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO users (name, password, size, format, created)"
                           " VALUES (?, ?, ?, ?, ?)",
                           (user.name, user.password, user.size, user.format,
                            user.created or time.time()))
        except sqlite3.IntegrityError:
            raise InventoryError(f"user {user.name!r} already exists") from None

    def get_user(self, name: str) -> User | None:
        row = self._db.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else _user_from_row(row)

    def users(self) -> list[User]:
        return [_user_from_row(r) for r in self._db.execute("SELECT * FROM users ORDER BY name")]

    def set_user_password(self, name: str, password_hash: str | None) -> None:
        with self._tx() as db:
            if db.execute("UPDATE users SET password = ? WHERE name = ?",
                          (password_hash, name)).rowcount == 0:
                raise InventoryError(f"no user named {name!r} (see: mobinux user list)")

    def remove_user(self, name: str) -> User:
        with self._tx() as db:
            row = db.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise InventoryError(f"no user named {name!r} (see: mobinux user list)")
            node = db.execute("SELECT name FROM nodes WHERE user = ?", (name,)).fetchone()
            if node is not None:
                raise InventoryError(f"user {name!r}'s disk is attached to node {node['name']!r}; "
                                     f"detach it first (mobinux node set {node['name']} --user none)")
            db.execute("DELETE FROM users WHERE name = ?", (name,))
            return _user_from_row(row)

    # -- boot-time logins ---------------------------------------------------------

    def boot_logins(self) -> list[BootLogin]:
        return [BootLogin(r["mac"], r["user"], r["chap_user"], r["chap_secret"], r["since"])
                for r in self._db.execute("SELECT * FROM boot_logins ORDER BY since")]

    def set_boot_login(self, login: BootLogin) -> None:
        """Record *login*, replacing the node's earlier one and the user's login elsewhere."""
        with self._tx() as db:
            db.execute("DELETE FROM boot_logins WHERE mac = ? OR user = ?", (login.mac, login.user))
            db.execute("INSERT INTO boot_logins (mac, user, chap_user, chap_secret, since)"
                       " VALUES (?, ?, ?, ?, ?)",
                       (login.mac, login.user, login.chap_user, login.chap_secret,
                        login.since or time.time()))

    def clear_boot_login(self, mac: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM boot_logins WHERE mac = ?", (mac,)).rowcount > 0

    # -- disk requests (CLI -> running server) ------------------------------------

    def add_disk_request(self, kind: str, subject: str, arg: str = "") -> int:
        with self._tx() as db:
            cur = db.execute("INSERT INTO disk_requests (kind, subject, arg, requested)"
                             " VALUES (?, ?, ?, ?)", (kind, subject, arg, time.time()))
            return int(cur.lastrowid or 0)

    def pending_disk_requests(self) -> list[tuple[int, str, str, str]]:
        return [(r["id"], r["kind"], r["subject"], r["arg"]) for r in self._db.execute(
            "SELECT * FROM disk_requests WHERE finished IS NULL ORDER BY id")]

    def finish_disk_request(self, request_id: int, error: str | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE disk_requests SET finished = ?, error = ? WHERE id = ?",
                       (time.time(), error, request_id))
            # keep the table small: answers older than a day are of no use to anyone
            db.execute("DELETE FROM disk_requests WHERE finished < ?", (time.time() - 86400,))

    def disk_request_result(self, request_id: int) -> tuple[bool, str | None]:
        """(finished, error) of a request."""
        row = self._db.execute("SELECT finished, error FROM disk_requests WHERE id = ?",
                               (request_id,)).fetchone()
        if row is None:
            return True, "the request disappeared"
        return row["finished"] is not None, row["error"]

    # -- node resets (``mobinux node reset`` while a server runs) ---------------

    def request_node_reset(self, mac: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO node_resets (mac, requested) VALUES (?, ?)",
                       (mac, time.time()))

    def node_reset_requests(self) -> list[str]:
        return [r["mac"] for r in self._db.execute("SELECT mac FROM node_resets ORDER BY requested")]

    def finish_node_reset(self, mac: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM node_resets WHERE mac = ?", (mac,))

    # -- free-form settings -------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_setting(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    # -- boot steps -------------------------------------------------------

    KEEP_STEPS_PER_CLIENT = 20

    def add_boot_steps(self, steps: list[BootStep], claims: dict[str, str] | None = None,
                       claim_since: float = 0.0) -> None:
        """Append steps in one transaction, keeping the newest few per client.

        *claims* (address -> MAC) attributes steps taken from that address after
        *claim_since* with no known MAC to the MAC, in the same transaction.
        """
        if not steps and not claims:
            return
        with self._tx() as db:
            db.executemany(
                "INSERT INTO boot_steps (mac, ip, time, step) VALUES (?, ?, ?, ?)",
                [(s.mac, s.ip, s.time, s.step) for s in steps],
            )
            for mac in {s.mac for s in steps}:
                db.execute(
                    "DELETE FROM boot_steps WHERE mac IS ? AND id NOT IN "
                    "(SELECT id FROM boot_steps WHERE mac IS ? ORDER BY id DESC LIMIT ?)",
                    (mac, mac, self.KEEP_STEPS_PER_CLIENT),
                )
            for ip, claimed_mac in (claims or {}).items():
                db.execute(
                    "UPDATE boot_steps SET mac = ? WHERE mac IS NULL AND ip = ? AND time >= ?",
                    (claimed_mac, ip, claim_since),
                )

    def boot_steps(self, mac: str | None = None) -> list[BootStep]:
        if mac is None:
            rows = self._db.execute("SELECT * FROM boot_steps ORDER BY id")
        else:
            rows = self._db.execute("SELECT * FROM boot_steps WHERE mac = ? ORDER BY id", (mac,))
        return [BootStep(r["mac"], r["ip"], r["time"], r["step"]) for r in rows]
