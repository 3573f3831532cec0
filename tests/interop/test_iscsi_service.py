"""IscsiService's asyncio adapter over TCP with a scripted SCSI layer (no external tools needed).

Checks what only the adapter does: the nowait/thread split, failures inside
the SCSI layer, nexus loss when sessions end, and stop() waiting for I/O.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from mobinux.iscsi.params import ChapSecret, TargetEntry
from mobinux.scsi import ScsiResult
from mobinux.storage.device import WouldBlock
from tests.interop.iscsi_helpers import IQN, RawInitiator, ServiceThread

pytestmark = pytest.mark.interop

READ10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])
INQUIRY = bytes([0x12, 0, 0, 0, 36, 0])
SYNC_CACHE = bytes([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0])


class ScriptedScsi:
    """Answers READ(10) with a pattern; records how each command was run."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool, str]] = []  # (opcode, nowait, thread name)
        self.lost: list[str] = []
        self.block_nowait = True
        self.fail_opcode: int | None = None
        self.release = threading.Event()
        self.release.set()

    def execute(self, lun: int, cdb: bytes, data_out: Any, nexus: str, *, nowait: bool = False,
                buffer: bytearray | None = None) -> ScsiResult:
        self.calls.append((cdb[0], nowait, threading.current_thread().name))
        if cdb[0] == self.fail_opcode:
            raise RuntimeError("bug in the SCSI layer")
        if cdb[0] == 0x28:
            if nowait and self.block_nowait:
                raise WouldBlock
            return ScsiResult(0, b"\x5a" * 512)
        if cdb[0] == 0x35:
            self.release.wait(10)
            return ScsiResult(0, b"")
        return ScsiResult(0, b"\0\0\x06\x02\x1f\0\0\x02SCRIPTED" + bytes(20))

    @staticmethod
    def is_nowait_candidate(cdb: bytes) -> bool:
        return cdb[0] == 0x28

    @staticmethod
    def touches_media(cdb: bytes) -> bool:
        return cdb[0] in (0x28, 0x35)

    @staticmethod
    def data_out_length(cdb: bytes) -> int:
        return 0

    def nexus_lost(self, nexus: str) -> None:
        self.lost.append(nexus)

    def lun_reset(self, lun: int, nexus: str) -> bool:
        return lun == 0

    def target_reset(self, nexus: str, cold: bool) -> None:
        pass


class OneTarget:
    def __init__(self, scsi: ScriptedScsi) -> None:
        self.scsi = scsi
        self.entry = TargetEntry(IQN)

    def lookup(self, iqn: str) -> TargetEntry | None:
        return self.entry if iqn.lower() == IQN.lower() else None

    def visible_to(self, initiator_name: str) -> Sequence[TargetEntry]:
        return [self.entry]

    def portals(self, iqn: str) -> Sequence[str]:
        return []

    def discovery_chap(self) -> ChapSecret | None:
        return None

    def scsi_target(self, iqn: str) -> Any:
        return self.scsi if iqn.lower() == IQN.lower() else None


@pytest.fixture
def scripted() -> Any:
    scsi = ScriptedScsi()
    server = ServiceThread(OneTarget(scsi), io_threads=2)  # type: ignore[arg-type]
    server.start()
    try:
        yield server, scsi
    finally:
        scsi.release.set()
        server.stop()


def test_nowait_read_that_would_block_is_rerun_in_a_thread(scripted: Any) -> None:
    server, scsi = scripted
    raw = RawInitiator(server.port)
    raw.login()
    assert raw.command(READ10, read=512) == (0, b"\x5a" * 512)
    assert [(op, nowait) for op, nowait, _ in scsi.calls] == [(0x28, True), (0x28, False)]
    assert scsi.calls[0][2] == "iscsi-service" and scsi.calls[1][2].startswith("iscsi-io")
    scsi.block_nowait = False
    scsi.calls.clear()
    assert raw.command(READ10, read=512) == (0, b"\x5a" * 512)
    assert [(op, nowait) for op, nowait, _ in scsi.calls] == [(0x28, True)]
    # commands that need no disk run inline, on the event loop
    scsi.calls.clear()
    status, data = raw.command(INQUIRY, read=36)
    assert status == 0 and data[8:16] == b"SCRIPTED"
    assert scsi.calls == [(0x12, False, "iscsi-service")]
    raw.logout()
    raw.close()


def test_a_failing_scsi_layer_gives_hardware_error_not_a_dead_connection(scripted: Any) -> None:
    server, scsi = scripted
    scsi.fail_opcode = 0x12
    raw = RawInitiator(server.port)
    raw.login()
    itt = raw.next_itt()
    raw.send(RawInitiator.pdu(0x01, 0xC1, itt=itt, fields={20: 36, 24: raw.cmd_sn}, tail=INQUIRY))
    raw.cmd_sn += 1
    rsp = raw.recv()
    assert rsp is not None and rsp.opcode == 0x21 and rsp.bhs[3] == 2
    sense = rsp.data[2:]
    assert sense[2] == 0x04 and sense[12] == 0x44  # HARDWARE ERROR, INTERNAL TARGET FAILURE
    assert raw.nop() is not None
    raw.close()


def test_nexus_loss_is_reported_once_per_session_end(scripted: Any) -> None:
    server, scsi = scripted
    polite = RawInitiator(server.port, isid=b"\x80\0\0\0\0\x01")
    polite.login()
    rude = RawInitiator(server.port, isid=b"\x80\0\0\0\0\x02")
    rude.login()
    assert polite.logout() == 0
    polite.close()
    rude.close()  # no logout: the connection just goes
    deadline = time.monotonic() + 5
    while len(scsi.lost) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    assert sorted(scsi.lost) == sorted(
        [f"{polite.initiator},i,0x800000000001,{IQN},t,0x0001", f"{rude.initiator},i,0x800000000002,{IQN},t,0x0001"]
    )


def test_stop_waits_for_running_io(scripted: Any) -> None:
    server, scsi = scripted
    scsi.release.clear()
    raw = RawInitiator(server.port)
    raw.login()
    itt = raw.next_itt()
    raw.send(RawInitiator.pdu(0x01, 0x81, itt=itt, fields={24: raw.cmd_sn}, tail=SYNC_CACHE))
    deadline = time.monotonic() + 5
    while not scsi.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scsi.calls and scsi.calls[0][0] == 0x35
    threading.Timer(0.5, scsi.release.set).start()
    started = time.monotonic()
    server.run(server.service.stop())
    assert time.monotonic() - started >= 0.4  # it waited for the SYNCHRONIZE CACHE
    assert raw.closed_by_target()
    raw.close()
    assert server.service.sessions() == []


def test_connections_beyond_the_limit_are_refused() -> None:
    scsi = ScriptedScsi()
    server = ServiceThread(OneTarget(scsi), max_connections=2)  # type: ignore[arg-type]
    server.start()
    try:
        first, second = RawInitiator(server.port), RawInitiator(server.port, isid=b"\x80\0\0\0\0\x09")
        first.login()
        second.login()
        third = RawInitiator(server.port)
        assert third.closed_by_target()
        third.close()
        first.close()
        deadline = time.monotonic() + 5
        while len(server.service.sessions()) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        fourth = RawInitiator(server.port)
        fourth.login()
        assert fourth.nop() is not None
        for raw in (second, fourth):
            raw.close()
    finally:
        server.stop()
