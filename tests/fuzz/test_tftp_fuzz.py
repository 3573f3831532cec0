"""Fuzzing the TFTP codec, the session and the service: garbage in gives a
parsed packet, a MalformedPacket, or a valid protocol reaction; never a crash.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobinux.boot import ResolvedFile
from mobinux.errors import MalformedPacket
from mobinux.paths import contained_file
from mobinux.tftp.aio import TftpService
from mobinux.tftp.packet import (
    Ack,
    Data,
    Error,
    OptionAck,
    ReadRequest,
    WriteRequest,
    encode,
    parse,
)
from mobinux.tftp.session import BytesSource, ReadSession, classify_request

SEEDS = [
    encode(ReadRequest("pxelinux.0", "octet", (("tsize", "0"), ("blksize", "1468")))),
    encode(ReadRequest("a/b", "netascii", (("windowsize", "8"), ("timeout", "2")))),
    encode(WriteRequest("x", "octet")),
    encode(Data(7, b"abc")),
    encode(Ack(0)),
    encode(Ack(65535)),
    encode(Error(8, "abort")),
    encode(OptionAck((("blksize", "512"),))),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "dup":
            data += data[pos:]
    return bytes(data)


datagrams = st.one_of(st.binary(max_size=80), mutated())


@settings(max_examples=800)
@given(datagrams)
def test_parse_gives_packet_or_malformed(data: bytes) -> None:
    try:
        pkt = parse(data)
    except MalformedPacket:
        return
    # Whatever parsed re-encodes to something that parses to the same thing.
    assert parse(encode(pkt)) == pkt


@settings(max_examples=800)
@given(datagrams)
def test_classify_request_never_crashes(data: bytes) -> None:
    try:
        decision = classify_request(data)
    except MalformedPacket:
        return
    assert decision is None or isinstance(decision, (ReadRequest, Error))


_actions = st.lists(
    st.one_of(
        st.tuples(st.just("ack"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("ack_near"), st.integers(-3, 20)),
        st.tuples(st.just("raw"), datagrams),
        st.tuples(st.just("tick"), st.floats(0, 3)),
        st.tuples(st.just("prepare"), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    options=st.lists(
        st.tuples(
            st.sampled_from(["blksize", "tsize", "timeout", "windowsize", "x", "BLKSIZE"]),
            st.sampled_from(["0", "1", "8", "100", "512", "65535", "99999999", "-1", "abc", ""]),
        ),
        max_size=4,
    ),
    size=st.integers(0, 5000),
    actions=_actions,
)
def test_session_reacts_validly_to_anything(
    options: list[tuple[str, str]], size: int, actions: list[tuple[str, object]]
) -> None:
    data = bytes(random.Random(size).randbytes(size))
    s = ReadSession(ReadRequest("f", "octet", tuple(options)), BytesSource(data), 0.0, max_retries=3)
    now = 0.0
    last_data = 0
    for kind, arg in [("start", None), *actions]:
        try:
            if kind == "ack":
                s.receive_datagram(encode(Ack(int(arg))), now)  # type: ignore[call-overload]
            elif kind == "ack_near":
                s.receive_datagram(encode(Ack((last_data + int(arg)) & 0xFFFF)), now)  # type: ignore[call-overload]
            elif kind == "raw":
                s.receive_datagram(arg, now)  # type: ignore[arg-type]
            elif kind == "tick":
                now += float(arg)  # type: ignore[arg-type]
                s.handle_timer(now)
            elif kind == "prepare":
                s.prepare_next()
        except MalformedPacket:
            pass
        out = [parse(d) for d in s.datagrams_to_send(now)]
        blocks = [p.block for p in out if isinstance(p, Data)]
        assert len(blocks) <= s.windowsize
        assert all(isinstance(p, (Data, OptionAck, Error)) for p in out)
        for a, b in itertools.pairwise(blocks):
            assert b == (a + 1) & 0xFFFF
        for p in out:
            if isinstance(p, Data):
                assert len(p.data) <= s.blksize
                last_data = p.block
        if s.done:
            assert s.get_timer() is None
            assert s.datagrams_to_send(now) == []


def test_service_survives_random_datagrams(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"payload" * 500)

    class Resolver:
        def resolve(self, name: str, client_ip: str, query: str = "") -> ResolvedFile | None:
            path = contained_file(tmp_path, name)
            return None if path is None else ResolvedFile(name=name, path=path)

    async def main() -> None:
        svc = TftpService(Resolver(), host="127.0.0.1", port=0, timeout=0.2, max_retries=1)
        loop = asyncio.get_running_loop()
        crashes: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _loop, ctx: crashes.append(ctx))
        await svc.start()
        rng = random.Random(1350)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        try:
            # Open one transfer so junk also reaches a per-transfer socket.
            sock.sendto(encode(ReadRequest("f", "octet", (("windowsize", "4"),))), ("127.0.0.1", svc.port))
            _, tid = await asyncio.wait_for(loop.sock_recvfrom(sock, 70_000), 2)
            for i in range(3000):  # bounded in count (and so in time)
                seed = bytearray(rng.choice(SEEDS))
                for _ in range(rng.randrange(4)):
                    if seed:
                        seed[rng.randrange(len(seed))] = rng.randrange(256)
                junk = bytes(seed[: rng.randrange(len(seed) + 1)]) if rng.random() < 0.5 else rng.randbytes(rng.randrange(40))
                sock.sendto(junk, tid if i % 2 else ("127.0.0.1", svc.port))
                if i % 100 == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(0.5)
            # Drain whatever came back, then check the service still serves.
            while True:
                try:
                    sock.recvfrom(70_000)
                except BlockingIOError:
                    break
            await asyncio.sleep(0.6)  # let any fuzz-started transfers time out
            while True:
                try:
                    sock.recvfrom(70_000)
                except BlockingIOError:
                    break
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.setblocking(False)
            client.bind(("127.0.0.1", 0))
            client.sendto(encode(ReadRequest("f", "octet")), ("127.0.0.1", svc.port))
            got = bytearray()
            while True:
                raw, addr = await asyncio.wait_for(loop.sock_recvfrom(client, 70_000), 2)
                pkt = parse(raw)
                assert isinstance(pkt, Data)
                got += pkt.data
                client.sendto(encode(Ack(pkt.block)), addr)
                if len(pkt.data) < 512:
                    break
            client.close()
            assert bytes(got) == b"payload" * 500
            assert crashes == []  # no callback ever raised
        finally:
            sock.close()
            await svc.close()

    asyncio.run(asyncio.wait_for(main(), 60))
