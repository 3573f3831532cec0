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
MEDIUM_ERROR = bytes([0x70, 0, 0x03, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0])
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
        # READ(16) pieces: (lba, blocks, continued, nowait); a piece at fail_lba fails
        self.pieces: list[tuple[int, int, bool, bool]] = []
        self.fail_lba: int | None = None

    def split_read(self, lun: int, cdb: bytes, max_blocks: int) -> list[bytes] | None:
        lba, blocks = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
        if cdb[0] != 0x88 or blocks <= max_blocks:
            return None
        return [
            bytes([0x88, cdb[1]]) + (lba + start).to_bytes(8, "big")
            + min(max_blocks, blocks - start).to_bytes(4, "big") + bytes(2)
            for start in range(0, blocks, max_blocks)
        ]

    @staticmethod
    def pattern(lba: int, blocks: int) -> bytes:
        return b"".join(bytes([n & 0xFF]) * 512 for n in range(lba, lba + blocks))

    def execute(self, lun: int, cdb: bytes, data_out: Any, nexus: str, *, nowait: bool = False,
                buffer: bytearray | None = None, continued: bool = False) -> ScsiResult:
        self.calls.append((cdb[0], nowait, threading.current_thread().name))
        if cdb[0] == self.fail_opcode:
            raise RuntimeError("bug in the SCSI layer")
        if cdb[0] == 0x88:
            lba, blocks = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
            self.pieces.append((lba, blocks, continued, nowait))
            if nowait and self.block_nowait and len(self.pieces) % 2:
                raise WouldBlock  # every other piece goes to a thread
            if lba == self.fail_lba:
                return ScsiResult(2, b"", MEDIUM_ERROR)
            data = self.pattern(lba, blocks)
            if buffer is not None and len(buffer) >= len(data):
                buffer[: len(data)] = data
                return ScsiResult(0, memoryview(buffer)[: len(data)])
            return ScsiResult(0, data)
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
        return cdb[0] in (0x28, 0x88)

    @staticmethod
    def touches_media(cdb: bytes) -> bool:
        return cdb[0] in (0x28, 0x88, 0x35)

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


def read16(lba: int, blocks: int) -> bytes:
    return bytes([0x88, 0x08]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + bytes(2)


def test_a_long_read_runs_in_pieces_sent_one_after_another(scripted: Any) -> None:
    server, scsi = scripted
    raw = RawInitiator(server.port)
    raw.login()
    blocks = 2048 * 2 + 100  # two whole 1 MiB pieces and a short one
    status, data = raw.command(read16(7, blocks), read=blocks * 512)
    assert status == 0 and data == scsi.pattern(7, blocks)
    # each piece is tried inline first; one that would block is run again in a thread
    tried = [(lba, n, continued) for lba, n, continued, nowait in scsi.pieces if nowait]
    assert tried == [(7, 2048, False), (7 + 2048, 2048, True), (7 + 4096, 100, True)]
    in_threads = [c for c in scsi.calls if not c[1]]
    assert in_threads and all(c[2].startswith("iscsi-io") for c in in_threads)
    # a short one is not split
    scsi.pieces.clear()
    assert raw.command(read16(0, 16), read=8192) == (0, scsi.pattern(0, 16))
    assert scsi.pieces[-1][:3] == (0, 16, False)
    raw.close()


def test_a_failing_piece_ends_the_read_with_its_check_condition(scripted: Any) -> None:
    server, scsi = scripted
    scsi.fail_lba = 2048
    raw = RawInitiator(server.port)
    raw.login()
    itt = raw.next_itt()
    edtl = 3 * 2048 * 512
    raw.send(RawInitiator.pdu(0x01, 0xC1, itt=itt, fields={20: edtl, 24: raw.cmd_sn}, tail=read16(0, 3 * 2048)))
    raw.cmd_sn += 1
    received = b""
    datasn = 0
    while (pdu := raw.recv()) is not None:
        if pdu.opcode == 0x25:
            assert pdu.u32(36) == datasn and pdu.u32(40) == len(received)
            assert not pdu.flags & 0x01
            datasn += 1
            received += pdu.data
            continue
        assert pdu.opcode == 0x21
        break
    assert pdu is not None and pdu.bhs[3] == 2 and pdu.data[2:] == MEDIUM_ERROR
    assert pdu.u32(36) == datasn  # ExpDataSN
    assert pdu.flags & 0x02 and pdu.u32(44) == edtl - len(received)  # underflow
    assert received == scsi.pattern(0, 2048)  # the first piece, nothing of the failed one
    assert max(lba for lba, *_ in scsi.pieces) == 2048  # nothing read after the failure
    assert raw.nop() is not None  # the connection carries on
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
