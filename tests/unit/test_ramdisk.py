"""pack_ramdisk: reproducible, rootless initramfs images checked with the real cpio tools."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from mobinux.errors import ImageError
from mobinux.images.compress import SUPPORTED, Compression, decompress_bytes
from mobinux.images.cpio import CpioEntry, read_archive
from mobinux.images.ramdisk import RamdiskInfo, pack_ramdisk, parse_special_entries, plan_ramdisk

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")

DECOMPRESS_CMD = {
    Compression.GZIP: ["gzip", "-dc"],
    Compression.XZ: ["xz", "-dc"],
    Compression.ZSTD: ["zstd", "-dcq"],
    Compression.LZMA: ["xz", "--format=lzma", "-dc"],
    Compression.BZIP2: ["bzip2", "-dc"],
    Compression.LZ4: ["lz4", "-dc"],
    Compression.NONE: ["cat"],
}


def make_tree(root: Path, *, reverse: bool = False) -> Path:
    """A small root file system; *reverse* creates it in another order with other metadata."""
    steps: list[Callable[[], object]] = [
        lambda: (root / "bin").mkdir(),
        lambda: (root / "etc" / "empty.d").mkdir(parents=True),
        lambda: (root / "bin" / "busybox").write_bytes(b"\x7fELF" + bytes(range(256)) * 40),
        lambda: (root / "bin" / "sh").symlink_to("busybox"),
        lambda: (root / "etc" / "motd").write_text("hello\n"),
        lambda: (root / "init").write_text("#!/bin/sh\nexec /bin/sh\n"),
        lambda: os.link(root / "bin" / "busybox", root / "bin" / "ls"),
        lambda: (root / "etc" / "secret").write_bytes(b"s"),
    ]
    root.mkdir()
    # The order of creation must not matter (dirs first, and a hard link needs its target).
    order = steps if not reverse else [*steps[:3], *reversed(steps[3:])]
    for step in order:
        step()
    (root / "init").chmod(0o755)
    (root / "bin" / "busybox").chmod(0o4755)
    (root / "etc" / "secret").chmod(0o600)
    (root / "etc" / "motd").chmod(0o644)
    stamp = 1_500_000_000 if reverse else 1_700_000_000
    for p in [root, *root.rglob("*")]:
        os.utime(p, (stamp, stamp), follow_symlinks=False)
    return root


def unpack_with(tool: list[str], image: Path) -> bytes:
    return subprocess.run([*tool, str(image)], check=True, capture_output=True).stdout


def entries_of(image: Path, kind: Compression = Compression.GZIP) -> dict[str, CpioEntry]:
    raw = decompress_bytes(image.read_bytes(), kind, max_size=1 << 30)
    return {e.header.name: e for e in read_archive(raw)}


def test_pack_lists_sorted_entries_with_fixed_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    tree = make_tree(tmp_path / "root")
    info = pack_ramdisk(tree, tmp_path / "initrd.img")
    assert isinstance(info, RamdiskInfo)
    data = (tmp_path / "initrd.img").read_bytes()
    assert info.size == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.compression == "gzip" and info.warnings == () and info.mtime == 0
    entries = entries_of(tmp_path / "initrd.img")
    assert list(entries) == [
        "bin", "bin/busybox", "bin/ls", "bin/sh", "dev", "dev/console",
        "etc", "etc/empty.d", "etc/motd", "etc/secret", "init",
    ]  # fmt: skip
    assert info.entries == len(entries)
    assert info.uncompressed_size == len(gzip.decompress(data))
    for e in entries.values():
        assert (e.header.uid, e.header.gid, e.header.mtime) == (0, 0, 0)
        assert e.header.dev_major == e.header.dev_minor == 0
    inos = [e.header.ino for e in entries.values()]
    assert inos == [1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # in archive order, links share one
    console = entries["dev/console"].header
    assert console.mode == stat.S_IFCHR | 0o600 and (console.rdev_major, console.rdev_minor) == (
        5,
        1,
    )
    assert entries["dev"].header.mode == stat.S_IFDIR | 0o755
    assert entries["bin/busybox"].header.permissions == 0o4755
    assert entries["etc/secret"].header.permissions == 0o600
    assert entries["init"].header.permissions == 0o755
    assert entries["bin/sh"].header.is_symlink and entries["bin/sh"].data == b"busybox"
    # newc hard links: same inode, nlink 2, data on the last name only.
    first, last = entries["bin/busybox"], entries["bin/ls"]
    assert first.header.nlink == last.header.nlink == 2
    assert first.data == b"" and last.data == (tree / "bin" / "ls").read_bytes()


def test_same_tree_gives_same_bytes_whatever_its_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    a = pack_ramdisk(make_tree(tmp_path / "a"), tmp_path / "a.img")
    b = pack_ramdisk(make_tree(tmp_path / "b", reverse=True), tmp_path / "b.img")
    again = pack_ramdisk(tmp_path / "a", tmp_path / "a2.img")
    assert a.sha256 == b.sha256 == again.sha256
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    header = (tmp_path / "a.img").read_bytes()[:10]
    assert header[3] == 0 and header[4:8] == b"\0\0\0\0"  # no file name, mtime 0


def test_source_date_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree(tmp_path / "root")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567890")
    info = pack_ramdisk(tree, tmp_path / "x.img")
    assert info.mtime == 1234567890
    assert {e.header.mtime for e in entries_of(tmp_path / "x.img").values()} == {1234567890}
    assert pack_ramdisk(tree, tmp_path / "y.img", mtime=7).mtime == 7
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ImageError, match="SOURCE_DATE_EPOCH"):
        pack_ramdisk(tree, tmp_path / "z.img")


@needs_cpio
def test_gnu_cpio_extracts_the_same_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "root")
    pack_ramdisk(tree, tmp_path / "initrd.img", compression="gzip")
    out = tmp_path / "out"
    out.mkdir()
    archive = unpack_with(["gzip", "-dc"], tmp_path / "initrd.img")
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"], cwd=out, input=archive, check=True
    )
    for p in tree.rglob("*"):
        rel = p.relative_to(tree)
        q = out / rel
        assert stat.S_IFMT(q.lstat().st_mode) == stat.S_IFMT(p.lstat().st_mode), rel
        if p.is_symlink():
            assert os.readlink(q) == os.readlink(p)
        elif p.is_file():
            assert q.read_bytes() == p.read_bytes()
            assert stat.S_IMODE(q.stat().st_mode) == stat.S_IMODE(p.stat().st_mode)
    assert (out / "bin" / "ls").stat().st_ino == (out / "bin" / "busybox").stat().st_ino
    listing = subprocess.run(
        ["cpio", "-tv", "--numeric-uid-gid", "--quiet"],
        input=archive,
        check=True,
        capture_output=True,
    ).stdout.decode()
    console = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    fields = console.replace(",", " , ").split()
    assert (
        fields[0] == "crw-------" and fields[2:4] == ["0", "0"] and fields[4:7] == ["5", ",", "1"]
    )


@pytest.mark.parametrize("kind", sorted(SUPPORTED))
def test_every_compression_is_readable_by_the_real_tool(tmp_path: Path, kind: Compression) -> None:
    tool = DECOMPRESS_CMD[kind]
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} not installed")
    tree = make_tree(tmp_path / "root")
    info = pack_ramdisk(tree, tmp_path / "img", compression=str(kind))
    assert info.compression == str(kind)
    raw = unpack_with(tool, tmp_path / "img")
    assert len(raw) == info.uncompressed_size
    assert "init" in {e.header.name for e in read_archive(raw)}
    assert pack_ramdisk(tree, tmp_path / "img2", compression=str(kind)).sha256 == info.sha256


def test_unknown_compression(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="unknown compression"):
        pack_ramdisk(make_tree(tmp_path / "r"), tmp_path / "x", compression="rar")


def test_warnings_about_init(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "root")
    (tree / "init").unlink()
    info = pack_ramdisk(tree, tmp_path / "a.img")
    assert any("no /init" in w for w in info.warnings)
    (tree / "init").write_text("not executable")
    assert any("not an executable" in w for w in pack_ramdisk(tree, tmp_path / "b.img").warnings)
    (tree / "init").unlink()
    (tree / "init").symlink_to("/bin/../bin/sh")  # -> bin/busybox, executable
    assert pack_ramdisk(tree, tmp_path / "c.img").warnings == ()
    (tree / "init").unlink()
    (tree / "init").symlink_to("nowhere")
    assert any("no /init" in w for w in pack_ramdisk(tree, tmp_path / "d.img").warnings)


def test_existing_dev_console_is_kept_and_dev_only_added_once(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "root")
    (tree / "dev").mkdir()
    (tree / "dev" / "console").write_text("placeholder")
    pack_ramdisk(tree, tmp_path / "a.img")
    entries = entries_of(tmp_path / "a.img")
    assert entries["dev/console"].header.is_regular
    assert [n for n in entries if n.startswith("dev")] == ["dev", "dev/console"]
    (tree / "dev" / "console").unlink()
    pack_ramdisk(tree, tmp_path / "b.img")
    assert stat.S_ISCHR(entries_of(tmp_path / "b.img")["dev/console"].header.mode)
    members, warnings = plan_ramdisk(tree, add_console=False)
    assert "dev/console" not in {m.name for m in members} and warnings == []


def test_special_entries_in_gen_init_cpio_syntax(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "root")
    (tmp_path / "motd").write_text("from outside\n")
    extra = """
    # power-user entries
    dir /dev 0755 0 0
    nod /dev/null 0666 0 0 c 1 3
    nod /dev/sda 0660 0 6 b 8 0
    slink /bin/cat busybox 0777 0 0
    pipe /run/fifo 0600 0 0
    sock /run/sock 0600 0 0
    dir /run 0755 0 0
    file /etc/motd motd 0600 10 20 /etc/motd2
    """
    info = pack_ramdisk(tree, tmp_path / "x.img", extra=extra, extra_base=tmp_path)
    assert info.warnings == ()
    e = entries_of(tmp_path / "x.img")
    assert e["dev/null"].header.mode == stat.S_IFCHR | 0o666
    assert (e["dev/null"].header.rdev_major, e["dev/null"].header.rdev_minor) == (1, 3)
    assert e["dev/sda"].header.mode == stat.S_IFBLK | 0o660 and e["dev/sda"].header.gid == 6
    assert e["bin/cat"].data == b"busybox"
    assert stat.S_ISFIFO(e["run/fifo"].header.mode) and stat.S_ISSOCK(e["run/sock"].header.mode)
    motd, motd2 = e["etc/motd"], e["etc/motd2"]
    assert (motd.header.uid, motd.header.gid, motd.header.permissions) == (10, 20, 0o600)
    assert motd.header.ino == motd2.header.ino and motd2.data == b"from outside\n"
    assert "dev/console" in e  # still added: the extras did not provide it


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("nod /dev/x 0666 0 0 q 1 3", "device type"),
        ("nod /dev/x 0666 0 0 c 1", "usage"),
        ("frob /x", "unknown entry type"),
        ("dir /x 0999 0 0", "octal"),
        ("dir /x 0755 root 0", "not a number"),
        ("dir /../x 0755 0 0", r"'\.\.'"),
        ("dir / 0755 0 0", "root"),
        ("file /x /does/not/exist 0644 0 0", "cannot read"),
        ('dir "/x 0755 0 0', "quotation"),
    ],
)
def test_special_entry_errors(line: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_special_entries(line)


def test_extra_entry_with_missing_parent_warns(tmp_path: Path) -> None:
    info = pack_ramdisk(
        make_tree(tmp_path / "r"), tmp_path / "x", extra=["nod /nope/null 0666 0 0 c 1 3"]
    )
    assert any("parent directory nope" in w for w in info.warnings)


def test_progress_reports_bytes_done_and_total(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "root")
    (tree / "big").write_bytes(os.urandom(300_000))
    calls: list[tuple[int, int]] = []
    pack_ramdisk(tree, tmp_path / "x.img", progress=lambda done, total: calls.append((done, total)))
    total = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    total -= (tree / "bin" / "ls").stat().st_size  # one hard-linked copy
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) > 3


def test_large_files_stream_in_bounded_memory(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    tree.mkdir()
    with (tree / "big").open("wb") as f:
        f.truncate(48 << 20)  # sparse: 48 MiB of zeros
    tracemalloc.start()
    try:
        info = pack_ramdisk(tree, tmp_path / "x.img", compression="zstd", level=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.uncompressed_size > 48 << 20
    assert peak < 8 << 20, peak


def test_errors_leave_no_output(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="No such file"):
        pack_ramdisk(tmp_path / "missing", tmp_path / "x.img")
    (tmp_path / "file").write_text("")
    with pytest.raises(ImageError, match="not a directory"):
        pack_ramdisk(tmp_path / "file", tmp_path / "x.img")
    assert not (tmp_path / "x.img").exists()
    tree = make_tree(tmp_path / "root")
    (tmp_path / "x.img").write_bytes(b"old")
    bad_extra = ["file /x /does/not/exist 0644 0 0"]
    with pytest.raises(ImageError):
        pack_ramdisk(tree, tmp_path / "x.img", extra=bad_extra)
    assert (tmp_path / "x.img").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_file_changing_while_packed_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = make_tree(tmp_path / "root")
    from mobinux.images import ramdisk

    real = ramdisk._scan_tree

    def scan_then_grow(root: Path, mtime: int) -> ramdisk._Scan:
        result = real(root, mtime)
        (tree / "etc" / "motd").write_text("much longer than before\n")
        return result

    monkeypatch.setattr(ramdisk, "_scan_tree", scan_then_grow)
    with pytest.raises(ImageError, match="changed while"):
        pack_ramdisk(tree, tmp_path / "x.img")
    assert not (tmp_path / "x.img").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_packs_without_root(request: pytest.FixtureRequest) -> None:
    """Run the packer as nobody: no privilege is needed for a tree one can read."""
    work = Path(tempfile.mkdtemp(prefix="mobinux-nobody-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    make_tree(work / "root")
    for p in [work, *work.rglob("*")]:
        os.chown(p, 65534, 65534, follow_symlinks=False)
    code = (
        "from pathlib import Path; from mobinux.images.ramdisk import pack_ramdisk; "
        f"i = pack_ramdisk(Path({str(work / 'root')!r}), Path({str(work / 'x.img')!r})); print(i.sha256)"
    )
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert stat.S_ISCHR(entries_of(work / "x.img")["dev/console"].header.mode)


# ------------------------------------------------------------------ a real kernel boots it

GUEST_KERNEL = (
    Path(os.environ.get("MOBINUX_CACHE", Path.home() / ".cache" / "mobinux")) / "guest" / "vmlinuz"
)
BUSYBOX = Path("/usr/bin/busybox")


def boot(initrd: Path, timeout: float = 120) -> str:
    """Boot the cached guest kernel with *initrd* under QEMU (no network) and return the console."""
    if shutil.which("qemu-system-x86_64") is None or not GUEST_KERNEL.is_file():
        pytest.skip("needs qemu-system-x86_64 and scripts/fetch-guest-kernel.sh's kernel")
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
        "-kernel", str(GUEST_KERNEL), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet",
    ]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    return res.stdout.decode(errors="replace")


BOOT_INIT = """#!/bin/busybox sh
/bin/busybox echo "MOBINUX-INIT pid=$$"
/bin/busybox stat -c 'CONSOLE %F %t:%T %a' /dev/console
/bin/busybox stat -c 'LINK %i %h %n' /bin/busybox /bin/sh2
/bin/busybox poweroff -f
"""


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SUPPORTED))
def test_the_kernel_boots_it(tmp_path: Path, kind: Compression) -> None:
    if not BUSYBOX.is_file():
        pytest.skip("needs busybox-static")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    os.link(root / "bin" / "busybox", root / "bin" / "sh2")
    (root / "init").write_text(BOOT_INIT)
    (root / "init").chmod(0o755)
    info = pack_ramdisk(root, tmp_path / "initrd.img", compression=str(kind))
    assert info.warnings == ()
    console = boot(tmp_path / "initrd.img")
    assert "MOBINUX-INIT pid=1" in console, console[-3000:]
    assert "CONSOLE character special file 5:1 600" in console
    links = [line.split()[1:3] for line in console.splitlines() if line.startswith("LINK ")]
    assert len(links) == 2 and links[0] == links[1] and links[0][1] == "2"  # one inode, two names
