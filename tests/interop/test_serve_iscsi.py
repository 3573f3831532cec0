"""The iSCSI target inside the real ``mobinux serve``, driven by the CLI and real initiators.

QEMU's iSCSI driver (libiscsi) reads and writes through ``qemu-io``; targets are
added with ``mobinux target add`` while the server runs; ACLs and CHAP come from
the inventory; ``mobinux status`` lists the sessions; acknowledged writes
survive ``kill -9`` of the server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.interop.serve_helpers import Server, loopback_server

pytestmark = pytest.mark.interop

SECRET = "chap-secret-0123"
MUTUAL = "mutual-secret-987"
ALLOWED = "iqn.2026-11.test.serve:allowed"
OTHER = "iqn.2026-11.test.serve:other"


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


def _mobinux(srv: Server, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "mobinux", "--data-dir", str(srv.data_dir), *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"mobinux {' '.join(args)}: {res.stderr}"
    return res.stdout


def _qemu_io(srv: Server, iqn: str, *commands: str, initiator: str = ALLOWED, user: str | None = None,
             password: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{srv.iscsi_port},target={iqn},lun=0,"
            f"initiator-name={initiator}")
    argv = ["qemu-io"]
    if user is not None:
        argv += ["--object", f"secret,id=pw,data={password}"]
        opts += f",user={user},password-secret=pw"
    argv += ["--image-opts", opts]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _file_with(path: Path, size: int, head: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def test_target_added_while_running_is_read_and_written(tmp_path: Path) -> None:
    _need("qemu-io")
    disk = _file_with(tmp_path / "disk.img", 8 << 20, b"SERVER-SIDE-DATA")
    with loopback_server(tmp_path) as srv:
        # added after the server started: visible at the next login, no restart
        _mobinux(srv, "target", "add", "live", "--file", str(disk))
        iqn = "iqn.2026-11.org.mobinux:live"
        res = _qemu_io(srv, iqn, "read -v 0 16", "write -P 0x5a 1048576 65536", "flush")
        assert res.returncode == 0, res.stderr + res.stdout
        assert "53 45 52 56 45 52 2d 53 49 44 45 2d 44 41 54 41" in res.stdout  # SERVER-SIDE-DATA
        assert "wrote 65536/65536 bytes" in res.stdout
        with open(disk, "rb") as f:
            f.seek(1 << 20)
            assert f.read(65536) == b"\x5a" * 65536
        listed = json.loads(_mobinux(srv, "target", "list", "--json"))
        assert listed[0]["portal"] == f"127.0.0.1:{srv.iscsi_port}"
        assert "iscsi" in srv.log() and ALLOWED in srv.log()


def test_readonly_target_refuses_writes(tmp_path: Path) -> None:
    _need("qemu-io")
    disk = _file_with(tmp_path / "ro.img", 4 << 20, b"KEEP")
    with loopback_server(tmp_path) as srv:
        _mobinux(srv, "target", "add", "ro", "--file", str(disk), "--readonly")
        res = _qemu_io(srv, "iqn.2026-11.org.mobinux:ro", "write -P 0x11 0 4096")
        assert "wrote" not in res.stdout, res.stdout
        assert disk.read_bytes()[:4] == b"KEEP"


def test_acl_and_chap_from_the_inventory(tmp_path: Path) -> None:
    _need("qemu-io")
    disk = _file_with(tmp_path / "acl.img", 4 << 20)
    chap = tmp_path / "chap"
    chap.write_text(f"alice:{SECRET}\n")
    with loopback_server(tmp_path) as srv:
        _mobinux(srv, "target", "add", "acl", "--file", str(disk), "--allow", ALLOWED)
        _mobinux(srv, "target", "add", "chap", "--file", str(disk), "--chap-file", str(chap))
        ok = _qemu_io(srv, "iqn.2026-11.org.mobinux:acl", "read 0 512")
        assert ok.returncode == 0 and "read 512/512" in ok.stdout, ok.stderr
        refused = _qemu_io(srv, "iqn.2026-11.org.mobinux:acl", "read 0 512", initiator=OTHER)
        assert refused.returncode != 0 and "read 512/512" not in refused.stdout
        good = _qemu_io(srv, "iqn.2026-11.org.mobinux:chap", "read 0 512", user="alice", password=SECRET)
        assert good.returncode == 0 and "read 512/512" in good.stdout, good.stderr
        bad = _qemu_io(srv, "iqn.2026-11.org.mobinux:chap", "read 0 512", user="alice",
                       password="wrong-secret-000")
        assert bad.returncode != 0 and "read 512/512" not in bad.stdout
        none = _qemu_io(srv, "iqn.2026-11.org.mobinux:chap", "read 0 512")
        assert none.returncode != 0 and "read 512/512" not in none.stdout
        assert SECRET not in srv.log()


def test_status_lists_sessions(tmp_path: Path) -> None:
    _need("qemu-io")
    disk = _file_with(tmp_path / "s.img", 4 << 20)
    with loopback_server(tmp_path) as srv:
        _mobinux(srv, "target", "add", "watched", "--file", str(disk))
        opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{srv.iscsi_port},"
                f"target=iqn.2026-11.org.mobinux:watched,lun=0,initiator-name={ALLOWED}")
        holder = subprocess.Popen(["qemu-io", "--image-opts", opts, "-c", "read 0 512", "-c", "sleep 8000"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 15
            sessions: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                sessions = json.loads(_mobinux(srv, "status", "--json"))["iscsi_sessions"]
                if sessions:
                    break
                time.sleep(0.3)
            assert len(sessions) == 1, sessions
            [session] = sessions
            assert session["initiator"] == ALLOWED
            assert session["target"] == "iqn.2026-11.org.mobinux:watched"
            assert session["peer"].startswith("127.0.0.1:")  # type: ignore[union-attr]
            assert abs(float(session["since"]) - time.time()) < 60  # type: ignore[arg-type]
            text = _mobinux(srv, "status")
            assert ALLOWED in text and "iqn.2026-11.org.mobinux:watched" in text
        finally:
            holder.kill()
            holder.wait()
        deadline = time.monotonic() + 15
        while json.loads(_mobinux(srv, "status", "--json"))["iscsi_sessions"]:
            assert time.monotonic() < deadline, "the closed session is still listed"
            time.sleep(0.3)


def test_flushed_and_fua_writes_survive_kill_9(tmp_path: Path) -> None:
    _need("qemu-io")
    disk = _file_with(tmp_path / "d.img", 8 << 20)
    with loopback_server(tmp_path) as srv:
        _mobinux(srv, "target", "add", "durable", "--file", str(disk))
        iqn = "iqn.2026-11.org.mobinux:durable"
        # a FUA write (qemu-io write -f), then an ordinary write followed by SYNCHRONIZE CACHE
        res = _qemu_io(srv, iqn, "write -f -P 0xa1 0 131072", "write -P 0xb2 1048576 131072", "flush")
        assert res.returncode == 0, res.stderr
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
    data = disk.read_bytes()
    assert data[:131072] == b"\xa1" * 131072
    assert data[1 << 20:(1 << 20) + 131072] == b"\xb2" * 131072
