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
        self.mac_by_ip: dict[str, str] = {}

    def __call__(self, mac: str | None, client_ip: str | None, step: str) -> None:
        if client_ip in _NO_ADDRESS:
            client_ip = None
        if mac is None and client_ip is not None:
            mac = self.mac_by_ip.get(client_ip)
        elif mac is not None and client_ip is not None:
            self.mac_by_ip[client_ip] = mac
        self._pending.append(BootStep(mac, client_ip, time.time(), step))
        self._log.info("%s %s %s", mac or "-", client_ip or "-", step)

    def learn(self, mac: str, client_ip: str) -> None:
        """Remember an address without logging a step (e.g. from a DHCP lease)."""
        if client_ip not in _NO_ADDRESS:
            self.mac_by_ip[client_ip] = mac

    def flush(self, inventory: Inventory) -> int:
        """Write queued steps to the inventory; returns how many."""
        steps = list(self._pending)
        self._pending.clear()
        inventory.add_boot_steps(steps)
        return len(steps)
