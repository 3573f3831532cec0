"""DhcpService over loopback (high ports): relay DORA, port 4011, garbage, commit order."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from mobinux.boot import BootOffer, BootRequest
from mobinux.dhcp.aio import DhcpService
from mobinux.dhcp.leases import LeaseState, read_leases
from mobinux.dhcp.packet import DhcpPacket, parse
from mobinux.dhcp.server import DhcpConfig

A = IPv4Address
MAC = bytes.fromhex("525400000001")


class Policy:
    def is_known(self, mac: str) -> bool:
        return True

    def fixed_address(self, mac: str) -> IPv4Address | None:
        return None

    def boot_offer(self, request: BootRequest) -> BootOffer | None:
        return BootOffer("pxelinux.0", A("127.0.0.1"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cfg(mode: str) -> DhcpConfig:
    return DhcpConfig(
        mode=mode,  # type: ignore[arg-type]
        server_ip=A("127.0.0.1"),
        subnet=IPv4Network("127.0.0.0/24"),
        pool_first=A("127.0.0.100"),
        pool_last=A("127.0.0.200"),
    )


@asynccontextmanager
async def service(
    tmp_path: Path, mode: str, steps: list[str] | None = None
) -> AsyncIterator[DhcpService]:
    svc = DhcpService(
        cfg(mode),
        "lo",
        Policy(),
        tmp_path / "leases.db",
        lambda m, i, s: steps.append(s) if steps is not None else None,
        logging.getLogger("test.dhcp"),
        server_port=free_port(),
        proxy_port=free_port(),
        client_port=free_port(),
        log_interval=3600,
    )
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


def udp(bind: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(bind)
    s.settimeout(3)
    return s


async def recv(s: socket.socket) -> tuple[bytes, tuple[str, int]]:
    data, addr = await asyncio.to_thread(s.recvfrom, 4096)
    return data, addr


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 20))


def test_relayed_dora_commits_before_ack(tmp_path: Path) -> None:
    async def main() -> None:
        steps: list[str] = []
        async with service(tmp_path, "full", steps) as svc:
            port = svc.server_port
            assert ("0.0.0.0", port) in svc.addresses
            relay = udp(("127.0.0.2", port))
            with relay:
                disc = DhcpPacket(xid=7, giaddr=A("127.0.0.2"), chaddr=MAC, options={53: b"\x01"})
                relay.sendto(disc.encode(), ("127.0.0.1", port))
                offer = parse((await recv(relay))[0])
                assert offer.message_type == 2 and offer.xid == 7
                ip = offer.yiaddr
                assert A("127.0.0.100") <= ip <= A("127.0.0.200")
                req = DhcpPacket(
                    xid=8,
                    giaddr=A("127.0.0.2"),
                    chaddr=MAC,
                    options={53: b"\x03", 54: A("127.0.0.1").packed, 50: ip.packed, 12: b"n1"},
                )
                relay.sendto(req.encode(), ("127.0.0.1", port))
                ack = parse((await recv(relay))[0])
                assert ack.message_type == 5 and ack.yiaddr == ip
                # The lease was durable before the ACK left.
                leases = read_leases(tmp_path / "leases.db")
                assert [(x.ip, x.mac, x.hostname, x.state) for x in leases] == [
                    (ip, "52:54:00:00:00:01", "n1", LeaseState.BOUND)
                ]
            assert steps == [f"dhcp-offer {ip}", f"dhcp-ack {ip}"]

        # Restart: the lease is still there and the client gets its address back.
        async with service(tmp_path, "full") as svc:
            assert svc.leases is not None
            assert svc.leases.by_client(b"\x01" + MAC) is not None

    run(main)


def test_proxy_4011_ack_unicast_to_source(tmp_path: Path) -> None:
    async def main() -> None:
        async with service(tmp_path, "proxy") as svc:
            assert {p for _, p in svc.addresses} == {svc.server_port, svc.proxy_port}
            client = udp(("127.0.0.1", 0))
            with client:
                req = DhcpPacket(
                    xid=9,
                    ciaddr=A("127.0.0.55"),
                    chaddr=MAC,
                    options={53: b"\x03", 60: b"PXEClient:Arch:00000:UNDI:002001"},
                )
                client.sendto(req.encode(), ("127.0.0.1", svc.proxy_port))
                data, addr = await recv(client)
                assert addr == ("127.0.0.1", svc.proxy_port)  # from the boot-server port
                ack = parse(data)
                assert ack.message_type == 5 and ack.file == b"pxelinux.0" and ack.yiaddr == A(0)

    run(main)


def test_garbage_is_counted_and_service_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with service(tmp_path, "proxy") as svc:
            client = udp(("127.0.0.1", 0))
            with client:
                for i in range(50):
                    client.sendto(b"\x01junk" * i, ("127.0.0.1", svc.proxy_port))
                req = DhcpPacket(
                    xid=10,
                    ciaddr=A("127.0.0.55"),
                    chaddr=MAC,
                    options={53: b"\x08", 60: b"PXEClient"},
                )
                client.sendto(req.encode(), ("127.0.0.1", svc.proxy_port))
                ack = parse((await recv(client))[0])
                assert ack.xid == 10
            assert svc.stats["malformed"] == 50
            assert svc.stats["received"] == 51

    with caplog.at_level(logging.WARNING, logger="test.dhcp"):
        run(main)
    # Rate-limited: one line for 50 bad packets.
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 1


def test_broadcast_reply_without_route_does_not_crash(tmp_path: Path) -> None:
    async def main() -> None:
        async with service(tmp_path, "full") as svc:
            client = udp(("127.0.0.1", 0))
            with client:
                disc = DhcpPacket(xid=11, chaddr=MAC, options={53: b"\x01"})
                for _ in range(3):
                    client.sendto(disc.encode(), ("127.0.0.1", svc.server_port))
                for _ in range(100):
                    await asyncio.sleep(0.02)
                    if svc.stats["sent"] + svc.stats["send_errors"] >= 3:
                        break
                assert svc.stats["sent"] + svc.stats["send_errors"] == 3
                assert svc.stats["errors"] == 0

    run(main)


def test_off_mode_binds_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        async with service(tmp_path, "off") as svc:
            assert svc.addresses == []
        assert not (tmp_path / "leases.db").exists()

    run(main)


def test_port_in_use_is_a_local_error(tmp_path: Path) -> None:
    from mobinux.errors import LocalError

    async def main() -> None:
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        blocker.bind(("0.0.0.0", 0))
        port = blocker.getsockname()[1]
        svc = DhcpService(
            cfg("full"), "lo", Policy(), tmp_path / "l.db", lambda *a: None, server_port=port
        )
        with blocker, pytest.raises(LocalError):
            await svc.start()
        await svc.close()

    run(main)


def test_failed_commit_withholds_the_ack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mobinux.dhcp.leases import Lease
    from mobinux.errors import LocalError

    async def main() -> None:
        async with service(tmp_path, "full") as svc:
            store = svc._store
            assert store is not None
            real = store.commit
            calls: list[int] = []

            def flaky(rows: Any) -> None:
                rows = list(rows)
                calls.append(len(rows))
                if len(calls) == 1:
                    raise LocalError("disk full")
                real(rows)

            monkeypatch.setattr(store, "commit", flaky)
            port = svc.server_port
            relay = udp(("127.0.0.2", port))
            with relay:
                disc = DhcpPacket(xid=1, giaddr=A("127.0.0.2"), chaddr=MAC, options={53: b"\x01"})
                relay.sendto(disc.encode(), ("127.0.0.1", port))
                ip = parse((await recv(relay))[0]).yiaddr
                req = DhcpPacket(
                    xid=2,
                    giaddr=A("127.0.0.2"),
                    chaddr=MAC,
                    options={53: b"\x03", 54: A("127.0.0.1").packed, 50: ip.packed},
                )
                relay.sendto(req.encode(), ("127.0.0.1", port))
                relay.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    await recv(relay)  # not durable -> no ACK
                relay.settimeout(3)
                relay.sendto(req.encode(), ("127.0.0.1", port))  # the client retries
                ack = parse((await recv(relay))[0])
                assert ack.message_type == 5 and ack.yiaddr == ip
            assert calls == [1, 1]
            leases: list[Lease] = read_leases(tmp_path / "leases.db")
            assert [x.ip for x in leases] == [ip]

    run(main)
