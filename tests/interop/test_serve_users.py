"""Users' persistent disks in the real ``mobinux serve``: LUN 1 of the node they are attached
to, the same data on whichever node, snapshots carried out by the running server."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.interop.serve_helpers import Server, loopback_server
from tests.interop.test_serve_node_disks import MAC_A, MAC_B, PREFIX, _hex, _mobinux

pytestmark = pytest.mark.interop


def _io(srv: Server, mac: str, lun: int, *commands: str) -> subprocess.CompletedProcess[str]:
    opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{srv.iscsi_port},"
            f"target={PREFIX}node.{_hex(mac)},lun={lun},initiator-name={PREFIX}initiator.{_hex(mac)}")
    argv = ["qemu-io", "--image-opts", opts]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _has(srv: Server, mac: str, byte: int, offset: int = 0, n: int = 65536) -> bool:
    res = _io(srv, mac, 1, f"read -P {byte:#x} {offset} {n}")
    return res.returncode == 0 and "Pattern verification failed" not in res.stdout + res.stderr


@pytest.fixture
def srv(tmp_path: Path) -> Server:
    if subprocess.run(["which", "qemu-io"], capture_output=True).returncode != 0:
        pytest.skip("qemu-io not installed")
    with loopback_server(tmp_path) as server:
        base = tmp_path / "base.raw"
        base.write_bytes(b"\x5a" * (8 << 20))
        _mobinux(server, "image", "import", str(base), "--name", "base", "--format", "raw")
        _mobinux(server, "user", "add", "alice", "--size", "32M")
        for mac, name in ((MAC_A, "pca"), (MAC_B, "pcb")):
            _mobinux(server, "node", "add", mac, "--name", name, "--image", "base", "--boot", "iscsi")
        yield server  # type: ignore[misc]


def test_user_disk_follows_the_user_and_snapshots_work_through_the_server(srv: Server) -> None:
    _mobinux(srv, "node", "set", "pca", "--user", "alice")
    res = _mobinux(srv, "node", "set", "pcb", "--user", "alice", ok=False)
    assert res.returncode == 1 and "attached to node 'pca'" in res.stderr  # one node at a time
    assert _io(srv, MAC_A, 1, "write -P 0x41 0 64k", "flush").returncode == 0
    assert _has(srv, MAC_A, 0x41)
    assert _io(srv, MAC_A, 0, "write -P 0x01 0 64k", "flush").returncode == 0  # its own disk: LUN 0
    assert _has(srv, MAC_A, 0x41)  # unaffected
    # a snapshot taken by the running server (the disk is open there)
    assert "snapshot s1 taken" in _mobinux(srv, "snapshot", "create", "alice", "--name", "s1").stdout
    assert _io(srv, MAC_A, 1, "write -P 0x42 0 64k", "flush").returncode == 0
    _mobinux(srv, "snapshot", "create", "alice", "--name", "s2")
    snaps = json.loads(_mobinux(srv, "snapshot", "list", "alice", "--json").stdout)
    assert [s["name"] for s in snaps] == ["s1", "s2"] and snaps[0]["used_bytes"] >= 65536
    # rollback while the node is up is refused with a clear message
    holder = subprocess.Popen(["qemu-io", "--image-opts",
                               f"driver=iscsi,transport=tcp,portal=127.0.0.1:{srv.iscsi_port},"
                               f"target={PREFIX}node.{_hex(MAC_A)},lun=0,"
                               f"initiator-name={PREFIX}initiator.{_hex(MAC_A)}", "-c", "sleep 20000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        res = _mobinux(srv, "snapshot", "rollback", "alice", "s1", ok=False)
        assert res.returncode == 1 and "attached to node pca, which is up" in res.stderr
        assert "Traceback" not in res.stderr
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.5)
    assert "back at snapshot s1" in _mobinux(srv, "snapshot", "rollback", "alice", "s1").stdout
    assert _has(srv, MAC_A, 0x41)
    assert [s["name"] for s in json.loads(_mobinux(srv, "snapshot", "list", "alice", "--json").stdout)] == ["s1"]
    res = _mobinux(srv, "snapshot", "delete", "alice", "s9", ok=False)
    assert res.returncode == 1 and "no snapshot named 's9'" in res.stderr
    # moved to the other node: the same data there
    _mobinux(srv, "node", "set", "pca", "--user", "none")
    _mobinux(srv, "node", "set", "pcb", "--user", "alice")
    assert _has(srv, MAC_B, 0x41)
    res = _io(srv, MAC_A, 1, "read 0 512")
    assert res.returncode != 0 or "read failed" in res.stdout + res.stderr  # pca has no LUN 1 now
    # a user whose disk is attached cannot be removed
    res = _mobinux(srv, "user", "remove", "alice", ok=False)
    assert res.returncode == 1 and "attached to node 'pcb'" in res.stderr
