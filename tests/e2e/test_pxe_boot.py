"""Acceptance: real PXE firmware in QEMU boots a RAM-disk image from `mobinux serve`.

Every boot runs in a private network namespace; the VM's serial console must
show the marker printed by the image's /init. One server per test, started as
the real command (`python -m mobinux serve`), with its own data directory.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import (
    BackgroundProcess,
    NetNS,
    ProcessGroup,
    build_test_rootfs,
    guest_kernel,
    make_localboot_disk,
    netns,
    run_vm,
    skip_unless_ready,
    start_ipv6_ra,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAC = "52:54:00:00:00:01"
BOOT_TIMEOUT = 240.0


@dataclass
class Lab:
    ns: NetNS
    data_dir: Path
    work: Path
    marker: str
    procs: ProcessGroup

    def mobinux(self, *args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "mobinux", "--data-dir", str(self.data_dir), *args],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"mobinux {' '.join(args)}: {res.stderr}"
        return res.stdout

    def serve(self, *args: str) -> BackgroundProcess:
        proc = self.procs.start(self.ns, [sys.executable, "-m", "mobinux", "--data-dir", str(self.data_dir),
                                          "serve", "--interface", self.ns.bridge, *args], "mobinux")
        proc.wait_for(r"serving on", timeout=20)
        return proc


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    skip_unless_ready()
    kernel = guest_kernel()
    marker = f"MOBINUX-E2E-{secrets.token_hex(4)}"
    rootfs = build_test_rootfs(tmp_path / "rootfs", marker)
    procs = ProcessGroup(tmp_path / "logs")
    with netns(taps=1) as ns:
        lab = Lab(ns, tmp_path / "data", tmp_path, marker, procs)
        lab.mobinux("image", "ramdisk", str(rootfs), "--kernel", str(kernel), "--name", "tiny",
                    "--cmdline", "console=ttyS0 panic=-1 {ipconfig} host={hostname}")
        # IPv6 router advertisements make iPXE's "Configuring" step ~10 s shorter.
        start_ipv6_ra(procs, ns)
        try:
            yield lab
        finally:
            procs.stop_all()


def _boot_and_check(lab: Lab, firmware: str, expect_steps: list[str]) -> str:
    with run_vm(lab.ns, lab.ns.taps[0], MAC, firmware, BOOT_TIMEOUT, workdir=lab.work) as vm:  # type: ignore[arg-type]
        console = vm.wait_for(lab.marker)
    # the kernel got the node's command line with the placeholders filled in
    assert "host=pc1" in console
    status = json.loads(lab.mobinux("status", "--json"))
    client = next(c for c in status["clients"] if c["mac"] == MAC)
    steps = " | ".join(s["step"] for s in client["last_steps"])
    for expected in expect_steps:
        assert expected in steps, f"{expected!r} not in boot steps {steps!r}"
    return console


def test_bios_ipxe_over_http_full_dhcp(lab: Lab) -> None:
    lab.mobinux("node", "add", MAC, "--name", "pc1", "--image", "tiny")
    server = lab.serve("--dhcp", "full", "--dhcp-range", lab.ns.address(100) + "-" + lab.ns.address(150))
    console = _boot_and_check(lab, "bios", ["dhcp-ack", "http boot/52-54-00-00-00-01.ipxe",
                                            "http images/tiny/initrd.img"])
    assert f"ip={lab.ns.address(100)}:{lab.ns.host_ip}::255.255.255.0:pc1::off" in console
    status = json.loads(lab.mobinux("status", "--json"))
    assert status["server"]["running"] is True
    assert [le["mac"] for le in status["leases"]] == [MAC]
    # one log line per boot step, naming the MAC
    assert f"{MAC} {lab.ns.address(100)} dhcp-ack" in server.log()


def test_bios_pxelinux_full_dhcp(lab: Lab) -> None:
    lab.mobinux("node", "add", MAC, "--name", "pc1", "--image", "tiny", "--loader", "pxelinux")
    lab.serve("--dhcp", "full", "--dhcp-range", lab.ns.address(100) + "-" + lab.ns.address(150))
    console = _boot_and_check(lab, "bios", ["tftp pxelinux.0", "tftp ldlinux.c32",
                                            "tftp pxelinux.cfg/01-52-54-00-00-00-01",
                                            "tftp images/tiny/initrd.img"])
    assert "PXELINUX" in console


def test_uefi_ipxe_full_dhcp(lab: Lab) -> None:
    lab.mobinux("node", "add", MAC, "--name", "pc1", "--image", "tiny")
    lab.serve("--dhcp", "full", "--dhcp-range", lab.ns.address(100) + "-" + lab.ns.address(150))
    _boot_and_check(lab, "uefi", ["dhcp-ack", "http boot/52-54-00-00-00-01.ipxe",
                                  "http images/tiny/vmlinuz"])


def test_local_boot_goes_to_next_device(lab: Lab) -> None:
    disk_marker = f"LOCAL-DISK-{secrets.token_hex(4)}"
    disk = make_localboot_disk(lab.work / "local.img", disk_marker)
    lab.mobinux("node", "add", MAC, "--name", "pc1", "--boot", "local")
    lab.serve("--dhcp", "full", "--dhcp-range", lab.ns.address(100) + "-" + lab.ns.address(150))
    with run_vm(lab.ns, lab.ns.taps[0], MAC, "bios", BOOT_TIMEOUT, workdir=lab.work,
                disks=[disk], boot_order="nc") as vm:
        console = vm.wait_for(disk_marker)
    assert "booting from the next boot device" in console
    assert lab.marker not in console


# -- proxy DHCP next to a plain DHCP server -----------------------------------


@pytest.fixture
def dhcp_router(lab: Lab) -> Iterator[str]:
    """A second namespace on the lab bridge running dnsmasq as a plain DHCP server."""
    name = f"{lab.ns.name}r"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True)

        ip("link", "add", "vr0", "netns", lab.ns.name, "type", "veth", "peer", "name", "eth0",
           "netns", name)
        ip("-n", lab.ns.name, "link", "set", "vr0", "master", lab.ns.bridge, "up")
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "addr", "add", lab.ns.address(2) + "/24", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        proc = BackgroundProcess(
            None,
            ["ip", "netns", "exec", name, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
             "--port=0", "--interface=eth0", "--bind-interfaces", "--log-dhcp",
             f"--dhcp-range={lab.ns.address(160)},{lab.ns.address(200)},1h",
             f"--dhcp-leasefile={lab.work / 'dnsmasq.leases'}", "--log-facility=-"],
            lab.work / "logs" / "dnsmasq-router.log",
        )
        with proc:
            proc.wait_for(r"DHCP, IP range", timeout=10)
            yield proc.log_path.as_posix()
    finally:
        subprocess.run(["ip", "netns", "pids", name], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize(("firmware", "loader"), [("bios", "ipxe"), ("bios", "pxelinux"),
                                                  ("uefi", "ipxe")])
def test_proxy_dhcp_next_to_plain_dnsmasq(lab: Lab, dhcp_router: str, firmware: str, loader: str) -> None:
    lab.mobinux("node", "add", MAC, "--name", "pc1", "--image", "tiny", "--loader", loader)
    server = lab.serve("--dhcp", "proxy")
    loader_steps = (["tftp pxelinux.0", "tftp pxelinux.cfg/01-52-54-00-00-00-01"]
                    if loader == "pxelinux" else ["http boot/52-54-00-00-00-01.ipxe"])
    console = _boot_and_check(lab, firmware, ["proxy", *loader_steps])
    # the address came from dnsmasq's range, not from Mobinux
    given = re.search(rf"ip=({re.escape(lab.ns.subnet_prefix)}\.\d+):{re.escape(lab.ns.host_ip)}::", console)
    assert given is not None, "no ip= with the server's address on the kernel command line"
    assert 160 <= int(given.group(1).rsplit(".", 1)[1]) <= 200  # dnsmasq's range
    leased = Path(lab.work / "dnsmasq.leases").read_text()
    assert MAC in leased
    assert "dhcp-ack" not in server.log()  # a proxy never acknowledges an address


def test_unknown_machine_enrolled_by_policy(lab: Lab) -> None:
    lab.mobinux("policy", "unknown", "enroll", "tiny")
    lab.serve("--dhcp", "full", "--dhcp-range", lab.ns.address(100) + "-" + lab.ns.address(150))
    with run_vm(lab.ns, lab.ns.taps[0], MAC, "bios", BOOT_TIMEOUT, workdir=lab.work) as vm:
        console = vm.wait_for(lab.marker)
    assert "host=node-525400000001" in console
    node = json.loads(lab.mobinux("node", "show", "node-525400000001", "--json"))
    assert node["mac"] == MAC and node["image"] == "tiny"
