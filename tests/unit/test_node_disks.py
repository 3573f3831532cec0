"""Per-node disks: one copy-on-write overlay per node over a shared, read-only base image.

Driven through :class:`IscsiExports` (what the iSCSI target and the boot
services call) with real files in a temporary data directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from mobinux.inventory.db import Image, Inventory, Node
from mobinux.scsi import ScsiTarget
from mobinux.service.boot import Endpoint
from mobinux.service.iscsi import IscsiExports
from mobinux.service.node_disks import NodeDisks, node_overlay_root, overlay_usage
from mobinux.storage.device import BlockDevice

ENDPOINT = Endpoint(IPv4Address("10.0.0.1"), 8080, iscsi_port=3260, iqn_prefix="iqn.2026-11.org.example:")
MAC1, MAC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"
SIZE = 4 << 20


def _iqn(mac: str) -> str:
    return ENDPOINT.node_target_iqn(mac)


def _base(data: Path, name: str, fill: int) -> str:
    """A base image whose every byte is *fill*; returns its path relative to *data*."""
    rel = f"disks/{name}/disk.raw"
    path = data / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([fill]) * SIZE)
    return rel


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Lab:
    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.inv = Inventory(self.data)
        self.cli = Inventory(self.data)  # what `mobinux node ...` writes through
        self.exports = IscsiExports(self.inv, ENDPOINT)
        self.closed: list[str] = []
        self.exports.close_sessions = self._close
        self.live: set[str] = set()  # IQNs with a "session"
        for name, fill in (("lab", 0xAB), ("lab2", 0xCD)):
            rel = _base(self.data, name, fill)
            self.cli.add_image(Image(name, "disk", "", None, "", SIZE, "", time.time(), disk=rel))

    def _close(self, iqn: str) -> int:
        self.closed.append(iqn)
        n = 1 if iqn in self.live else 0
        self.live.discard(iqn)
        return n

    def add(self, mac: str, name: str, **kw: object) -> None:
        self.cli.add_node(Node(name, mac, None, ("lab",), boot="iscsi", **kw))  # type: ignore[arg-type]

    def login(self, mac: str) -> BlockDevice:
        target = self.exports.scsi_target(_iqn(mac))
        assert isinstance(target, ScsiTarget)
        self.live.add(_iqn(mac))
        return target.luns[0].device

    def close(self) -> None:
        self.exports.close()
        self.cli.close()
        self.inv.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def _read(dev: BlockDevice, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    dev.read_into(offset, memoryview(buf))
    return bytes(buf)


def test_each_node_writes_its_own_overlay_and_the_base_never_changes(lab: Lab) -> None:
    lab.add(MAC1, "pc1")
    lab.add(MAC2, "pc2")
    base = lab.data / "disks/lab/disk.raw"
    before = _sha(base)
    d1, d2 = lab.login(MAC1), lab.login(MAC2)
    d1.write(4096, b"node one" * 64)
    d2.write(4096, b"node two" * 64)
    d1.flush()
    d2.flush()
    assert _read(d1, 4096, 8) == b"node one"
    assert _read(d2, 4096, 8) == b"node two"
    assert _read(d1, 1 << 20, 4) == b"\xab" * 4  # unwritten: falls through to the base
    d1.discard(1 << 20, 1 << 20)  # UNMAP reads zeros, never base data
    assert _read(d1, 1 << 20, 4) == b"\0" * 4 and _read(d2, 1 << 20, 4) == b"\xab" * 4
    assert _sha(base) == before
    assert overlay_usage(lab.data, MAC1) >= 64 * 1024  # one copied-up chunk at least
    assert overlay_usage(lab.data, MAC1) < 1 << 20  # costs only what was written


def test_new_boot_closes_old_sessions_and_empties_only_that_overlay(lab: Lab) -> None:
    lab.add(MAC1, "pc1")
    lab.add(MAC2, "pc2")
    d1, d2 = lab.login(MAC1), lab.login(MAC2)
    d1.write(0, b"A" * 512)
    d2.write(0, b"B" * 512)
    lab.exports.node_booting(MAC1)
    assert lab.closed == [_iqn(MAC1)]  # the power-cycled machine's session is ended first
    d1 = lab.login(MAC1)
    assert _read(d1, 0, 512) == b"\xab" * 512  # clean base again
    assert _read(d2, 0, 512) == b"B" * 512  # the other node keeps its changes
    # more boot signals before this boot logs in change nothing (several DHCP packets per boot)
    d1.write(0, b"C" * 512)
    lab.exports.node_booting(MAC2)
    assert _read(d1, 0, 512) == b"C" * 512


def test_untouched_overlay_is_not_reset_again(lab: Lab) -> None:
    lab.add(MAC1, "pc1")
    lab.login(MAC1).write(0, b"x" * 512)
    lab.exports.node_booting(MAC1)
    files = sorted(os.listdir(next(node_overlay_root(lab.data, MAC1).iterdir())))
    lab.closed.clear()
    for _ in range(4):  # firmware DISCOVER/REQUEST, iPXE DISCOVER/REQUEST, script fetch
        lab.exports.node_booting(MAC1)
    assert lab.closed == []
    assert sorted(os.listdir(next(node_overlay_root(lab.data, MAC1).iterdir()))) == files


def test_persistent_node_keeps_changes_across_boots_until_reset(lab: Lab) -> None:
    lab.add(MAC1, "pc1", persistent=True)
    lab.login(MAC1).write(0, b"keep" * 128)
    lab.exports.node_booting(MAC1)
    assert _read(lab.login(MAC1), 0, 4) == b"keep"
    lab.cli.request_node_reset(MAC1)  # mobinux node reset pc1
    lab.exports.poll()
    assert lab.cli.node_reset_requests() == []
    assert _read(lab.login(MAC1), 0, 4) == b"\xab" * 4


def test_overlay_survives_a_server_restart_between_boots(lab: Lab, tmp_path: Path) -> None:
    lab.add(MAC1, "pc1")
    dev = lab.login(MAC1)
    dev.write(8192, b"still here")
    dev.flush()
    lab.exports.close()  # server stops while the node runs
    exports = IscsiExports(lab.inv, ENDPOINT)
    try:
        target = exports.scsi_target(_iqn(MAC1))
        assert target is not None
        assert _read(target.luns[0].device, 8192, 10) == b"still here"
        exports.node_booting(MAC1)  # its next boot still empties it
        target = exports.scsi_target(_iqn(MAC1))
        assert target is not None
        assert _read(target.luns[0].device, 8192, 10) == b"\xab" * 10
    finally:
        exports.close()
    lab.exports = IscsiExports(lab.inv, ENDPOINT)


def test_overlay_limit_fails_writes_with_no_space_and_spares_other_nodes(lab: Lab) -> None:
    lab.add(MAC1, "pc1", overlay_limit=128 * 1024)
    lab.add(MAC2, "pc2")
    d1, d2 = lab.login(MAC1), lab.login(MAC2)
    d1.write(0, b"1" * (128 * 1024))
    with pytest.raises(OSError) as err:
        d1.write(1 << 20, b"2" * 512)
    assert err.value.errno == errno.ENOSPC
    assert _read(d1, 0, 4) == b"1111"  # what fitted is intact
    d2.write(1 << 20, b"3" * (1 << 20))  # the other node is unaffected
    assert _read(d2, 1 << 20, 4) == b"3333"
    # raising the limit while it runs applies at once
    lab.cli.replace_node("pc1", Node("pc1", MAC1, None, ("lab",), boot="iscsi", overlay_limit=None))
    lab.login(MAC1).write(1 << 20, b"2" * 512)


def test_new_image_version_applies_at_the_next_boot(lab: Lab) -> None:
    lab.add(MAC1, "pc1")
    assert _read(lab.login(MAC1), 0, 1) == b"\xab"
    lab.cli.replace_node("pc1", Node("pc1", MAC1, None, ("lab2",), boot="iscsi"))
    assert _read(lab.login(MAC1), 0, 1) == b"\xab"  # the running node keeps what it booted
    lab.exports.node_booting(MAC1)
    assert _read(lab.login(MAC1), 0, 1) == b"\xcd"
    dirs = list(node_overlay_root(lab.data, MAC1).iterdir())
    assert len(dirs) == 1 and (dirs[0] / "base").read_text().strip() == "disks/lab2/disk.raw"


def test_removed_node_loses_sessions_and_overlay(lab: Lab) -> None:
    lab.add(MAC1, "pc1")
    lab.login(MAC1).write(0, b"x" * 512)
    assert node_overlay_root(lab.data, MAC1).exists()
    lab.cli.remove_node("pc1")
    assert lab.exports.scsi_target(_iqn(MAC1)) is None
    assert lab.closed == [_iqn(MAC1)]
    assert not node_overlay_root(lab.data, MAC1).exists()


def test_crash_between_base_switch_steps_leaves_one_overlay(tmp_path: Path) -> None:
    """A directory for another base left by a crash is removed at the next open."""
    data = tmp_path / "data"
    old = _base(data, "old", 1)
    new = _base(data, "new", 2)
    disks = NodeDisks(data)
    disks.open(MAC1, old, persistent=False, limit=None)
    disks.close()
    disks = NodeDisks(data)
    disks.open(MAC1, new, persistent=False, limit=None)  # as after a crash mid-switch: both exist
    disks.close()
    disks = NodeDisks(data)
    try:
        disk = disks.open(MAC1, new, persistent=False, limit=None)
        assert disk.base_rel == new
        assert [(d / "base").read_text().strip() for d in node_overlay_root(data, MAC1).iterdir()] == [new]
    finally:
        disks.close()
