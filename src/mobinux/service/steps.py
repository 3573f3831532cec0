"""The boot-step log: one line per boot step, kept for ``mobinux status``.

Protocol services call :class:`StepLog` (a :data:`mobinux.boot.StepRecorder`)
on the event loop; it logs the step, remembers which MAC uses which address
(TFTP and HTTP clients are known only by their address) and queues the step.
The server flushes the queue to the inventory about once a second in one
transaction, so the hot path never waits for the disk.
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

    def flush(self, inventory: Inventory) -> int:
        """Write queued steps to the inventory; returns how many."""
        steps = list(self._pending)
        self._pending.clear()
        learned, self._learned = self._learned, {}
        inventory.add_boot_steps(steps)
        for ip, mac in learned.items():
            inventory.claim_boot_steps(ip, mac, since=time.time() - self.CLAIM_WINDOW)
        return len(steps)

    CLAIM_WINDOW = 300.0  # seconds: anonymous steps this recent are attributed to a learned MAC
