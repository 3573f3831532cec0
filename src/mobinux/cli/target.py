"""``mobinux target``: export files over iSCSI in place, as tgt and LIO do."""

from __future__ import annotations

import argparse
import os
import re
import stat
import time
from pathlib import Path

from mobinux.cli.common import data_dir, print_json, print_table
from mobinux.errors import InventoryError
from mobinux.inventory.db import Inventory, Target
from mobinux.service.boot import Endpoint
from mobinux.service.node_disks import node_base, node_overlay_root

# The part after the prefix: lower case, as IQNs are compared case-insensitively and
# stringprep'd to lower case (RFC 7143 §4.2.7.1); "node." names belong to node disks.
_NAME = re.compile(r"^[a-z0-9][a-z0-9.:-]{0,127}$")
_INITIATOR = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^\s,]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")
_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)(i?b?)$", re.IGNORECASE)
MIN_SECRET = 12  # RFC 7143 §9.2.1: CHAP secrets of at least 96 bits
MAX_SECRET = 255
BLOCK = 512


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    target = sub.add_parser(
        "target", help="export files or block devices over iSCSI",
        description="Targets export a file (or block device) in place over iSCSI as LUN 0, "
        "like tgt or LIO. Their IQN is the server's --iqn-prefix plus the target name.")
    tsub = target.add_subparsers(dest="target_command", required=True, metavar="COMMAND")
    p = tsub.add_parser("add", help="export a file",
                        description="Export FILE as target NAME. Secrets are read from files "
                        "holding USER:SECRET (one line), never from the command line.")
    p.add_argument("name", help="target name: lower-case letters, digits, '.', ':' and '-'")
    p.add_argument("--file", required=True, type=Path, help="the file or block device to export")
    p.add_argument("--size", help="create FILE (sparse) with this size, or grow it to it: "
                   "bytes or 64M, 10G, 1T")
    p.add_argument("--readonly", action="store_true", help="initiators may only read")
    p.add_argument("--chap-file", type=Path, metavar="FILE",
                   help="initiators must log in with this CHAP user and secret (USER:SECRET)")
    p.add_argument("--mutual-chap-file", type=Path, metavar="FILE",
                   help="the target proves itself to initiators with this user and secret "
                   "(mutual CHAP; needs --chap-file)")
    p.add_argument("--allow", action="append", metavar="INITIATOR_IQN",
                   help="only this initiator may log in; repeat for several (default: any)")
    p = tsub.add_parser("list", help="list targets (including each iSCSI-booting node's own)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = tsub.add_parser("remove", help="stop exporting a target (the file is kept)")
    p.add_argument("name")


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if match is None:
        raise InventoryError(f"--size {text!r}: give bytes or a number with K, M, G or T (like 10G)")
    number, unit = int(match.group(1)), match.group(2).upper()
    size: int = number * 1024 ** " KMGT".index(unit or " ")
    if size <= 0 or size % BLOCK:
        raise InventoryError(f"--size {text!r}: must be a positive multiple of {BLOCK} bytes")
    return size


def read_secret_file(path: Path, what: str) -> tuple[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InventoryError(f"{what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InventoryError(f"{what} {path}: not text; write USER:SECRET on one line") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1 or ":" not in lines[0]:
        raise InventoryError(f"{what} {path}: write USER:SECRET on one line")
    user, _, secret = lines[0].strip().partition(":")
    if not user:
        raise InventoryError(f"{what} {path}: the user name before ':' is empty")
    if not MIN_SECRET <= len(secret.encode()) <= MAX_SECRET:
        # Say how long it is, never what it is.
        raise InventoryError(f"{what} {path}: the secret must be {MIN_SECRET}-{MAX_SECRET} bytes "
                             f"(RFC 7143 §9.2.1), it has {len(secret.encode())}")
    return user, secret


def _prepare_file(path: Path, size: int | None) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        if size is None:
            raise InventoryError(f"{path} does not exist; give --size to create it") from None
        if not path.parent.is_dir():
            raise InventoryError(f"cannot create {path}: {path.parent} is not a directory") from None
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return
    except OSError as exc:
        raise InventoryError(f"{path}: {exc.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        if size is not None:
            raise InventoryError(f"{path} is a block device; its size is its own (drop --size)")
        return
    if not stat.S_ISREG(st.st_mode):
        raise InventoryError(f"{path} is neither a regular file nor a block device")
    if size is not None:
        if size < st.st_size:
            raise InventoryError(f"{path} is {st.st_size} bytes; --size {size} would cut it "
                                 "(shrinking a disk loses data)")
        os.truncate(path, size)
    elif st.st_size == 0 or st.st_size % BLOCK:
        raise InventoryError(f"{path} is {st.st_size} bytes, not a positive multiple of {BLOCK}; "
                             "give --size to grow it")


def _size_of(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def describe_targets(inv: Inventory) -> list[dict[str, object]]:
    """Every exported target, explicit ones and each ``--boot iscsi`` node's own."""
    endpoint = Endpoint.saved(inv)
    out: list[dict[str, object]] = []
    for t in inv.targets():
        out.append({
            "name": t.name,
            "iqn": endpoint.target_iqn(t.name),
            "portal": endpoint.portal,
            "file": t.file,
            "luns": [{"lun": 0, "file": t.file, "size": _size_of(Path(t.file)),
                      "readonly": t.readonly}],
            "readonly": t.readonly,
            "chap": t.chap_user is not None,
            "mutual_chap": t.mutual_user is not None,
            "allow": list(t.allow),
            "node": None,
        })
    images = {i.name: i for i in inv.images()}
    for node in inv.nodes():
        base = node_base(node, images)
        if base is None:
            continue
        file = str(inv.data_dir.resolve() / base)  # the shared base; writes go to the node's overlay
        out.append({
            "name": "node." + node.mac.replace(":", ""),
            "iqn": endpoint.node_target_iqn(node.mac),
            "portal": endpoint.portal,
            "file": file,
            "luns": [{"lun": 0, "file": file, "size": _size_of(Path(file)), "readonly": False}],
            "readonly": False,
            "chap": False,
            "mutual_chap": False,
            "allow": [endpoint.node_initiator_iqn(node.mac)],
            "node": node.name,
            "overlay": str(node_overlay_root(inv.data_dir.resolve(), node.mac)),
        })
    return out


def run(args: argparse.Namespace) -> int:
    inv = Inventory(data_dir(args))
    try:
        return _run(args, inv)
    finally:
        inv.close()


def _run(args: argparse.Namespace, inv: Inventory) -> int:
    cmd = args.target_command
    if cmd == "add":
        name: str = args.name
        if not _NAME.match(name) or name.startswith(("node.", "initiator.")):
            raise InventoryError(f"target name {name!r}: use lower-case letters, digits, '.', ':' "
                                 "and '-' (not starting with 'node.' or 'initiator.')")
        if inv.get_target(name) is not None:
            raise InventoryError(f"target {name!r} already exists; remove it first "
                                 f"(mobinux target remove {name})")
        chap = read_secret_file(args.chap_file, "--chap-file") if args.chap_file else None
        mutual = (read_secret_file(args.mutual_chap_file, "--mutual-chap-file")
                  if args.mutual_chap_file else None)
        if mutual is not None and chap is None:
            raise InventoryError("--mutual-chap-file needs --chap-file: mutual CHAP means both "
                                 "sides prove themselves")
        if mutual is not None and chap is not None and mutual[1] == chap[1]:
            raise InventoryError("the mutual CHAP secret must differ from the initiator's "
                                 "(RFC 7143 §12.1.3: a shared secret allows reflection attacks)")
        allow = tuple(args.allow or ())
        for iqn in allow:
            if not _INITIATOR.match(iqn):
                raise InventoryError(f"--allow {iqn!r} is not an iSCSI name (iqn.YYYY-MM.domain:..., "
                                     "eui.<16 hex> or naa.<hex>)")
        path = args.file.absolute()
        _prepare_file(path, parse_size(args.size) if args.size else None)
        inv.add_target(Target(
            name=name, file=str(path), readonly=args.readonly,
            chap_user=chap[0] if chap else None, chap_secret=chap[1] if chap else None,
            mutual_user=mutual[0] if mutual else None, mutual_secret=mutual[1] if mutual else None,
            allow=allow, created=time.time(),
        ))
        print(f"added target {Endpoint.saved(inv).target_iqn(name)} exporting {path}")
        return 0
    if cmd == "list":
        targets = describe_targets(inv)
        if args.json:
            print_json(targets)
        else:
            print_table(["name", "iqn", "portal", "file", "access"],
                        [[t["name"], t["iqn"], t["portal"], t["file"],
                          ("ro" if t["readonly"] else "rw") + (",chap" if t["chap"] else "")
                          + (",mutual" if t["mutual_chap"] else "")
                          + (",acl" if t["allow"] else "")] for t in targets])
        return 0
    if cmd == "remove":
        target = inv.remove_target(args.name)
        print(f"removed target {args.name} (the file {target.file} is kept)")
        return 0
    raise AssertionError(cmd)
