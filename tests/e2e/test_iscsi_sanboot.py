"""Acceptance: iPXE sanboots a whole disk from Mobinux's own iSCSI target, BIOS and UEFI.

The disk holds an MBR with a syslinux boot partition and an EFI system
partition (tests/e2e/disks.py); it is imported with ``mobinux image import``
(as qcow2, so the import really converts) and given to a node with ``--boot
iscsi``. The VM has no disk of its own: everything it boots comes over iSCSI,
logged in with the initiator name Mobinux assigned to the node.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.disks import make_sanboot_disk, skip_unless_disk_tools
from tests.e2e.harness import (
    BackgroundProcess,
    NetNS,
    ProcessGroup,
    guest_kernel,
    make_test_initrd,
    netns,
    run_vm,
    skip_unless_ready,
    start_ipv6_ra,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAC = "52:54:00:00:00:21"
BOOT_TIMEOUT = 300.0


class SanLab:
    def __init__(self, ns: NetNS, data_dir: Path, work: Path, marker: str, procs: ProcessGroup) -> None:
        self.ns, self.data_dir, self.work, self.marker, self.procs = ns, data_dir, work, marker, procs

    def mobinux(self, *args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "mobinux", "--data-dir", str(self.data_dir), *args],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"mobinux {' '.join(args)}: {res.stderr}"
        return res.stdout

    def serve(self) -> BackgroundProcess:
        proc = self.procs.start(self.ns, [
            sys.executable, "-m", "mobinux", "--data-dir", str(self.data_dir), "serve",
            "--interface", self.ns.bridge, "--dhcp", "full",
            "--dhcp-range", self.ns.address(100) + "-" + self.ns.address(150)], "mobinux")
        proc.wait_for(r"serving on", timeout=20)
        return proc


@pytest.fixture
def san_lab(tmp_path: Path) -> Iterator[SanLab]:
    skip_unless_ready()
    skip_unless_disk_tools()
    kernel = guest_kernel()
    marker = f"MOBINUX-SAN-{secrets.token_hex(4)}"
    initrd = make_test_initrd(tmp_path / "initrd.gz", marker)
    raw = make_sanboot_disk(tmp_path / "san.raw", kernel, initrd, "console=ttyS0 panic=-1")
    qcow2 = tmp_path / "san.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True, timeout=120)
    procs = ProcessGroup(tmp_path / "logs")
    with netns(taps=1) as ns:
        lab = SanLab(ns, tmp_path / "data", tmp_path, marker, procs)
        lab.mobinux("image", "import", str(qcow2), "--name", "classroom")
        lab.mobinux("node", "add", MAC, "--name", "pc21", "--image", "classroom", "--boot", "iscsi")
        start_ipv6_ra(procs, ns)
        try:
            yield lab
        finally:
            procs.stop_all()


def _sanboot(lab: SanLab, firmware: str) -> None:
    info = json.loads(lab.mobinux("node", "show", "pc21", "--json"))["iscsi"]
    server = lab.serve()
    # Watch `mobinux status` while the VM boots (the console only tells us when it ends).
    seen: list[dict[str, object]] = []
    done = threading.Event()

    def watch_status() -> None:
        while not done.is_set():
            seen.extend(json.loads(lab.mobinux("status", "--json"))["iscsi_sessions"])
            done.wait(0.3)

    watcher = threading.Thread(target=watch_status, daemon=True)
    watcher.start()
    try:
        with run_vm(lab.ns, lab.ns.taps[0], MAC, firmware, BOOT_TIMEOUT, workdir=lab.work) as vm:  # type: ignore[arg-type]
            console = vm.wait_for(lab.marker)
    finally:
        done.set()
        watcher.join(timeout=30)
    # The disk's own boot loader ran, not a network kernel: syslinux prints its banner
    # (BIOS, SERIAL in its config); syslinux.efi draws "Loading vmlinuz" on the EFI console.
    text = re.sub(r"\x1b\[[0-9;=]*[A-Za-z]", "", console)
    assert ("SYSLINUX" if firmware == "bios" else "Loading vmlinuz... ok") in text, text[-3000:]
    log = server.log()
    # the session was opened with the node's own initiator name, to the node's own target
    assert info["initiator"] in log and info["target"] in log, log[-3000:]
    if firmware == "bios":
        # iPXE stays resident under BIOS (INT 13h), so its session lives on and
        # `mobinux status` shows it. Under UEFI iPXE logs out at ExitBootServices,
        # often within the once-a-second recording interval; the log line above
        # shows that login.
        assert any(s["initiator"] == info["initiator"] and s["target"] == info["target"]
                   and s["node"] == "pc21" for s in seen), seen


def test_bios_sanboot_from_mobinux_target(san_lab: SanLab) -> None:
    _sanboot(san_lab, "bios")


def test_uefi_sanboot_from_mobinux_target(san_lab: SanLab) -> None:
    _sanboot(san_lab, "uefi")
