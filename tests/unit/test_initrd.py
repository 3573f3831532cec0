"""Multi-segment initrds: unpack/repack against the real cpio and decompressors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest

from mobinux.errors import ImageError
from mobinux.images.compress import (
    SUPPORTED,
    ByteSource,
    Compression,
    DecompressingReader,
    compress_bytes,
    decompress_bytes,
    detect,
    lz4_block_compress,
    lz4_block_decompress,
    parse_compression,
)
from mobinux.images.cpio import CpioEntry, CpioHeader, read_archive, write_archive
from mobinux.images.initrd import (
    MANIFEST_NAME,
    EntryKind,
    InitrdManifest,
    ManifestEntry,
    iter_segments,
    repack_initrd,
    unpack_initrd,
)

pytestmark = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
IS_ROOT = os.geteuid() == 0

COMPRESS_CMD = {
    "gzip": ["gzip", "-n", "-9", "-c"],
    "xz": ["xz", "--check=crc32", "-z", "-c"],
    "zstd": ["zstd", "-q", "-19", "-c"],
    "lzma": ["xz", "--format=lzma", "-z", "-c"],
    "bzip2": ["bzip2", "-z", "-c"],
    "lz4": ["lz4", "-l", "-c"],
}
DECOMPRESS_CMD = {
    "gzip": ["gzip", "-dc"],
    "xz": ["xz", "-dc"],
    "zstd": ["zstd", "-dcq"],
    "lzma": ["xz", "--format=lzma", "-dc"],
    "bzip2": ["bzip2", "-dc"],
    "lz4": ["lz4", "-dc"],
}
MAGIC = {
    "gzip": b"\x1f\x8b",
    "xz": b"\xfd7zXZ\x00",
    "zstd": b"\x28\xb5\x2f\xfd",
    "lzma": b"\x5d\x00\x00",
    "bzip2": b"BZh",
    "lz4": b"\x02\x21\x4c\x18",
}
STAMP = 1_650_000_000


def run(cmd: list[str], data: bytes = b"", cwd: Path | None = None) -> bytes:
    return subprocess.run(cmd, input=data, cwd=cwd, check=True, capture_output=True).stdout


def cpio_create(tree: Path, fmt: str = "newc") -> bytes:
    names = run(["find", ".", "-print0"], cwd=tree)
    ordered = b"\0".join(sorted(n for n in names.split(b"\0") if n)) + b"\0"
    return run(["cpio", "-o", "-0", "-H", fmt, "--quiet"], ordered, cwd=tree)


def cpio_extract(archive: bytes, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], archive, cwd=dest)


def make_early(root: Path) -> Path:
    ucode = root / "kernel" / "x86" / "microcode"
    ucode.mkdir(parents=True)
    (ucode / "GenuineIntel.bin").write_bytes(hashlib.sha256(b"intel").digest() * 300)
    (ucode / "AuthenticAMD.bin").write_bytes(hashlib.sha256(b"amd").digest() * 100)
    _stamp(root)
    return root


def make_main(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    busybox = Path("/usr/bin/busybox")
    data = busybox.read_bytes() if busybox.exists() else os.urandom(200_000)
    (root / "bin" / "busybox").write_bytes(data)
    (root / "bin" / "busybox").chmod(0o4755)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "init").write_text("#!/bin/sh\nexec /bin/sh\n")
    (root / "init").chmod(0o755)
    (root / "etc" / "ro.d").mkdir(parents=True)
    (root / "etc" / "ro.d" / "conf").write_text("x=1\n")
    (root / "etc" / "ro.d" / "conf").chmod(0o400)
    (root / "etc" / "ro.d").chmod(0o555)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.link(root / "etc" / "passwd", root / "etc" / "passwd.link")
    (root / "empty").mkdir()
    (root / "abs-link").symlink_to("/etc/passwd")
    (root / "weird name é\x01").write_bytes(b"\xff\xfe")
    os.mkfifo(root / "fifo")
    (root / "dev").mkdir()
    if IS_ROOT:
        os.mknod(root / "dev" / "console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
        os.mknod(root / "dev" / "sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
        (root / "dev" / "sda").chmod(0o660)  # mknod is subject to the umask
        os.chown(root / "etc" / "passwd", 1234, 5678)
    _stamp(root)
    return root


def _stamp(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            os.utime(os.path.join(dirpath, name), (STAMP, STAMP), follow_symlinks=False)
    os.utime(root, (STAMP, STAMP))


def snapshot(
    root: Path, specials: InitrdManifest | None = None, segment: int = 0, *, dir_mtimes: bool = True
) -> dict[str, tuple[Any, ...]]:
    """Everything a boot would see of a tree: kinds, modes, mtimes, content, links, devices.

    GNU ``cpio -idm`` sets the mtimes of neither directories nor symlinks:
    compare with it using ``dir_mtimes=False``.
    """
    snap: dict[str, tuple[Any, ...]] = {}
    first_name: dict[int, str] = {}
    paths = [(".", root)]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            paths.append((str(p.relative_to(root)), p))
    for rel, p in sorted(paths):
        st = p.lstat()
        kind = stat.S_IFMT(st.st_mode)
        extra: Any = None
        if stat.S_ISREG(kind):
            extra = hashlib.sha256(p.read_bytes()).hexdigest()
            if st.st_nlink > 1:
                extra = (extra, first_name.setdefault(st.st_ino, rel))
        elif stat.S_ISLNK(kind):
            extra = os.readlink(p)
        elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
            extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
        perms = stat.S_IMODE(st.st_mode) if not stat.S_ISLNK(kind) else 0o777
        mtime = int(st.st_mtime) if dir_mtimes or stat.S_ISREG(kind) else None
        snap[rel] = (kind, perms, mtime, extra, (st.st_uid, st.st_gid) if IS_ROOT else None)
    if specials is not None:
        # Our unpack keeps devices, FIFOs and owners in the manifest: fold them in.
        for e in specials.segments[segment].entries:
            if not e.kind.on_disk:
                rdev = e.rdev if e.kind in (EntryKind.CHAR, EntryKind.BLOCK) else None
                snap[e.name] = (
                    e.kind.type_bits,
                    e.mode,
                    e.mtime if dir_mtimes else None,
                    rdev,
                    None,
                )
            if IS_ROOT:
                snap[e.name] = (*snap[e.name][:4], (e.uid, e.gid))
    return snap


def build_initrd(tmp: Path, compression: str, *, pad: int = 0, early_fmt: str = "newc") -> bytes:
    early = cpio_create(make_early(tmp / "early"), early_fmt)
    main = run(COMPRESS_CMD[compression], cpio_create(make_main(tmp / "main")))
    return early + b"\0" * pad + main


def split(image: bytes, compression: str) -> tuple[bytes, bytes]:
    """(uncompressed early archive, compressed main stream), found the way skipcpio does."""
    end = image.index(b"TRAILER!!!")
    start = image.index(MAGIC[compression], end)
    assert image[end:start].strip(b"\0").startswith(b"TRAILER!!!")
    return image[:start], image[start:]


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


# ------------------------------------------------------------------ the round trip


@pytest.mark.parametrize("compression", ["gzip", "xz", "zstd", "lzma", "bzip2", "lz4"])
def test_round_trip_against_the_real_tools(tmp_path: Path, compression: str) -> None:
    if not have(COMPRESS_CMD[compression][0], DECOMPRESS_CMD[compression][0]):
        pytest.skip(f"{compression} tools not installed")
    image = build_initrd(tmp_path, compression, pad=512)
    (tmp_path / "initrd.img").write_bytes(image)

    # Reference: what GNU cpio extracts from each segment.
    early_raw, main_compressed = split(image, compression)
    cpio_extract(early_raw, tmp_path / "ref" / "0")
    cpio_extract(run(DECOMPRESS_CMD[compression], main_compressed), tmp_path / "ref" / "1")

    manifest = unpack_initrd(tmp_path / "initrd.img", tmp_path / "un")
    assert [(s.directory, s.compression, s.stream) for s in manifest.segments] == [
        ("segment-0", Compression.NONE, 0),
        ("segment-1", Compression(compression), 1),
    ]
    assert manifest.segments[1].offset == len(early_raw)
    assert InitrdManifest.load(tmp_path / "un") == manifest
    for n in (0, 1):
        ours = snapshot(tmp_path / "un" / f"segment-{n}", manifest, n, dir_mtimes=False)
        assert ours == snapshot(tmp_path / "ref" / str(n), dir_mtimes=False)

    repack_initrd(tmp_path / "un", tmp_path / "re.img")
    again = (tmp_path / "re.img").read_bytes()

    # The real tools read the repacked initrd: early archive first, then the compressed one.
    listing = run(["cpio", "-t", "--quiet"], again).decode().split()
    assert "kernel/x86/microcode/GenuineIntel.bin" in listing
    early2, main2 = split(again, compression)
    assert early2.startswith(b"070701") and len(early2) % 4 == 0
    cpio_extract(early2, tmp_path / "re" / "0")
    cpio_extract(run(DECOMPRESS_CMD[compression], main2), tmp_path / "re" / "1")
    for n in (0, 1):
        assert snapshot(tmp_path / "re" / str(n), dir_mtimes=False) == snapshot(
            tmp_path / "ref" / str(n), dir_mtimes=False
        )

    # unpack -> repack -> unpack gives the same trees and manifest.
    manifest2 = unpack_initrd(tmp_path / "re.img", tmp_path / "un2")
    for n in (0, 1):
        assert snapshot(tmp_path / "un2" / f"segment-{n}", manifest2, n) == snapshot(
            tmp_path / "un" / f"segment-{n}", manifest, n
        )
    assert [s.entries for s in manifest2.segments] == [s.entries for s in manifest.segments]

    # And repacking is reproducible.
    repack_initrd(tmp_path / "un", tmp_path / "re2.img")
    assert (tmp_path / "re2.img").read_bytes() == again


def test_unpack_keeps_specials_and_owners_in_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "initrd.img").write_bytes(build_initrd(tmp_path, "gzip"))
    manifest = unpack_initrd(tmp_path / "initrd.img", tmp_path / "un")
    entries = {e.name: e for e in manifest.segments[1].entries}
    assert entries["fifo"].kind is EntryKind.FIFO
    assert not (tmp_path / "un" / "segment-1" / "fifo").exists()
    assert entries["bin/busybox"].mode == 0o4755
    assert entries["bin/sh"].kind is EntryKind.SYMLINK
    assert entries["."].kind is EntryKind.DIR
    if IS_ROOT:
        assert (
            entries["dev/console"].rdev == (5, 1) and entries["dev/console"].kind is EntryKind.CHAR
        )
        assert entries["dev/sda"].kind is EntryKind.BLOCK and entries["dev/sda"].mode == 0o660
        assert (entries["etc/passwd"].uid, entries["etc/passwd"].gid) == (1234, 5678)
    seg = tmp_path / "un" / "segment-1"
    assert (seg / "etc" / "passwd").stat().st_ino == (seg / "etc" / "passwd.link").stat().st_ino
    assert stat.S_IMODE((seg / "etc" / "ro.d").stat().st_mode) == 0o555
    text = (tmp_path / "un" / MANIFEST_NAME).read_text()
    assert InitrdManifest.from_json(text) == manifest
    assert json.loads(text)["segments"][1]["compression"] == "gzip"


def test_edits_in_the_tree_are_repacked(tmp_path: Path) -> None:
    (tmp_path / "initrd.img").write_bytes(build_initrd(tmp_path, "zstd"))
    unpack_initrd(tmp_path / "initrd.img", tmp_path / "un")
    seg = tmp_path / "un" / "segment-1"
    (seg / "etc" / "passwd").write_text("changed\n")
    (seg / "init").chmod(0o700)
    (seg / "bin" / "sh").unlink()
    (seg / "new-dir").mkdir()
    (seg / "new-dir" / "file").write_text("new\n")
    repack_initrd(tmp_path / "un", tmp_path / "re.img")
    manifest = unpack_initrd(tmp_path / "re.img", tmp_path / "un2")
    seg2 = tmp_path / "un2" / "segment-1"
    assert (seg2 / "etc" / "passwd").read_text() == "changed\n"
    assert (seg2 / "etc" / "passwd.link").read_text() == "changed\n"  # still one inode
    assert stat.S_IMODE((seg2 / "init").stat().st_mode) == 0o700
    assert not (seg2 / "bin" / "sh").exists()
    assert (seg2 / "new-dir" / "file").read_text() == "new\n"
    entries = {e.name: e for e in manifest.segments[1].entries}
    assert list(entries)[-2:] == ["new-dir", "new-dir/file"]
    assert (entries["new-dir/file"].uid, entries["new-dir/file"].gid) == (0, 0)
    assert entries["fifo"].kind is EntryKind.FIFO
    if IS_ROOT:
        assert entries["etc/passwd"].uid == 1234


def test_recorded_mode_wins_when_the_tree_could_not_hold_it(tmp_path: Path) -> None:
    archive = write_archive([_reg("suid", b"x", mode=0o4755)])
    (tmp_path / "i.img").write_bytes(archive)
    unpack_initrd(tmp_path / "i.img", tmp_path / "un")
    # Pretend the file system dropped the setuid bit at unpack time.
    path = tmp_path / "un" / MANIFEST_NAME
    obj = json.loads(path.read_text())
    obj["segments"][0]["entries"][0]["disk_mode"] = "0755"
    path.write_text(json.dumps(obj))
    (tmp_path / "un" / "segment-0" / "suid").chmod(0o755)
    repack_initrd(tmp_path / "un", tmp_path / "re.img")
    [entry] = read_archive((tmp_path / "re.img").read_bytes())
    assert entry.header.permissions == 0o4755
    # ...unless the user changed it since.
    (tmp_path / "un" / "segment-0" / "suid").chmod(0o700)
    repack_initrd(tmp_path / "un", tmp_path / "re.img")
    [entry] = read_archive((tmp_path / "re.img").read_bytes())
    assert entry.header.permissions == 0o700


def test_several_archives_in_one_compressed_stream_stay_together(tmp_path: Path) -> None:
    a = write_archive([_reg("a", b"1")])
    b = write_archive([_reg("b", b"2")])
    c = write_archive([_reg("c", b"3")])
    image = (
        a
        + b"\0" * 8
        + compress_bytes(a + b"\0" * 512 + b, Compression.GZIP)
        + compress_bytes(c, Compression.XZ)
    )
    (tmp_path / "i.img").write_bytes(image)
    manifest = unpack_initrd(tmp_path / "i.img", tmp_path / "un")
    assert [(s.compression, s.stream) for s in manifest.segments] == [
        (Compression.NONE, 0),
        (Compression.GZIP, 1),
        (Compression.GZIP, 1),
        (Compression.XZ, 2),
    ]
    repack_initrd(tmp_path / "un", tmp_path / "re.img")
    again = (tmp_path / "re.img").read_bytes()
    listing = [(n, str(k), h.name) for n, k, _, h in iter_segments(tmp_path / "re.img")]
    assert listing == [(0, "none", "a"), (1, "gzip", "a"), (2, "gzip", "b"), (3, "xz", "c")]
    gz_start = again.index(b"\x1f\x8b")
    d = zlib.decompressobj(wbits=31)
    inner = d.decompress(again[gz_start:])
    assert d.eof and inner.count(b"TRAILER!!!") == 2  # one gzip member holding both archives
    assert d.unused_data.lstrip(b"\0").startswith(b"\xfd7zXZ")


def test_crc_segments_stay_crc(tmp_path: Path) -> None:
    image = build_initrd(tmp_path, "gzip", early_fmt="crc")
    (tmp_path / "i.img").write_bytes(image)
    manifest = unpack_initrd(tmp_path / "i.img", tmp_path / "un")
    assert [s.crc for s in manifest.segments] == [True, False]
    repack_initrd(tmp_path / "un", tmp_path / "re.img")
    again = (tmp_path / "re.img").read_bytes()
    assert again.startswith(b"070702")
    run(["cpio", "-t", "--quiet"], again)  # GNU cpio checks the sums
    early, _ = split(again, "gzip")
    cpio_extract(early, tmp_path / "x")
    assert (
        tmp_path / "x" / "kernel" / "x86" / "microcode" / "GenuineIntel.bin"
    ).stat().st_size == 9600


def test_archive_without_parent_directories(tmp_path: Path) -> None:
    """`echo a/b/c | cpio -o` lists no directories: unpack creates them, repack omits them again."""
    archive = write_archive([_reg("a/b/c", b"deep"), _reg("top", b"t")])
    (tmp_path / "i.img").write_bytes(archive)
    manifest = unpack_initrd(tmp_path / "i.img", tmp_path / "un")
    assert manifest.segments[0].implicit_dirs == ("a", "a/b")
    assert (tmp_path / "un" / "segment-0" / "a" / "b" / "c").read_bytes() == b"deep"
    repack_initrd(tmp_path / "un", tmp_path / "re.img")
    assert [e.header.name for e in read_archive((tmp_path / "re.img").read_bytes())] == [
        "a/b/c",
        "top",
    ]
    # A new file under an implicit directory needs it in the archive.
    (tmp_path / "un" / "segment-0" / "a" / "new").write_text("n")
    repack_initrd(tmp_path / "un", tmp_path / "re.img")
    names = [e.header.name for e in read_archive((tmp_path / "re.img").read_bytes())]
    assert names == ["a/b/c", "top", "a", "a/new"]


def test_names_are_kept_as_spelled(tmp_path: Path) -> None:
    archive = write_archive(
        [
            CpioEntry(CpioHeader(name=".", mode=0o40700)),
            CpioEntry(CpioHeader(name="./etc", mode=0o40755)),
            _reg("./etc//x", b"1"),
        ]
    )
    (tmp_path / "i.img").write_bytes(archive)
    manifest = unpack_initrd(tmp_path / "i.img", tmp_path / "un")
    assert [(e.name, e.archive_name) for e in manifest.segments[0].entries] == [
        (".", None),
        ("etc", "./etc"),
        ("etc/x", "./etc//x"),
    ]
    repack_initrd(tmp_path / "un", tmp_path / "re.img")
    again = read_archive((tmp_path / "re.img").read_bytes())
    assert [(e.header.name, e.header.mode, e.data) for e in again] == [
        (e.header.name, e.header.mode, e.data) for e in read_archive(archive)
    ]


def test_duplicate_entries_replace_earlier_ones(tmp_path: Path) -> None:
    archive = write_archive(
        [
            CpioEntry(CpioHeader(name="d", mode=0o40755)),
            _reg("d/f", b"first"),
            _reg("x", b"file"),
            CpioEntry(CpioHeader(name="x", mode=0o120777, filesize=1), b"d"),
            _reg("d/f", b"second"),
            CpioEntry(CpioHeader(name="d", mode=0o40700)),
        ]
    )
    (tmp_path / "i.img").write_bytes(archive)
    manifest = unpack_initrd(tmp_path / "i.img", tmp_path / "un")
    seg = tmp_path / "un" / "segment-0"
    assert (seg / "d" / "f").read_bytes() == b"second"
    assert os.readlink(seg / "x") == "d"
    assert stat.S_IMODE((seg / "d").stat().st_mode) == 0o700
    assert [e.name for e in manifest.segments[0].entries] == ["d", "x", "d/f"]


def test_hard_links_with_data_on_the_first_name(tmp_path: Path) -> None:
    """Some writers put the data on the first link; the kernel and we accept both."""
    archive = write_archive(
        [
            _reg("a", b"shared", ino=7, nlink=2),
            _reg("b", b"", ino=7, nlink=2),
            _reg("c", b"other", ino=8),
        ]
    )
    (tmp_path / "i.img").write_bytes(archive)
    unpack_initrd(tmp_path / "i.img", tmp_path / "un")
    seg = tmp_path / "un" / "segment-0"
    assert (seg / "b").read_bytes() == b"shared" and (seg / "a").stat().st_ino == (
        seg / "b"
    ).stat().st_ino
    repack_initrd(tmp_path / "un", tmp_path / "re.img")
    a, b, c = read_archive((tmp_path / "re.img").read_bytes())
    assert (a.data, b.data, a.header.ino == b.header.ino, a.header.nlink) == (
        b"",
        b"shared",
        True,
        2,
    )
    assert c.header.nlink == 1 and c.header.ino != a.header.ino


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "a/../../evil", "a/b/../../../evil"])
def test_escaping_names_are_refused(tmp_path: Path, name: str) -> None:
    archive = write_archive([CpioEntry(CpioHeader(name="a", mode=0o40755)), _reg(name, b"pwned")])
    (tmp_path / "i.img").write_bytes(archive)
    (tmp_path / "deep").mkdir()
    with pytest.raises(ImageError, match="refusing"):
        unpack_initrd(tmp_path / "i.img", tmp_path / "deep" / "un")
    assert not list(tmp_path.rglob("evil"))
    assert list((tmp_path / "deep" / "un").iterdir()) == []  # partial segment removed


def test_symlinks_cannot_be_used_to_escape(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = write_archive(
        [
            CpioEntry(
                CpioHeader(name="link", mode=0o120777, filesize=len(str(outside))),
                str(outside).encode(),
            ),
            _reg("link/pwned", b"x"),
        ]
    )
    (tmp_path / "i.img").write_bytes(archive)
    with pytest.raises(ImageError, match="not a directory"):
        unpack_initrd(tmp_path / "i.img", tmp_path / "un")
    assert list(outside.iterdir()) == []


def test_hard_link_to_an_outside_file_is_impossible(tmp_path: Path) -> None:
    """newc links name no target path: only inode numbers seen in the same archive link."""
    archive = write_archive([_reg("b", b"", ino=9, nlink=2)])
    (tmp_path / "i.img").write_bytes(archive)
    unpack_initrd(tmp_path / "i.img", tmp_path / "un")
    assert (tmp_path / "un" / "segment-0" / "b").stat().st_nlink == 1


def test_destination_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "i.img").write_bytes(write_archive([_reg("a")]))
    (tmp_path / "un").mkdir()
    (tmp_path / "un" / "x").write_text("")
    with pytest.raises(ImageError, match="not an empty directory"):
        unpack_initrd(tmp_path / "i.img", tmp_path / "un")


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"", "holds no cpio archive"),
        (b"\0" * 100, "holds no cpio archive"),
        (b"hello world", "unrecognised data at offset 0"),
        (b"\x89LZO\x00\x0d\x0a", "lzo-compressed data at offset 0 is not supported"),
        (compress_bytes(b"\0" * 100, Compression.GZIP), "holds no cpio archive"),
        (compress_bytes(b"junk", Compression.ZSTD), "junk"),
        (compress_bytes(write_archive([]), Compression.GZIP)[:-12], "truncated"),
        (compress_bytes(write_archive([]), Compression.XZ)[:-30], "truncated|corrupt"),
        (b"\x1f\x8b" + b"\0" * 30, "corrupt"),
    ],
)
def test_bad_initrds(tmp_path: Path, image: bytes, message: str) -> None:
    (tmp_path / "i.img").write_bytes(image)
    with pytest.raises(ImageError, match=message):
        unpack_initrd(tmp_path / "i.img", tmp_path / "un")
    assert not (tmp_path / "un" / MANIFEST_NAME).exists()


def test_error_in_a_later_segment_reports_its_offset(tmp_path: Path) -> None:
    good = write_archive([_reg("a", b"1")])
    (tmp_path / "i.img").write_bytes(good + write_archive([_reg("b", b"22")])[:-20])
    with pytest.raises(ImageError, match=f"offset {len(good)}|truncated"):
        unpack_initrd(tmp_path / "i.img", tmp_path / "un")
    assert list((tmp_path / "un").iterdir()) == []


def test_repack_needs_a_valid_manifest(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        repack_initrd(tmp_path, tmp_path / "x.img")
    seg0: dict[str, Any] = {
        "directory": "segment-0",
        "compression": "gzip",
        "stream": 0,
        "entries": [],
    }
    good: dict[str, Any] = {"format": "mobinux-initrd", "version": 1, "segments": [seg0]}

    def with_entry(entry: dict[str, Any]) -> dict[str, Any]:
        return {**good, "segments": [{**seg0, "entries": [entry]}]}

    bad_cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "version": 9}, "version"),
        ({**good, "segments": []}, "no segments"),
        ({**good, "segments": [{**seg0, "directory": "../x"}]}, "bad segment directory"),
        ({**good, "segments": [{**seg0, "compression": "lzo"}]}, "not supported"),
        ({**good, "segments": [seg0, seg0]}, "bad segment directory"),
        (with_entry({"name": "../x", "kind": "file", "mode": "0644"}), "normalised"),
        (with_entry({"name": "x", "kind": "file", "mode": "9"}), "octal"),
        (with_entry({"name": "x", "kind": "door", "mode": "0"}), "unknown kind"),
        (with_entry({"name": "x", "kind": "file", "mode": "0644", "uid": -1}), "non-negative"),
        (with_entry({"name": "x", "kind": "char", "mode": "0644", "rdev": [1]}), "rdev"),
    ]
    for obj, message in bad_cases:
        (tmp_path / MANIFEST_NAME).write_text(json.dumps(obj))
        with pytest.raises(ImageError, match=message):
            repack_initrd(tmp_path, tmp_path / "x.img")
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(good))
    with pytest.raises(ImageError, match="segment-0"):
        repack_initrd(tmp_path, tmp_path / "x.img")
    assert not (tmp_path / "x.img").exists()
    (tmp_path / MANIFEST_NAME).write_text("{")
    with pytest.raises(ImageError, match="JSON"):
        repack_initrd(tmp_path, tmp_path / "x.img")


def test_manifest_entry_json_round_trip() -> None:
    e = ManifestEntry("dev/x", EntryKind.CHAR, 0o620, 1, 2, 3, (4, 5), "./dev/x", 0o600)
    assert ManifestEntry.from_json(json.loads(json.dumps(e.to_json()))) == e
    odd = ManifestEntry("\udcff\udcfe", EntryKind.FILE, 0o644)  # undecodable bytes survive JSON
    assert ManifestEntry.from_json(json.loads(json.dumps(odd.to_json()))) == odd


@pytest.mark.skipif(not IS_ROOT, reason="needs root to drop to another user")
def test_unpack_and_repack_without_root(request: pytest.FixtureRequest) -> None:
    work = Path(tempfile.mkdtemp(prefix="mobinux-nobody-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    image = build_initrd(work / "build", "xz")
    (work / "i.img").write_bytes(image)
    os.chown(work, 65534, 65534)
    code = (
        "import sys; from pathlib import Path; from mobinux.images.initrd import *; w = Path(sys.argv[1]); "
        "unpack_initrd(w / 'i.img', w / 'un'); repack_initrd(w / 'un', w / 're.img'); "
        "unpack_initrd(w / 're.img', w / 'un2')"
    )
    res = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
            str(work),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    m1 = InitrdManifest.load(work / "un")
    m2 = InitrdManifest.load(work / "un2")
    assert [s.entries for s in m1.segments] == [s.entries for s in m2.segments]
    entries = {e.name: e for e in m1.segments[1].entries}
    assert entries["dev/console"].rdev == (5, 1) and entries["etc/passwd"].uid == 1234
    assert entries["bin/busybox"].mode == 0o4755
    assert (work / "un" / "segment-1" / "etc" / "passwd").stat().st_uid == 65534
    # A non-root tree stays usable: 0555 / 0400 on disk would block editing and removal.
    assert stat.S_IMODE((work / "un" / "segment-1" / "etc" / "ro.d").stat().st_mode) == 0o755
    assert (entries["etc/ro.d"].mode, entries["etc/ro.d"].disk_mode) == (0o555, 0o755)
    assert (entries["etc/ro.d/conf"].mode, entries["etc/ro.d/conf"].disk_mode) == (0o400, None)
    repacked = {h.name: h for n, _, _, h in iter_segments(work / "re.img") if n == 1}
    assert (
        repacked["etc/ro.d"].permissions == 0o555 and repacked["etc/ro.d/conf"].permissions == 0o400
    )
    assert repacked["etc/passwd"].uid == 1234 and repacked["dev/sda"].rdev_major == 8
    for n in (0, 1):
        assert snapshot(work / "un" / f"segment-{n}", m1, n) == snapshot(
            work / "un2" / f"segment-{n}", m2, n
        )


# ------------------------------------------------------------------ a real kernel boots the result

GUEST_KERNEL = (
    Path(os.environ.get("MOBINUX_CACHE", Path.home() / ".cache" / "mobinux")) / "guest" / "vmlinuz"
)

BOOT_INIT = """#!/bin/busybox sh
/bin/busybox echo "MOBINUX-INIT pid=$$"
/bin/busybox stat -c 'NODE %n %F %t:%T %a %u:%g' /dev/console /dev/sda
/bin/busybox stat -c 'FILE %n %a %u:%g %h %s' /etc/passwd /bin/busybox /kernel/x86/microcode/GenuineIntel.bin
/bin/busybox cat /etc/edited
/bin/busybox poweroff -f
"""


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="building the reference initrd needs mknod")
@pytest.mark.parametrize("compression", ["gzip", "xz", "zstd"])
def test_the_kernel_boots_the_repacked_initrd(tmp_path: Path, compression: str) -> None:
    if shutil.which("qemu-system-x86_64") is None or not GUEST_KERNEL.is_file():
        pytest.skip("needs qemu-system-x86_64 and scripts/fetch-guest-kernel.sh's kernel")
    if not Path("/usr/bin/busybox").is_file():
        pytest.skip("needs busybox-static")
    early = cpio_create(make_early(tmp_path / "early"))
    main_tree = make_main(tmp_path / "main")
    (main_tree / "init").write_text(BOOT_INIT)
    (tmp_path / "orig.img").write_bytes(
        early + run(COMPRESS_CMD[compression], cpio_create(main_tree))
    )
    unpack_initrd(tmp_path / "orig.img", tmp_path / "un")
    (tmp_path / "un" / "segment-1" / "etc" / "edited").write_text("EDITED-IN-THE-TREE\n")
    repack_initrd(tmp_path / "un", tmp_path / "re.img")
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
        "-kernel", str(GUEST_KERNEL), "-initrd", str(tmp_path / "re.img"),
        "-append", "console=ttyS0 panic=-1 quiet",
    ]  # fmt: skip
    console = subprocess.run(argv, capture_output=True, timeout=120, check=False).stdout.decode(
        errors="replace"
    )
    assert "MOBINUX-INIT pid=1" in console, console[-3000:]
    assert "NODE /dev/console character special file 5:1 600 0:0" in console
    assert "NODE /dev/sda block special file 8:0 660 0:0" in console
    assert "FILE /etc/passwd 644 1234:5678 2 26" in console
    assert "FILE /bin/busybox 4755 0:0 1" in console
    assert (
        "FILE /kernel/x86/microcode/GenuineIntel.bin 644 0:0 1 9600" in console
    )  # the early segment
    assert "EDITED-IN-THE-TREE" in console


# ------------------------------------------------------------------ compression helpers


@pytest.mark.parametrize("name", ["gzip", "xz", "zstd", "lzma", "bzip2", "lz4"])
def test_detects_and_reads_real_tool_output(name: str) -> None:
    if not have(COMPRESS_CMD[name][0]):
        pytest.skip(f"{name} not installed")
    payload = b"".join(hashlib.sha256(bytes([i % 7])).digest() for i in range(20_000))
    packed = run(COMPRESS_CMD[name], payload)
    kind = detect(packed[:6])
    assert kind is Compression(name)
    assert decompress_bytes(packed, kind, max_size=len(payload)) == payload
    with pytest.raises(ImageError, match="more than"):
        decompress_bytes(packed, kind, max_size=len(payload) - 1)
    # The stream ends where it ends: what follows is handed back.
    src = ByteSource(io.BytesIO(packed + b"\0\0\0\0NEXT"))
    reader = DecompressingReader(src, kind)
    assert reader.drain() == len(payload)
    assert reader.compressed_size == len(packed)
    src.skip_nuls()
    assert src.read(4) == b"NEXT"


@pytest.mark.parametrize("kind", sorted(SUPPORTED - {Compression.NONE}))
def test_our_output_is_read_by_the_real_tool(kind: Compression) -> None:
    tool = DECOMPRESS_CMD[str(kind)]
    if not have(tool[0]):
        pytest.skip(f"{tool[0]} not installed")
    payload = os.urandom(5000) * 30
    packed = compress_bytes(payload, kind)
    assert detect(packed) is kind
    assert run(tool, packed) == payload
    assert compress_bytes(payload, kind) == packed  # deterministic


def test_gzip_header_is_reproducible() -> None:
    packed = compress_bytes(b"data", Compression.GZIP)
    assert packed[:4] == b"\x1f\x8b\x08\x00" and packed[4:8] == b"\0\0\0\0" and packed[9] == 3


def test_decompression_bombs_stay_small() -> None:
    import tracemalloc

    for kind in (Compression.GZIP, Compression.ZSTD, Compression.XZ, Compression.BZIP2):
        bomb = compress_bytes(
            b"\0" * (64 << 20), kind, level=1 if kind is not Compression.XZ else 0
        )
        tracemalloc.start()
        try:
            reader = DecompressingReader(ByteSource(io.BytesIO(bomb)), kind)
            for _ in range(10):
                assert len(reader.read(1 << 20)) <= 1 << 16
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 40 << 20, (kind, peak)


def test_parse_compression_names() -> None:
    assert parse_compression("GZ") is Compression.GZIP
    assert parse_compression("zst") is Compression.ZSTD
    assert parse_compression("none") is Compression.NONE
    with pytest.raises(ImageError, match="not supported"):
        parse_compression("lzo")
    with pytest.raises(ImageError, match="unknown"):
        parse_compression("zip")


def test_lz4_blocks_round_trip_and_refuse_garbage() -> None:
    for data in [
        b"",
        b"a",
        b"abcd" * 10,
        os.urandom(1000),
        b"x" * 100_000,
        bytes(range(256)) * 300,
    ]:
        assert lz4_block_decompress(lz4_block_compress(data), len(data)) == data
    for bad in [b"\xf0", b"\x1f" + b"a" + b"\x00\x00", b"\x1f" + b"a" + b"\x05\x00", b"\x00\x01"]:
        with pytest.raises(ImageError):
            lz4_block_decompress(bad, 1 << 20)
    with pytest.raises(ImageError, match="limit"):
        lz4_block_decompress(lz4_block_compress(b"x" * 1000), 999)


def _reg(name: str, data: bytes = b"", *, mode: int = 0o644, **kw: int) -> CpioEntry:
    return CpioEntry(
        CpioHeader(name=name, mode=stat.S_IFREG | mode, filesize=len(data), **kw), data
    )
