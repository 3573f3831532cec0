"""``mobinux target``, ``image import`` and ``--boot iscsi`` nodes: the CLI side of the iSCSI target."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from mobinux.bootcfg.ipxe import iscsi_root_path
from mobinux.inventory.db import Inventory
from mobinux.service.boot import BootService, Endpoint
from mobinux.service.steps import StepLog
from tests.conftest import CliRunner

SECRET = "s3cret-of-16chars"
MAC = "52:54:00:00:00:31"

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def _secret_file(tmp_path: Path, text: str, name: str = "chap") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_target_add_list_remove(cli: CliRunner, tmp_path: Path, data_dir: Path) -> None:
    disk = tmp_path / "scratch.img"
    chap = _secret_file(tmp_path, f"alice:{SECRET}\n")
    mutual = _secret_file(tmp_path, "target:another-secret-99\n", "mutual")
    r = cli("target", "add", "scratch", "--file", str(disk), "--size", "64M", "--chap-file", str(chap),
            "--mutual-chap-file", str(mutual), "--allow", "iqn.2026-01.com.example:pc1")
    assert r.code == 0, r.err
    assert disk.stat().st_size == 64 << 20
    assert disk.stat().st_blocks == 0  # created sparse
    [target] = cli("target", "list", "--json").json()
    assert target["name"] == "scratch"
    assert target["iqn"] == "iqn.2026-11.org.mobinux:scratch"
    assert target["portal"].endswith(":3260")
    assert target["file"] == str(disk)
    assert target["luns"] == [{"lun": 0, "file": str(disk), "size": 64 << 20, "readonly": False}]
    assert target["chap"] is True and target["mutual_chap"] is True
    assert target["allow"] == ["iqn.2026-01.com.example:pc1"]
    # secrets never appear in any output
    listing = cli("target", "list").out + cli("target", "list", "--json").out
    assert SECRET not in listing and "another-secret-99" not in listing
    # the database holding them is readable by its owner only
    assert stat.S_IMODE(os.stat(data_dir / "mobinux.db").st_mode) == 0o600
    assert cli("target", "add", "scratch", "--file", str(disk)).code == 1
    r = cli("target", "remove", "scratch")
    assert r.code == 0 and disk.exists()  # the file is kept
    assert cli("target", "list", "--json").json() == []


def test_target_grows_existing_file_but_never_shrinks(cli: CliRunner, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x" * 4096)
    assert cli("target", "add", "t1", "--file", str(disk), "--size", "8192").code == 0
    assert disk.stat().st_size == 8192 and disk.read_bytes()[:4096] == b"x" * 4096
    r = cli("target", "add", "t2", "--file", str(disk), "--size", "4096")
    assert r.code == 1 and "shrinking" in r.err
    assert disk.stat().st_size == 8192


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Upper", "--file", "{disk}"], "lower-case"),
        (["node.x", "--file", "{disk}"], "not starting with 'node.'"),
        (["t", "--file", "{missing}"], "give --size to create it"),
        (["t", "--file", "{disk}", "--size", "1000"], "multiple of 512"),
        (["t", "--file", "{disk}", "--size", "ten"], "--size 'ten'"),
        (["t", "--file", "{odd}"], "not a positive multiple of 512"),
        (["t", "--file", "{disk}", "--chap-file", "{short}"], "12-255 bytes"),
        (["t", "--file", "{disk}", "--chap-file", "{noformat}"], "USER:SECRET"),
        (["t", "--file", "{disk}", "--chap-file", "{missing}"], "--chap-file"),
        (["t", "--file", "{disk}", "--mutual-chap-file", "{good}"], "needs --chap-file"),
        (["t", "--file", "{disk}", "--chap-file", "{good}", "--mutual-chap-file", "{good}"], "must differ"),
        (["t", "--file", "{disk}", "--allow", "pc1"], "not an iSCSI name"),
    ],
)
def test_target_mistakes_get_one_line(cli: CliRunner, tmp_path: Path, args: list[str], message: str) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"\0" * 1000)
    files = {
        "disk": disk, "odd": odd, "missing": tmp_path / "missing",
        "short": _secret_file(tmp_path, "u:short", "short"),
        "noformat": _secret_file(tmp_path, "just-a-secret-without-user", "noformat"),
        "good": _secret_file(tmp_path, f"u:{SECRET}", "good"),
    }
    r = cli("target", "add", *[a.format(**files) for a in args])
    assert r.code == 1, r.out
    assert message in r.err and "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert cli("target", "list", "--json").json() == []


def _make_qcow2(tmp_path: Path, content: bytes) -> Path:
    raw = tmp_path / "src.raw"
    raw.write_bytes(content)
    qcow2 = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    return qcow2


@needs_qemu_img
def test_image_import_converts_to_raw_and_registers(cli: CliRunner, tmp_path: Path, data_dir: Path) -> None:
    content = os.urandom(4096) + b"\0" * (1 << 20) + b"END-OF-DISK".ljust(512, b"\0")
    qcow2 = _make_qcow2(tmp_path, content)
    r = cli("image", "import", str(qcow2), "--name", "lab")
    assert r.code == 0, r.err
    [image] = cli("image", "list", "--json").json()
    assert image["kind"] == "disk" and image["disk"] == "disks/lab/disk.raw"
    assert image["size"] == len(content)
    copy = data_dir / "disks" / "lab" / "disk.raw"
    assert copy.read_bytes() == content
    # disks are not in images/, which TFTP and HTTP serve to anyone
    assert not (data_dir / "images" / "lab").exists()
    assert sorted(p.name for p in (data_dir / "disks").iterdir()) == ["lab"]
    assert cli("image", "remove", "lab").code == 0
    assert not copy.exists()


@needs_qemu_img
def test_image_import_refuses_backing_files_and_garbage(cli: CliRunner, tmp_path: Path, data_dir: Path) -> None:
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"PRIVATE" * 1000 + b"\0" * 1000)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(overlay)],
                   check=True, capture_output=True)
    r = cli("image", "import", str(overlay), "--name", "evil")
    assert r.code == 1 and "backing file" in r.err
    garbage = tmp_path / "garbage.qcow2"
    garbage.write_bytes(b"not a disk")
    r = cli("image", "import", str(garbage), "--name", "bad", "--format", "qcow2")
    assert r.code == 1 and "qemu-img cannot read" in r.err and "Traceback" not in r.err
    assert cli("image", "list", "--json").json() == []
    assert not (data_dir / "disks").exists() or list((data_dir / "disks").iterdir()) == []


@needs_qemu_img
def test_iscsi_node_gets_own_target_initiator_and_sanboot_script(cli: CliRunner, tmp_path: Path,
                                                                 data_dir: Path) -> None:
    assert cli("image", "import", str(_make_qcow2(tmp_path, b"\0" * 65536)), "--name", "lab").code == 0
    r = cli("node", "add", MAC, "--name", "pc31", "--image", "lab", "--boot", "iscsi")
    assert r.code == 0, r.err
    info = cli("node", "show", "pc31", "--json").json()
    iscsi = info["iscsi"]
    assert iscsi["target"] == "iqn.2026-11.org.mobinux:node.525400000031"
    assert iscsi["initiator"] == "iqn.2026-11.org.mobinux:initiator.525400000031"
    assert iscsi["lun"] == 0 and iscsi["portal"].endswith(":3260")
    # listed with the targets, and only its initiator is allowed in
    node_target = next(t for t in cli("target", "list", "--json").json() if t["node"] == "pc31")
    assert node_target["iqn"] == iscsi["target"] and node_target["allow"] == [iscsi["initiator"]]
    assert node_target["file"] == str((data_dir / "disks" / "lab" / "disk.raw").resolve())
    # the iPXE script logs in as that initiator and sanboots the node's target
    inv = Inventory(data_dir)
    try:
        endpoint = Endpoint(IPv4Address("10.0.0.1"), 8080, iscsi_port=3260)
        service = BootService(inv, endpoint, StepLog())
        node = inv.get_node("pc31")
        assert node is not None
        script = service.ipxe_script(node, None)
    finally:
        inv.close()
    assert f"set initiator-iqn {iscsi['initiator']}" in script
    assert f"sanboot iscsi:10.0.0.1:::0:{iscsi['target']}" in script
    # a second node on the same image: its own target and initiator, its own overlay
    r = cli("node", "add", "52:54:00:00:00:32", "--name", "pc32", "--image", "lab", "--boot", "iscsi")
    assert r.code == 0, r.err
    other = cli("node", "show", "pc32", "--json").json()
    assert other["iscsi"]["target"] != iscsi["target"]
    assert other["iscsi"]["initiator"] != iscsi["initiator"]
    assert other["overlay_bytes"] == 0 and info["overlay_bytes"] == 0
    overlays = {t["node"]: t["overlay"] for t in cli("target", "list", "--json").json() if t["node"]}
    assert overlays["pc31"] != overlays["pc32"]
    r = cli("node", "set", "pc31", "--loader", "pxelinux")
    assert r.code == 1 and "iPXE loader" in r.err


def test_iscsi_root_path_names_port_only_when_not_default() -> None:
    assert iscsi_root_path("10.0.0.1", 3260, 0, "iqn.x:y") == "iscsi:10.0.0.1:::0:iqn.x:y"
    assert iscsi_root_path("10.0.0.1", 3261, 1, "iqn.x:y") == "iscsi:10.0.0.1::3261:1:iqn.x:y"


def test_schema_upgrade_keeps_existing_images(tmp_path: Path) -> None:
    """A data directory from the first schema opens with its images intact."""
    data = tmp_path / "old"
    data.mkdir()
    db = sqlite3.connect(data / "mobinux.db")
    db.executescript("""
        CREATE TABLE images (name TEXT PRIMARY KEY, kind TEXT NOT NULL, kernel TEXT NOT NULL,
            initrd TEXT, cmdline TEXT NOT NULL DEFAULT '', size INTEGER NOT NULL DEFAULT 0,
            sha256 TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
        CREATE TABLE nodes (name TEXT PRIMARY KEY, mac TEXT NOT NULL UNIQUE, ip TEXT UNIQUE,
            images TEXT NOT NULL DEFAULT '[]', boot TEXT NOT NULL DEFAULT 'ramdisk',
            loader TEXT NOT NULL DEFAULT 'ipxe', cmdline TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE boot_steps (id INTEGER PRIMARY KEY AUTOINCREMENT, mac TEXT, ip TEXT,
            time REAL NOT NULL, step TEXT NOT NULL);
        INSERT INTO images VALUES ('tiny', 'ramdisk', 'images/tiny/vmlinuz', 'images/tiny/initrd.img',
            '', 10, '', 1.0);
        PRAGMA user_version=1;
    """)
    db.close()
    inv = Inventory(data)
    try:
        [image] = inv.images()
        assert image.name == "tiny" and image.disk is None
        assert inv.targets() == []
    finally:
        inv.close()
