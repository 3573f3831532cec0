"""Sans-I/O read transfer: negotiation, windows, timers, rollover (RFC 1350/2347/2348/2349/7440)."""

from __future__ import annotations

import ast
import contextlib
import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mobinux.tftp.packet as packet_mod
import mobinux.tftp.session as session_mod
from mobinux.errors import MalformedPacket
from mobinux.tftp.constants import ErrorCode
from mobinux.tftp.packet import Ack, Data, Error, OptionAck, ReadRequest, encode, parse
from mobinux.tftp.session import (
    ACK_OPCODE_HALFWORD,
    NO_EXPECTED_ACK,
    BytesSource,
    Outcome,
    ReadSession,
    ack_halfwords,
    classify_request,
    negotiate,
)


def rrq(name: str = "f", *options: tuple[str, str], mode: str = "octet") -> ReadRequest:
    return ReadRequest(name, mode, tuple(options))


def payload(size: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(size))


def sent(session: ReadSession, now: float = 0.0) -> list[object]:
    return [parse(d) for d in session.datagrams_to_send(now)]


def ack(session: ReadSession, block: int, now: float = 0.0) -> list[object]:
    session.receive_datagram(encode(Ack(block & 0xFFFF)), now)
    return sent(session, now)


def download(session: ReadSession, *, prepare: bool = False) -> tuple[bytes, list[int]]:
    """A well-behaved client: accept the OACK, ACK each window's last block."""
    out = bytearray()
    blocks: list[int] = []
    pkts = sent(session)
    expected = 1
    steps = 0
    while not session.done:
        steps += 1
        assert steps < 1_000_000
        if pkts and isinstance(pkts[0], OptionAck):
            pkts = ack(session, 0)
            continue
        assert pkts, "session stalled"
        for pkt in pkts:
            assert isinstance(pkt, Data)
            assert pkt.block == expected & 0xFFFF
            blocks.append(pkt.block)
            out += pkt.data
            expected += 1
        if prepare:
            session.prepare_next()
        pkts = ack(session, blocks[-1])
    assert session.outcome is Outcome.COMPLETE
    return bytes(out), blocks


def test_no_options_means_no_oack_and_512_byte_blocks() -> None:
    data = payload(1300)
    s = ReadSession(rrq(), BytesSource(data), 0.0)
    first = sent(s)
    assert first == [Data(1, data[:512])]
    assert ack(s, 1) == [Data(2, data[512:1024])]
    assert ack(s, 2) == [Data(3, data[1024:])]
    assert ack(s, 3) == []
    assert s.done and s.outcome is Outcome.COMPLETE


@pytest.mark.parametrize("prepare", [False, True])
@pytest.mark.parametrize(
    ("options", "size"),
    [
        ((), 0),
        ((), 5000),
        ((("blksize", "1468"),), 100_000),
        ((("blksize", "8"), ("windowsize", "3")), 1000),
        ((("windowsize", "16"), ("tsize", "0"), ("blksize", "1468")), 200_000),
        ((("windowsize", "7"),), 512 * 7 * 3),
    ],
)
def test_full_transfers(options: tuple[tuple[str, str], ...], size: int, prepare: bool) -> None:
    data = payload(size)
    got, _ = download(ReadSession(rrq("f", *options), BytesSource(data), 0.0), prepare=prepare)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_last_block_is_empty_when_size_is_a_multiple_of_blksize() -> None:
    data = payload(1024)
    s = ReadSession(rrq(), BytesSource(data), 0.0)
    assert sent(s) == [Data(1, data[:512])]
    assert ack(s, 1) == [Data(2, data[512:])]
    assert ack(s, 2) == [Data(3, b"")]  # RFC 1350 §6: a short (empty) block ends it
    assert not s.done
    assert ack(s, 3) == [] and s.done


def test_empty_file_is_one_empty_block() -> None:
    s = ReadSession(rrq(), BytesSource(b""), 0.0)
    assert sent(s) == [Data(1, b"")]
    ack(s, 1)
    assert s.outcome is Outcome.COMPLETE


def test_blksize_option() -> None:
    data = payload(3000)
    s = ReadSession(rrq("f", ("blksize", "1024")), BytesSource(data), 0.0)
    assert sent(s) == [OptionAck((("blksize", "1024"),))]
    assert ack(s, 0) == [Data(1, data[:1024])]


def test_blksize_is_clamped_to_the_path_mtu_and_invalid_values_ignored() -> None:
    s = ReadSession(rrq("f", ("blksize", "65464")), BytesSource(b"x"), 0.0, max_blksize=1468)
    assert sent(s) == [OptionAck((("blksize", "1468"),))]
    assert s.blksize == 1468
    s = ReadSession(rrq("f", ("blksize", "7")), BytesSource(b"x"), 0.0)
    assert sent(s) == [Data(1, b"x")]  # below RFC 2348's 8: ignored, so no OACK at all
    s = ReadSession(rrq("f", ("blksize", "abc")), BytesSource(b"x"), 0.0)
    assert sent(s) == [Data(1, b"x")]


def test_tsize_answers_the_real_size() -> None:
    s = ReadSession(rrq("f", ("tsize", "0")), BytesSource(payload(123456)), 0.0)
    assert sent(s) == [OptionAck((("tsize", "123456"),))]
    assert s.blksize == 512


def test_timeout_option_is_echoed_and_used() -> None:
    s = ReadSession(rrq("f", ("timeout", "3")), BytesSource(payload(10)), 100.0)
    assert sent(s, 100.0) == [OptionAck((("timeout", "3"),))]
    assert s.get_timer() == 103.0
    s.handle_timer(102.9)
    assert sent(s, 102.9) == []
    s.handle_timer(103.0)
    assert sent(s, 103.0) == [OptionAck((("timeout", "3"),))]
    for bad in ("0", "256"):
        s = ReadSession(rrq("f", ("timeout", bad)), BytesSource(b""), 0.0)
        assert sent(s) == [Data(1, b"")]


def test_windowsize_option_sends_whole_windows() -> None:
    data = payload(512 * 10)
    s = ReadSession(rrq("f", ("windowsize", "4")), BytesSource(data), 0.0)
    assert sent(s) == [OptionAck((("windowsize", "4"),))]
    assert [d.block for d in ack(s, 0)] == [1, 2, 3, 4]  # type: ignore[attr-defined]
    assert [d.block for d in ack(s, 4)] == [5, 6, 7, 8]  # type: ignore[attr-defined]
    assert [d.block for d in ack(s, 8)] == [9, 10, 11]  # type: ignore[attr-defined]
    assert ack(s, 11) == [] and s.outcome is Outcome.COMPLETE


def test_windowsize_is_capped() -> None:
    neg = negotiate((("windowsize", "65535"),), 0, max_windowsize=64)
    assert neg.windowsize == 64 and neg.oack == (("windowsize", "64"),)
    # ... and kept within a sane number of bytes in flight for big blocks.
    neg = negotiate((("blksize", "65464"), ("windowsize", "16")), 0)
    assert neg.windowsize * neg.blksize <= 128 * 1024
    assert ("windowsize", str(neg.windowsize)) in neg.oack


def test_oack_only_for_requested_and_known_options() -> None:
    s = ReadSession(rrq("f", ("tsize", "0"), ("multicast", ""), ("foo", "1")), BytesSource(b"ab"), 0.0)
    assert sent(s) == [OptionAck((("tsize", "2"),))]
    # Unknown options only: nothing to acknowledge, so no OACK (RFC 2347).
    s = ReadSession(rrq("f", ("foo", "1")), BytesSource(b"ab"), 0.0)
    assert sent(s) == [Data(1, b"ab")]


def test_option_names_are_case_insensitive_and_first_wins() -> None:
    s = ReadSession(
        rrq("f", ("BlkSize", "1000"), ("blksize", "2000"), ("TSIZE", "0")), BytesSource(b"a"), 0.0
    )
    assert sent(s) == [OptionAck((("BlkSize", "1000"), ("TSIZE", "1")))]
    assert s.blksize == 1000


def test_block_numbers_roll_over_after_65535() -> None:
    # 70,000 blocks of 8 bytes: block 65535 is followed by block 0, then 1.
    data = payload(8 * 70_000 + 3)
    got, blocks = download(ReadSession(rrq("f", ("blksize", "8")), BytesSource(data), 0.0))
    assert got == data
    i = blocks.index(65535)
    assert blocks[i + 1 : i + 3] == [0, 1]
    assert len(blocks) == 70_001


def test_rollover_with_windows() -> None:
    data = payload(8 * 66_000)
    s = ReadSession(rrq("f", ("blksize", "8"), ("windowsize", "5")), BytesSource(data), 0.0)
    got, blocks = download(s, prepare=True)
    assert got == data and blocks.count(0) == 1


def test_timeout_retransmits_then_gives_up() -> None:
    data = payload(2000)
    s = ReadSession(rrq(), BytesSource(data), 0.0, timeout=2.0, max_retries=3)
    assert sent(s) == [Data(1, data[:512])]
    now = 0.0
    for _ in range(3):
        assert s.get_timer() == now + 2.0
        s.handle_timer(now + 1.0)  # early: nothing
        assert sent(s) == []
        now += 2.0
        s.handle_timer(now)
        assert sent(s, now) == [Data(1, data[:512])]
    now += 2.0
    s.handle_timer(now)
    assert sent(s, now) == []
    assert s.done and s.outcome is Outcome.TIMED_OUT and s.get_timer() is None
    assert s.retransmissions == 3


def test_progress_resets_the_retry_count() -> None:
    data = payload(5000)
    s = ReadSession(rrq(), BytesSource(data), 0.0, timeout=1.0, max_retries=1)
    sent(s)
    s.handle_timer(1.0)
    assert sent(s, 1.0) == [Data(1, data[:512])]
    assert ack(s, 1, 1.5) == [Data(2, data[512:1024])]
    s.handle_timer(2.5)
    assert sent(s, 2.5) == [Data(2, data[512:1024])]  # a fresh retry budget
    assert not s.done


def test_duplicate_ack_is_not_answered() -> None:
    # Sorcerer's Apprentice (RFC 1123 §4.2.3.1): only the timer retransmits.
    data = payload(3000)
    s = ReadSession(rrq(), BytesSource(data), 0.0)
    sent(s)
    assert ack(s, 1) == [Data(2, data[512:1024])]
    assert ack(s, 1) == []
    assert ack(s, 1) == []
    assert ack(s, 2) == [Data(3, data[1024:1536])]


def test_duplicate_ack_zero_after_oack_is_not_answered() -> None:
    s = ReadSession(rrq("f", ("tsize", "0")), BytesSource(payload(2000)), 0.0)
    sent(s)
    assert len(ack(s, 0)) == 1
    assert ack(s, 0) == []


def test_stale_or_future_acks_are_ignored() -> None:
    s = ReadSession(rrq(), BytesSource(payload(3000)), 0.0)
    sent(s)
    assert ack(s, 5) == []  # never sent
    assert ack(s, 65535) == []  # "before" block 1
    assert not s.done


def test_window_resumes_after_the_acknowledged_block() -> None:
    # RFC 7440 §4: an ACK for a block before the last one sent restarts the
    # window right after it.
    data = payload(512 * 20)
    s = ReadSession(rrq("f", ("windowsize", "4")), BytesSource(data), 0.0)
    sent(s)
    assert [d.block for d in ack(s, 0)] == [1, 2, 3, 4]  # type: ignore[attr-defined]
    s.prepare_next()  # speculative build of 5..8 must not leak into the resend
    resent = ack(s, 2)
    assert resent == [Data(b, data[(b - 1) * 512 : b * 512]) for b in (3, 4, 5, 6)]
    assert ack(s, 2) == []  # the same ACK again is a duplicate: no resend
    assert [d.block for d in ack(s, 6)] == [7, 8, 9, 10]  # type: ignore[attr-defined]


def test_window_timeout_resends_the_window_from_the_last_ack() -> None:
    data = payload(512 * 20)
    s = ReadSession(rrq("f", ("windowsize", "4")), BytesSource(data), 0.0, timeout=1.0)
    sent(s)
    ack(s, 0)
    ack(s, 4)  # window 5..8 out
    s.prepare_next()
    s.handle_timer(1.0)
    assert [d.block for d in sent(s, 1.0)] == [5, 6, 7, 8]  # type: ignore[attr-defined]


def test_error_8_after_oack_ends_silently() -> None:
    s = ReadSession(rrq("f", ("tsize", "0")), BytesSource(payload(10_000)), 0.0)
    assert sent(s) == [OptionAck((("tsize", "10000"),))]
    s.receive_datagram(encode(Error(ErrorCode.OPTION_NEGOTIATION, "abort")), 0.1)
    assert s.done and s.outcome is Outcome.OPTIONS_REFUSED
    assert sent(s) == [] and s.get_timer() is None
    s.handle_timer(100.0)
    assert sent(s) == []


def test_client_error_during_data_ends_the_transfer() -> None:
    s = ReadSession(rrq(), BytesSource(payload(10_000)), 0.0)
    sent(s)
    s.receive_datagram(encode(Error(0, "disk full")), 0.1)
    assert s.outcome is Outcome.CLIENT_ERROR and s.error == Error(0, "disk full")
    assert sent(s) == []


def test_stray_packets_are_ignored_and_garbage_raises() -> None:
    s = ReadSession(rrq(), BytesSource(payload(1000)), 0.0)
    sent(s)
    for stray in (Data(1, b"x"), rrq("g"), OptionAck(())):
        s.receive_datagram(encode(stray), 0.0)
        assert sent(s) == []
    for garbage in (b"", b"\x00", b"\x00\x09", b"\x00\x04\x00"):
        with pytest.raises(MalformedPacket):
            s.receive_datagram(garbage, 0.0)
    assert ack(s, 1) == [Data(2, payload(1000)[512:])]


class _FailingSource:
    def __init__(self, exc: OSError, size: int = 10_000) -> None:
        self.exc = exc
        self.size = size
        self.calls = 0

    def readinto(self, views: Sequence[memoryview], offset: int) -> int:
        self.calls += 1
        raise self.exc


def test_read_error_sends_error_0() -> None:
    s = ReadSession(rrq(), _FailingSource(OSError(5, "Input/output error")), 0.0)
    pkts = sent(s)
    assert len(pkts) == 1 and isinstance(pkts[0], Error) and pkts[0].code == 0
    assert s.outcome is Outcome.READ_FAILED


def test_not_ready_source_keeps_the_request_pending() -> None:
    src = _FailingSource(BlockingIOError(11, "later"))
    s = ReadSession(rrq(), src, 0.0)
    with pytest.raises(BlockingIOError):
        s.take_burst()
    with pytest.raises(BlockingIOError):
        s.take_burst()
    assert src.calls == 2 and not s.done
    s._source = BytesSource(payload(10_000))  # the data arrived
    assert sent(s) == [Data(1, payload(10_000)[:512])]


def test_classify_request() -> None:
    assert classify_request(encode(rrq("a"))) == rrq("a")
    assert classify_request(encode(rrq("a", mode="NetASCII"))) == rrq("a", mode="NetASCII")
    wrq = encode(packet_mod.WriteRequest("a", "octet"))
    err = classify_request(wrq)
    assert isinstance(err, Error) and err.code == ErrorCode.ACCESS_VIOLATION
    err = classify_request(encode(rrq("a", mode="mail")))
    assert isinstance(err, Error) and err.code == ErrorCode.ILLEGAL_OPERATION
    assert classify_request(encode(Ack(1))) is None


@pytest.mark.parametrize("module", [session_mod, packet_mod])
def test_protocol_core_does_no_io(module: object) -> None:
    tree = ast.parse(Path(module.__file__).read_text())  # type: ignore[attr-defined]
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"socket", "asyncio", "time", "os", "selectors"}


# -- the lean ACK path (expected_ack / ack_and_next) ----------------------------------


def lean_feed(s: ReadSession, data: bytes, now: float) -> list[bytes]:
    """What the adapter does with one datagram; returns what it then sends.

    Exactly the expected ACK goes the lean way (ack_and_next, then take_burst
    only if that returned None, then prepare_next if read_due); anything else
    through receive_datagram + take_burst.
    """
    if len(data) == 4:
        half = memoryview(data).cast("H")
        if half[1] == s.expected_ack and half[0] == ACK_OPCODE_HALFWORD:
            view = s.ack_and_next(now)
            if view is not None:
                out = [bytes(view)]
                if s.read_due:
                    s.prepare_next()
                return out
            return s.datagrams_to_send(now)
    with contextlib.suppress(MalformedPacket):
        s.receive_datagram(data, now)
    return s.datagrams_to_send(now)


def generic_feed(s: ReadSession, data: bytes, now: float) -> list[bytes]:
    with contextlib.suppress(MalformedPacket):
        s.receive_datagram(data, now)
    out = s.datagrams_to_send(now)
    s.prepare_next()
    return out


def state(s: ReadSession) -> tuple[object, ...]:
    return (s.outcome, s.acked_blocks, s.get_timer(), s.retransmissions, s.done, s.error)


def test_ack_halfwords_read_the_wire_bytes() -> None:
    for block in (0, 1, 255, 256, 0x1234, 65535, 65536 + 7):
        raw = encode(Ack(block & 0xFFFF))
        half = memoryview(raw).cast("H")
        assert (half[0], half[1]) == ack_halfwords(block)
        assert half[0] == ACK_OPCODE_HALFWORD


def test_expected_ack_follows_lock_step_blocks_but_never_the_last() -> None:
    data = payload(512 * 3 + 10)  # blocks 1..4, 4 is the short last one
    s = ReadSession(rrq(), BytesSource(data), 0.0)
    assert s.expected_ack == NO_EXPECTED_ACK  # nothing sent yet
    assert sent(s) == [Data(1, data[:512])]
    assert s.expected_ack == ack_halfwords(1)[1]
    view = s.ack_and_next(0.5)
    assert view is not None and parse(view) == Data(2, data[512:1024])
    assert s.acked_blocks == 1 and s.get_timer() == 1.5
    assert s.expected_ack == ack_halfwords(2)[1]
    view = s.ack_and_next(0.6)
    assert view is not None and parse(view) == Data(3, data[1024:1536])
    # Block 4 is the last: its DATA goes out the generic way, and its ACK
    # (which completes the transfer) must too.
    assert s.ack_and_next(0.7) is None
    assert sent(s) == [Data(4, data[1536:])]
    assert s.expected_ack == NO_EXPECTED_ACK
    assert ack(s, 4) == [] and s.outcome is Outcome.COMPLETE
    assert s.expected_ack == NO_EXPECTED_ACK


def test_expected_ack_is_unset_for_windows_oack_and_after_the_end() -> None:
    s = ReadSession(rrq("f", ("windowsize", "4")), BytesSource(payload(5000)), 0.0)
    sent(s)  # the OACK
    assert s.expected_ack == NO_EXPECTED_ACK
    ack(s, 0)
    assert s.expected_ack == NO_EXPECTED_ACK  # a window is out: generic ACKs only
    s = ReadSession(rrq("f", ("tsize", "0")), BytesSource(payload(5000)), 0.0)
    sent(s)
    assert s.expected_ack == NO_EXPECTED_ACK  # OACK out, ACK 0 goes the generic way
    ack(s, 0)
    assert s.expected_ack == ack_halfwords(1)[1]
    s.receive_datagram(encode(Error(0, "bye")), 0.1)
    assert s.done and s.expected_ack == NO_EXPECTED_ACK


def test_lean_ack_restarts_the_clock_and_the_retry_budget() -> None:
    data = payload(5000)
    s = ReadSession(rrq(), BytesSource(data), 0.0, timeout=1.0, max_retries=1)
    sent(s)
    s.handle_timer(1.0)
    assert sent(s, 1.0) == [Data(1, data[:512])]  # the one retry allowed
    view = s.ack_and_next(1.5)
    assert view is not None and parse(view) == Data(2, data[512:1024])
    assert s.get_timer() == 2.5
    s.handle_timer(2.4)
    assert sent(s, 2.4) == []
    s.handle_timer(2.5)
    assert sent(s, 2.5) == [Data(2, data[512:1024])]  # a fresh retry budget
    assert s.expected_ack == ack_halfwords(2)[1]  # the resend is lock-step too
    view = s.ack_and_next(2.6)
    assert view is not None and parse(view) == Data(3, data[1024:1536])
    assert not s.done


def test_lean_path_after_a_failed_speculative_read() -> None:
    # A speculative read that fails leaves no valid run: the lean path must
    # not serve stale bytes from the buffer but hand over to take_burst.
    data = payload(512 * 70)
    src = BytesSource(data)
    s = ReadSession(rrq(), src, 0.0)
    sent(s)
    for _ in range(63):
        assert s.ack_and_next(0.0) is not None
    assert s.read_due

    class Broken:
        size = len(data)

        def readinto(self, views: Sequence[memoryview], offset: int) -> int:
            raise OSError(5, "Input/output error")

    s._source = Broken()
    s.prepare_next()  # fails quietly: speculative
    assert s.ack_and_next(0.0) is None
    s._source = src
    assert sent(s) == [Data(65, data[64 * 512 : 65 * 512])]


def test_lean_path_hands_over_at_the_end_of_the_run_buffer() -> None:
    # 512-byte blocks: a run is 64 blocks; the lean path serves 2..64 from
    # it, says read_due when it hands out the run's last block, and once the
    # next run is read it goes on from there.
    data = payload(512 * 200)
    s = ReadSession(rrq(), BytesSource(data), 0.0)
    sent(s)
    for block in range(2, 65):
        view = s.ack_and_next(0.0)
        assert view is not None and parse(view) == Data(block, data[(block - 1) * 512 : block * 512])
        assert s.read_due is (block == 64)
    # Without prepare_next the run is exhausted: the generic path reads it.
    assert s.ack_and_next(0.0) is None
    assert s.expected_ack == NO_EXPECTED_ACK  # until that DATA is out
    assert sent(s) == [Data(65, data[64 * 512 : 65 * 512])]
    s.prepare_next()  # already in the buffer now: nothing to do
    view = s.ack_and_next(0.0)
    assert view is not None and parse(view) == Data(66, data[65 * 512 : 66 * 512])


def test_lean_path_rolls_over_block_numbers() -> None:
    data = payload(8 * 70_000)
    s = ReadSession(rrq("f", ("blksize", "8")), BytesSource(data), 0.0)
    out = bytearray()
    assert [parse(d) for d in s.datagrams_to_send(0.0)] == [OptionAck((("blksize", "8"),))]
    pkts = lean_feed(s, encode(Ack(0)), 0.0)
    lean = 0
    while not s.done:
        (raw,) = pkts
        pkt = parse(raw)
        assert isinstance(pkt, Data)
        out += pkt.data
        if s.expected_ack != NO_EXPECTED_ACK:
            lean += 1
        pkts = lean_feed(s, encode(Ack(pkt.block)), 0.0)
    assert bytes(out) == data and s.outcome is Outcome.COMPLETE
    assert lean > 69_000  # nearly every ACK took the lean path


_lean_actions = st.lists(
    st.one_of(
        st.tuples(st.just("ack_last"), st.integers(1, 80)),  # that many well-behaved ACKs
        st.tuples(st.just("ack_near"), st.integers(-3, 3)),  # duplicate, old or future ACK
        st.tuples(st.just("ack_padded"), st.none()),  # the right ACK with a trailing byte
        st.tuples(st.just("error"), st.integers(0, 8)),
        st.tuples(st.just("garbage"), st.binary(max_size=6)),
        st.tuples(st.just("tick"), st.floats(0, 3)),
    ),
    max_size=30,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    options=st.sampled_from([(), (("blksize", "8"),), (("blksize", "100"), ("tsize", "0")),
                             (("windowsize", "3"), ("blksize", "16")), (("windowsize", "1"),)]),
    size=st.integers(0, 9000),
    actions=_lean_actions,
)
def test_lean_path_behaves_exactly_like_the_generic_path(
    options: tuple[tuple[str, str], ...], size: int, actions: list[tuple[str, object]]
) -> None:
    data = payload(size)
    lean = ReadSession(rrq("f", *options), BytesSource(data), 0.0, timeout=1.0, max_retries=2)
    plain = ReadSession(rrq("f", *options), BytesSource(data), 0.0, timeout=1.0, max_retries=2)
    now = 0.0
    out = lean.datagrams_to_send(now)
    assert out == plain.datagrams_to_send(now)
    plain.prepare_next()
    last = 0
    for kind, arg in actions:
        feeds: list[bytes] = []
        if kind == "ack_last":
            feeds = [b""] * int(arg)  # type: ignore[call-overload]
        elif kind == "ack_near":
            feeds = [encode(Ack((last + int(arg)) & 0xFFFF))]  # type: ignore[call-overload]
        elif kind == "ack_padded":
            feeds = [encode(Ack(last)) + b"\x00"]
        elif kind == "error":
            feeds = [encode(Error(int(arg), "stop"))]  # type: ignore[call-overload]
        elif kind == "garbage":
            feeds = [arg]  # type: ignore[list-item]
        else:
            now += float(arg)  # type: ignore[arg-type]
            lean.handle_timer(now)
            plain.handle_timer(now)
            out = lean.datagrams_to_send(now)
            assert out == plain.datagrams_to_send(now)
            plain.prepare_next()
        for feed in feeds:
            if lean.done:
                break
            now += 0.01
            raw = feed or encode(Ack(last))
            out = lean_feed(lean, raw, now)
            assert out == generic_feed(plain, raw, now)
            assert state(lean) == state(plain)
            for d in out:
                pkt = parse(d)
                if isinstance(pkt, Data):
                    last = pkt.block
                elif isinstance(pkt, OptionAck):
                    last = 0
        assert state(lean) == state(plain)
