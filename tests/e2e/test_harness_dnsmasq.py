"""The e2e harness proves itself against dnsmasq, independently of Mobinux.

dnsmasq (DHCP + TFTP, inside a private namespace) network-boots real
firmware in QEMU (TCG) to the busybox /init marker:

* BIOS (SeaBIOS + iPXE NIC ROM) -> pxelinux.0 -> ldlinux.c32 -> pxelinux.cfg
* BIOS -> iPXE script
* UEFI (OVMF, q35, iPXE EFI NIC ROM) -> iPXE script
* and a local disk: the MBR marker from make_localboot_disk, booted alone
  and after an iPXE script that just says ``exit``.

Each test prints how long the boot took (run with ``-s`` to see it).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import (
    LDLINUX_C32,
    PXELINUX,
    SNPONLY_EFI,
    UNDIONLY_KPXE,
    BackgroundProcess,
    Firmware,
    NetNS,
    ProcessGroup,
    e2e_kernel,
    e2e_netns,
    e2e_procs,
    make_localboot_disk,
    make_test_initrd,
    run_vm,
    skip_unless_files,
    skip_unless_ready,
    start_ipv6_ra,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Re-exported fixtures (pytest finds fixtures through module globals).
__all__ = ["e2e_kernel", "e2e_netns", "e2e_procs"]

MARKER = "MOBINUX-E2E-BUSYBOX-OK"
DISK_MARKER = "MOBINUX-E2E-LOCAL-DISK-OK"
# panic=-1: a kernel panic reboots at once, and -no-reboot turns that into a
# QEMU exit, so a broken initramfs fails the test fast instead of timing out.
CMDLINE = "console=ttyS0 panic=-1"
BOOT_TIMEOUT = 240.0

# Milestones on the console, in order; the times show where a boot spends
# its time (firmware init, iPXE DHCP, loader, kernel download, kernel boot).
IPXE_STEPS = [
    ("ipxe", r"iPXE"),  # the NIC ROM's banner: firmware init is over
    ("dhcp", r"Configuring \(net0 .*ok"),  # iPXE's DHCP (and IPv6 wait) done
]
LINUX_STEPS = [
    ("linux", r"Linux version"),  # kernel and initrd downloaded, kernel runs
    ("init", r"mobinux-test-init: cmdline"),
    ("marker", MARKER),
]
SCRIPT_STEPS = [("script", r"boot\.ipxe loaded")]


@dataclass
class TftpRoot:
    path: Path

    def write(self, name: str, text: str) -> Path:
        dest = self.path / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        return dest


@pytest.fixture
def tftp_root(tmp_path: Path, e2e_kernel: Path) -> Iterator[TftpRoot]:
    """vmlinuz + initrd.gz (printing MARKER) + the boot loaders, in one dir."""
    skip_unless_ready()
    root = tmp_path / "tftp"
    root.mkdir()
    shutil.copyfile(e2e_kernel, root / "vmlinuz")
    make_test_initrd(root / "initrd.gz", MARKER)
    for src in (PXELINUX, LDLINUX_C32, UNDIONLY_KPXE, SNPONLY_EFI):
        if src.exists():
            shutil.copyfile(src, root / src.name)
    yield TftpRoot(root)


def start_dnsmasq(
    procs: ProcessGroup, ns: NetNS, root: Path, boot_options: list[str]
) -> BackgroundProcess:
    """dnsmasq as DHCP + TFTP server on br0 only (no DNS: --port=0)."""
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq not found (apt-get install dnsmasq)")
    argv = [
        "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--interface=br0",
        "--bind-interfaces",
        "--no-hosts",
        "--no-resolv",
        f"--dhcp-range={ns.address(100)},{ns.address(200)},255.255.255.0,1h",
        f"--dhcp-leasefile={root.parent / 'dnsmasq.leases'}",
        "--dhcp-authoritative",
        "--enable-tftp",
        f"--tftp-root={root}",
        "--log-dhcp",
        "--log-facility=-",
        "--pid-file",
        "--user=root",
        "--group=root",
        *boot_options,
    ]
    dns = procs.start(ns, argv, "dnsmasq")
    dns.wait_for(r"TFTP root is", timeout=15)
    return dns


def ipxe_options(script: str) -> list[str]:
    """DHCP boot file by client: iPXE gets ``script``, plain PXE ROMs get an
    iPXE binary for their architecture (which then asks again, as iPXE)."""
    return [
        "--dhcp-userclass=set:ipxe,iPXE",
        "--dhcp-match=set:efi64,option:client-arch,7",
        "--dhcp-match=set:efi64,option:client-arch,9",
        "--dhcp-boot=tag:!ipxe,tag:efi64,snponly.efi",
        "--dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe",
        f"--dhcp-boot=tag:ipxe,{script}",
    ]


def report(label: str, times: dict[str, float], extra: str = "") -> None:
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
    print(f"\n[e2e timing] {label}: {steps}{extra}")


def boot_linux(
    ns: NetNS,
    tmp_path: Path,
    firmware: Firmware,
    label: str,
    mac: str,
    loader_steps: list[tuple[str, str]],
) -> dict[str, float]:
    """Boot one VM to MARKER, check it powers itself off, print the timeline."""
    with run_vm(
        ns,
        ns.taps[0],
        mac,
        firmware,
        timeout=BOOT_TIMEOUT,
        workdir=tmp_path,
        name=label,
    ) as vm:
        times = vm.timeline(IPXE_STEPS + loader_steps + LINUX_STEPS, timeout=BOOT_TIMEOUT)
        vm.wait_exit(timeout=60)  # /init's poweroff -f ends QEMU
        times["exit"] = round(vm.elapsed(), 1)
        console = vm.console()
    # The loader may prepend BOOT_IMAGE=... (pxelinux) or the image name (iPXE EFI).
    assert re.search(r"mobinux-test-init: cmdline: .*" + re.escape(CMDLINE), console)
    report(label, times)
    return times


def test_bios_pxelinux(
    e2e_netns: NetNS, e2e_procs: ProcessGroup, tftp_root: TftpRoot, tmp_path: Path
) -> None:
    skip_unless_files(PXELINUX, LDLINUX_C32)
    tftp_root.write(
        "pxelinux.cfg/default",
        "SERIAL 0 115200\n"
        "DEFAULT linux\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL linux\n"
        "  KERNEL vmlinuz\n"
        f"  APPEND initrd=initrd.gz {CMDLINE}\n",
    )
    dns = start_dnsmasq(e2e_procs, e2e_netns, tftp_root.path, ["--dhcp-boot=pxelinux.0"])
    boot_linux(
        e2e_netns,
        tmp_path,
        "bios",
        "bios-pxelinux",
        "52:54:00:e2:00:01",
        [("pxelinux", "PXELINUX")],
    )
    log = dns.log()
    assert "pxelinux.0" in log and "ldlinux.c32" in log and "pxelinux.cfg/default" in log


@pytest.mark.parametrize("ipv6_ra", [False, True], ids=["ipv4-only", "with-ipv6-ra"])
def test_bios_ipxe_script(
    e2e_netns: NetNS,
    e2e_procs: ProcessGroup,
    tftp_root: TftpRoot,
    tmp_path: Path,
    ipv6_ra: bool,
) -> None:
    # with-ipv6-ra: iPXE's "Configuring" step also waits for an IPv6 router
    # advertisement; without one it gives up after ~13 s (see start_ipv6_ra).
    if ipv6_ra:
        start_ipv6_ra(e2e_procs, e2e_netns)
    tftp_root.write(
        "boot.ipxe",
        "#!ipxe\n"
        "echo mobinux-e2e: boot.ipxe loaded\n"
        f"kernel vmlinuz initrd=initrd.gz {CMDLINE}\n"
        "initrd initrd.gz\n"
        "boot\n",
    )
    dns = start_dnsmasq(e2e_procs, e2e_netns, tftp_root.path, ipxe_options("boot.ipxe"))
    label = "bios-ipxe-ra" if ipv6_ra else "bios-ipxe"
    boot_linux(e2e_netns, tmp_path, "bios", label, "52:54:00:e2:00:02", SCRIPT_STEPS)
    assert "boot.ipxe" in dns.log()


def test_uefi_ipxe_script(
    e2e_netns: NetNS, e2e_procs: ProcessGroup, tftp_root: TftpRoot, tmp_path: Path
) -> None:
    # initrd=initrd.gz on the kernel line: this iPXE (2019) hands initrds to
    # the EFI stub as files of a virtual file system named on the cmdline.
    tftp_root.write(
        "boot.ipxe",
        "#!ipxe\n"
        "echo mobinux-e2e: boot.ipxe loaded\n"
        f"kernel vmlinuz initrd=initrd.gz {CMDLINE}\n"
        "initrd initrd.gz\n"
        "boot\n",
    )
    dns = start_dnsmasq(e2e_procs, e2e_netns, tftp_root.path, ipxe_options("boot.ipxe"))
    boot_linux(e2e_netns, tmp_path, "uefi", "uefi-ipxe", "52:54:00:e2:00:03", SCRIPT_STEPS)
    assert "boot.ipxe" in dns.log()


def test_localboot_disk_alone(tmp_path: Path) -> None:
    skip_unless_ready(need_root=False)
    disk = make_localboot_disk(tmp_path / "disk.img", DISK_MARKER)
    assert disk.stat().st_size == 1024 * 1024
    with run_vm(
        None,
        None,
        "52:54:00:e2:00:04",
        "bios",
        timeout=60,
        disks=[disk],
        boot_order="c",
        workdir=tmp_path,
        name="disk-alone",
    ) as vm:
        times = vm.timeline([("disk-marker", DISK_MARKER)], timeout=60)
    report("bios-disk-alone", times)


def test_ipxe_exit_reaches_local_disk(
    e2e_netns: NetNS, e2e_procs: ProcessGroup, tftp_root: TftpRoot, tmp_path: Path
) -> None:
    tftp_root.write("exit.ipxe", "#!ipxe\necho mobinux-e2e: exit.ipxe loaded\nexit\n")
    disk = make_localboot_disk(tmp_path / "disk.img", DISK_MARKER)
    dns = start_dnsmasq(e2e_procs, e2e_netns, tftp_root.path, ipxe_options("exit.ipxe"))
    with run_vm(
        e2e_netns,
        e2e_netns.taps[0],
        "52:54:00:e2:00:05",
        "bios",
        timeout=BOOT_TIMEOUT,
        disks=[disk],
        boot_order="nc",
        workdir=tmp_path,
        name="bios-ipxe-exit",
    ) as vm:
        times = vm.timeline(
            [("ipxe", r"iPXE"), ("script", r"exit\.ipxe loaded"), ("disk-marker", DISK_MARKER)],
            timeout=BOOT_TIMEOUT,
        )
        console = vm.console()
    # The disk marker came after the network script, not instead of it.
    assert console.index("exit.ipxe loaded") < console.index(DISK_MARKER)
    assert "exit.ipxe" in dns.log()
    report("bios-ipxe-exit-to-disk", times)
