"""Fuzz the DHCP codec and core: garbage gives MalformedPacket or replies, nothing else."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobinux.boot import BootOffer, BootRequest
from mobinux.dhcp.constants import MAGIC_COOKIE
from mobinux.dhcp.leases import LeaseTable
from mobinux.dhcp.packet import DhcpPacket, parse
from mobinux.dhcp.server import DhcpConfig, DhcpServerCore, Reply
from mobinux.errors import MalformedPacket

A = IPv4Address
SERVER = A("10.77.0.1")


class Policy:
    def is_known(self, mac: str) -> bool:
        return not mac.endswith("ff")

    def fixed_address(self, mac: str) -> IPv4Address | None:
        return A("10.77.0.20") if mac.endswith("01") else None

    def boot_offer(self, request: BootRequest) -> BootOffer | None:
        if request.arch == 5:
            return None
        name = "x" * 300 if request.arch == 9 else "pxelinux.0"
        return BootOffer(name, A("10.77.0.2"))


def core(mode: str, deny: bool = False) -> DhcpServerCore:
    cfg = DhcpConfig(
        mode=mode,  # type: ignore[arg-type]
        server_ip=SERVER,
        subnet=IPv4Network("10.77.0.0/24"),
        pool_first=A("10.77.0.100"),
        pool_last=A("10.77.0.110"),
        routers=(A("10.77.0.254"),),
        dns_servers=(A("10.77.0.53"),),
        domain="lab.test",
        deny_unknown=deny,
    )
    return DhcpServerCore(cfg, Policy(), LeaseTable(cfg.pool_first, cfg.pool_last), lambda *a: None)


CORES = [core("full"), core("proxy"), core("full", deny=True)]
PORTS = st.sampled_from([67, 4011, 68])
SRC = st.sampled_from([("0.0.0.0", 68), ("10.77.0.105", 68), ("10.77.0.105", 4011)])


def check(data: bytes, port: int, src: tuple[str, int], now: float) -> None:
    for c in CORES:
        try:
            out = c.handle(data, port, src, now)
        except MalformedPacket:
            continue
        assert isinstance(out, list)
        for r in out:
            assert isinstance(r, Reply)
            assert parse(r.data) == r.packet  # every reply we emit parses back
            assert len(r.data) <= 1500 - 28


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700))
def test_random_bytes_into_parse(data: bytes) -> None:
    try:
        p = parse(data)
    except MalformedPacket:
        return
    assert isinstance(p, DhcpPacket)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), PORTS, SRC)
def test_random_options_into_core(tail: bytes, port: int, src: tuple[str, int]) -> None:
    head = bytearray(236)
    head[0] = 1
    head[1] = 1
    head[2] = 6
    check(bytes(head) + MAGIC_COOKIE + tail, port, src, 1e9)


mac_tails = st.sampled_from([b"\x01", b"\x02", b"\x03", b"\xff"])
vendor = st.sampled_from(
    [b"PXEClient:Arch:00000:UNDI:002001", b"HTTPClient:Arch:00016", b"other", b""]
)


@st.composite
def valid_requests(draw: st.DrawFn) -> DhcpPacket:
    opts: dict[int, bytes] = {53: bytes([draw(st.integers(0, 9))])}
    for code, strat in [
        (60, vendor),
        (
            50,
            st.sampled_from(
                [A("10.77.0.100").packed, A("10.77.0.20").packed, b"\x01\x02", A("1.2.3.4").packed]
            ),
        ),
        (54, st.sampled_from([SERVER.packed, A("10.77.0.9").packed, b""])),
        (55, st.binary(max_size=40)),
        (57, st.sampled_from([b"\x02\x40", b"\x05\xdc", b"\x00\x10", b"\x01"])),
        (61, st.binary(max_size=20)),
        (77, st.sampled_from([b"iPXE", b"\x04iPXE", b"x"])),
        (82, st.binary(max_size=30)),
        (93, st.sampled_from([b"\x00\x00", b"\x00\x07", b"\x00\x05", b"\x00\x09", b"\x07", b""])),
        (97, st.sampled_from([bytes(17), b"\x00" * 3, b"\x01" + bytes(16)])),
        (175, st.binary(max_size=5)),
        (12, st.binary(max_size=30)),
    ]:
        if draw(st.booleans()):
            opts[code] = draw(strat)
    return DhcpPacket(
        op=draw(st.sampled_from([1, 1, 1, 2])),
        hlen=draw(st.sampled_from([6, 6, 0, 17, 16])),
        xid=draw(st.integers(0, 2**32 - 1)),
        flags=draw(st.sampled_from([0, 0x8000])),
        ciaddr=draw(st.sampled_from([A(0), A("10.77.0.100"), A("10.77.0.105"), A("8.8.8.8")])),
        giaddr=draw(st.sampled_from([A(0), A(0), A("10.77.0.250"), A("192.168.1.1")])),
        chaddr=b"\x52\x54\x00\x00\x00" + draw(mac_tails),
        options=opts,
    )


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(valid_requests(), min_size=1, max_size=6), PORTS, SRC, st.floats(0, 1e10))
def test_valid_sequences_into_core(
    pkts: list[DhcpPacket], port: int, src: tuple[str, int], now: float
) -> None:
    for p in pkts:
        check(p.encode(), port, src, now)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(
    valid_requests(),
    st.lists(st.tuples(st.integers(0, 599), st.integers(0, 255)), max_size=8),
    PORTS,
    SRC,
)
def test_mutated_packets_into_core(
    p: DhcpPacket, flips: list[tuple[int, int]], port: int, src: tuple[str, int]
) -> None:
    data = bytearray(p.encode())
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    check(bytes(data), port, src, 1e9)
    # Truncations too.
    for cut in (len(data) - 1, 241, 239):
        check(bytes(data[:cut]), port, src, 1e9)
