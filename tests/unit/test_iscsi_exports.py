"""IscsiExports: what the target exports, read from the inventory and kept current."""

from __future__ import annotations

import time
from ipaddress import IPv4Address
from pathlib import Path

from mobinux.inventory.db import Image, Inventory, Node, Target
from mobinux.service.boot import Endpoint
from mobinux.service.iscsi import IscsiExports

ENDPOINT = Endpoint(IPv4Address("10.0.0.1"), 8080, iscsi_port=3260, iqn_prefix="iqn.2026-11.org.example:")


def _disk(path: Path, size: int = 1 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_targets_and_node_disks_with_their_acls(tmp_path: Path) -> None:
    inv = Inventory(tmp_path / "data")
    writer = Inventory(tmp_path / "data")  # the CLI, in another connection
    exports = IscsiExports(inv, ENDPOINT)
    try:
        assert exports.lookup("iqn.2026-11.org.example:open") is None
        writer.add_target(Target("open", str(_disk(tmp_path / "open.img"))))
        writer.add_target(Target("acl", str(_disk(tmp_path / "acl.img")), allow=("iqn.2026-01.x:Pc1",),
                                 chap_user="u", chap_secret="secret-secret"))
        # seen without restarting anything, compared case-insensitively (RFC 7143 §4.2.7.1)
        entry = exports.lookup("IQN.2026-11.ORG.EXAMPLE:OPEN")
        assert entry is not None and entry.allowed_initiators is None and entry.chap is None
        acl = exports.lookup("iqn.2026-11.org.example:acl")
        assert acl is not None and acl.allowed_initiators == frozenset({"iqn.2026-01.x:pc1"})
        assert acl.chap is not None and acl.chap.secret == b"secret-secret"
        assert "secret-secret" not in repr(acl)
        visible = {e.iqn for e in exports.visible_to("iqn.2026-01.x:other")}
        assert visible == {"iqn.2026-11.org.example:open"}
        assert exports.portals("iqn.2026-11.org.example:open") == ["10.0.0.1:3260,1"]

        (tmp_path / "data" / "disks" / "lab").mkdir(parents=True)
        _disk(tmp_path / "data" / "disks" / "lab" / "disk.raw")
        writer.add_image(Image("lab", "disk", "", None, "", 1 << 20, "", time.time(),
                               disk="disks/lab/disk.raw"))
        writer.add_node(Node("pc1", "52:54:00:00:00:01", None, ("lab",), boot="iscsi"))
        node_iqn = "iqn.2026-11.org.example:node.525400000001"
        node_entry = exports.lookup(node_iqn)
        assert node_entry is not None
        assert node_entry.allowed_initiators == frozenset({"iqn.2026-11.org.example:initiator.525400000001"})
        assert exports.node_of(node_iqn) == "pc1"
        assert exports.node_of("iqn.2026-11.org.example:open") is None
    finally:
        exports.close()
        writer.close()
        inv.close()


def test_scsi_target_is_shared_until_its_definition_changes(tmp_path: Path) -> None:
    inv = Inventory(tmp_path / "data")
    exports = IscsiExports(inv, ENDPOINT)
    try:
        inv.add_target(Target("t", str(_disk(tmp_path / "t.img"))))
        first = exports.scsi_target("iqn.2026-11.org.example:t")
        assert first is not None
        assert exports.scsi_target("iqn.2026-11.org.example:T") is first  # same object for every session
        inv.remove_target("t")
        inv.add_target(Target("t", str(tmp_path / "t.img"), readonly=True))
        second = exports.scsi_target("iqn.2026-11.org.example:t")
        assert second is not None and second is not first
        # a file that cannot be opened exports nothing (logged once), rather than failing logins oddly
        inv.add_target(Target("gone", str(tmp_path / "missing.img")))
        assert exports.scsi_target("iqn.2026-11.org.example:gone") is None
        assert exports.scsi_target("iqn.2026-11.org.example:nothing") is None
    finally:
        exports.close()
        inv.close()
