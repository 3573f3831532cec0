"""Composition root of ``mobinux serve``: builds the services and runs one asyncio loop.

::

    DHCP (67, 4011) --\\                       /-- Inventory (mobinux.db)
    TFTP (69)       ---+-- BootService -------+
    HTTP (8080)     --/   (policy + files)     \\-- images/, --tftp-root, loaders
             \\______________ StepLog (log lines, `mobinux status`)
    iSCSI (3260)    ----- IscsiExports ---------- targets, node disks (disks/)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sqlite3
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Protocol

from mobinux.config import ServeConfig, default_tftp_workers
from mobinux.errors import ConfigError, LocalError
from mobinux.inventory.db import Inventory, IscsiSessionRecord
from mobinux.netif import interface_address
from mobinux.service.boot import ENDPOINT_SETTING, BootService, Endpoint
from mobinux.service.steps import StepLog, write_steps

log = logging.getLogger("mobinux")

LOCK_NAME = "serve.lock"
LEASES_NAME = "leases.db"
STEP_FLUSH_INTERVAL = 1.0


class Service(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class Network:
    address: IPv4Address
    subnet: IPv4Network | None


def resolve_network(config: ServeConfig) -> Network:
    """The server address and subnet: from flags, else from the interface."""
    subnet: IPv4Network | None
    if config.interface:
        iface = interface_address(config.interface)
        address = config.address or iface.ip
        subnet = config.subnet or iface.network
    elif config.address is not None:
        address, subnet = config.address, config.subnet
    else:
        raise ConfigError("give --interface or --address so clients know where to reach the server")
    if config.dhcp_range is not None and subnet is not None:
        for ip in config.dhcp_range:
            if ip not in subnet:
                raise ConfigError(f"--dhcp-range: {ip} is outside the interface's network {subnet}")
    return Network(address, subnet)


class ServerLock:
    """One server per data directory: an flock held for the server's lifetime."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LocalError(f"another mobinux serve is already using {self.path.parent}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def server_pid(data_dir: Path) -> int | None:
    """The pid of the server running on *data_dir*, or None."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def build_services(config: ServeConfig, data_dir: Path, inventory: Inventory, steps: StepLog,
                   network: Network) -> tuple[BootService, list[Service]]:
    from mobinux.http.server import HttpService
    from mobinux.tftp.aio import TftpService

    gateway = config.router[0] if config.router else None
    endpoint = Endpoint(network.address, config.http_port, network.subnet, gateway,
                        iscsi_port=config.iscsi_port, iqn_prefix=config.iqn_prefix)
    inventory.set_setting(ENDPOINT_SETTING, endpoint.to_json())
    host = str(network.address)
    iscsi = IscsiRunner(inventory, endpoint, host) if config.iscsi_port else None
    boot = BootService(inventory, endpoint, steps, tftp_root=config.tftp_root,
                       loader_dirs=config.loader_dirs,
                       on_boot=None if iscsi is None else iscsi.exports.node_booting,
                       node_alive=None if iscsi is None else iscsi.exports.node_alive)
    services: list[Service] = []
    if config.dhcp != "off":
        from mobinux.dhcp.aio import DhcpService
        from mobinux.dhcp.server import DhcpConfig

        assert config.interface is not None and network.subnet is not None
        first, last = config.dhcp_range if config.dhcp_range else (None, None)
        dhcp_config = DhcpConfig(
            mode=config.dhcp,  # type: ignore[arg-type]
            server_ip=network.address,
            subnet=network.subnet,
            pool_first=first,
            pool_last=last,
            routers=config.router,
            dns_servers=config.dns,
            domain=config.domain,
            lease_time=config.lease_time,
            deny_unknown=config.deny_unknown,
        )
        services.append(DhcpService(dhcp_config, config.interface, boot, data_dir / LEASES_NAME,
                                    steps, logging.getLogger("mobinux.dhcp")))
    services.append(TftpService(boot, host=host, port=config.tftp_port, record_step=steps,
                                logger=logging.getLogger("mobinux.tftp"),
                                interface=config.interface,
                                workers=(default_tftp_workers() if config.tftp_workers is None
                                         else config.tftp_workers)))
    services.append(HttpService(boot, host=host, port=config.http_port, record_step=steps,
                                logger=logging.getLogger("mobinux.http")))
    if iscsi is not None:
        services.append(iscsi)
    return boot, services


class IscsiRunner:
    """The iSCSI target as a :class:`Service`, with its exports read from the inventory.

    It has its own inventory connection: the exports are consulted at login,
    and a login must not wait for (or interleave with) the boot services' reads.
    """

    def __init__(self, inventory: Inventory, endpoint: Endpoint, host: str) -> None:
        from mobinux.iscsi.aio import IscsiService
        from mobinux.service.iscsi import IscsiExports

        self._inventory = Inventory(inventory.data_dir)
        self.exports = IscsiExports(self._inventory, endpoint)
        self.service = IscsiService(self.exports, host=host, port=endpoint.iscsi_port)
        self.exports.close_sessions = self._close_sessions
        self.exports.count_sessions = lambda iqn: len(self.service.registry.for_target(iqn))
        self.exports.target_alive = self.service.target_alive
        self._recorded: list[IscsiSessionRecord] | None = None

    def _close_sessions(self, target_iqn: str) -> int:
        return self.service.close_sessions(target_iqn, reason="the node booted again")

    def poll(self) -> None:
        """Once a second: carry out `mobinux node reset` requests."""
        try:
            self.exports.poll()
        except (OSError, sqlite3.Error) as exc:
            log.warning("iSCSI: node reset requests: %s", exc)

    async def start(self) -> None:
        await self.service.start()

    async def close(self) -> None:
        try:
            await self.service.stop()
        finally:
            self.exports.close()
            self._inventory.close()

    def session_records(self) -> list[IscsiSessionRecord] | None:
        """The live sessions, or None when they have not changed since the last call."""
        records = [
            IscsiSessionRecord(s.initiator, s.target, self.exports.node_of(s.target), s.peer,
                               s.since, s.session_type)
            for s in self.service.sessions()
        ]
        if records == self._recorded:
            return None
        self._recorded = records
        return records


async def run(config: ServeConfig, data_dir: Path, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = ServerLock(data_dir)
    lock.acquire()
    inventory = Inventory(data_dir)
    # Boot steps get their own connection, written from a worker thread: the
    # once-a-second commit (an fsync) never stalls the event loop.
    step_store = Inventory(data_dir, any_thread=True)
    steps = StepLog(logging.getLogger("mobinux.boot"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: list[Service] = []
    try:
        network = resolve_network(config)
        _, services = build_services(config, data_dir, inventory, steps, network)
        iscsi = next((s for s in services if isinstance(s, IscsiRunner)), None)
        for service in services:
            try:
                await service.start()
            except PermissionError as exc:
                raise LocalError(f"{type(service).__name__}: {exc.strerror}: "
                                 "ports below 1024 need root (or CAP_NET_BIND_SERVICE)") from None
            except OSError as exc:
                raise LocalError(f"{type(service).__name__} cannot start: {exc.strerror or exc}") from None
            started.append(service)
        log.info("serving on %s (dhcp %s, tftp :%d, http :%d, iscsi %s), data in %s",
                 network.address, config.dhcp, config.tftp_port, config.http_port,
                 f":{config.iscsi_port}" if config.iscsi_port else "off", data_dir)
        if ready is not None:
            ready.set()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STEP_FLUSH_INTERVAL)
            if iscsi is not None:
                iscsi.poll()
            sessions = None if iscsi is None else iscsi.session_records()
            try:
                await asyncio.to_thread(write_steps, step_store, *steps.drain())
                if sessions is not None:
                    await asyncio.to_thread(step_store.set_iscsi_sessions, sessions)
            except sqlite3.Error as exc:  # status is lost, booting goes on
                log.warning("cannot record boot steps in %s: %s", data_dir, exc)
        log.info("shutting down")
    finally:
        for service in reversed(started):
            try:
                await service.close()
            except Exception:  # a failing close must not stop the others
                log.exception("error while closing %s", type(service).__name__)
        steps.flush(step_store)
        with contextlib.suppress(sqlite3.Error):
            step_store.set_iscsi_sessions([])  # no server, no sessions
        step_store.close()
        inventory.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        lock.release()
