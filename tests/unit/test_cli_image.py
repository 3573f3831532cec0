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


def test_initrd_unpack_edit_repack(cli: CliRunner, tmp_path: Path) -> None:
    import shutil
    import subprocess

    import pytest

    if shutil.which("cpio") is None or shutil.which("xz") is None:
        pytest.skip("needs cpio and xz")
    early = tmp_path / "early"
    (early / "kernel" / "x86" / "microcode").mkdir(parents=True)
    (early / "kernel" / "x86" / "microcode" / "GenuineIntel.bin").write_bytes(b"UCODE" * 10)
    main_tree = _tree(tmp_path / "main")

    def cpio(tree: Path) -> bytes:
        names = subprocess.run("find . | LC_ALL=C sort", shell=True, cwd=tree, capture_output=True,
                               check=True).stdout
        return subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], input=names, cwd=tree,
                              capture_output=True, check=True).stdout

    initrd = tmp_path / "initrd.img"
    main_xz = subprocess.run(["xz", "--check=crc32", "-c"], input=cpio(main_tree), capture_output=True,
                             check=True).stdout
    initrd.write_bytes(cpio(early) + main_xz)
    out = tmp_path / "unpacked"
    r = cli("image", "initrd", "unpack", str(initrd), str(out))
    assert r.code == 0, r.err
    assert "2 segment(s)" in r.out
    segs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(segs) == 2
    assert (out / segs[0] / "kernel/x86/microcode/GenuineIntel.bin").read_bytes() == b"UCODE" * 10
    (out / segs[1] / "added-by-admin").write_bytes(b"iscsi step")
    repacked = tmp_path / "new.img"
    assert cli("image", "initrd", "repack", str(out), str(repacked)).code == 0
    again = tmp_path / "again"
    assert cli("image", "initrd", "unpack", str(repacked), str(again)).code == 0
    assert (again / segs[1] / "added-by-admin").read_bytes() == b"iscsi step"
    assert (again / segs[1] / "init").read_bytes() == (main_tree / "init").read_bytes()
    # the early segment stays uncompressed, first: the kernel's microcode loader needs that
    assert repacked.read_bytes().startswith(b"070701")
    r = cli("image", "initrd", "unpack", str(tmp_path / "missing.img"), str(tmp_path / "x"))
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1
