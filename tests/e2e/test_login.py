"""Acceptance (issue 4): log in at boot, use your disk anywhere.

Two ``--login`` nodes boot diskless (``--boot kernel --disk base``, as in
test_diskless_root). iPXE's login prompt is answered through each VM's serial
console. A wrong password attaches nothing and asks again; alice's disk (an
ext4 user disk, LUN 1, logged in with the one-boot CHAP secret from the kernel
command line) is mounted on /home where the VM writes a note; the same user on
the second node is refused while the first runs; once the first is switched
off, alice logs in on the second node and finds her note there.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.harness import VM, ProcessGroup, netns, vm_argv
from tests.e2e.test_diskless_root import BOOT_TIMEOUT, MAC_A, MAC_B, _prepare, _serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PASSWORD = "wonder land"
ALIVE_WAIT = 60.0  # a switched-off node stops answering NOP-Ins within two 15 s ticks


class TypingVM(VM):
    """A VM whose serial console we can type on (QEMU's stdin)."""

    def __init__(self, argv: list[str], log_path: Path, timeout: float, name: str) -> None:
        self.argv = argv
        self.name = name
        self.log_path = log_path
        self.timeout = timeout
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.started_at = time.monotonic()
        self.deadline = self.started_at + timeout
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def type(self, text: str) -> None:
        assert self.proc.stdin is not None
        for ch in text:  # one key at a time, as a person (and the BIOS keyboard buffer) would
            self.proc.stdin.write(ch.encode())
            self.proc.stdin.flush()
            time.sleep(0.03)

    def kill(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        super().kill()


def _start(ns: object, tap: str, mac: str, workdir: Path, name: str) -> TypingVM:
    argv = vm_argv(ns, tap, mac, "bios", workdir)  # type: ignore[arg-type]
    return TypingVM(argv, workdir / f"{name}.console.log", BOOT_TIMEOUT, name)


def _answer_prompt(vm: TypingVM, user: str, password: str, nth: int) -> None:
    """Wait for the *nth* login prompt on the console, then type into it."""
    deadline = time.monotonic() + 120
    while vm.console().count("Username:") < nth:
        if time.monotonic() > deadline or not vm.alive():
            raise vm._fail("no login prompt")
        time.sleep(0.3)
    time.sleep(0.5)
    vm.type(f"{user}\r{password}\r")


def test_login_attaches_the_users_disk_on_whichever_node_and_only_one(tmp_path: Path) -> None:
    mobinux, _ = _prepare(tmp_path)
    pw = tmp_path / "alice.pw"
    pw.write_text(PASSWORD + "\n")
    mobinux("user", "add", "alice", "--size", "64M", "--format", "ext4", "--password-file", str(pw))
    procs = ProcessGroup(tmp_path / "logs")
    with netns(taps=2) as ns:
        vma = vmb = None
        try:
            for mac, name, host in ((MAC_A, "vma", 61), (MAC_B, "vmb", 62)):
                mobinux("node", "add", mac, "--name", name, "--ip", ns.address(host),
                        "--image", "diskless", "--boot", "kernel", "--disk", "base", "--login")
            server = _serve(procs, ns, mobinux.data)
            vma = _start(ns, ns.taps[0], MAC_A, tmp_path, "vma")
            _answer_prompt(vma, "alice", "not her password", 1)
            vma.wait_for(r"login failed: wrong user name or password", timeout=60)
            after_wrong = server.log()
            _answer_prompt(vma, "alice", PASSWORD, 2)
            vma.wait_for(r"HOME-WROTE vma")
            home_a = re.findall(r"HOME vma: \[([^\]]*)\]", vma.console())
            # the same user on the second node, while the first still runs: refused
            vmb = _start(ns, ns.taps[1], MAC_B, tmp_path, "vmb")
            _answer_prompt(vmb, "alice", PASSWORD, 1)
            vmb.wait_for(r"login refused: alice is logged in on node vma", timeout=60)
            # switched off (it never logs out); once it stops talking she may log in elsewhere
            vma.kill()
            deadline = time.monotonic() + ALIVE_WAIT
            attempt = 1
            while True:
                attempt += 1
                mark = len(vmb.console())
                _answer_prompt(vmb, "alice", PASSWORD, attempt)
                got = ""
                until = time.monotonic() + 60
                while "login refused" not in got and "HOME vmb" not in got:
                    if time.monotonic() > until or not vmb.alive():
                        raise vmb._fail("neither a refusal nor the home directory")
                    time.sleep(0.3)
                    got = vmb.console()[mark:]
                if "HOME vmb" in got or time.monotonic() > deadline:
                    break
                time.sleep(5)
            vmb.wait_for(r"HOME-WROTE vmb")
            home_b = re.findall(r"HOME vmb: \[([^\]]*)\]", vmb.console())
            log = server.log()
        finally:
            for vm in (vma, vmb):
                if vm is not None:
                    vm.kill()
            procs.stop_all()
    assert home_a and home_a[0].split() == ["lost+found"], home_a  # a fresh ext4 disk
    assert home_b and "note-from-vma.txt" in home_b[0].split(), home_b  # her note followed her
    assert "login as 'alice' refused: wrong user name or password" in log
    assert "not her password" not in log and PASSWORD not in log  # passwords are never logged
    assert "logged in" not in after_wrong  # the wrong password attached nothing
    users = json.loads(mobinux("user", "list", "--json"))
    assert [u["name"] for u in users] == ["alice"] and users[0]["used_bytes"] > 0
