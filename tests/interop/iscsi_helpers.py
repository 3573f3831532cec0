"""Run an IscsiService on 127.0.0.1 for real initiators (libiscsi tools, qemu-img/qemu-io).

The service runs on its own event loop in a background thread; exports are a
static :class:`StaticExports` over sparse temporary files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mobinux.iscsi.aio import IscsiService
from mobinux.iscsi.params import ChapSecret, TargetEntry, TargetLimits
from mobinux.iscsi.pdu import Pdu, PduReader, digest_bytes
from mobinux.scsi import LogicalUnit, ScsiTarget
from mobinux.storage.file import FileDevice

T = TypeVar("T")

IQN = "iqn.2024-01.org.mobinux.test:disk0"
INITIATOR = "iqn.2024-01.org.mobinux.test:initiator"
HOST = "127.0.0.1"


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


@dataclasses.dataclass
class Export:
    entry: TargetEntry
    scsi: ScsiTarget
    paths: list[Path]


class StaticExports:
    """A fixed set of targets (the ``Exports`` protocol of mobinux.iscsi.aio)."""

    def __init__(self, exports: Sequence[Export], *, discovery: ChapSecret | None = None) -> None:
        self.exports = {e.entry.iqn.lower(): e for e in exports}
        self.discovery = discovery
        self.portal = ""  # "IP:PORT,TPGT", known once the service listens

    def lookup(self, iqn: str) -> TargetEntry | None:
        export = self.exports.get(iqn.lower())
        return export.entry if export else None

    def visible_to(self, initiator_name: str) -> Sequence[TargetEntry]:
        name = initiator_name.lower()
        return [
            e.entry
            for e in self.exports.values()
            if e.entry.allowed_initiators is None
            or name in {a.lower() for a in e.entry.allowed_initiators}
        ]

    def portals(self, iqn: str) -> Sequence[str]:
        return [self.portal] if self.portal else []

    def discovery_chap(self) -> ChapSecret | None:
        return self.discovery

    def scsi_target(self, iqn: str) -> ScsiTarget | None:
        export = self.exports.get(iqn.lower())
        return export.scsi if export else None


def file_export(
    directory: Path,
    iqn: str = IQN,
    *,
    size: int = 64 * 1024 * 1024,
    luns: int = 1,
    **entry: Any,
) -> Export:
    """A target with *luns* sparse files of *size* bytes behind LUN 0, 1, ..."""
    units: dict[int, LogicalUnit] = {}
    paths = []
    for lun in range(luns):
        path = directory / f"{iqn.rsplit(':', 1)[-1]}-lun{lun}.img"
        with path.open("wb") as f:
            f.truncate(size)
        units[lun] = LogicalUnit(FileDevice(path), device_id=f"{iqn}-{lun}")
        paths.append(path)
    return Export(TargetEntry(iqn, **entry), ScsiTarget(units), paths)


class ServiceThread:
    """IscsiService on a private event loop in a daemon thread."""

    def __init__(self, exports: StaticExports, **kwargs: Any) -> None:
        self.exports = exports
        self.kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self.service = IscsiService(exports, host=HOST, port=0, **kwargs)
        self.thread = threading.Thread(target=self.loop.run_forever, name="iscsi-service", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.run(self.service.start())
        self.exports.portal = f"{HOST}:{self.port},1"

    def stop(self) -> None:
        try:
            self.run(self.service.stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    @property
    def port(self) -> int:
        return self.service.port

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 30) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def url(self, iqn: str = IQN, lun: int | None = 0, *, user: str = "", secret: str = "",
            args: str = "") -> str:
        auth = f"{user}%{secret}@" if user else ""
        path = f"/{iqn}" + (f"/{lun}" if lun is not None else "")
        return f"iscsi://{auth}{HOST}:{self.port}{path}" + (f"?{args}" if args else "")


@contextmanager
def iscsi_service(
    exports: Sequence[Export] | StaticExports,
    *,
    limits: TargetLimits | None = None,
    **kwargs: Any,
) -> Iterator[ServiceThread]:
    static = exports if isinstance(exports, StaticExports) else StaticExports(exports)
    if limits is not None:
        kwargs["limits"] = limits
    server = ServiceThread(static, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run(cmd: Sequence[str], *, timeout: float = 120, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@contextmanager
def captured_log(name: str = "mobinux.iscsi") -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger(name)
    handler = Handler(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class RawInitiator:
    """A minimal blocking iSCSI initiator in Python for protocol-level interop tests.

    Logs in without authentication (straight to the operational stage), then
    sends whatever a test needs, including PDUs no real initiator would send.
    """

    def __init__(self, port: int, *, initiator: str = INITIATOR, isid: bytes = b"\x80\x00\x00\x00\x00\x01",
                 timeout: float = 10) -> None:
        import socket

        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.initiator = initiator
        self.isid = isid
        self.itt = 0x100
        self.cmd_sn = 0
        self.exp_stat_sn = 0
        self.tsih = 0
        self.reader = PduReader(max_data_segment=1 << 24)
        self.header_digest = False
        self.data_digest = False
        self.negotiated: dict[str, str] = {}

    # -- framing ------------------------------------------------------------

    def send(self, raw: bytes) -> None:
        """Send one PDU built by :meth:`pdu` (digests are added when negotiated)."""
        if self.header_digest or self.data_digest:
            header, data = raw[:48], raw[48:]
            raw = header + (digest_bytes(header) if self.header_digest else b"") + data
            if data and self.data_digest:
                raw += digest_bytes(data)
        self.sock.sendall(raw)

    def recv(self) -> Pdu | None:
        """The next PDU, or None when the target closed the connection."""
        while (pdu := self.reader.next_pdu()) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.reader.feed(chunk)
        if pdu.opcode == 0x20 and pdu.itt == 0xFFFFFFFF:
            self.exp_stat_sn = pdu.u32(24)  # a ping does not advance StatSN
        elif pdu.opcode != 0x31 and not (pdu.opcode == 0x25 and not pdu.flags & 0x01):
            self.exp_stat_sn = (pdu.u32(24) + 1) & 0xFFFFFFFF
        return pdu

    def closed_by_target(self) -> bool:
        """True once the target has closed (after draining whatever it sent first)."""
        try:
            while self.recv() is not None:
                pass
        except (ConnectionResetError, OSError):
            pass
        return True

    def close(self) -> None:
        self.sock.close()

    @staticmethod
    def pdu(opcode: int, flags: int, *, itt: int, data: bytes = b"", fields: dict[int, int] | None = None,
            lun: bytes = bytes(8), immediate: bool = False, tail: bytes = b"") -> bytes:
        bhs = bytearray(48)
        bhs[0] = opcode | (0x40 if immediate else 0)
        bhs[1] = flags
        bhs[5:8] = len(data).to_bytes(3, "big")
        bhs[8:16] = lun
        bhs[16:20] = itt.to_bytes(4, "big")
        for off, value in (fields or {}).items():
            bhs[off : off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "big")
        if tail:
            bhs[32 : 32 + len(tail)] = tail
        return bytes(bhs) + data + b"\0" * (-len(data) & 3)

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    # -- login --------------------------------------------------------------

    def login(self, target: str | None = IQN, **keys: str) -> Pdu:
        """Log in (discovery when *target* is None); returns the final Login Response."""
        pairs = {"InitiatorName": self.initiator}
        if target is None:
            pairs["SessionType"] = "Discovery"
        else:
            pairs["SessionType"] = "Normal"
            pairs["TargetName"] = target
        pairs.update({"HeaderDigest": "None", "DataDigest": "None", "MaxRecvDataSegmentLength": "262144"})
        pairs.update(keys)
        itt = self.next_itt()
        while True:
            text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs.items())
            bhs = bytearray(self.pdu(0x03, 0x80 | (1 << 2) | 3, itt=itt, data=text, immediate=True,
                                     fields={24: self.cmd_sn, 28: self.exp_stat_sn}))
            bhs[8:14] = self.isid
            self.send(bytes(bhs))
            rsp = self.recv()
            if rsp is None:
                raise ConnectionError("target closed the connection during login")
            status = (rsp.bhs[36] << 8) | rsp.bhs[37]
            if status:
                raise PermissionError(f"login refused: status 0x{status:04x}")
            for item in rsp.data.split(b"\0"):
                if b"=" in item:
                    k, _, v = item.decode().partition("=")
                    self.negotiated[k] = v
            if rsp.flags & 0x80 and rsp.flags & 0x03 == 3:
                self.tsih = rsp.u16(14)
                self.cmd_sn = rsp.u32(28)
                # digests apply from the first full-feature PDU on (§13.1)
                self.header_digest = self.negotiated.get("HeaderDigest") == "CRC32C"
                self.data_digest = self.negotiated.get("DataDigest") == "CRC32C"
                self.reader.enable_digests(self.header_digest, self.data_digest)
                return rsp
            # the target proposed keys of its own: accept them as they are
            pairs = {}
            for item in rsp.data.split(b"\0"):
                if b"=" in item:
                    k, _, v = item.decode().partition("=")
                    if k not in ("TargetPortalGroupTag", "TargetAlias", "MaxRecvDataSegmentLength"):
                        pairs[k] = v

    # -- full feature -------------------------------------------------------

    def nop(self, payload: bytes = b"ping") -> Pdu | None:
        itt = self.next_itt()
        self.send(self.pdu(0x00, 0x80, itt=itt, data=payload, immediate=True,
                           fields={20: 0xFFFFFFFF, 24: self.cmd_sn, 28: self.exp_stat_sn}))
        while (pdu := self.recv()) is not None:
            if pdu.opcode == 0x20 and pdu.itt == itt:
                return pdu
        return None

    def command(self, cdb: bytes, *, read: int = 0) -> tuple[int, bytes]:
        """One SCSI command without Data-Out; returns (status, data-in)."""
        itt = self.next_itt()
        flags = 0x80 | (0x40 if read else 0) | 1
        self.send(self.pdu(0x01, flags, itt=itt, fields={20: read, 24: self.cmd_sn, 28: self.exp_stat_sn},
                           tail=cdb.ljust(16, b"\0")))
        self.cmd_sn = (self.cmd_sn + 1) & 0xFFFFFFFF
        data = b""
        while (pdu := self.recv()) is not None:
            if pdu.itt != itt:
                continue
            if pdu.opcode == 0x25:
                data += pdu.data
                if pdu.flags & 0x01:
                    return pdu.bhs[3], data
            elif pdu.opcode == 0x21:
                return pdu.bhs[3], data
        raise ConnectionError("target closed the connection")

    def text(self, text: bytes) -> bytes:
        itt = self.next_itt()
        self.send(self.pdu(0x04, 0x80, itt=itt, data=text, fields={20: 0xFFFFFFFF, 24: self.cmd_sn,
                                                                    28: self.exp_stat_sn}))
        self.cmd_sn = (self.cmd_sn + 1) & 0xFFFFFFFF
        answer = b""
        while (pdu := self.recv()) is not None:
            if pdu.opcode == 0x24 and pdu.itt == itt:
                answer += pdu.data
                if pdu.flags & 0x80:
                    return answer
                self.send(self.pdu(0x04, 0x80, itt=itt, fields={20: pdu.u32(20), 24: self.cmd_sn,
                                                                 28: self.exp_stat_sn}))
                self.cmd_sn = (self.cmd_sn + 1) & 0xFFFFFFFF
        raise ConnectionError("target closed the connection")

    def logout(self) -> int:
        itt = self.next_itt()
        self.send(self.pdu(0x06, 0x80, itt=itt, immediate=True, fields={24: self.cmd_sn, 28: self.exp_stat_sn}))
        while (pdu := self.recv()) is not None:
            if pdu.opcode == 0x26:
                return pdu.bhs[2]
        raise ConnectionError("target closed the connection before the Logout Response")
