"""``mobinux user`` and ``mobinux snapshot``: users' persistent disks and their snapshots."""

from __future__ import annotations

import argparse
import getpass
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mobinux.app import ServerLock, server_pid
from mobinux.cli.common import data_dir, print_json, print_table
from mobinux.cli.progress import ProgressBar
from mobinux.cli.target import parse_size
from mobinux.errors import InventoryError, LocalError
from mobinux.inventory.db import Inventory, User
from mobinux.service.user_disks import (
    FORMATS,
    apply_snapshot_op,
    check_user_name,
    create_user_disk,
    disk_dir,
    list_snapshots,
    user_dir,
)
from mobinux.users.passwords import MAX_PASSWORD, hash_password

if TYPE_CHECKING:
    from mobinux.storage.chain import UserDisk

DEFAULT_SIZE = "10G"
REQUEST_WAIT = 120.0  # seconds the CLI waits for a running server to do snapshot work


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    user = sub.add_parser("user", help="users with persistent disks (attached as a node's LUN 1)",
                          description="A user has a persistent disk that follows them: attached to "
                          "a node with 'mobinux node set NODE --user NAME', or at boot when they log "
                          "in on a --login node. It survives reboots and has snapshots.")
    usub = user.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    p = usub.add_parser("add", help="create a user and their disk")
    p.add_argument("name", help="user name (like a Linux user name)")
    p.add_argument("--size", default=DEFAULT_SIZE,
                   help=f"disk size, like 20G (default {DEFAULT_SIZE}); costs only what is written")
    p.add_argument("--format", choices=FORMATS, dest="fs_format",
                   help="make a file system on the disk (default: a blank disk)")
    p.add_argument("--password-file", type=Path, metavar="FILE",
                   help="file holding the boot-time login password on one line (default: no login; "
                   "set one later with mobinux user passwd)")
    p = usub.add_parser("passwd", help="set (or remove) a user's boot-time login password",
                        description="Reads the new password from --password-file, else asks twice "
                        "on the terminal. Only a scrypt hash is stored.")
    p.add_argument("name")
    p.add_argument("--password-file", type=Path, metavar="FILE")
    p.add_argument("--remove", action="store_true", help="no password: the user cannot log in at boot")
    p = usub.add_parser("remove", help="delete a user and their disk with all snapshots")
    p.add_argument("name")
    p = usub.add_parser("list", help="list users")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    snap = sub.add_parser("snapshot", help="snapshots of users' disks",
                          description="Snapshots cost metadata, not a copy of the disk. Rollback "
                          "and delete are refused while the disk is attached to a running node.")
    ssub = snap.add_subparsers(dest="snapshot_command", required=True, metavar="COMMAND")
    p = ssub.add_parser("create", help="take a snapshot of a user's disk")
    p.add_argument("user")
    p.add_argument("--name", help="snapshot name (default: the date and time, like 2026-11-22T10.30.00)")
    p = ssub.add_parser("list", help="list a user's snapshots: name, time, space used")
    p.add_argument("user")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = ssub.add_parser("rollback", help="return the disk to a snapshot; later snapshots are deleted")
    p.add_argument("user")
    p.add_argument("snapshot")
    p = ssub.add_parser("delete", help="delete a snapshot (its space is freed)")
    p.add_argument("user")
    p.add_argument("snapshot")


def _read_password_file(path: Path) -> str:
    try:
        lines = [line for line in path.read_text().splitlines() if line]
    except OSError as exc:
        raise InventoryError(f"--password-file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InventoryError(f"--password-file {path}: not text") from None
    if len(lines) != 1 or not 1 <= len(lines[0]) <= MAX_PASSWORD:
        raise InventoryError(f"--password-file {path}: write the password on one line "
                             f"(1 to {MAX_PASSWORD} characters)")
    return lines[0]


def _ask_password(name: str) -> str:
    if not sys.stdin.isatty():
        raise InventoryError("no terminal to ask the password on; give --password-file FILE")
    first = getpass.getpass(f"new password for {name}: ")
    if first != getpass.getpass("again: "):
        raise InventoryError("the two passwords differ; nothing changed")
    if not 1 <= len(first) <= MAX_PASSWORD:
        raise InventoryError(f"a password has 1 to {MAX_PASSWORD} characters; nothing changed")
    return first


def run(args: argparse.Namespace) -> int:
    inv = Inventory(data_dir(args))
    try:
        if args.command == "user":
            return _user(args, inv)
        return _snapshot(args, inv)
    finally:
        inv.close()


def _get_user(inv: Inventory, name: str) -> User:
    user = inv.get_user(name)
    if user is None:
        raise InventoryError(f"no user named {name!r} (see: mobinux user list)")
    return user


def _user(args: argparse.Namespace, inv: Inventory) -> int:
    cmd = args.user_command
    if cmd == "add":
        name = check_user_name(args.name)
        if inv.get_user(name) is not None:
            raise InventoryError(f"user {name!r} already exists")
        try:
            size = parse_size(args.size)
        except InventoryError:
            raise InventoryError(f"--size {args.size!r}: give a size like 10G") from None
        password = None if args.password_file is None else hash_password(
            _read_password_file(args.password_file))
        create_user_disk(inv.data_dir, name, size, args.fs_format,
                         progress=ProgressBar(f"formatting {name}'s disk"))
        try:
            inv.add_user(User(name, size, password, args.fs_format, time.time()))
        except BaseException:
            shutil.rmtree(user_dir(inv.data_dir, name), ignore_errors=True)
            raise
        what = f"{args.fs_format} file system" if args.fs_format else "blank disk"
        print(f"added user {name}: {size / 2**30:.1f} GiB {what}"
              + ("" if password else "; no login password (mobinux user passwd)"))
        return 0
    if cmd == "passwd":
        user = _get_user(inv, args.name)
        if args.remove:
            inv.set_user_password(user.name, None)
            print(f"user {user.name}: no password, cannot log in at boot")
            return 0
        text = (_read_password_file(args.password_file) if args.password_file
                else _ask_password(user.name))
        inv.set_user_password(user.name, hash_password(text))
        print(f"user {user.name}: password set")
        return 0
    if cmd == "remove":
        user = inv.remove_user(_get_user(inv, args.name).name)
        shutil.rmtree(user_dir(inv.data_dir, user.name), ignore_errors=True)
        print(f"removed user {user.name} and their disk")
        return 0
    if cmd == "list":
        users = inv.users()
        attached = {n.user: n.name for n in inv.nodes() if n.user}
        rows = []
        for u in users:
            info = u.to_json()
            info["node"] = attached.get(u.name)
            info["used_bytes"] = _used_bytes(inv.data_dir, u.name)
            rows.append(info)
        if args.json:
            print_json(rows)
        else:
            print_table(["name", "size", "used", "format", "login", "node"],
                        [[r["name"], f"{int(str(r['size'])) / 2**30:.1f} GiB",
                          f"{int(str(r['used_bytes'])) / 2**20:.1f} MiB", r["format"] or "-",
                          "yes" if r["login"] else "no", r["node"] or "-"] for r in rows])
        return 0
    raise AssertionError(cmd)


def _used_bytes(data: Path, name: str) -> int:
    total = 0
    for f in disk_dir(data, name).rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_blocks * 512
        except OSError:
            pass
    return total


def _snapshot(args: argparse.Namespace, inv: Inventory) -> int:
    cmd = args.snapshot_command
    user = _get_user(inv, args.user)
    if cmd == "list":
        snaps = list_snapshots(inv.data_dir, user.name)
        rows = [{"name": s.name, "time": s.created, "used_bytes": s.used_bytes} for s in snaps]
        if args.json:
            print_json(rows)
        else:
            print_table(["name", "time", "used"],
                        [[r["name"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(str(r["time"])))),
                          f"{int(str(r['used_bytes'])) / 2**20:.1f} MiB"] for r in rows])
        return 0
    if cmd == "create":
        snap = args.name or time.strftime("%Y-%m-%dT%H.%M.%S")
        _disk_op(inv, "snapshot-create", user.name, snap)
        print(f"user {user.name}: snapshot {snap} taken")
        return 0
    if cmd in ("rollback", "delete"):
        _disk_op(inv, f"snapshot-{cmd}", user.name, args.snapshot)
        print(f"user {user.name}: " + (f"back at snapshot {args.snapshot}; later snapshots deleted"
                                        if cmd == "rollback" else f"snapshot {args.snapshot} deleted"))
        return 0
    raise AssertionError(cmd)


def _disk_op(inv: Inventory, kind: str, user: str, arg: str) -> None:
    """Run a snapshot operation: by the running server, or here under the server lock."""
    if server_pid(inv.data_dir) is not None:
        request = inv.add_disk_request(kind, user, arg)
        deadline = time.monotonic() + REQUEST_WAIT
        while time.monotonic() < deadline:
            done, error = inv.disk_request_result(request)
            if done:
                if error:
                    raise InventoryError(error)
                return
            time.sleep(0.1)
        raise LocalError(f"the server has not done it within {REQUEST_WAIT:.0f} s; "
                         "see: mobinux snapshot list " + user)
    lock = ServerLock(inv.data_dir)
    lock.acquire()  # no server may start and open the disk meanwhile
    try:
        _with_disk(inv.data_dir, user, lambda disk: apply_snapshot_op(disk, kind, arg, time.time()))
    finally:
        lock.release()


def _with_disk(data: Path, user: str, fn: Callable[[UserDisk], None]) -> None:
    from mobinux.storage.chain import UserDisk

    disk = UserDisk.open(disk_dir(data, user))
    try:
        fn(disk)
    finally:
        disk.close()
