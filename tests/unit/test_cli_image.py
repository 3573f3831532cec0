from __future__ import annotations

import gzip
from pathlib import Path

from mobinux.images.cpio import read_archive
from tests.conftest import CliRunner


def _tree(path: Path, with_init: bool = True) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (path / "bin" / "tool").chmod(0o755)
    if with_init:
        (path / "init").write_bytes(b"#!/bin/sh\necho hi\n")
        (path / "init").chmod(0o755)
    return path


def test_ramdisk_registers_reproducible_image(cli: CliRunner, tmp_path: Path, data_dir: Path) -> None:
    tree = _tree(tmp_path / "root")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\x00KERNEL" * 100)
    r = cli("image", "ramdisk", str(tree), "--kernel", str(kernel), "--name", "a",
            "--cmdline", "console=ttyS0 {ipconfig}")
    assert r.code == 0, r.err
    assert cli("image", "ramdisk", str(tree), "--kernel", str(kernel), "--name", "b").code == 0
    images = {i["name"]: i for i in cli("image", "list", "--json").json()}
    assert images["a"]["sha256"] == images["b"]["sha256"] != ""
    assert images["a"]["cmdline"] == "console=ttyS0 {ipconfig}" and images["a"]["kind"] == "ramdisk"
    initrd = data_dir / "images" / "a" / "initrd.img"
    assert (data_dir / "images" / "a" / "vmlinuz").read_bytes() == kernel.read_bytes()
    archive = gzip.decompress(initrd.read_bytes())
    assert archive.startswith(b"070701") and b"TRAILER!!!" in archive
    assert b"dev/console" in archive and b"bin/tool" in archive
    # no temporary directories left behind
    assert sorted(p.name for p in (data_dir / "images").iterdir()) == ["a", "b"]


def test_ramdisk_mistakes(cli: CliRunner, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "root")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    r = cli("image", "ramdisk", str(tmp_path / "nope"), "--kernel", str(kernel), "--name", "x")
    assert r.code == 1 and "not a directory" in r.err
    r = cli("image", "ramdisk", str(tree), "--kernel", str(tmp_path / "nokernel"), "--name", "x")
    assert r.code == 1 and "does not exist" in r.err
    r = cli("image", "ramdisk", str(tree), "--kernel", str(kernel), "--name", "x", "--cmdline", "{oops}")
    assert r.code == 1 and "unknown placeholder" in r.err
    assert cli("image", "ramdisk", str(tree), "--kernel", str(kernel), "--name", "x").code == 0
    r = cli("image", "ramdisk", str(tree), "--kernel", str(kernel), "--name", "x")
    assert r.code == 1 and "already exists" in r.err


def test_ramdisk_warns_without_init(cli: CliRunner, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "root", with_init=False)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    r = cli("image", "ramdisk", str(tree), "--kernel", str(kernel), "--name", "x")
    assert r.code == 0 and "warning" in r.out and "init" in r.out


def test_ramdisk_special_entries(cli: CliRunner, tmp_path: Path, data_dir: Path) -> None:
    tree = _tree(tmp_path / "root")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    special = tmp_path / "special.txt"
    special.write_text("dir /dev 0755 0 0\nnod /dev/null 0666 0 0 c 1 3\n")
    r = cli("image", "ramdisk", str(tree), "--kernel", str(kernel), "--name", "s", "--special", str(special))
    assert r.code == 0, r.err
    archive = gzip.decompress((data_dir / "images" / "s" / "initrd.img").read_bytes())
    entries = {e.header.name: e.header for e in read_archive(archive)}
    null = entries["dev/null"]
    assert (null.rdev_major, null.rdev_minor) == (1, 3)
    r = cli("image", "ramdisk", str(tree), "--kernel", str(kernel), "--name", "t",
            "--special", str(tmp_path / "missing.txt"))
    assert r.code == 1 and "cannot read --special" in r.err
