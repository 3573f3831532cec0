"""IscsiService against real initiators on 127.0.0.1: libiscsi tools, qemu-img / qemu-io.

Every test exports sparse temporary files through FileDevice and checks the
bytes that land in them.
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from mobinux.iscsi.aio import IscsiService
from mobinux.iscsi.params import ChapSecret, TargetLimits
from mobinux.iscsi.pdu import digest_bytes
from tests.interop.iscsi_helpers import (
    INITIATOR,
    IQN,
    Export,
    RawInitiator,
    StaticExports,
    captured_log,
    file_export,
    iscsi_service,
    need,
    run,
)

pytestmark = pytest.mark.interop

MiB = 1024 * 1024


def test_iscsi_ls_discovers_targets_and_luns(tmp_path: Path) -> None:
    need("iscsi-ls")
    second = "iqn.2024-01.org.mobinux.test:disk1"
    with iscsi_service([file_export(tmp_path), file_export(tmp_path, second, luns=2)]) as srv:
        proc = run(["iscsi-ls", "-s", f"iscsi://127.0.0.1:{srv.port}"])
    out = proc.stdout
    assert f"Target:{IQN} Portal:127.0.0.1:{srv.port},1" in out
    assert f"Target:{second} Portal:127.0.0.1:{srv.port},1" in out
    assert out.count("Lun:0") == 2 and out.count("Lun:1") == 1
    assert "DIRECT_ACCESS" in out


def test_iscsi_inq_with_header_digest(tmp_path: Path) -> None:
    need("iscsi-inq")
    with iscsi_service([file_export(tmp_path)]) as srv, captured_log() as log:
        proc = run(["iscsi-inq", srv.url(args="header_digest=crc32c")])
        assert "Vendor:MOBINUX" in proc.stdout
        proc = run(["iscsi-inq", "-e", "1", "-c", "0x80", srv.url(args="header_digest=crc32c")])
    assert "login" in " ".join(r.getMessage() for r in log)


def test_header_and_data_digests_end_to_end(tmp_path: Path) -> None:
    with iscsi_service([file_export(tmp_path)]) as srv:
        raw = RawInitiator(srv.port)
        raw.login(HeaderDigest="CRC32C", DataDigest="CRC32C")
        assert raw.header_digest and raw.data_digest
        pong = raw.nop(b"digested!")
        assert pong is not None and pong.data == b"digested!"
        status, data = raw.command(bytes([0x12, 0, 0, 0, 96, 0]), read=96)  # INQUIRY
        assert status == 0 and data[8:15] == b"MOBINUX"
        # a corrupted data digest ends the connection (ErrorRecoveryLevel 0, §7.8)
        raw.data_digest = False
        bad = RawInitiator.pdu(0x00, 0x80, itt=raw.next_itt(), data=b"abcd", immediate=True,
                               fields={20: 0xFFFFFFFF})
        raw.header_digest = False
        raw.sock.sendall(bad[:48] + digest_bytes(bad[:48]) + bad[48:] + b"\0\0\0\0")
        assert raw.closed_by_target()
        raw.close()


def test_qemu_img_convert_writes_and_reads_back(tmp_path: Path) -> None:
    need("qemu-img")
    source = tmp_path / "source.raw"
    payload = os.urandom(12 * MiB + 4096)  # not a multiple of the burst: the last R2T is short
    source.write_bytes(payload)
    export = file_export(tmp_path, size=32 * MiB)
    with iscsi_service([export]) as srv:
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), srv.url()])
        assert export.paths[0].read_bytes()[: len(payload)] == payload
        back = tmp_path / "back.raw"
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.url(), str(back)])
    data = back.read_bytes()
    assert len(data) == 32 * MiB
    assert data[: len(payload)] == payload and not any(data[len(payload) :])


def test_qemu_io_mixed_reads_and_writes(tmp_path: Path) -> None:
    need("qemu-io")
    export = file_export(tmp_path, size=16 * MiB)
    with iscsi_service([export]) as srv:
        proc = run([
            "qemu-io", "-f", "raw",
            "-c", "write -P 0xab 0 1M",
            "-c", "write -P 0xcd 4M 3M",
            "-c", "aio_write -P 0x11 8M 64k",
            "-c", "aio_write -P 0x22 9M 512k",
            "-c", "aio_flush",
            "-c", "read -P 0xab 0 1M",
            "-c", "read -P 0xcd 4M 3M",
            "-c", "read -P 0x11 8M 64k",
            "-c", "read -P 0x22 9M 512k",
            "-c", "read -P 0 12M 1M",
            srv.url(),
        ])  # fmt: skip
    assert "Pattern verification failed" not in proc.stdout + proc.stderr
    data = export.paths[0].read_bytes()
    assert data[:MiB] == b"\xab" * MiB
    assert data[4 * MiB : 7 * MiB] == b"\xcd" * (3 * MiB)
    assert data[8 * MiB : 8 * MiB + 65536] == b"\x11" * 65536
    assert data[9 * MiB : 9 * MiB + 524288] == b"\x22" * 524288


def test_qemu_io_with_small_segments_and_bursts(tmp_path: Path) -> None:
    """A target that declares small PDUs and bursts: many R2Ts and Data-In sequences per command."""
    need("qemu-io")
    export = file_export(tmp_path, size=8 * MiB)
    limits = TargetLimits(
        max_recv_data_segment_length=4096, max_burst_length=16384, first_burst_length=8192
    )
    with iscsi_service([export], limits=limits) as srv:
        run([
            "qemu-io", "-f", "raw",
            "-c", "write -P 0x5a 1M 1M",
            "-c", "read -P 0x5a 1M 1M",
            "-c", "write -P 0x6b 3M 4k",
            "-c", "read -P 0x6b 3M 4k",
            srv.url(),
        ])  # fmt: skip
    data = export.paths[0].read_bytes()
    assert data[MiB : 2 * MiB] == b"\x5a" * MiB and data[3 * MiB : 3 * MiB + 4096] == b"\x6b" * 4096


class ReadSpy:
    """Wraps an export's ScsiTarget.execute: the largest READ it ran, and how much the
    service's transports held unsent meanwhile (what a long READ may make us buffer)."""

    def __init__(self, export: Export, service: IscsiService) -> None:
        self.real = export.scsi.execute
        self.service = service
        self.reads: list[int] = []  # transfer length of every READ(16) that ran, in blocks
        self.unsent = 0
        export.scsi.execute = self  # type: ignore[method-assign]

    def __call__(self, lun: int, cdb: bytes, *args: Any, **kwargs: Any) -> Any:
        for conn in list(self.service._connections):
            if conn.transport is not None:
                self.unsent = max(self.unsent, conn.transport.get_write_buffer_size())
        result = self.real(lun, cdb, *args, **kwargs)  # WouldBlock: tried again in a thread
        if cdb[0] == 0x88:
            self.reads.append(int.from_bytes(cdb[10:14], "big"))
        return result


def filled_export(tmp_path: Path, size: int, *, cold: bool = False) -> tuple[Export, bytes]:
    """An export full of random bytes; *cold*: not in the page cache (reads go to threads)."""
    export = file_export(tmp_path, size=size)
    payload = os.urandom(size)
    export.paths[0].write_bytes(payload)
    if cold:
        fd = os.open(export.paths[0], os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return export, payload


def test_a_20_mib_read16_is_streamed_in_bounded_pieces(tmp_path: Path) -> None:
    """Old iPXE reads whole files in one READ: it is read and sent 1 MiB at a time."""
    export, payload = filled_export(tmp_path, 24 * MiB, cold=True)
    length = 20 * MiB
    with iscsi_service([export]) as srv:
        spy = ReadSpy(export, srv.service)
        raw = RawInitiator(srv.port)
        raw.login(MaxBurstLength="262144")
        burst = int(raw.negotiated.get("MaxBurstLength", "262144"))
        assert raw.command(bytes(6))[0] == 2  # TEST UNIT READY: the power-on unit attention
        itt = raw.next_itt()
        cdb = bytes([0x88, 0]) + (1024).to_bytes(8, "big") + (length // 512).to_bytes(4, "big") + bytes(2)
        raw.send(RawInitiator.pdu(0x01, 0xC1, itt=itt, fields={20: length, 24: raw.cmd_sn}, tail=cdb))
        raw.cmd_sn += 1
        time.sleep(1.0)  # a slow reader: the target must wait for the socket, not buffer 20 MiB
        received = bytearray()
        datasn = 0
        while True:
            pdu = raw.recv()
            assert pdu is not None and pdu.itt == itt and pdu.opcode == 0x25
            assert pdu.u32(36) == datasn and pdu.u32(40) == len(received)
            datasn += 1
            received += pdu.data
            at_boundary = len(received) % burst == 0 or len(received) == length
            assert bool(pdu.flags & 0x80) == at_boundary
            if pdu.flags & 0x01:
                assert len(received) == length and pdu.bhs[3] == 0 and pdu.flags == 0x81
                break
        assert received == payload[1024 * 512 : 1024 * 512 + length]
        assert raw.nop() is not None
        raw.close()
    assert spy.reads == [2048] * 20
    # Pieces wait while the transport holds more than its 8 MiB high-water mark (here the
    # slow reader made it hold ~7 MiB besides what the kernel's socket buffers took).
    assert spy.unsent <= 8 * MiB + 2 * MiB


def test_iscsi_perf_reads_of_20_mib(tmp_path: Path) -> None:
    need("iscsi-perf")
    export, _ = filled_export(tmp_path, 64 * MiB)
    with iscsi_service([export]) as srv:
        spy = ReadSpy(export, srv.service)
        proc = run(["iscsi-perf", "-i", INITIATOR, "-b", "40000", "-m", "1", "-t", "2", srv.url()],
                   timeout=60)
    assert "iops average" in proc.stdout + proc.stderr
    assert spy.reads and max(spy.reads) <= 2048 and len(spy.reads) >= 20


def chap_export(tmp_path: Path, *, mutual: bool) -> StaticExports:
    export = file_export(
        tmp_path,
        chap=ChapSecret("alice", b"initiator-secret-16"),
        mutual_chap=ChapSecret("target-bob", b"target-secret-1234") if mutual else None,
    )
    return StaticExports([export])


def test_chap_one_way(tmp_path: Path) -> None:
    need("iscsi-inq")
    with iscsi_service(chap_export(tmp_path, mutual=False)) as srv, captured_log() as log:
        ok = run(["iscsi-inq", srv.url(user="alice", secret="initiator-secret-16")])
        assert "Vendor:MOBINUX" in ok.stdout
        bad = run(["iscsi-inq", srv.url(user="alice", secret="wrong-secret-00000")], check=False)
        assert bad.returncode != 0
        anonymous = run(["iscsi-inq", srv.url()], check=False)
        assert anonymous.returncode != 0
    messages = " ".join(r.getMessage() for r in log)
    assert "login refused" in messages
    assert "initiator-secret" not in messages and "wrong-secret" not in messages


def test_chap_mutual(tmp_path: Path) -> None:
    need("iscsi-inq")
    with iscsi_service(chap_export(tmp_path, mutual=True)) as srv:
        good_target = "target_user=target-bob&target_password=target-secret-1234"
        ok = run(["iscsi-inq", srv.url(user="alice", secret="initiator-secret-16", args=good_target)])
        assert "Vendor:MOBINUX" in ok.stdout
        # the initiator refuses a target that cannot prove the secret it expects
        wrong_target = "target_user=target-bob&target_password=not-the-right-one"
        bad = run(["iscsi-inq", srv.url(user="alice", secret="initiator-secret-16", args=wrong_target)],
                  check=False)
        assert bad.returncode != 0


def test_acl_refuses_a_foreign_initiator(tmp_path: Path) -> None:
    need("iscsi-inq", "iscsi-ls")
    export = file_export(tmp_path, allowed_initiators=frozenset({INITIATOR}))
    with iscsi_service([export]) as srv:
        ok = run(["iscsi-inq", "-i", INITIATOR, srv.url()])
        assert "Vendor:MOBINUX" in ok.stdout
        foreign = run(["iscsi-inq", "-i", "iqn.2024-01.org.example:intruder", srv.url()], check=False)
        assert foreign.returncode != 0
        listing = run(["iscsi-ls", "-i", "iqn.2024-01.org.example:intruder", f"iscsi://127.0.0.1:{srv.port}"],
                      check=False)
        assert IQN not in listing.stdout
        listing = run(["iscsi-ls", "-i", INITIATOR, f"iscsi://127.0.0.1:{srv.port}"])
        assert IQN in listing.stdout


def test_malformed_pdu_drops_only_its_own_connection(tmp_path: Path) -> None:
    need("iscsi-inq")
    with iscsi_service([file_export(tmp_path)]) as srv:
        good = RawInitiator(srv.port, isid=b"\x80\0\0\0\0\x01")
        bad = RawInitiator(srv.port, isid=b"\x80\0\0\0\0\x02")
        good.login()
        bad.login()
        assert len(srv.service.sessions()) == 2
        # an opcode no initiator may send: Reject, then the connection goes
        bad.send(RawInitiator.pdu(0x1F, 0x80, itt=1))
        reject = bad.recv()
        assert reject is not None and reject.opcode == 0x3F and reject.bhs[2] == 0x05
        assert bad.closed_by_target()
        # a data segment larger than the MaxRecvDataSegmentLength we declared
        worse = RawInitiator(srv.port, isid=b"\x80\0\0\0\0\x03")
        worse.login()
        header = bytearray(RawInitiator.pdu(0x00, 0x80, itt=5, immediate=True, fields={20: 0xFFFFFFFF}))
        header[5:8] = (16 * MiB - 1).to_bytes(3, "big")
        worse.send(bytes(header) + b"x" * 1000)
        assert worse.closed_by_target()
        # the other session and new ones are unaffected
        pong = good.nop(b"still here")
        assert pong is not None and pong.data == b"still here"
        status, data = good.command(bytes([0x12, 0, 0, 0, 36, 0]), read=36)  # INQUIRY
        assert status == 0 and data[8:15] == b"MOBINUX"
        assert "Vendor:MOBINUX" in run(["iscsi-inq", srv.url()]).stdout
        assert good.logout() == 0
        for raw in (good, bad, worse):
            raw.close()
        deadline = time.monotonic() + 5
        while srv.service.sessions() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.service.sessions() == []


def test_sessions_reinstatement_and_close_sessions(tmp_path: Path) -> None:
    second = "iqn.2024-01.org.mobinux.test:disk1"
    with iscsi_service([file_export(tmp_path), file_export(tmp_path, second)]) as srv:
        ipxe = RawInitiator(srv.port, isid=b"\x40\0\x01\x37\0\0")
        ipxe.login()
        kernel = RawInitiator(srv.port, isid=b"\x00\x02\x3d\0\0\x01")  # the booted OS: another ISID
        kernel.login()
        other = RawInitiator(srv.port, isid=b"\x40\0\x01\x37\0\0")
        other.login(second)
        infos = srv.service.sessions()
        assert sorted((s.target, s.isid) for s in infos) == sorted(
            [(IQN, "400001370000"), (IQN, "00023d000001"), (second, "400001370000")]
        )
        assert all(s.initiator == INITIATOR and s.session_type == "Normal" and s.tsih for s in infos)
        assert all(s.peer.startswith("127.0.0.1:") and s.since <= time.time() for s in infos)
        # §6.3.5: the same InitiatorName and ISID towards the same target reinstate the session
        again = RawInitiator(srv.port, isid=b"\x40\0\x01\x37\0\0")
        again.login()
        assert ipxe.closed_by_target()
        assert len(srv.service.sessions()) == 3
        assert kernel.nop() is not None
        # the lead's "node rebooted" hook: every session to the target goes
        assert srv.call(lambda: srv.service.close_sessions(IQN.upper())) == 2
        assert kernel.closed_by_target() and again.closed_by_target()
        assert [s.target for s in srv.service.sessions()] == [second]
        assert other.nop() is not None
        for raw in (ipxe, kernel, other, again):
            raw.close()


def test_target_cold_reset_drops_every_connection_to_the_target(tmp_path: Path) -> None:
    with iscsi_service([file_export(tmp_path)]) as srv:
        a = RawInitiator(srv.port, isid=b"\x80\0\0\0\0\x01")
        b = RawInitiator(srv.port, isid=b"\x80\0\0\0\0\x02")
        a.login()
        b.login()
        a.send(RawInitiator.pdu(0x02, 0x80 | 7, itt=77, immediate=True,
                                fields={20: 0xFFFFFFFF, 24: a.cmd_sn, 28: a.exp_stat_sn}))
        rsp = a.recv()
        assert rsp is not None and rsp.opcode == 0x22 and rsp.bhs[2] == 0
        assert a.closed_by_target() and b.closed_by_target()
        a.close()
        b.close()


def test_send_targets_in_a_normal_session(tmp_path: Path) -> None:
    with iscsi_service([file_export(tmp_path)]) as srv:
        raw = RawInitiator(srv.port)
        raw.login()
        answer = raw.text(b"SendTargets=All\0")
        assert answer == f"TargetName={IQN}\0TargetAddress=127.0.0.1:{srv.port},1\0".encode()
        raw.logout()
        raw.close()


@pytest.mark.slow
def test_connect_disconnect_cycles_leak_nothing(tmp_path: Path) -> None:
    """1,000 connections that log in (or not) and go away in every way leave no fd or memory behind."""
    fd_dir = Path("/proc/self/fd")
    with iscsi_service([file_export(tmp_path)]) as srv:

        def cycle(i: int) -> None:
            raw = RawInitiator(srv.port, isid=b"\x80\0\0\0" + i.to_bytes(2, "big"))
            try:
                kind = i % 5
                if kind == 0:
                    return  # connect and vanish before the login
                if kind == 1:
                    raw.send(b"\x43" + bytes(30))  # half a Login Request, then vanish
                    return
                raw.login(None if kind == 2 else IQN)
                if kind == 3:
                    raw.command(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]), read=4096)  # READ(10)
                    assert raw.logout() == 0
                elif kind == 4:
                    raw.nop()  # and drop without a logout
            finally:
                raw.close()

        for i in range(100):  # warm up: pools, caches, lazily created objects
            cycle(i)
        time.sleep(0.3)
        gc.collect()
        fds_before = len(os.listdir(fd_dir))
        tracemalloc.start()
        snapshot_before = tracemalloc.take_snapshot()
        started = time.monotonic()
        for i in range(1000):
            cycle(i)
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 10
        while (srv.service.sessions() or len(os.listdir(fd_dir)) > fds_before) and time.monotonic() < deadline:
            time.sleep(0.05)
        gc.collect()
        snapshot_after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        fds_after = len(os.listdir(fd_dir))
        assert srv.service.sessions() == []
    assert fds_after <= fds_before, f"{fds_after - fds_before} file descriptors leaked"
    growth = sum(s.size_diff for s in snapshot_after.compare_to(snapshot_before, "filename"))
    assert growth < 2 * MiB, f"memory grew by {growth} bytes over 1000 connections"
    assert elapsed < 120
