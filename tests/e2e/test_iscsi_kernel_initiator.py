"""Acceptance: the Linux kernel's iSCSI initiator (open-iscsi's iscsistart in a VM's
initramfs) logs in to a Mobinux target, reads what the server holds and writes
data that lands in the exported file.

The VM PXE-boots a RAM-disk image from the same server; its /init loads the
virtio and iSCSI modules, configures the address from the kernel's ``ip=``
parameter, runs ``iscsistart`` and reads and writes ``/dev/sda``.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import (
    ProcessGroup,
    build_test_rootfs,
    cache_dir,
    guest_kernel,
    netns,
    run_vm,
    skip_unless_ready,
    start_ipv6_ra,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAC = "52:54:00:00:00:41"
INITIATOR = "iqn.2026-11.test.guest:vm41"
BOOT_TIMEOUT = 300.0
ISCSISTART = Path("/usr/sbin/iscsistart")
# Load order follows modules.dep of the Debian cloud kernel (virtio and SCSI are modules there).
MODULES = (
    "drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev", "drivers/virtio/virtio_pci", "net/core/failover",
    "drivers/net/net_failover", "drivers/net/virtio_net", "drivers/scsi/scsi_common",
    "drivers/scsi/scsi_mod", "drivers/scsi/sd_mod", "drivers/scsi/scsi_transport_iscsi",
    "drivers/scsi/libiscsi", "drivers/scsi/libiscsi_tcp", "drivers/scsi/iscsi_tcp",
)

HOOK = r"""#!/bin/sh
for m in /modules/*.ko; do insmod "$m" || echo "hook: insmod $m failed"; done
set -- $(sed -n 's/.*ip=\([0-9.]*\):\([0-9.]*\):.*/\1 \2/p' /proc/cmdline)
CLIENT=$1 SERVER=$2
for i in $(seq 1 20); do [ -e /sys/class/net/eth0 ] && break; sleep 0.5; done
ip link set lo up
ip link set eth0 up
ip addr add "$CLIENT/24" dev eth0
TARGET=$(sed -n 's/.*mbx_target=\([^ ]*\).*/\1/p' /proc/cmdline)
iscsistart -i @INITIATOR@ -t "$TARGET" -g 1 -a "$SERVER" -p 3260 || echo "hook: iscsistart failed"
for i in $(seq 1 40); do [ -b /dev/sda ] && break; sleep 0.5; done
echo "GUEST-READ:$(dd if=/dev/sda bs=512 count=1 2>/dev/null | head -c 26)"
printf 'WRITTEN-BY-GUEST-@TOKEN@' | dd of=/dev/sda bs=512 seek=8 conv=sync,fsync 2>/dev/null \
    && echo "GUEST-WRITE-DONE"
"""


def _copy_with_libraries(binary: Path, root: Path) -> None:
    """Copy *binary* and the shared libraries ``ldd`` lists into *root* at the same paths."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    paths = [binary]
    for line in out.splitlines():
        parts = line.split()
        for part in parts:
            if part.startswith("/"):
                paths.append(Path(part))
    for path in paths:
        dest = root / path.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.resolve(), dest)


def _kernel_modules_dir() -> Path:
    found = sorted((cache_dir() / "guest" / "root" / "lib" / "modules").glob("*/kernel"))
    if not found:
        pytest.skip("the guest kernel's modules are not unpacked (scripts/fetch-guest-kernel.sh)")
    return found[-1]


def test_iscsistart_logs_in_reads_and_writes(tmp_path: Path) -> None:
    skip_unless_ready()
    if not ISCSISTART.is_file():
        pytest.skip("iscsistart not installed (apt-get install open-iscsi)")
    kernel = guest_kernel()
    modules = _kernel_modules_dir()
    marker = f"MOBINUX-ISCSISTART-{secrets.token_hex(4)}"
    token = secrets.token_hex(4)
    rootfs = build_test_rootfs(tmp_path / "rootfs", marker)
    (rootfs / "modules").mkdir()
    for index, module in enumerate(MODULES):
        shutil.copy(modules / f"{module}.ko", rootfs / "modules" / f"{index:02d}-{Path(module).name}.ko")
    _copy_with_libraries(ISCSISTART, rootfs)
    hook = rootfs / "hook"
    hook.write_text(HOOK.replace("@INITIATOR@", INITIATOR).replace("@TOKEN@", token))
    hook.chmod(0o755)

    disk = tmp_path / "guest-disk.img"
    planted = f"PLANTED-BY-SERVER-{token}".encode()
    with open(disk, "wb") as f:
        f.write(planted)
        f.truncate(16 << 20)
    data = tmp_path / "data"

    def mobinux(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "mobinux", "--data-dir", str(data), *args],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"mobinux {' '.join(args)}: {res.stderr}"
        return res.stdout

    mobinux("target", "add", "guest", "--file", str(disk), "--allow", INITIATOR)
    mobinux("image", "ramdisk", str(rootfs), "--kernel", str(kernel), "--name", "initiator",
            "--cmdline", "console=ttyS0 panic=-1 {ipconfig} mbx_target=iqn.2026-11.org.mobinux:guest")
    procs = ProcessGroup(tmp_path / "logs")
    with netns(taps=1) as ns:
        try:
            mobinux("node", "add", MAC, "--name", "vm41", "--ip", ns.address(60), "--image", "initiator")
            server = procs.start(ns, [sys.executable, "-m", "mobinux", "--data-dir", str(data), "serve",
                                      "--interface", ns.bridge, "--dhcp", "full", "--dhcp-range",
                                      ns.address(100) + "-" + ns.address(150)], "mobinux")
            server.wait_for("serving on", timeout=20)
            start_ipv6_ra(procs, ns)
            with run_vm(ns, ns.taps[0], MAC, "bios", BOOT_TIMEOUT, workdir=tmp_path) as vm:
                console = vm.wait_for(marker)
            log = server.log()
        finally:
            procs.stop_all()
    assert f"GUEST-READ:{planted.decode()}" in console, console[-4000:]
    assert "GUEST-WRITE-DONE" in console, console[-4000:]
    written = f"WRITTEN-BY-GUEST-{token}".encode()
    with open(disk, "rb") as f:
        f.seek(8 * 512)
        assert f.read(512) == written.ljust(512, b"\0")  # dd conv=sync pads the block with zeros
    assert INITIATOR in log  # the login was logged with the initiator's name
