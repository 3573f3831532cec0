"""Per-node overlays in the real ``mobinux serve``, driven by the CLI, HTTP and QEMU's iSCSI driver.

Two nodes share one imported base image; each writes through its own target
(``qemu-io`` logging in with the node's InitiatorName); fetching a node's boot
script (what iPXE does at every boot) empties only that node's overlay;
``--overlay-limit`` makes writes fail with an error the initiator sees while
the other node goes on; ``--persistent`` keeps changes until ``node reset``,
which is refused while the node is up unless ``--force``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.interop.serve_helpers import Server, loopback_server

pytestmark = pytest.mark.interop

MAC_A, MAC_B = "52:54:00:00:00:a1", "52:54:00:00:00:b2"
PREFIX = "iqn.2026-11.org.mobinux:"
BASE_SIZE = 8 << 20


def _mobinux(srv: Server, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "mobinux", "--data-dir", str(srv.data_dir), *args],
                         capture_output=True, text=True, timeout=60)
    if ok:
        assert res.returncode == 0, f"mobinux {' '.join(args)}: {res.stderr}"
    return res


def _hex(mac: str) -> str:
    return mac.replace(":", "")


def _qemu_io(srv: Server, mac: str, *commands: str) -> subprocess.CompletedProcess[str]:
    opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{srv.iscsi_port},"
            f"target={PREFIX}node.{_hex(mac)},lun=0,initiator-name={PREFIX}initiator.{_hex(mac)}")
    argv = ["qemu-io", "--image-opts", opts]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _pattern_ok(srv: Server, mac: str, offset: int, length: int, byte: int) -> bool:
    res = _qemu_io(srv, mac, f"read -P {byte:#x} {offset} {length}")
    return res.returncode == 0 and "Pattern verification failed" not in res.stdout + res.stderr


def _boot_script(srv: Server, mac: str) -> str:
    url = f"http://127.0.0.1:{srv.http_port}/boot/{mac.replace(':', '-')}.ipxe"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def _settle(srv: Server) -> None:
    """Wait until the server has recorded that the last qemu-io logged out (once a second)."""
    deadline = time.monotonic() + 10
    while json.loads(_mobinux(srv, "status", "--json").stdout)["iscsi_sessions"]:
        assert time.monotonic() < deadline, "sessions never ended"
        time.sleep(0.2)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def srv(tmp_path: Path) -> Server:
    if subprocess.run(["which", "qemu-io"], capture_output=True).returncode != 0:
        pytest.skip("qemu-io not installed")
    with loopback_server(tmp_path) as server:
        base = tmp_path / "base.raw"
        base.write_bytes(b"\x5a" * BASE_SIZE)
        _mobinux(server, "image", "import", str(base), "--name", "base", "--format", "raw")
        _mobinux(server, "node", "add", MAC_A, "--name", "pca", "--image", "base", "--boot", "iscsi")
        _mobinux(server, "node", "add", MAC_B, "--name", "pcb", "--image", "base", "--boot", "iscsi")
        yield server  # type: ignore[misc]


def test_nodes_write_their_own_overlays_and_a_boot_empties_only_its_own(srv: Server) -> None:
    stored = srv.data_dir / "disks" / "base" / "disk.raw"
    before = _sha(stored)
    assert _qemu_io(srv, MAC_A, "write -P 0x11 0 128k", "flush").returncode == 0
    assert _qemu_io(srv, MAC_B, "write -P 0x22 0 128k", "flush").returncode == 0
    assert _pattern_ok(srv, MAC_A, 0, 128 * 1024, 0x11)
    assert _pattern_ok(srv, MAC_B, 0, 128 * 1024, 0x22)
    assert _pattern_ok(srv, MAC_A, 1 << 20, 4096, 0x5A)  # unwritten: the base
    shown = json.loads(_mobinux(srv, "node", "show", "pca", "--json").stdout)
    assert shown["overlay_bytes"] >= 128 * 1024
    # iPXE fetching node A's boot script is a new boot of A: A's changes go, B's stay
    assert "sanboot" in _boot_script(srv, MAC_A)
    assert _pattern_ok(srv, MAC_A, 0, 128 * 1024, 0x5A)
    assert _pattern_ok(srv, MAC_B, 0, 128 * 1024, 0x22)
    assert "node pca: new boot" in srv.log()
    assert _sha(stored) == before


def test_overlay_limit_fails_that_nodes_writes_only(srv: Server) -> None:
    _mobinux(srv, "node", "set", "pcb", "--overlay-limit", "256K")
    assert json.loads(_mobinux(srv, "node", "show", "pcb", "--json").stdout)["overlay_limit"] == 256 * 1024
    assert _qemu_io(srv, MAC_B, "write -P 0x22 0 256k", "flush").returncode == 0
    res = _qemu_io(srv, MAC_B, "write -P 0x23 2M 64k")
    assert "write failed" in res.stdout + res.stderr, res.stdout + res.stderr
    assert _pattern_ok(srv, MAC_B, 0, 256 * 1024, 0x22)  # what fitted is intact
    assert _qemu_io(srv, MAC_A, "write -P 0x11 0 2M", "flush").returncode == 0  # A is unaffected
    assert _pattern_ok(srv, MAC_A, 0, 2 << 20, 0x11)
    _mobinux(srv, "node", "set", "pcb", "--overlay-limit", "none")
    assert _qemu_io(srv, MAC_B, "write -P 0x23 2M 64k").returncode == 0


def test_persistent_node_and_node_reset(srv: Server) -> None:
    _mobinux(srv, "node", "set", "pca", "--persistent")
    assert _qemu_io(srv, MAC_A, "write -P 0x33 0 64k", "flush").returncode == 0
    _boot_script(srv, MAC_A)
    assert _pattern_ok(srv, MAC_A, 0, 65536, 0x33)  # kept across boots
    # up (a session open): refused without --force
    opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{srv.iscsi_port},"
            f"target={PREFIX}node.{_hex(MAC_A)},lun=0,initiator-name={PREFIX}initiator.{_hex(MAC_A)}")
    holder = subprocess.Popen(["qemu-io", "--image-opts", opts, "-c", "sleep 20000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not json.loads(_mobinux(srv, "status", "--json").stdout)["iscsi_sessions"]:
            assert time.monotonic() < deadline, "the session never showed in mobinux status"
            time.sleep(0.2)
        res = _mobinux(srv, "node", "reset", "pca", ok=False)
        assert res.returncode == 1 and "is up" in res.stderr and "--force" in res.stderr
        assert "Traceback" not in res.stderr
        assert _pattern_ok(srv, MAC_A, 0, 65536, 0x33)  # nothing was reset
        res = _mobinux(srv, "node", "reset", "pca", "--force")
        assert "clean base image" in res.stdout
        holder.wait(timeout=30)  # its session was ended by the server
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert _pattern_ok(srv, MAC_A, 0, 65536, 0x5A)
    res = _mobinux(srv, "node", "reset", "pcz", ok=False)
    assert res.returncode == 1 and "no node named 'pcz'" in res.stderr


def test_image_commit_and_update_make_versions_that_nodes_get_at_their_next_boot(
        srv: Server, tmp_path: Path) -> None:
    disks = srv.data_dir / "disks" / "base"
    assert _qemu_io(srv, MAC_A, "write -P 0x11 0 64k", "flush").returncode == 0  # installed on A
    assert _qemu_io(srv, MAC_B, "write -P 0x22 1M 64k", "flush").returncode == 0  # B runs v1
    _settle(srv)
    res = _mobinux(srv, "image", "commit", "pca")
    assert "version 2" in res.stdout
    image = next(i for i in json.loads(_mobinux(srv, "image", "list", "--json").stdout)
                 if i["name"] == "base")
    assert image["version"] == 2 and image["disk"] == "disks/base/v2.raw"
    # B has not rebooted: it keeps version 1 and its own changes
    assert _pattern_ok(srv, MAC_B, 0, 65536, 0x5A)
    assert _pattern_ok(srv, MAC_B, 1 << 20, 65536, 0x22)
    assert (disks / "disk.raw").exists()  # still in use
    _boot_script(srv, MAC_B)  # B boots again: the new version, its changes gone
    assert _pattern_ok(srv, MAC_B, 0, 65536, 0x11)
    assert _pattern_ok(srv, MAC_B, 1 << 20, 65536, 0x5A)
    assert (disks / "disk.raw").exists()  # A's overlay still sits on version 1
    _boot_script(srv, MAC_A)
    assert _pattern_ok(srv, MAC_A, 0, 65536, 0x11)  # A's changes are the base now
    assert not (disks / "disk.raw").exists()  # nobody uses version 1: freed
    # a new version from a file
    new = tmp_path / "new.raw"
    new.write_bytes(b"\x77" * BASE_SIZE)
    assert "version 3" in _mobinux(srv, "image", "import", str(new), "--name", "base", "--format",
                                   "raw", "--update").stdout
    assert _pattern_ok(srv, MAC_A, 0, 65536, 0x11)  # running: unchanged
    _boot_script(srv, MAC_A)
    assert _pattern_ok(srv, MAC_A, 0, 65536, 0x77)
    # committing a node with nothing written, an unknown image to update
    _settle(srv)
    res = _mobinux(srv, "image", "commit", "pca", ok=False)
    assert res.returncode == 1 and "nothing to commit" in res.stderr
    res = _mobinux(srv, "image", "import", str(new), "--name", "nope", "--update", ok=False)
    assert res.returncode == 1 and "no disk image 'nope'" in res.stderr
    # commit into a new image: the node's own image is left as it was
    assert _qemu_io(srv, MAC_A, "write -P 0x31 0 64k", "flush").returncode == 0
    _settle(srv)
    assert "a new disk image" in _mobinux(srv, "image", "commit", "pca", "--name", "desk2").stdout
    _mobinux(srv, "node", "set", "pcb", "--image", "desk2")
    _boot_script(srv, MAC_B)
    assert _pattern_ok(srv, MAC_B, 0, 65536, 0x31)
    _boot_script(srv, MAC_A)
    assert _pattern_ok(srv, MAC_A, 0, 65536, 0x77)
