"""Reusable pieces for the end-to-end VM tests.

Everything here runs real programs (``ip``, ``qemu-system-x86_64``, dnsmasq,
``mobinux serve``) but confines all network traffic to a private network
namespace named ``mbxe2e*`` that is deleted on exit, also on failure. Every
wait is bounded by a timeout.

Typical use (see tests/e2e/test_harness_dnsmasq.py)::

    from tests.e2e.harness import (BackgroundProcess, guest_kernel,
                                   make_test_initrd, netns, run_vm)

    def test_boot(tmp_path):
        kernel = guest_kernel()                      # skips if unavailable
        initrd = make_test_initrd(tmp_path / "initrd.gz", "MARKER-42")
        ...                                          # fill a TFTP root
        with netns(taps=1) as ns, BackgroundProcess(
            ns, ["dnsmasq", ...], tmp_path / "dnsmasq.log"
        ) as dns:
            dns.wait_for("TFTP root is", timeout=10)
            with run_vm(ns, ns.taps[0], "52:54:00:00:00:01", "bios",
                        timeout=180, workdir=tmp_path) as vm:
                vm.wait_for(r"MARKER-42", timeout=180)

The pytest fixtures ``e2e_netns``, ``e2e_procs`` and ``e2e_kernel`` wrap the
same pieces; import them into a test module to use them.

Why these choices:

* QEMU runs with ``-accel tcg``: iPXE reboot-loops under KVM on this host.
* Boot order is expressed with per-device ``bootindex`` (not ``-boot
  order=``): SeaBIOS and OVMF both honour it, and QEMU ignores ``-boot
  order`` once any device has a bootindex.
* Background processes get their own session so that stopping them
  (SIGTERM, then SIGKILL) also reaches worker processes they forked.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts"

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
PXELINUX = Path("/usr/lib/PXELINUX/pxelinux.0")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
UNDIONLY_KPXE = Path("/usr/lib/ipxe/undionly.kpxe")
IPXE_EFI = Path("/usr/lib/ipxe/ipxe.efi")
SNPONLY_EFI = Path("/usr/lib/ipxe/snponly.efi")

NETNS_PREFIX = "mbxe2e"
DEFAULT_SUBNET = "10.77.0"
"""First three octets of the /24 used inside every test namespace."""

Firmware = Literal["bios", "uefi"]

# CSI sequences (ESC [ ... final), charset selection (ESC ( B), and other
# two-byte escapes such as ESC c (reset, printed by SeaBIOS).
_ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[@-~])")


class E2EError(AssertionError):
    """A VM or helper process did not do what the test waited for.

    Subclasses AssertionError so pytest reports it as a test failure; the
    message carries the tail of the relevant log.
    """


# --------------------------------------------------------------------------
# prerequisites


def missing_prerequisites(*, need_root: bool = True, need_qemu: bool = True) -> str | None:
    """Return why e2e tests cannot run here, or None when they can."""
    if need_root and os.geteuid() != 0:
        return "e2e tests need root (network namespaces, tap devices)"
    if need_root and shutil.which("ip") is None:
        return "iproute2 'ip' not found"
    if need_qemu and shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt-get install qemu-system-x86)"
    return None


def skip_unless_ready(*, need_root: bool = True, need_qemu: bool = True) -> None:
    """pytest.skip with a clear reason when root or QEMU is missing."""
    reason = missing_prerequisites(need_root=need_root, need_qemu=need_qemu)
    if reason is not None:
        pytest.skip(reason)


def skip_unless_files(*paths: Path) -> None:
    """pytest.skip naming the first of ``paths`` that does not exist."""
    for path in paths:
        if not path.exists():
            pytest.skip(f"{path} not found")


def _run(
    argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=check)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(strip_ansi(text).splitlines()[-lines:])


def strip_ansi(text: str) -> str:
    """Remove terminal escape sequences and carriage returns (firmware output)."""
    return _ANSI_RE.sub("", text).replace("\r", "")


# --------------------------------------------------------------------------
# (1) network namespace with a bridge and tap devices


@dataclass(frozen=True)
class NetNS:
    """A private network namespace: bridge ``br0`` with ``host_ip``, and taps.

    ``taps`` are persistent tap devices enslaved to ``br0``; give one to each
    VM. Processes reach the VMs only via ``exec_argv``/``run`` (they must
    run inside the namespace).
    """

    name: str
    bridge: str
    host_ip: str
    prefix_len: int
    taps: tuple[str, ...]

    @property
    def subnet_prefix(self) -> str:
        """The first three octets, e.g. ``"10.77.0"``."""
        return self.host_ip.rsplit(".", 1)[0]

    def address(self, host: int) -> str:
        """Address ``host`` in the namespace's /24, e.g. ``address(100)``."""
        return f"{self.subnet_prefix}.{host}"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace, capture output, bounded by ``timeout``."""
        return _run(self.exec_argv(argv), timeout=timeout, check=check)


def _delete_netns(name: str) -> None:
    """Kill whatever still runs in ``name`` (all ours) and delete it."""
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
            time.sleep(0.05)
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        _run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def netns(
    taps: int = 1,
    *,
    subnet: str = DEFAULT_SUBNET,
    host: int = 1,
    name: str | None = None,
) -> Iterator[NetNS]:
    """Create namespace ``mbxe2e<random>`` with ``br0`` = ``subnet.host/24``
    and ``taps`` tap devices ``tap0..`` on it; yield a :class:`NetNS`.

    On exit (also on exceptions) every process left in the namespace is
    killed and the namespace, with its bridge and taps, is deleted.
    """
    skip_unless_ready(need_qemu=False)
    ns_name = name or f"{NETNS_PREFIX}{secrets.token_hex(3)}"
    if not ns_name.startswith(NETNS_PREFIX):
        raise ValueError(f"namespace names must start with {NETNS_PREFIX!r}")
    tap_names = tuple(f"tap{i}" for i in range(taps))
    host_ip = f"{subnet}.{host}"
    _run(["ip", "netns", "add", ns_name])
    try:
        commands = [
            ["ip", "-n", ns_name, "link", "set", "lo", "up"],
            ["ip", "-n", ns_name, "link", "add", "br0", "type", "bridge"],
            # No STP, no forwarding delay: the VM's first DHCPDISCOVER must pass.
            [
                "ip",
                "-n",
                ns_name,
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
            ["ip", "-n", ns_name, "addr", "add", f"{host_ip}/24", "dev", "br0"],
            ["ip", "-n", ns_name, "link", "set", "br0", "up"],
        ]
        for tap in tap_names:
            commands += [
                ["ip", "netns", "exec", ns_name, "ip", "tuntap", "add", tap, "mode", "tap"],
                ["ip", "-n", ns_name, "link", "set", tap, "master", "br0"],
                ["ip", "-n", ns_name, "link", "set", tap, "up"],
            ]
        for argv in commands:
            res = _run(argv, check=False)
            if res.returncode != 0:
                raise E2EError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        yield NetNS(ns_name, "br0", host_ip, 24, tap_names)
    finally:
        _delete_netns(ns_name)


def cleanup_stale_namespaces() -> list[str]:
    """Delete leftover ``mbxe2e*`` namespaces (from a killed test run).

    Kills everything running in them: call it only when no other e2e run is
    active on this machine (concurrent runs use ``mbxe2e*`` names too).
    """
    res = _run(["ip", "netns", "list"], check=False)
    stale = [
        line.split()[0]
        for line in res.stdout.splitlines()
        if line.split() and line.split()[0].startswith(NETNS_PREFIX)
    ]
    for name in stale:
        _delete_netns(name)
    return stale


# --------------------------------------------------------------------------
# (4) background processes inside the namespace


class BackgroundProcess:
    """A process (e.g. ``mobinux serve``, dnsmasq) running in a namespace.

    stdout and stderr go to ``log_path``. Use as a context manager; on exit
    the process group gets SIGTERM, then SIGKILL after ``term_timeout``.
    ``ns=None`` runs the process in the current namespace.
    """

    def __init__(
        self,
        ns: NetNS | None,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        term_timeout: float = 5.0,
    ) -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.term_timeout = term_timeout
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_argv = ns.exec_argv(self.argv) if ns is not None else self.argv
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            full_argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the log; fail fast if the
        process exits first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = rx.search(self.log())
            if match is not None:
                return match
            if not self.alive():
                raise E2EError(
                    f"{self.argv[0]} exited with {self.proc.returncode} before "
                    f"printing {pattern!r}; log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise E2EError(
                    f"{self.argv[0]} did not print {pattern!r} within {timeout:.0f} s; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``term_timeout``.
        Returns the exit status (None if it could not be reaped)."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=self.term_timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=5)
            else:
                # The leader is gone; make sure no worker it forked survives.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.returncode
        finally:
            self._log.close()

    def __enter__(self) -> BackgroundProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ProcessGroup:
    """Collects background processes and stops them all (reverse order)."""

    log_dir: Path
    processes: list[BackgroundProcess] = field(default_factory=list)

    def start(
        self,
        ns: NetNS | None,
        argv: Sequence[str],
        name: str,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> BackgroundProcess:
        """Start ``argv`` in ``ns``, logging to ``log_dir/<name>.log``."""
        proc = BackgroundProcess(ns, argv, self.log_dir / f"{name}.log", env=env, cwd=cwd)
        self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        while self.processes:
            self.processes.pop().stop()


DEFAULT_IPV6_PREFIX = "fd77::"
"""A ULA /64 for :func:`start_ipv6_ra` (never routed outside the namespace)."""


def start_ipv6_ra(
    group: ProcessGroup, ns: NetNS, prefix: str = DEFAULT_IPV6_PREFIX
) -> BackgroundProcess:
    """Send IPv6 router advertisements on ``br0`` (an RA-only dnsmasq).

    Why: iPXE's ``Configuring (net0 ...)`` step waits for an IPv6 router
    advertisement as well as for DHCPv4; on an IPv4-only link it gives up
    only after ~13 s. With RAs the step takes ~3 s (measured, BIOS and UEFI,
    iPXE 1.0.0+git-20190125). Gives ``br0`` the address ``<prefix>1/64``;
    the RA-only dnsmasq opens no DHCPv4/TFTP/DNS port, so it coexists with
    the server under test.
    """
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq not found (apt-get install dnsmasq)")
    addr = f"{prefix}1/64"
    if addr.split("/")[0] not in ns.run(["ip", "-6", "addr", "show", "dev", ns.bridge]).stdout:
        ns.run(["ip", "-6", "addr", "add", addr, "dev", ns.bridge, "nodad"])
    argv = [
        "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        f"--interface={ns.bridge}",
        "--bind-interfaces",
        "--no-hosts",
        "--no-resolv",
        "--enable-ra",
        f"--dhcp-range=::,constructor:{ns.bridge},ra-only",
        "--dhcp-leasefile=/dev/null",
        "--log-facility=-",
        "--pid-file",
        "--user=root",
        "--group=root",
    ]
    proc = group.start(ns, argv, "ipv6-ra")
    proc.wait_for(r"router advertisement enabled", timeout=15)
    return proc


# --------------------------------------------------------------------------
# (2) QEMU virtual machines


@dataclass(frozen=True)
class Disk:
    """A disk for :func:`run_vm`. ``bus`` is ``virtio`` (virtio-blk-pci) or
    ``ide`` (the machine's IDE/AHCI controller)."""

    path: Path
    format: str = "raw"
    bus: Literal["virtio", "ide"] = "virtio"
    readonly: bool = False


class VM:
    """A running QEMU. Its serial console (QEMU's stdout) goes to ``log_path``."""

    def __init__(self, argv: list[str], log_path: Path, timeout: float, name: str) -> None:
        self.argv = argv
        self.name = name
        self.log_path = log_path
        self.timeout = timeout
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.started_at = time.monotonic()
        self.deadline = self.started_at + timeout
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def raw_console(self) -> str:
        """Serial console output so far, as QEMU wrote it."""
        return self.log_path.read_text(errors="replace")

    def console(self) -> str:
        """Serial console output so far, escape sequences and CRs removed."""
        return strip_ansi(self.raw_console())

    def elapsed(self) -> float:
        """Seconds since QEMU was started."""
        return time.monotonic() - self.started_at

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _fail(self, why: str) -> E2EError:
        return E2EError(
            f"VM {self.name}: {why} (after {self.elapsed():.1f} s); "
            f"console {self.log_path}:\n{_tail(self.log_path)}"
        )

    def wait_for(self, pattern: str, timeout: float | None = None) -> str:
        """Wait until regex ``pattern`` appears on the console and return the
        console text (ANSI-stripped). Bounded by ``timeout`` and by the VM's
        own lifetime limit; raises :class:`E2EError` with the console tail
        on timeout or when QEMU exits without printing it."""
        rx = re.compile(pattern)
        limit = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        while True:
            text = self.console()
            if rx.search(text):
                return text
            if not self.alive():
                # Read once more: output may have landed just before exit.
                text = self.console()
                if rx.search(text):
                    return text
                raise self._fail(f"QEMU exited with {self.proc.returncode} before {pattern!r}")
            if time.monotonic() >= limit:
                raise self._fail(f"no {pattern!r} on the console")
            time.sleep(0.1)

    def timeline(
        self, steps: Sequence[tuple[str, str]], timeout: float | None = None
    ) -> dict[str, float]:
        """Wait for each ``(label, pattern)`` in turn; return the seconds since
        start at which each first appeared (0.1 s resolution). All steps share
        one ``timeout``. Raises like :meth:`wait_for`."""
        limit = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        times: dict[str, float] = {}
        for label, pattern in steps:
            self.wait_for(pattern, timeout=max(0.0, limit - time.monotonic()))
            times[label] = round(self.elapsed(), 1)
        return times

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (e.g. after the guest's poweroff)."""
        try:
            return self.proc.wait(timeout=max(0.0, min(timeout, self.deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            raise self._fail("QEMU did not exit") from None

    def kill(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and close the log."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=5)
        finally:
            self._log.close()


def _bootindex(order: str, kind: str) -> str:
    pos = order.find(kind)
    return f",bootindex={pos + 1}" if pos >= 0 else ""


def vm_argv(
    ns: NetNS | None,
    tap: str | None,
    mac: str,
    firmware: Firmware,
    workdir: Path,
    *,
    disks: Sequence[Disk | Path] = (),
    boot_order: str = "n",
    memory_mb: int = 512,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line :func:`run_vm` uses (exposed for debugging)."""
    for ch in boot_order:
        if ch not in "nc":
            raise ValueError(f"boot_order letters are 'n' (network) and 'c' (disk), not {ch!r}")
    argv = [QEMU, "-accel", "tcg", "-m", str(memory_mb), "-nographic", "-no-reboot"]
    if firmware == "uefi":
        vars_copy = workdir / "OVMF_VARS.fd"
        if not vars_copy.exists():
            shutil.copyfile(OVMF_VARS, vars_copy)
        argv += [
            "-machine",
            "q35",
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={vars_copy}",
        ]
    elif firmware == "bios":
        argv += ["-machine", "pc"]
    else:
        raise ValueError(f"firmware must be 'bios' or 'uefi', not {firmware!r}")
    if tap is not None:
        argv += [
            "-netdev",
            f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={mac}{_bootindex(boot_order, 'n')}",
        ]
    else:
        argv += ["-nic", "none"]
    disk_index = boot_order.find("c")
    for i, item in enumerate(disks):
        disk = item if isinstance(item, Disk) else Disk(Path(item))
        # Only the first disk is a boot candidate.
        boot = f",bootindex={disk_index + 1}" if i == 0 and disk_index >= 0 else ""
        ro = ",readonly=on" if disk.readonly else ""
        argv += ["-drive", f"file={disk.path},format={disk.format},if=none,id=d{i}{ro}"]
        if disk.bus == "virtio":
            argv += ["-device", f"virtio-blk-pci,drive=d{i}{boot}"]
        else:
            bus = "ide.0" if firmware == "uefi" else f"ide.{i // 2}"
            argv += ["-device", f"ide-hd,drive=d{i},bus={bus}{boot}"]
    argv += list(extra_args)
    return ns.exec_argv(argv) if ns is not None else argv


@contextlib.contextmanager
def run_vm(
    ns: NetNS | None,
    tap: str | None,
    mac: str,
    firmware: Firmware,
    timeout: float,
    *,
    disks: Sequence[Disk | Path] = (),
    boot_order: str = "n",
    workdir: Path | None = None,
    name: str | None = None,
    memory_mb: int = 512,
    extra_args: Sequence[str] = (),
) -> Iterator[VM]:
    """Start ``qemu-system-x86_64`` inside ``ns`` and yield a :class:`VM`.

    * ``tap``: a tap of ``ns`` for a virtio-net-pci NIC with ``mac`` (whose
      option ROM is iPXE); ``None`` (with ``ns=None``) gives no NIC.
    * ``firmware``: ``"bios"`` (SeaBIOS, i440fx) or ``"uefi"`` (OVMF, q35,
      with a private copy of the VARS file in ``workdir``).
    * ``timeout``: the VM's lifetime limit in seconds; no ``wait_for`` waits
      beyond it, and the VM is killed on exit of the ``with`` block anyway.
    * ``boot_order``: letters ``n`` (the NIC) and ``c`` (the first disk),
      first = highest priority, mapped to ``bootindex``.
    * ``disks``: :class:`Disk` objects or paths of raw images.
    * ``workdir``: where the console log (``<name>.console.log``) and the
      VARS copy go; default a fresh ``/tmp/mbxe2e-vm-*`` directory.
    """
    skip_unless_ready(need_root=ns is not None)
    if firmware == "uefi":
        skip_unless_files(OVMF_CODE, OVMF_VARS)
    vm_name = name or f"{firmware}-{mac.replace(':', '')[-6:]}"
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mbxe2e-vm-"))
    wd.mkdir(parents=True, exist_ok=True)
    # A fresh VARS copy per VM (OVMF records boot options there): vm_argv
    # copies OVMF_VARS_4M.fd into this per-VM directory.
    vm_dir = wd / f"{vm_name}.vm"
    vm_dir.mkdir(exist_ok=True)
    (vm_dir / "OVMF_VARS.fd").unlink(missing_ok=True)
    argv = vm_argv(
        ns,
        tap,
        mac,
        firmware,
        vm_dir,
        disks=disks,
        boot_order=boot_order,
        memory_mb=memory_mb,
        extra_args=extra_args,
    )
    (wd / f"{vm_name}.argv").write_text(" ".join(argv) + "\n")
    vm = VM(argv, wd / f"{vm_name}.console.log", timeout, vm_name)
    try:
        yield vm
    finally:
        vm.kill()


# --------------------------------------------------------------------------
# (3) guest kernel and initramfs


def cache_dir() -> Path:
    """``$MOBINUX_CACHE`` or ``~/.cache/mobinux`` (same rule as the scripts)."""
    env = os.environ.get("MOBINUX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mobinux"


def guest_kernel(timeout: float = 300.0) -> Path:
    """Path of the cached Debian cloud kernel, fetched on first use with
    scripts/fetch-guest-kernel.sh; pytest.skip with the reason if that fails."""
    path = cache_dir() / "guest" / "vmlinuz"
    if path.is_file() and path.stat().st_size > 0:
        return path
    script = SCRIPTS / "fetch-guest-kernel.sh"
    try:
        res = _run(["/bin/sh", str(script)], timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{script} did not finish within {timeout:.0f} s")
    except OSError as exc:
        pytest.skip(f"cannot run {script}: {exc}")
    if res.returncode != 0 or not path.is_file():
        tail = "\n".join(res.stderr.strip().splitlines()[-5:])
        pytest.skip(f"cannot fetch the guest kernel ({script} exit {res.returncode}): {tail}")
    return path


def build_test_rootfs(directory: Path, marker: str) -> Path:
    """Write the busybox initramfs source tree (scripts/build-test-rootfs.sh)."""
    _run(["/bin/sh", str(SCRIPTS / "build-test-rootfs.sh"), str(directory), marker], timeout=60)
    return directory


def pack_initramfs(directory: Path, dest: Path) -> Path:
    """Pack ``directory`` as a gzip'd newc cpio (``find . | cpio -o -H newc | gzip``)."""
    if shutil.which("cpio") is None:
        pytest.skip("cpio not found (apt-get install cpio)")
    with open(dest, "wb") as out:
        subprocess.run(
            "find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -9n",
            shell=True,
            cwd=directory,
            stdout=out,
            check=True,
            timeout=120,
        )
    return dest


def make_test_initrd(dest: Path, marker: str) -> Path:
    """A ready initrd.gz whose /init prints ``marker`` and powers off."""
    tree = dest.parent / f"{dest.name}.tree"
    build_test_rootfs(tree, marker)
    return pack_initramfs(tree, dest)


# --------------------------------------------------------------------------
# (5) a local disk that proves "boot the next device"


def _mbr_code(message: bytes) -> bytes:
    """16-bit real-mode boot sector code printing ``message`` on COM1 and halting.

    Loaded at 0000:7C00 by the BIOS (some jump to 07C0:0000: the code uses
    only relative jumps and addresses data through DS=0). Assembly::

        00  FA          cli
        01  31 C0       xor  ax, ax
        03  8E D8       mov  ds, ax
        05  BE xx xx    mov  si, 0x7C00 + msg
        08  BA F8 03    mov  dx, 0x3F8          ; COM1 data register
        0B  FC          cld
      next:
        0C  AC          lodsb
        0D  84 C0       test al, al
        0F  74 13       jz   done
        11  88 C3       mov  bl, al
        13  83 C2 05    add  dx, 5              ; line status register
      wait:
        16  EC          in   al, dx
        17  A8 20       test al, 0x20           ; THR empty?
        19  74 FB       jz   wait
        1B  83 EA 05    sub  dx, 5
        1E  88 D8       mov  al, bl
        20  EE          out  dx, al
        21  EB E9       jmp  next
      done:
        23  F4          hlt
        24  EB FD       jmp  done
      msg:
        26  <message> 00
    """
    code_len = 0x26
    msg_addr = 0x7C00 + code_len
    # fmt: off
    code = bytes([
        0xFA,
        0x31, 0xC0,
        0x8E, 0xD8,
        0xBE, msg_addr & 0xFF, msg_addr >> 8,
        0xBA, 0xF8, 0x03,
        0xFC,
        0xAC,                    # 0C next:
        0x84, 0xC0,
        0x74, 0x23 - 0x11,       # jz done
        0x88, 0xC3,
        0x83, 0xC2, 0x05,
        0xEC,                    # 16 wait:
        0xA8, 0x20,
        0x74, 0x100 - 5,         # jz wait
        0x83, 0xEA, 0x05,
        0x88, 0xD8,
        0xEE,
        0xEB, 0x100 - (0x23 - 0x0C),  # jmp next
        0xF4,                    # 23 done:
        0xEB, 0xFD,              # jmp done
        # 26 msg:
    ])
    # fmt: on
    assert len(code) == code_len
    return code + message + b"\x00"


def make_localboot_disk(path: Path, marker: str, *, size_mb: int = 1) -> Path:
    """Write a raw disk image whose MBR prints ``marker`` on COM1 and halts.

    The marker is printed as ``"\\r\\n<marker>\\r\\n"``; the VM does not
    power off (the CPU halts with interrupts off), so kill it after
    ``wait_for(marker)``. ASCII only, at most 400 bytes.
    """
    message = f"\r\n{marker}\r\n".encode("ascii")
    sector = _mbr_code(message)
    if len(sector) > 446:  # keep clear of the partition table
        raise ValueError("marker too long for a boot sector")
    mbr = sector.ljust(510, b"\x00") + b"\x55\xaa"
    with open(path, "wb") as f:
        f.write(mbr)
        f.truncate(size_mb * 1024 * 1024)
    return path


# --------------------------------------------------------------------------
# pytest fixtures (import them into a test module to use them)


@pytest.fixture
def e2e_netns() -> Iterator[NetNS]:
    """A fresh namespace with br0 = 10.77.0.1/24 and taps tap0, tap1.

    List it before ``e2e_procs`` in a test's arguments: pytest then tears
    the processes down first (SIGTERM), and the namespace after (anything
    still running in it gets SIGKILL).
    """
    with netns(taps=2) as ns:
        yield ns


@pytest.fixture
def e2e_procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Start background processes with ``e2e_procs.start(ns, argv, name)``;
    all are stopped (SIGTERM, then SIGKILL) at teardown. Logs in tmp_path."""
    group = ProcessGroup(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture(scope="session")
def e2e_kernel() -> Path:
    """The cached guest vmlinuz (skips the test if it cannot be fetched)."""
    return guest_kernel()
