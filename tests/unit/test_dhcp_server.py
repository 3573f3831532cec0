"""DhcpServerCore: every RFC 2131 §4.3 path, PXE / proxy behaviour, relays.

The core is driven with encoded packets and a fake clock; replies are parsed
back, so these tests exercise the codec too.
"""

from __future__ import annotations

import ast
import struct
import uuid
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from mobinux.boot import BootOffer, BootRequest
from mobinux.dhcp.constants import FLAG_BROADCAST, MessageType
from mobinux.dhcp.leases import LeaseState, LeaseTable
from mobinux.dhcp.packet import ZERO, DhcpPacket, parse
from mobinux.dhcp.server import DhcpConfig, DhcpServerCore, Reply
from mobinux.errors import ConfigError, MalformedPacket

A = IPv4Address
SERVER = A("10.77.0.1")
NEXT = A("10.77.0.2")
MAC1 = "52:54:00:00:00:01"
MAC2 = "52:54:00:00:00:02"
T0 = 1_700_000_000.0
PXE_BIOS = b"PXEClient:Arch:00000:UNDI:002001"
PXE_EFI = b"PXEClient:Arch:00007:UNDI:003010"


@dataclass
class FakePolicy:
    known: set[str] | None = None
    fixed: dict[str, IPv4Address] = field(default_factory=dict)
    filename: str | None = "pxelinux.0"
    by_arch: dict[int, str] = field(default_factory=dict)
    requests: list[BootRequest] = field(default_factory=list)

    def is_known(self, mac: str) -> bool:
        return self.known is None or mac in self.known

    def fixed_address(self, mac: str) -> IPv4Address | None:
        return self.fixed.get(mac)

    def boot_offer(self, request: BootRequest) -> BootOffer | None:
        self.requests.append(request)
        if self.filename is None:
            return None
        name = self.by_arch.get(request.arch or 0, self.filename)
        if request.is_ipxe:
            name = f"http://{NEXT}/boot.ipxe"
        return BootOffer(name, NEXT)


@dataclass
class OwnersPolicy(FakePolicy):
    def fixed_owner(self, ip: IPv4Address) -> str | None:
        for mac, a in self.fixed.items():
            if a == ip:
                return mac
        return None


def config(mode: str = "full", **kw: object) -> DhcpConfig:
    base: dict[str, object] = {
        "mode": mode,
        "server_ip": SERVER,
        "subnet": IPv4Network("10.77.0.0/24"),
        "pool_first": A("10.77.0.100"),
        "pool_last": A("10.77.0.199"),
        "routers": (A("10.77.0.254"),),
        "dns_servers": (A("10.77.0.53"),),
        "domain": "lab.test",
        "lease_time": 3600,
    }
    base.update(kw)
    return DhcpConfig(**base)  # type: ignore[arg-type]


class Rig:
    def __init__(self, cfg: DhcpConfig | None = None, policy: FakePolicy | None = None) -> None:
        self.cfg = cfg or config()
        self.policy = policy or FakePolicy()
        self.leases = LeaseTable(self.cfg.pool_first, self.cfg.pool_last)
        self.steps: list[tuple[str | None, str | None, str]] = []
        self.core = DhcpServerCore(
            self.cfg, self.policy, self.leases, lambda m, i, s: self.steps.append((m, i, s))
        )
        self.now = T0

    def send(
        self, pkt: DhcpPacket, port: int = 67, src: tuple[str, int] = ("0.0.0.0", 68)
    ) -> list[Reply]:
        return self.core.handle(pkt.encode(), port, src, self.now)

    def one(
        self, pkt: DhcpPacket, port: int = 67, src: tuple[str, int] = ("0.0.0.0", 68)
    ) -> DhcpPacket:
        replies = self.send(pkt, port, src)
        assert len(replies) == 1, replies
        reply = parse(replies[0].data)
        assert reply == replies[0].packet
        return reply

    def dora(self, mac: str = MAC1, **kw: object) -> IPv4Address:
        offer = self.one(discover(mac, **kw))  # type: ignore[arg-type]
        assert offer.message_type == MessageType.DHCPOFFER
        ack = self.one(request(mac, offer.yiaddr, server=SERVER, **kw))
        assert ack.message_type == MessageType.DHCPACK
        assert ack.yiaddr == offer.yiaddr
        return ack.yiaddr


def chaddr(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def msg(
    mtype: int,
    mac: str = MAC1,
    *,
    xid: int = 0x1234,
    ciaddr: IPv4Address = ZERO,
    giaddr: IPv4Address = ZERO,
    options: dict[int, bytes] | None = None,
    vendor: bytes | None = None,
    flags: int = 0,
) -> DhcpPacket:
    opts: dict[int, bytes] = {53: bytes([mtype])}
    if vendor is not None:
        opts[60] = vendor
    opts.update(options or {})
    return DhcpPacket(
        xid=xid, ciaddr=ciaddr, giaddr=giaddr, chaddr=chaddr(mac), flags=flags, options=opts
    )


def discover(mac: str = MAC1, *, requested: IPv4Address | None = None, **kw: object) -> DhcpPacket:
    p = msg(MessageType.DHCPDISCOVER, mac, **kw)  # type: ignore[arg-type]
    if requested is not None:
        p.options[50] = requested.packed
    return p


def request(
    mac: str = MAC1,
    requested: IPv4Address | None = None,
    *,
    server: IPv4Address | None = None,
    **kw: object,
) -> DhcpPacket:
    p = msg(MessageType.DHCPREQUEST, mac, **kw)  # type: ignore[arg-type]
    if server is not None:
        p.options[54] = server.packed
    if requested is not None:
        p.options[50] = requested.packed
    return p


def u32(b: bytes) -> int:
    return int(struct.unpack("!I", b)[0])


# -- config ------------------------------------------------------------------------


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        config(mode="maybe")
    with pytest.raises(ConfigError):
        config(pool_first=A("10.78.0.1"))
    with pytest.raises(ConfigError):
        config(pool_first=A("10.77.0.200"), pool_last=A("10.77.0.100"))
    with pytest.raises(ConfigError):
        config(pool_last=None)
    with pytest.raises(ConfigError):
        config(lease_time=5)


# -- DORA --------------------------------------------------------------------------


def test_discover_offer_options_and_destination() -> None:
    rig = Rig()
    replies = rig.send(discover(options={55: bytes([15, 6, 3, 1])}))
    assert len(replies) == 1
    r = replies[0]
    assert r.dest == ("255.255.255.255", 68) and r.broadcast
    offer = parse(r.data)
    assert offer.op == 2 and offer.xid == 0x1234
    assert offer.message_type == MessageType.DHCPOFFER
    assert rig.cfg.pool_first is not None and rig.cfg.pool_last is not None
    assert rig.cfg.pool_first <= offer.yiaddr <= rig.cfg.pool_last
    o = offer.options
    assert o[54] == SERVER.packed
    assert u32(o[51]) == 3600 and u32(o[58]) == 1800 and u32(o[59]) == 3150
    assert o[1] == b"\xff\xff\xff\x00"
    assert o[3] == A("10.77.0.254").packed
    assert o[6] == A("10.77.0.53").packed
    assert o[15] == b"lab.test"
    # RFC 2132 §9.8: requested parameters in the client's order.
    keys = [k for k in o if k in (1, 3, 6, 15)]
    assert keys == [15, 6, 3, 1]
    assert 60 not in o and 67 not in o and offer.file == b""  # not a PXE client
    assert rig.steps == [(MAC1, str(offer.yiaddr), f"dhcp-offer {offer.yiaddr}")]


def test_full_dora_binds_lease() -> None:
    rig = Rig()
    offer = rig.one(discover(options={12: b"node1"}))
    # The offer only reserves (not persisted).
    assert rig.leases.take_dirty() == []
    held = rig.leases.by_ip(offer.yiaddr)
    assert held is not None and held.state is LeaseState.OFFERED
    ack = rig.one(request(requested=offer.yiaddr, server=SERVER, options={12: b"node1"}))
    assert ack.message_type == MessageType.DHCPACK
    assert ack.yiaddr == offer.yiaddr
    dirty = rig.leases.take_dirty()
    assert len(dirty) == 1
    lease = dirty[0]
    assert lease.ip == offer.yiaddr and lease.mac == MAC1 and lease.hostname == "node1"
    assert lease.state is LeaseState.BOUND and lease.expires == T0 + 3600
    assert rig.steps[-1] == (MAC1, str(ack.yiaddr), f"dhcp-ack {ack.yiaddr}")


def test_two_clients_get_different_addresses_and_keep_them() -> None:
    rig = Rig()
    a = rig.dora(MAC1)
    b = rig.dora(MAC2)
    assert a != b
    rig.now += 10
    assert rig.one(discover(MAC1)).yiaddr == a
    assert rig.one(discover(MAC2)).yiaddr == b


def test_client_identifier_keys_the_lease() -> None:
    rig = Rig()
    a = rig.dora(MAC1, options={61: b"\x00my-client"})
    # The same client id on another NIC keeps its address.
    assert rig.one(discover(MAC2, options={61: b"\x00my-client"})).yiaddr == a
    # The same MAC with another client id is another client.
    assert rig.one(discover(MAC1, options={61: b"\x00other"})).yiaddr != a


def test_requested_address_preferred_when_free() -> None:
    rig = Rig()
    want = A("10.77.0.150")
    assert rig.one(discover(requested=want)).yiaddr == want
    # Outside the pool or not free: something else.
    assert rig.one(discover(MAC2, requested=A("10.77.0.20"))).yiaddr != A("10.77.0.20")
    assert rig.one(discover(MAC2, requested=want)).yiaddr != want


def test_previous_address_survives_expiry() -> None:
    rig = Rig()
    a = rig.dora(MAC1)
    rig.now += 7200  # lease expired
    assert rig.one(discover(MAC1)).yiaddr == a


def test_offer_expires_and_address_is_reused() -> None:
    rig = Rig(config(pool_first=A("10.77.0.100"), pool_last=A("10.77.0.100")))
    a = rig.one(discover(MAC1)).yiaddr
    assert rig.send(discover(MAC2)) == []  # reserved by the offer
    rig.now += 61
    assert rig.one(discover(MAC2)).yiaddr == a


def test_pool_exhaustion() -> None:
    rig = Rig(config(pool_first=A("10.77.0.100"), pool_last=A("10.77.0.102")))
    got = {rig.dora(f"52:54:00:00:01:{i:02x}") for i in range(3)}
    assert len(got) == 3
    assert rig.send(discover("52:54:00:00:01:99")) == []
    # Released address becomes available again.
    ip = sorted(got)[0]
    lease = rig.leases.by_ip(ip)
    assert lease is not None
    owner = lease.mac
    rig.send(msg(MessageType.DHCPRELEASE, owner, ciaddr=ip, options={54: SERVER.packed}))
    assert rig.one(discover("52:54:00:00:01:99")).yiaddr == ip


def test_server_and_router_addresses_never_leased() -> None:
    rig = Rig(
        config(pool_first=A("10.77.0.1"), pool_last=A("10.77.0.3"), routers=(A("10.77.0.2"),))
    )
    assert rig.dora(MAC1) == A("10.77.0.3")
    assert rig.send(discover(MAC2)) == []


def test_allocation_does_not_scan_the_pool() -> None:
    # A /16 pool: thousands of allocations stay fast (cursor + heap, no scan).
    cfg = config(
        subnet=IPv4Network("10.80.0.0/16"),
        server_ip=A("10.80.0.1"),
        pool_first=A("10.80.1.0"),
        pool_last=A("10.80.255.254"),
        routers=(),
        dns_servers=(),
    )
    rig = Rig(cfg)
    seen = set()
    for i in range(3000):
        offer = rig.one(discover(f"52:54:00:01:{i >> 8:02x}:{i & 255:02x}"))
        seen.add(offer.yiaddr)
    assert len(seen) == 3000


# -- REQUEST states (RFC 2131 §4.3.2) ------------------------------------------------


def test_request_for_another_server_is_ignored_and_frees_offer() -> None:
    rig = Rig(config(pool_first=A("10.77.0.100"), pool_last=A("10.77.0.100")))
    offer = rig.one(discover(MAC1))
    assert rig.send(request(MAC1, offer.yiaddr, server=A("10.77.0.9"))) == []
    assert rig.one(discover(MAC2)).yiaddr == offer.yiaddr  # our offer was withdrawn


def test_selecting_address_taken_by_another_is_naked() -> None:
    rig = Rig()
    a = rig.dora(MAC1)
    replies = rig.send(request(MAC2, a, server=SERVER))
    assert len(replies) == 1
    nak = parse(replies[0].data)
    assert nak.message_type == MessageType.DHCPNAK
    assert nak.yiaddr == A(0) and 51 not in nak.options
    assert replies[0].dest == ("255.255.255.255", 68) and replies[0].broadcast
    assert rig.steps[-1][2] == f"dhcp-nak {a}"


def test_init_reboot() -> None:
    rig = Rig()
    a = rig.dora(MAC1)
    rig.now += 100
    ack = rig.one(request(MAC1, a))  # INIT-REBOOT: 50, no 54, ciaddr 0
    assert ack.message_type == MessageType.DHCPACK and ack.yiaddr == a
    assert rig.leases.by_ip(a).expires == rig.now + 3600  # type: ignore[union-attr]
    # Wrong address in our subnet: NAK.
    other = A("10.77.0.180")
    assert rig.one(request(MAC1, other)).message_type == MessageType.DHCPNAK
    # Wrong network: NAK.
    assert rig.one(request(MAC1, A("192.168.1.5"))).message_type == MessageType.DHCPNAK
    # No record of the client: silent (§4.3.2, coexistence with other servers).
    assert rig.send(request(MAC2, A("10.77.0.181"))) == []


def test_renewing_and_rebinding() -> None:
    rig = Rig()
    a = rig.dora(MAC1)
    rig.now += 1800  # T1
    replies = rig.send(request(MAC1, ciaddr=a), src=(str(a), 68))
    assert len(replies) == 1
    ack = parse(replies[0].data)
    assert ack.message_type == MessageType.DHCPACK and ack.yiaddr == a and ack.ciaddr == a
    assert replies[0].dest == (str(a), 68) and not replies[0].broadcast  # §4.1: unicast to ciaddr
    assert rig.leases.take_dirty()[-1].expires == rig.now + 3600
    rig.now += 3150  # T2: REBINDING is broadcast, answered the same way
    ack = rig.one(request(MAC1, ciaddr=a, flags=FLAG_BROADCAST))
    assert ack.message_type == MessageType.DHCPACK


def test_renewing_an_address_held_by_another_client_is_naked() -> None:
    rig = Rig()
    a = rig.dora(MAC1)
    nak = rig.one(request(MAC2, ciaddr=a))
    assert nak.message_type == MessageType.DHCPNAK
    # A renewal from another network is not ours to answer.
    assert rig.send(request(MAC2, ciaddr=A("192.168.9.9"))) == []


def test_request_without_address_is_ignored() -> None:
    rig = Rig()
    assert rig.send(request(MAC1)) == []


# -- RELEASE, DECLINE, INFORM -------------------------------------------------------


def test_release() -> None:
    rig = Rig()
    a = rig.dora(MAC1)
    rig.leases.take_dirty()
    # Another client cannot release it.
    rig.send(msg(MessageType.DHCPRELEASE, MAC2, ciaddr=a, options={54: SERVER.packed}))
    assert rig.leases.take_dirty() == []
    assert rig.send(msg(MessageType.DHCPRELEASE, MAC1, ciaddr=a, options={54: SERVER.packed})) == []
    (lease,) = rig.leases.take_dirty()
    assert lease.state is LeaseState.RELEASED and lease.expires == rig.now
    assert rig.leases.is_free_for(a, b"\x01" + chaddr(MAC2), rig.now)


def test_decline_quarantines_address() -> None:
    rig = Rig(config(pool_first=A("10.77.0.100"), pool_last=A("10.77.0.101")))
    a = rig.dora(MAC1)
    decline = msg(MessageType.DHCPDECLINE, MAC1, options={54: SERVER.packed, 50: a.packed})
    assert rig.send(decline) == []
    (lease,) = rig.leases.take_dirty()[-1:]
    assert lease.state is LeaseState.DECLINED
    # The decliner gets another address; nobody gets the declined one.
    b = rig.dora(MAC1)
    assert b != a
    assert rig.send(discover(MAC2)) == []
    rig.now += 601  # quarantine over
    assert rig.one(discover(MAC2)).yiaddr == a


def test_inform() -> None:
    rig = Rig()
    ci = A("10.77.0.30")
    replies = rig.send(
        msg(MessageType.DHCPINFORM, ciaddr=ci, options={55: bytes([6, 1])}), src=(str(ci), 68)
    )
    assert len(replies) == 1
    ack = parse(replies[0].data)
    assert replies[0].dest == (str(ci), 68)
    assert ack.message_type == MessageType.DHCPACK
    assert ack.yiaddr == A(0) and ack.ciaddr == ci
    assert 51 not in ack.options and 58 not in ack.options
    assert ack.options[6] == A("10.77.0.53").packed
    assert rig.leases.take_dirty() == [] and len(rig.leases) == 0


# -- fixed addresses, unknown clients -------------------------------------------------


def test_fixed_address_outside_pool() -> None:
    fixed = A("10.77.0.20")
    rig = Rig(policy=FakePolicy(fixed={MAC1: fixed}))
    assert rig.dora(MAC1) == fixed
    # Another client asking for it is refused.
    nak = rig.one(request(MAC2, fixed, server=SERVER))
    assert nak.message_type == MessageType.DHCPNAK
    assert rig.one(discover(MAC2, requested=fixed)).yiaddr != fixed


def test_fixed_address_inside_pool_is_not_handed_to_others() -> None:
    fixed = A("10.77.0.100")  # the first pool address
    policy = OwnersPolicy(fixed={MAC1: fixed})
    rig = Rig(policy=policy)
    # MAC2 arrives first: the reverse lookup keeps the reservation free.
    assert rig.dora(MAC2) != fixed
    assert rig.dora(MAC1) == fixed


def test_fixed_address_learned_without_reverse_lookup() -> None:
    fixed = A("10.77.0.150")
    rig = Rig(policy=FakePolicy(fixed={MAC1: fixed}))
    assert rig.dora(MAC1) == fixed
    rig.send(msg(MessageType.DHCPRELEASE, MAC1, ciaddr=fixed))
    assert rig.one(discover(MAC2, requested=fixed)).yiaddr != fixed


def test_client_with_new_fixed_address_is_moved_to_it() -> None:
    policy = FakePolicy()
    rig = Rig(policy=policy)
    a = rig.dora(MAC1)
    policy.fixed[MAC1] = A("10.77.0.21")
    nak = rig.one(request(MAC1, ciaddr=a))  # renewal of the old address
    assert nak.message_type == MessageType.DHCPNAK
    assert rig.dora(MAC1) == A("10.77.0.21")
    assert rig.leases.by_ip(a).state is LeaseState.RELEASED  # type: ignore[union-attr]


def test_deny_unknown() -> None:
    rig = Rig(config(deny_unknown=True), FakePolicy(known={MAC1}))
    assert rig.send(discover(MAC2)) == []
    assert rig.send(request(MAC2, A("10.77.0.100"), server=SERVER)) == []
    assert rig.dora(MAC1) is not None


# -- PXE (full mode) ------------------------------------------------------------------


def test_pxe_boot_fields_in_offer_and_ack() -> None:
    guid = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    rig = Rig()
    opts = {93: b"\x00\x00", 97: b"\x00" + guid.bytes, 55: bytes([67, 66, 43, 60, 97, 1])}
    offer = rig.one(discover(vendor=PXE_BIOS, options=opts))
    assert offer.siaddr == NEXT
    assert offer.file == b"pxelinux.0"
    o = offer.options
    assert o[67] == b"pxelinux.0" and o[66] == str(NEXT).encode()
    assert o[60] == b"PXEClient"
    assert o[97] == b"\x00" + guid.bytes
    assert o[43] == bytes([6, 1, 8, 255])  # PXE_DISCOVERY_CONTROL: use boot file directly
    req = rig.policy.requests[-1]
    assert req.mac == MAC1 and req.arch == 0 and not req.is_ipxe and not req.http_client
    assert req.uuid == str(guid) and req.ip == offer.yiaddr
    ack = rig.one(request(requested=offer.yiaddr, server=SERVER, vendor=PXE_BIOS, options=opts))
    assert ack.file == b"pxelinux.0" and ack.siaddr == NEXT and ack.options[43] == o[43]


def test_pxe_arch_selection_goes_through_boot_request() -> None:
    policy = FakePolicy(by_arch={7: "ipxe.efi", 0: "undionly.kpxe"})
    rig = Rig(policy=policy)
    offer = rig.one(discover(MAC1, vendor=PXE_EFI, options={93: b"\x00\x07"}))
    assert policy.requests[-1].arch == 7
    assert offer.file == b"ipxe.efi"
    offer = rig.one(discover(MAC2, vendor=PXE_BIOS, options={93: b"\x00\x00"}))
    assert offer.file == b"undionly.kpxe"


@pytest.mark.parametrize(
    "extra",
    [{77: b"iPXE"}, {77: b"\x04iPXE"}, {175: b"\x13\x01\x01"}],
    ids=["user-class", "rfc3004-user-class", "option-175"],
)
def test_ipxe_detection(extra: dict[int, bytes]) -> None:
    rig = Rig()
    offer = rig.one(discover(vendor=PXE_BIOS, options=extra))
    assert rig.policy.requests[-1].is_ipxe
    assert 43 not in offer.options  # iPXE does not need PXE discovery control
    assert offer.options[67] == f"http://{NEXT}/boot.ipxe".encode()


def test_not_ipxe_with_other_user_class() -> None:
    rig = Rig()
    offer = rig.one(discover(vendor=PXE_BIOS, options={77: b"\x05other"}))
    assert not rig.policy.requests[-1].is_ipxe
    assert 43 in offer.options


def test_http_client() -> None:
    rig = Rig(policy=FakePolicy(filename="http://10.77.0.2/boot.efi"))
    offer = rig.one(
        discover(vendor=b"HTTPClient:Arch:00016:UNDI:003001", options={93: b"\x00\x10"})
    )
    req = rig.policy.requests[-1]
    assert req.http_client and req.arch == 16
    assert offer.options[60] == b"HTTPClient"
    assert 43 not in offer.options
    assert offer.options[67] == b"http://10.77.0.2/boot.efi"


def test_vendor_class_prefix_match_only() -> None:
    rig = Rig()
    offer = rig.one(discover(vendor=b"MyPXEClient"))
    assert rig.policy.requests == [] and 67 not in offer.options


def test_full_mode_without_boot_offer_still_leases() -> None:
    rig = Rig(policy=FakePolicy(filename=None))
    offer = rig.one(discover(vendor=PXE_BIOS))
    assert offer.yiaddr != A(0)
    assert offer.file == b"" and offer.siaddr == A(0)
    assert 67 not in offer.options and 43 not in offer.options and 60 not in offer.options


def test_long_filename_only_in_option_67() -> None:
    name = "http://10.77.0.2/" + "x" * 300
    rig = Rig(policy=FakePolicy(filename=name))
    offer = rig.one(discover(vendor=PXE_BIOS, options={57: struct.pack("!H", 1500)}))
    assert offer.file == b""
    assert offer.options[67] == name.encode()  # split per RFC 3396, concatenated by parse


def test_max_message_size_is_honoured() -> None:
    rig = Rig(policy=FakePolicy(filename="x" * 120), cfg=config(domain="d" * 200))
    replies = rig.send(discover(vendor=PXE_BIOS))  # no option 57: 576-octet datagrams
    assert len(replies[0].data) <= 576 - 28
    big = rig.send(discover(MAC2, vendor=PXE_BIOS, options={57: struct.pack("!H", 1500)}))
    assert len(big[0].data) > 576 - 28
    offer = parse(replies[0].data)
    assert offer.options[53] == bytes([MessageType.DHCPOFFER]) and 54 in offer.options


# -- proxy mode -----------------------------------------------------------------------


def test_proxy_offer_to_pxe_client_has_no_address() -> None:
    rig = Rig(config("proxy"))
    replies = rig.send(discover(vendor=PXE_BIOS, options={93: b"\x00\x00"}))
    assert len(replies) == 1
    r = replies[0]
    assert r.broadcast and r.dest == ("255.255.255.255", 68)
    offer = parse(r.data)
    assert offer.message_type == MessageType.DHCPOFFER
    assert offer.yiaddr == A(0)
    for code in (51, 58, 59, 1, 3, 6, 15):
        assert code not in offer.options
    assert offer.options[54] == SERVER.packed
    assert offer.options[60] == b"PXEClient"
    assert offer.siaddr == NEXT and offer.file == b"pxelinux.0"
    assert 43 in offer.options
    assert len(rig.leases) == 0 and rig.leases.take_dirty() == []
    assert rig.steps == [(MAC1, None, "proxy-offer pxelinux.0")]


def test_proxy_ignores_non_pxe_and_requests_on_67() -> None:
    rig = Rig(config("proxy"))
    assert rig.send(discover()) == []
    assert (
        rig.send(request(requested=A("10.77.0.100"), server=A("10.77.0.9"), vendor=PXE_BIOS)) == []
    )
    assert rig.send(msg(MessageType.DHCPINFORM, ciaddr=A("10.77.0.5"))) == []


def test_proxy_silent_without_boot_offer() -> None:
    rig = Rig(config("proxy"), FakePolicy(filename=None))
    assert rig.send(discover(vendor=PXE_BIOS)) == []


@pytest.mark.parametrize("mode", ["proxy", "full"])
@pytest.mark.parametrize("mtype", [MessageType.DHCPREQUEST, MessageType.DHCPINFORM])
def test_boot_server_port_4011(mode: str, mtype: int) -> None:
    rig = Rig(config(mode))
    ci = A("10.77.0.120")
    p = msg(mtype, ciaddr=ci, vendor=PXE_BIOS, options={77: b"iPXE"})
    replies = rig.send(p, port=4011, src=(str(ci), 4011))
    assert len(replies) == 1
    r = replies[0]
    assert r.dest == (str(ci), 4011) and not r.broadcast
    ack = parse(r.data)
    assert ack.message_type == MessageType.DHCPACK
    assert ack.yiaddr == A(0) and 51 not in ack.options
    assert ack.options[67] == f"http://{NEXT}/boot.ipxe".encode()
    assert rig.policy.requests[-1].ip == ci
    assert rig.steps[-1] == (MAC1, str(ci), f"proxy-ack http://{NEXT}/boot.ipxe")
    # Not a PXE client, or a DISCOVER: nothing.
    assert rig.send(msg(mtype, ciaddr=ci), port=4011, src=(str(ci), 4011)) == []
    assert rig.send(discover(vendor=PXE_BIOS), port=4011, src=(str(ci), 4011)) == []


def test_off_mode_answers_nothing() -> None:
    rig = Rig(config("off"))
    assert rig.send(discover(vendor=PXE_BIOS)) == []


# -- relays ---------------------------------------------------------------------------


def test_relayed_dora_replies_to_giaddr() -> None:
    rig = Rig()
    relay = A("10.77.0.250")
    rai = b"\x01\x04eth0"
    replies = rig.send(discover(giaddr=relay, options={82: rai}), src=(str(relay), 67))
    assert replies[0].dest == (str(relay), 67) and not replies[0].broadcast
    offer = parse(replies[0].data)
    assert offer.giaddr == relay
    assert list(offer.options)[-1] == 82 and offer.options[82] == rai  # RFC 3046 §2.2
    replies = rig.send(request(requested=offer.yiaddr, server=SERVER, giaddr=relay))
    assert replies[0].dest == (str(relay), 67)
    assert parse(replies[0].data).message_type == MessageType.DHCPACK
    nak = rig.send(request(MAC2, offer.yiaddr, server=SERVER, giaddr=relay))
    assert nak[0].dest == (str(relay), 67)
    assert parse(nak[0].data).flags & FLAG_BROADCAST


def test_relay_from_foreign_subnet_is_dropped() -> None:
    rig = Rig()
    assert rig.send(discover(giaddr=A("192.168.5.1"))) == []


# -- robustness -----------------------------------------------------------------------


def test_malformed_raises_and_replies_are_ignored() -> None:
    rig = Rig()
    with pytest.raises(MalformedPacket):
        rig.core.handle(b"\x01garbage", 67, ("1.2.3.4", 68), T0)
    reply = discover()
    reply.op = 2
    assert rig.send(reply) == []
    bootp = DhcpPacket(chaddr=chaddr(MAC1))
    assert rig.send(bootp) == []


def test_core_modules_do_no_io() -> None:
    src = Path(__file__).resolve().parents[2] / "src" / "mobinux" / "dhcp"
    for name in ("constants.py", "packet.py", "server.py", "leases.py"):
        tree = ast.parse((src / name).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"socket", "asyncio", "time", "selectors"}, name


def test_changed_reservation_frees_the_old_address() -> None:
    policy = FakePolicy(fixed={MAC1: A("10.77.0.150")})
    rig = Rig(policy=policy)
    assert rig.dora(MAC1) == A("10.77.0.150")
    rig.send(msg(MessageType.DHCPRELEASE, MAC1, ciaddr=A("10.77.0.150")))
    assert rig.one(discover(MAC2, requested=A("10.77.0.150"))).yiaddr != A("10.77.0.150")
    del policy.fixed[MAC1]
    assert rig.dora(MAC1) == A("10.77.0.150")  # still its previous address
    rig.send(msg(MessageType.DHCPRELEASE, MAC1, ciaddr=A("10.77.0.150")))
    mac3 = "52:54:00:00:00:03"
    assert rig.one(discover(mac3, requested=A("10.77.0.150"))).yiaddr == A("10.77.0.150")


def test_oversized_echoed_options_are_dropped_not_fatal() -> None:
    rig = Rig()
    relay = A("10.77.0.250")
    big = {61: b"\x00" + b"c" * 254, 82: b"r" * 255, 55: bytes(range(1, 80))}
    replies = rig.send(discover(giaddr=relay, vendor=PXE_BIOS, options=big))
    assert len(replies) == 1 and len(replies[0].data) <= 576 - 28
    offer = parse(replies[0].data)
    assert offer.message_type == MessageType.DHCPOFFER and offer.options[54] == SERVER.packed
