"""Acceptance (issue 4): two VMs boot one base image diskless, root on iSCSI, each
through its own copy-on-write overlay that is thrown away when it reboots.

The base image is an ext4 file system (built without root by ``mkfs.ext4 -d``)
whose ``/sbin/init`` prints what ``/data`` holds, writes ``/data/<host>.txt``,
syncs, and then lists ``/data`` every few seconds. Both nodes are
``--boot kernel --disk base``: iPXE loads a kernel and an initramfs over HTTP;
the initramfs logs in with ``iscsistart`` using the ``{initiator}``,
``{target}`` and ``{portal}`` placeholders of its kernel command line, mounts
``/dev/sda`` and switches root to it. Then:

* neither VM ever lists the other's file;
* VM A is power-cycled (QEMU killed, never logging out) and boots again: its
  file is gone (its new boot reset its overlay), while VM B, still running,
  keeps listing its own;
* the base image's bytes are unchanged, and ``node show`` reports each
  overlay's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.harness import (
    BackgroundProcess,
    NetNS,
    ProcessGroup,
    guest_kernel,
    netns,
    run_vm,
    skip_unless_ready,
    start_ipv6_ra,
)
from tests.e2e.test_iscsi_kernel_initiator import (
    ISCSISTART,
    MODULES,
    _copy_with_libraries,
    _kernel_modules_dir,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAC_A, MAC_B = "52:54:00:00:00:51", "52:54:00:00:00:52"
BOOT_TIMEOUT = 400.0
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "echo", "mount", "sync", "sleep", "tr", "sed", "mkdir", "umount", "cut")

INITRAMFS_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
fail() { echo "DISKLESS-INITRAMFS-FAILED: $*"; poweroff -f; }
for m in /modules/*.ko; do insmod "$m" || echo "insmod $m failed"; done
set -- $(sed -n 's/.*ip=\([0-9.]*\):\([0-9.]*\):.*/\1 \2/p' /proc/cmdline)
for i in $(seq 1 20); do [ -e /sys/class/net/eth0 ] && break; sleep 0.5; done
ip link set lo up
ip link set eth0 up
ip addr add "$1/24" dev eth0
PORTAL=$(arg mbx.portal)
CHAP=$(arg mbx.chap)
echo "initramfs: logging in to $(arg mbx.target) at $PORTAL as $(arg mbx.initiator)"
if [ -n "$CHAP" ]; then set -- -u "${CHAP%%:*}" -w "${CHAP#*:}"; else set --; fi
iscsistart -i "$(arg mbx.initiator)" -t "$(arg mbx.target)" -g 1 -a "${PORTAL%:*}" \
    -p "${PORTAL##*:}" "$@" || fail "iscsistart"
for i in $(seq 1 40); do [ -b /dev/sda ] && break; sleep 0.5; done
mkdir -p /newroot
mount -t ext4 /dev/sda /newroot || fail "mount /dev/sda"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""

ROOT_INIT = r"""#!/bin/sh
export PATH=/bin
exec </dev/console >/dev/console 2>&1
HOST=$(sed -n 's/.*mbx.host=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "ROOT-UP $HOST: [$(ls /data | tr '\n' ' ')]"
BOOT=$(cut -c1-8 /proc/sys/kernel/random/uuid)
echo "written by $HOST" > /data/$HOST.txt
echo "boot $BOOT" > /data/boot-$HOST-$BOOT.txt
sync
echo "WROTE $HOST boot-$HOST-$BOOT.txt"
for i in 1 2 3 4 5 6; do [ -b /dev/sdb ] && break; sleep 0.5; done
if [ -b /dev/sdb ] && mount -t ext4 /dev/sdb /home; then
    echo "HOME $HOST: [$(ls /home | tr '\n' ' ')]"
    echo "from $HOST" > /home/note-from-$HOST.txt
    sync
    echo "HOME-WROTE $HOST"
else
    echo "NO-HOME $HOST"
fi
i=0
while :; do
    i=$((i + 1))
    echo "LS $HOST $i: [$(ls /data | tr '\n' ' ')]"
    sleep 3
done
"""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _base_image(tmp_path: Path) -> Path:
    root = tmp_path / "base-root"
    for d in ("bin", "sbin", "proc", "sys", "dev", "data", "home"):
        (root / d).mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    (root / "data" / "from-base.txt").write_text("in the base image\n")
    init = root / "sbin" / "init"
    init.write_text(ROOT_INIT)
    init.chmod(0o755)
    image = tmp_path / "base.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "mbxbase", "-d", str(root), str(image), "48M"],
                   check=True, capture_output=True, timeout=60)
    return image


def _initramfs_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "initramfs"
    for d in ("bin", "sbin", "proc", "sys", "dev", "modules", "newroot"):
        (tree / d).mkdir(parents=True)
    shutil.copy(BUSYBOX, tree / "bin" / "busybox")
    modules = _kernel_modules_dir()
    for index, module in enumerate(MODULES):
        shutil.copy(modules / f"{module}.ko", tree / "modules" / f"{index:02d}-{Path(module).name}.ko")
    _copy_with_libraries(ISCSISTART, tree)
    init = tree / "init"
    init.write_text(INITRAMFS_INIT)
    init.chmod(0o755)
    return tree


def _listings(console: str, host: str) -> list[str]:
    return re.findall(rf"(?:ROOT-UP|LS) {host}(?: \d+)?: \[([^\]]*)\]", console)


class Mobinux:
    def __init__(self, data: Path) -> None:
        self.data = data

    def __call__(self, *args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "mobinux", "--data-dir", str(self.data), *args],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"mobinux {' '.join(args)}: {res.stderr}"
        return res.stdout


def _prepare(tmp_path: Path) -> tuple[Mobinux, Path]:
    """The base image imported as ``base`` and the diskless initramfs as ``diskless``."""
    skip_unless_ready()
    if not ISCSISTART.is_file():
        pytest.skip("iscsistart not installed (apt-get install open-iscsi)")
    kernel = guest_kernel()
    base = _base_image(tmp_path)
    tree = _initramfs_tree(tmp_path)
    mobinux = Mobinux(tmp_path / "data")
    mobinux("image", "import", str(base), "--name", "base", "--format", "raw")
    mobinux("image", "ramdisk", str(tree), "--kernel", str(kernel), "--name", "diskless",
            "--cmdline", "console=ttyS0 panic=-1 {ipconfig} mbx.target={target} mbx.portal={portal} "
            "mbx.initiator={initiator} mbx.chap={chap} mbx.host={hostname}")
    return mobinux, base


def _serve(procs: ProcessGroup, ns: NetNS, data: Path) -> BackgroundProcess:
    server = procs.start(ns, [sys.executable, "-m", "mobinux", "--data-dir", str(data), "serve",
                              "--interface", ns.bridge, "--dhcp", "full", "--dhcp-range",
                              ns.address(100) + "-" + ns.address(150)], "mobinux")
    server.wait_for("serving on", timeout=20)
    start_ipv6_ra(procs, ns)
    return server


def test_two_nodes_share_one_base_and_a_reboot_discards_only_that_nodes_changes(tmp_path: Path) -> None:
    mobinux, base = _prepare(tmp_path)
    data = mobinux.data
    base_sha = _sha256(base)
    stored = data / "disks" / "base" / "disk.raw"
    stored_sha = _sha256(stored)
    procs = ProcessGroup(tmp_path / "logs")
    with netns(taps=2) as ns:
        try:
            for mac, name, host in ((MAC_A, "vma", 61), (MAC_B, "vmb", 62)):
                mobinux("node", "add", mac, "--name", name, "--ip", ns.address(host),
                        "--image", "diskless", "--boot", "kernel", "--disk", "base")
            shown = json.loads(mobinux("node", "show", "vma", "--json"))
            assert f"mbx.initiator={shown['iscsi']['initiator']}" in shown["boot_cmdline"]
            assert f"mbx.target={shown['iscsi']['target']}" in shown["boot_cmdline"]
            server = _serve(procs, ns, data)
            with run_vm(ns, ns.taps[1], MAC_B, "bios", BOOT_TIMEOUT, workdir=tmp_path, name="vmb") as vmb:
                with run_vm(ns, ns.taps[0], MAC_A, "bios", BOOT_TIMEOUT, workdir=tmp_path,
                            name="vma-boot1") as vma:
                    vma.wait_for(r"WROTE vma")
                    vmb.wait_for(r"WROTE vmb")
                    vma.wait_for(r"LS vma 2:")
                    vmb.wait_for(r"LS vmb 2:")
                    first_a = _listings(vma.console(), "vma")
                    overlay_a = json.loads(mobinux("node", "show", "vma", "--json"))["overlay_bytes"]
                    status = json.loads(mobinux("status", "--json"))
                # VM A lost power: it never logged out. Its next boot must end the old
                # session and discard its overlay; VM B keeps running meanwhile.
                with run_vm(ns, ns.taps[0], MAC_A, "bios", BOOT_TIMEOUT, workdir=tmp_path,
                            name="vma-boot2") as vma2:
                    vma2.wait_for(r"ROOT-UP vma")
                    second_a = _listings(vma2.console(), "vma")
                    mark_b = len(vmb.console())
                    deadline = time.monotonic() + 30
                    while not _listings(vmb.console()[mark_b:], "vmb") and time.monotonic() < deadline:
                        time.sleep(0.5)
                    after_b = _listings(vmb.console()[mark_b:], "vmb")
                all_b = _listings(vmb.console(), "vmb")
            server_log = server.log()
        finally:
            procs.stop_all()
    # each saw the base's file and its own, never the other's
    assert first_a and all("from-base.txt" in entry for entry in first_a), first_a
    assert "vma.txt" in first_a[-1] and not any("vmb.txt" in e for e in first_a), first_a
    assert all_b and "vmb.txt" in all_b[-1] and not any("vma.txt" in e for e in all_b), all_b
    # after the power cycle A's file is gone; B, not rebooted, still has its own
    assert second_a[0].split() == ["from-base.txt"], second_a
    assert after_b and all("vmb.txt" in e and "vma.txt" not in e for e in after_b), after_b
    assert overlay_a > 0
    assert "the node booted again" in server_log or "old session(s) closed" in server_log, server_log[-3000:]
    assert _sha256(stored) == stored_sha  # the shared base was never written
    assert _sha256(base) == base_sha
    sessions = {(s["node"], s["initiator"]) for s in status["iscsi_sessions"]}
    assert ("vma", shown["iscsi"]["initiator"]) in sessions and any(n == "vmb" for n, _ in sessions)


def _boot_file(console: str, host: str) -> str:
    match = re.search(rf"WROTE {host} (boot-{host}-\w+\.txt)", console)
    assert match is not None, console[-3000:]
    return match.group(1)


def test_image_commit_reaches_other_nodes_at_their_next_boot_and_persistent_nodes_keep_changes(
        tmp_path: Path) -> None:
    mobinux, _ = _prepare(tmp_path)
    data = mobinux.data
    procs = ProcessGroup(tmp_path / "logs")
    with netns(taps=2) as ns:
        try:
            for mac, name, host in ((MAC_A, "vma", 61), (MAC_B, "vmb", 62)):
                mobinux("node", "add", mac, "--name", name, "--ip", ns.address(host),
                        "--image", "diskless", "--boot", "kernel", "--disk", "base")
            _serve(procs, ns, data)
            with run_vm(ns, ns.taps[1], MAC_B, "bios", BOOT_TIMEOUT, workdir=tmp_path, name="vmb1") as vmb:
                # A installs something (its boot writes files), shuts down; its changes are committed
                with run_vm(ns, ns.taps[0], MAC_A, "bios", BOOT_TIMEOUT, workdir=tmp_path,
                            name="vma1") as vma:
                    installed = _boot_file(vma.wait_for(r"WROTE vma boot-\S+\.txt"), "vma")
                    vma.wait_for(r"LS vma 1:")
                vmb.wait_for(r"WROTE vmb")
                # Switched off, A never logged out: its session lingers, hence --force
                # (its boot synced what it wrote).
                committed = mobinux("image", "commit", "vma", "--force")
                assert "version 2" in committed
                # B runs the old version: it keeps listing without A's files
                mark = len(vmb.console())
                vmb.wait_for(r"LS vmb \d+:.*", timeout=10)
                deadline = time.monotonic() + 20
                while not _listings(vmb.console()[mark:], "vmb") and time.monotonic() < deadline:
                    time.sleep(0.5)
                b_running = _listings(vmb.console()[mark:], "vmb")
            # B reboots: the new version, without its own old changes
            with run_vm(ns, ns.taps[1], MAC_B, "bios", BOOT_TIMEOUT, workdir=tmp_path, name="vmb2") as vmb2:
                vmb2.wait_for(r"ROOT-UP vmb")
                b_rebooted = _listings(vmb2.console(), "vmb")[0].split()
            # A, now persistent, keeps what a boot wrote at its next boot
            mobinux("node", "set", "vma", "--persistent")
            with run_vm(ns, ns.taps[0], MAC_A, "bios", BOOT_TIMEOUT, workdir=tmp_path, name="vma2") as vma2:
                kept = _boot_file(vma2.wait_for(r"WROTE vma boot-\S+\.txt"), "vma")
                vma2.wait_for(r"LS vma 1:")
            with run_vm(ns, ns.taps[0], MAC_A, "bios", BOOT_TIMEOUT, workdir=tmp_path, name="vma3") as vma3:
                vma3.wait_for(r"ROOT-UP vma")
                a_persistent = _listings(vma3.console(), "vma")[0].split()
        finally:
            procs.stop_all()
    assert b_running and all(installed not in e and "vma.txt" not in e for e in b_running), b_running
    assert installed in b_rebooted and "vma.txt" in b_rebooted, b_rebooted
    assert not any(f.startswith("boot-vmb-") for f in b_rebooted) and "vmb.txt" not in b_rebooted
    assert kept in a_persistent and installed in a_persistent, a_persistent
    # the persistent node still sits on version 1 (what it was made on); reset, nothing does
    assert (data / "disks" / "base" / "disk.raw").exists()
    mobinux("node", "reset", "vma")
    assert not (data / "disks" / "base" / "disk.raw").exists()
