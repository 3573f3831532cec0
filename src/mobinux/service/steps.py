"""The boot-step log: one line per boot step, kept for ``mobinux status``.

Protocol services call :class:`StepLog` (a :data:`mobinux.boot.StepRecorder`)
on the event loop; it logs the step, remembers which MAC uses which address
(TFTP and HTTP clients are known only by their address) and queues the step.
The server drains the queue about once a second and writes it in one
transaction from a worker thread, so neither the hot path nor the event loop
waits for the disk.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from mobinux.inventory.db import BootStep, Inventory

_NO_ADDRESS = ("", "0.0.0.0")


class StepLog:
    def __init__(self, logger: logging.Logger | None = None, max_pending: int = 50_000) -> None:
        self._log = logger or logging.getLogger("mobinux.boot")
        self._pending: deque[BootStep] = deque(maxlen=max_pending)
        self._learned: dict[str, str] = {}  # ip -> mac learned since the last flush
        self.mac_by_ip: dict[str, str] = {}

    def __call__(self, mac: str | None, client_ip: str | None, step: str) -> None:
        if client_ip in _NO_ADDRESS:
            client_ip = None
        if mac is None and client_ip is not None:
            mac = self.mac_by_ip.get(client_ip)
        elif mac is not None and client_ip is not None:
            self.learn(mac, client_ip)
        self._pending.append(BootStep(mac, client_ip, time.time(), step))
        self._log.info("%s %s %s", mac or "-", client_ip or "-", step)

    def learn(self, mac: str, client_ip: str) -> None:
        """Remember which MAC uses *client_ip* (without logging a step).

        Steps already taken from that address without a known MAC are given
        it: with proxy DHCP the address comes from another server, so the
        first TFTP fetch (pxelinux.0) is seen before the MAC can be tied to
        the address (by the pxelinux.cfg/01-<mac> request or the PXE
        boot-server request).
        """
        if client_ip in _NO_ADDRESS or self.mac_by_ip.get(client_ip) == mac:
            return
        self.mac_by_ip[client_ip] = mac
        self._learned[client_ip] = mac
        for i, step in enumerate(self._pending):
            if step.mac is None and step.ip == client_ip:
                self._pending[i] = BootStep(mac, step.ip, step.time, step.step)

    def drain(self) -> tuple[list[BootStep], dict[str, str]]:
        """Take the queued steps and the addresses learned since the last drain.

        Called on the event loop; :func:`write_steps` then stores them, off the loop.
        """
        steps = list(self._pending)
        self._pending.clear()
        learned, self._learned = self._learned, {}
        return steps, learned

    def flush(self, inventory: Inventory) -> int:
        """Drain and write in one go (shutdown, tests); returns how many steps."""
        steps, learned = self.drain()
        write_steps(inventory, steps, learned)
        return len(steps)



CLAIM_WINDOW = 300.0  # seconds: anonymous steps this recent are attributed to a learned MAC


def write_steps(inventory: Inventory, steps: list[BootStep], learned: dict[str, str]) -> None:
    """Store drained steps, and give recent anonymous steps of learned addresses their MAC,
    in one transaction (one fsync, however many clients booted)."""
    inventory.add_boot_steps(steps, claims=learned, claim_since=time.time() - CLAIM_WINDOW)
