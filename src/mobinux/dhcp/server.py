"""The DHCP / ProxyDHCP server core: bytes in, replies out, no I/O.

``DhcpServerCore.handle(data, arrived_on_port, src, now)`` parses one
datagram, decides per RFC 2131 §4.3 (full mode) or the PXE spec 2.1 §2.2
(proxy mode) and returns the encoded replies with their destinations. Lease
changes land in the :class:`~mobinux.dhcp.leases.LeaseTable`; the adapter
takes them (``leases.take_dirty()``) and commits them before it sends the
replies of the batch. Time is a parameter; nothing here reads a clock, opens
a socket or logs.

Modes:

* ``full``: addresses from the pool (or the node's fixed address) and, for
  PXE/HTTP-boot clients the policy has an offer for, boot fields.
* ``proxy``: another server hands out addresses; we answer PXE clients only,
  with boot fields and no address (PXE spec 2.1 §2.2.3, "ProxyDHCP").
* ``off``: nothing is answered.

In both full and proxy mode, PXE REQUEST/INFORM arriving on the boot-server
port (4011) get a unicast ACK with the boot fields (PXE spec 2.1 §2.2.4; iPXE
sends its ProxyDHCP REQUEST there).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Literal, Protocol, runtime_checkable

from mobinux.boot import BootOffer, BootPolicy, BootRequest, StepRecorder
from mobinux.dhcp.constants import (
    CLIENT_MACHINE_ID_TYPE_GUID,
    CLIENT_PORT,
    DEFAULT_MAX_MESSAGE,
    FLAG_BROADCAST,
    IP_UDP_HEADERS,
    PXE_PORT,
    SERVER_PORT,
    MessageType,
    Op,
    OptionCode,
    PxeDiscoveryControl,
    PxeVendorOption,
)
from mobinux.dhcp.leases import Lease, LeaseState, LeaseTable
from mobinux.dhcp.packet import ZERO, DhcpPacket, PacketTooLarge, parse
from mobinux.errors import ConfigError

__all__ = ["DhcpConfig", "DhcpServerCore", "FixedAddressOwners", "Reply"]

_BROADCAST_IP = "255.255.255.255"
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
#: Largest reply we build: one Ethernet MTU, so no reply is ever fragmented.
_MTU = 1500

_DISCOVER = MessageType.DHCPDISCOVER
_REQUEST = MessageType.DHCPREQUEST
_DECLINE = MessageType.DHCPDECLINE
_RELEASE = MessageType.DHCPRELEASE
_INFORM = MessageType.DHCPINFORM
_OFFER_B = bytes((MessageType.DHCPOFFER,))
_ACK_B = bytes((MessageType.DHCPACK,))
_NAK_B = bytes((MessageType.DHCPNAK,))

_O = OptionCode
# PXE spec 2.1 table 2-1: PXE_DISCOVERY_CONTROL = "use boot file name directly", then END.
_PXE_VENDOR_43 = bytes(
    (
        PxeVendorOption.PXE_DISCOVERY_CONTROL,
        1,
        PxeDiscoveryControl.USE_BOOTFILE_DIRECTLY,
        PxeVendorOption.END,
    )
)
#: RFC 2131 §2: the 'file' field is 128 octets and NUL-terminated.
_MAX_FILE_FIELD = 127


@dataclass(frozen=True)
class DhcpConfig:
    """What the DHCP service serves. Addresses are in *subnet*; the pool may be empty."""

    mode: Literal["off", "proxy", "full"]
    server_ip: IPv4Address
    subnet: IPv4Network
    pool_first: IPv4Address | None
    pool_last: IPv4Address | None
    routers: tuple[IPv4Address, ...] = ()
    dns_servers: tuple[IPv4Address, ...] = ()
    domain: str | None = None
    lease_time: int = 3600
    deny_unknown: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("off", "proxy", "full"):
            raise ConfigError(f"dhcp mode must be off, proxy or full, not {self.mode!r}")
        if (self.pool_first is None) != (self.pool_last is None):
            raise ConfigError("dhcp pool needs both a first and a last address")
        if self.pool_first is not None and self.pool_last is not None:
            if self.pool_first not in self.subnet or self.pool_last not in self.subnet:
                raise ConfigError(
                    f"dhcp pool {self.pool_first}-{self.pool_last} is not in {self.subnet}"
                )
            if self.pool_first > self.pool_last:
                raise ConfigError("dhcp pool first address is after its last address")
        if not 60 <= self.lease_time <= 0xFFFFFFFE:
            raise ConfigError("dhcp lease time must be at least 60 seconds")
        if self.domain is not None and not 0 < len(self.domain.encode()) <= 255:
            raise ConfigError("dhcp domain must be 1-255 octets")


@dataclass(frozen=True, slots=True)
class Reply:
    """One datagram to send: encoded bytes, destination, and whether it is a broadcast."""

    data: bytes
    dest: tuple[str, int]
    broadcast: bool
    packet: DhcpPacket


@runtime_checkable
class FixedAddressOwners(Protocol):
    """Optional extension of :class:`~mobinux.boot.BootPolicy`: reverse fixed-address lookup.

    With it, the pool never hands a node's fixed address to anybody else,
    even before that node has been seen. Without it, the core only knows the
    reservations of nodes it has already talked to.
    """

    def fixed_owner(self, ip: IPv4Address) -> str | None:
        """The MAC whose fixed address *ip* is, or None."""
        ...


def _ntoa(ip: IPv4Address) -> str:
    """Dotted quad, several times faster than ``str(IPv4Address)`` (hot path)."""
    k = int(ip)
    return f"{k >> 24}.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}"


def _addresses(addrs: tuple[IPv4Address, ...]) -> bytes:
    return b"".join(a.packed for a in addrs)


def _pxe_kind(pkt: DhcpPacket) -> bytes | None:
    """b"PXEClient" / b"HTTPClient" from option 60 (PXE spec 2.1 §2.2.1; UEFI 2.x §24.7)."""
    vc = pkt.options.get(_O.VENDOR_CLASS_IDENTIFIER)
    if vc is None:
        return None
    if vc.startswith(b"PXEClient"):
        return b"PXEClient"
    if vc.startswith(b"HTTPClient"):
        return b"HTTPClient"
    return None


def boot_request(pkt: DhcpPacket, kind: bytes, ip: IPv4Address | None) -> BootRequest:
    """Describe a PXE / HTTP-boot client for the boot policy."""
    opts = pkt.options
    arch_v = opts.get(_O.CLIENT_SYSTEM_ARCHITECTURE)
    # RFC 4578 §2.1: a list of 16-bit types; the first is the one in use.
    arch = _U16.unpack_from(arch_v)[0] if arch_v is not None and len(arch_v) >= 2 else None
    user_class = opts.get(_O.USER_CLASS)
    # iPXE sends user class "iPXE" (plain, or RFC 3004-framed) and option 175.
    is_ipxe = _O.IPXE_ENCAPSULATED in opts or (user_class is not None and b"iPXE" in user_class)
    guid = opts.get(_O.CLIENT_MACHINE_ID)
    text: str | None = None
    # RFC 4578 §2.3: type 0 followed by a 16-octet GUID.
    if guid is not None and len(guid) == 17 and guid[0] == CLIENT_MACHINE_ID_TYPE_GUID:
        text = str(uuid.UUID(bytes=guid[1:]))
    return BootRequest(
        mac=pkt.mac,
        arch=arch,
        is_ipxe=is_ipxe,
        http_client=kind == b"HTTPClient",
        uuid=text,
        ip=ip,
    )


class DhcpServerCore:
    """RFC 2131 server and PXE ProxyDHCP logic over a :class:`LeaseTable`."""

    def __init__(
        self,
        config: DhcpConfig,
        policy: BootPolicy,
        leases: LeaseTable,
        record_step: StepRecorder | None = None,
        *,
        server_port: int = SERVER_PORT,
        client_port: int = CLIENT_PORT,
        proxy_port: int = PXE_PORT,
        offer_time: float = 60.0,
        decline_time: float = 600.0,
    ) -> None:
        self.config = config
        self.policy = policy
        self.leases = leases
        self._record = record_step
        self.server_port = server_port
        self.client_port = client_port
        self.proxy_port = proxy_port
        self.offer_time = offer_time
        self.decline_time = decline_time
        self._sid = config.server_ip.packed
        net = config.subnet
        self._net = int(net.network_address)
        self._mask = int(net.netmask)
        # Addresses never leased dynamically: ours, the subnet's network and
        # broadcast addresses, routers and DNS servers we announce.
        self._excluded = {
            int(config.server_ip),
            int(net.network_address),
            int(net.broadcast_address),
            *(int(a) for a in config.routers),
            *(int(a) for a in config.dns_servers),
        }
        lt = config.lease_time
        # RFC 2131 §4.4.5: T1 defaults to 0.5 * lease, T2 to 0.875 * lease.
        self._lease_opts: dict[int, bytes] = {
            _O.IP_ADDRESS_LEASE_TIME: _U32.pack(lt),
            _O.RENEWAL_TIME_VALUE: _U32.pack(lt // 2),
            _O.REBINDING_TIME_VALUE: _U32.pack(lt * 7 // 8),
        }
        params: dict[int, bytes] = {_O.SUBNET_MASK: net.netmask.packed}
        if config.routers:
            params[_O.ROUTER] = _addresses(config.routers)
        if config.dns_servers:
            params[_O.DOMAIN_NAME_SERVER] = _addresses(config.dns_servers)
        if config.domain:
            params[_O.DOMAIN_NAME] = config.domain.encode()
        self._net_params = params
        owners = policy if isinstance(policy, FixedAddressOwners) else None
        self._fixed_owner: Callable[[IPv4Address], str | None] | None = (
            owners.fixed_owner if owners is not None else None
        )
        # Reservations seen so far (address -> MAC, MAC -> address), for
        # policies without ``fixed_owner``.
        self._learned_fixed: dict[int, str] = {}
        self._learned_by_mac: dict[str, int] = {}

    # -- entry point ----------------------------------------------------------------

    def handle(
        self, data: bytes, arrived_on_port: int, src: tuple[str, int], now: float
    ) -> list[Reply]:
        """Replies to one datagram. Raises MalformedPacket for bytes that are not DHCP."""
        mode = self.config.mode
        if mode == "off":
            return []
        pkt = parse(data)
        if pkt.op != Op.BOOTREQUEST or not 0 < pkt.hlen <= 16:
            return []
        mt = pkt.message_type
        if mt is None:
            return []  # BOOTP (no option 53): not served
        gi = int(pkt.giaddr)
        if gi and (gi & self._mask) != self._net:
            return []  # relayed from a subnet we have no pool for
        mac = pkt.mac
        if self.config.deny_unknown and not self.policy.is_known(mac):
            return []
        if arrived_on_port == self.proxy_port:
            return self._boot_server(pkt, mt, mac, src)
        if mode == "proxy":
            return self._proxy_offer(pkt, mt, mac) if mt == _DISCOVER else []
        return self._full(pkt, mt, mac, src, now)

    # -- helpers ----------------------------------------------------------------

    def _in_subnet(self, ip: IPv4Address) -> bool:
        return (int(ip) & self._mask) == self._net

    def _step(self, mac: str, ip: IPv4Address | None, step: str) -> None:
        if self._record is not None:
            self._record(mac, _ntoa(ip) if ip is not None else None, step)

    def _address_step(self, mac: str, ip: IPv4Address, verb: str) -> None:
        """Record "<verb> <ip>" (e.g. "dhcp-ack 10.77.0.100")."""
        if self._record is not None:
            text = _ntoa(ip)
            self._record(mac, text, f"{verb} {text}")

    def _fixed(self, mac: str) -> IPv4Address | None:
        """The node's fixed address (only if it is usable in our subnet)."""
        fixed = self.policy.fixed_address(mac)
        if fixed is not None and (not self._in_subnet(fixed) or int(fixed) in self._excluded):
            fixed = None
        key = int(fixed) if fixed is not None else None
        old = self._learned_by_mac.get(mac)
        if old != key:
            # The reservation is new or changed: forget the previous one.
            if old is not None and self._learned_fixed.get(old) == mac:
                del self._learned_fixed[old]
            if key is None:
                del self._learned_by_mac[mac]
            else:
                self._learned_fixed[key] = mac
                self._learned_by_mac[mac] = key
        return fixed

    def _owner(self, ip: IPv4Address) -> str | None:
        if self._fixed_owner is not None:
            owner = self._fixed_owner(ip)
            if owner is not None:
                return owner.lower()
        return self._learned_fixed.get(int(ip))

    def _acceptable(self, ip: IPv4Address, mac: str) -> bool:
        if int(ip) in self._excluded:
            return False
        owner = self._owner(ip)
        return owner is None or owner == mac

    def _valid_for(self, ip: IPv4Address, mac: str, fixed: IPv4Address | None) -> bool:
        """May *ip* be bound to *mac* at all (ignoring who holds it now)?"""
        if fixed is not None and ip == fixed:
            return True
        return self.leases.in_pool(ip) and self._acceptable(ip, mac)

    @staticmethod
    def _client_id(pkt: DhcpPacket) -> bytes:
        # RFC 2131 §4.2: option 61 if present, else (htype, chaddr). Prefixing
        # chaddr with htype makes it equal to the common "01:<mac>" option 61,
        # so a client that sends 61 only sometimes keeps its lease.
        cid = pkt.options.get(_O.CLIENT_IDENTIFIER)
        if cid:
            return cid
        return bytes((pkt.htype,)) + pkt.hwaddr

    @staticmethod
    def _hostname(pkt: DhcpPacket) -> str | None:
        v = pkt.options.get(_O.HOST_NAME)
        if not v:
            return None
        return v.rstrip(b"\0").decode("utf-8", "replace")[:255] or None

    def _dest(self, pkt: DhcpPacket, nak: bool = False) -> tuple[tuple[str, int], bool]:
        # RFC 2131 §4.1: relayed -> the relay's port 67; NAK -> broadcast;
        # ciaddr set -> unicast to it; otherwise broadcast (always allowed).
        if pkt.giaddr != ZERO:
            return (_ntoa(pkt.giaddr), self.server_port), False
        if not nak and pkt.ciaddr != ZERO:
            return (_ntoa(pkt.ciaddr), self.client_port), False
        return (_BROADCAST_IP, self.client_port), True

    @staticmethod
    def _max_size(pkt: DhcpPacket) -> int:
        # RFC 2132 §9.10: option 57, at least 576. Taken as the IP datagram size
        # (the cautious reading), and capped to one Ethernet MTU.
        v = pkt.options.get(_O.MAXIMUM_DHCP_MESSAGE_SIZE)
        size = DEFAULT_MAX_MESSAGE
        if v is not None and len(v) == 2:
            size = max(size, _U16.unpack(v)[0])
        return min(size, _MTU) - IP_UDP_HEADERS

    def _boot_fields(
        self, pkt: DhcpPacket, kind: bytes, offer: BootOffer, is_ipxe: bool
    ) -> tuple[bytes, dict[int, bytes]]:
        """('file' field, boot options) for a boot offer (PXE spec 2.1 §2.2.1)."""
        name = offer.filename.encode()
        opts: dict[int, bytes] = {
            _O.VENDOR_CLASS_IDENTIFIER: kind,
            _O.TFTP_SERVER_NAME: str(offer.next_server).encode(),
            _O.BOOTFILE_NAME: name,
        }
        guid = pkt.options.get(_O.CLIENT_MACHINE_ID)
        if guid is not None:
            opts[_O.CLIENT_MACHINE_ID] = guid
        if kind == b"PXEClient" and not is_ipxe:
            opts[_O.VENDOR_SPECIFIC_INFORMATION] = _PXE_VENDOR_43
        # Some firmware reads 'file', some option 67: give both, unless the name
        # does not fit in the 128-octet field (then option 67 only, RFC 3396 if long).
        return (name if len(name) <= _MAX_FILE_FIELD else b""), opts

    def _build(
        self,
        pkt: DhcpPacket,
        msg: bytes,
        *,
        yiaddr: IPv4Address = ZERO,
        ciaddr: IPv4Address = ZERO,
        siaddr: IPv4Address = ZERO,
        file: bytes = b"",
        lease: bool = False,
        params: dict[int, bytes] | None = None,
        dest: tuple[tuple[str, int], bool],
        flags: int | None = None,
    ) -> Reply:
        opts: dict[int, bytes] = {_O.DHCP_MESSAGE_TYPE: msg, _O.SERVER_IDENTIFIER: self._sid}
        if lease:
            opts.update(self._lease_opts)
        droppable: list[int] = []
        if params:
            # RFC 2131 §4.3.1 / RFC 2132 §9.8: requested parameters in the
            # client's order first, then what we send unasked.
            params = dict(params)
            prl = pkt.options.get(_O.PARAMETER_REQUEST_LIST)
            if prl:
                for code in prl:
                    v = params.pop(code, None)
                    if v is not None:
                        opts[code] = v
                        droppable.append(code)
            opts.update(params)
            droppable.extend(params)
        cid = pkt.options.get(_O.CLIENT_IDENTIFIER)
        if cid is not None:
            opts[_O.CLIENT_IDENTIFIER] = cid  # RFC 6842 §3: echo the client identifier
            droppable.insert(0, _O.CLIENT_IDENTIFIER)
        rai = pkt.options.get(_O.RELAY_AGENT_INFORMATION)
        if rai is not None and pkt.giaddr != ZERO:
            opts[_O.RELAY_AGENT_INFORMATION] = rai  # RFC 3046 §2.2: echoed, last
            droppable.insert(0, _O.RELAY_AGENT_INFORMATION)
        reply = DhcpPacket(
            op=Op.BOOTREPLY,
            htype=pkt.htype,
            hlen=pkt.hlen,
            hops=0,
            xid=pkt.xid,
            secs=0,
            flags=pkt.flags if flags is None else flags,
            ciaddr=ciaddr,
            yiaddr=yiaddr,
            siaddr=siaddr,
            giaddr=pkt.giaddr,
            chaddr=pkt.chaddr,
            file=file,
            options=opts,
        )
        limit = self._max_size(pkt)
        while True:
            try:
                data = reply.encode(limit)
                break
            except PacketTooLarge:
                if not droppable:
                    raise
                # Too big even with overload: drop the least wanted option.
                del opts[droppable.pop()]
        (addr, broadcast) = dest
        return Reply(data, addr, broadcast, reply)

    # -- proxy DHCP (PXE spec 2.1 §2.2.3) ----------------------------------------------

    def _boot_offer(
        self, pkt: DhcpPacket, mac: str, ip: IPv4Address | None
    ) -> tuple[bytes, BootOffer, bool] | None:
        kind = _pxe_kind(pkt)
        if kind is None:
            return None
        req = boot_request(pkt, kind, ip)
        offer = self.policy.boot_offer(req)
        if offer is None:
            return None
        return kind, offer, req.is_ipxe

    def _proxy_offer(self, pkt: DhcpPacket, mt: int, mac: str) -> list[Reply]:
        got = self._boot_offer(pkt, mac, None)
        if got is None:
            return []  # not a PXE client, or nothing to boot: the real server answers
        kind, offer, ipxe = got
        file, params = self._boot_fields(pkt, kind, offer, ipxe)
        reply = self._build(
            pkt,
            _OFFER_B,
            siaddr=offer.next_server,
            file=file,
            params=params,
            dest=self._dest(pkt),
        )
        self._step(mac, None, f"proxy-offer {offer.filename}")
        return [reply]

    def _boot_server(self, pkt: DhcpPacket, mt: int, mac: str, src: tuple[str, int]) -> list[Reply]:
        # PXE spec 2.1 §2.2.4: REQUEST (or INFORM) to port 4011, ACK unicast to its source.
        if mt != _REQUEST and mt != _INFORM:
            return []
        ip = pkt.ciaddr if pkt.ciaddr != ZERO else None
        if ip is None and src[0] not in ("0.0.0.0", ""):
            try:
                ip = IPv4Address(src[0])
            except ValueError:
                ip = None
        got = self._boot_offer(pkt, mac, ip)
        if got is None:
            return []
        kind, offer, ipxe = got
        file, params = self._boot_fields(pkt, kind, offer, ipxe)
        if src[0] in ("0.0.0.0", ""):
            dest: tuple[tuple[str, int], bool] = ((_BROADCAST_IP, src[1]), True)
        else:
            dest = ((src[0], src[1]), False)
        reply = self._build(
            pkt,
            _ACK_B,
            ciaddr=pkt.ciaddr,
            siaddr=offer.next_server,
            file=file,
            params=params,
            dest=dest,
        )
        self._step(mac, ip, f"proxy-ack {offer.filename}")
        return [reply]

    # -- full DHCP (RFC 2131 §4.3) -------------------------------------------------------

    def _full(
        self, pkt: DhcpPacket, mt: int, mac: str, src: tuple[str, int], now: float
    ) -> list[Reply]:
        if mt == _DISCOVER:
            return self._discover(pkt, mac, now)
        if mt == _REQUEST:
            return self._request(pkt, mac, now)
        if mt == _RELEASE:
            self._release(pkt, now)
            return []
        if mt == _DECLINE:
            self._decline(pkt, now)
            return []
        if mt == _INFORM:
            return self._inform(pkt, mac, src)
        return []

    def _address_reply(
        self, pkt: DhcpPacket, msg: bytes, mac: str, ip: IPv4Address, ciaddr: IPv4Address
    ) -> Reply:
        params = dict(self._net_params)
        siaddr = ZERO
        file = b""
        got = self._boot_offer(pkt, mac, ip)
        if got is not None:
            kind, offer, ipxe = got
            file, boot = self._boot_fields(pkt, kind, offer, ipxe)
            params.update(boot)
            siaddr = offer.next_server
        return self._build(
            pkt,
            msg,
            yiaddr=ip,
            ciaddr=ciaddr,
            siaddr=siaddr,
            file=file,
            lease=True,
            params=params,
            dest=self._dest(pkt),
        )

    def _choose(
        self,
        cid: bytes,
        mac: str,
        fixed: IPv4Address | None,
        requested: IPv4Address | None,
        now: float,
    ) -> IPv4Address | None:
        """RFC 2131 §4.3.1: the address to offer."""
        leases = self.leases
        if fixed is not None and leases.is_free_for(fixed, cid, now):
            return fixed
        # (A fixed address still held by another client: serve from the pool
        # meanwhile; the holder is NAKed at its next REQUEST.)
        current = leases.by_client(cid)
        if current is not None and current.state is not LeaseState.DECLINED:
            ip = current.ip
            if self._valid_for(ip, mac, None) and leases.is_free_for(ip, cid, now):
                return ip
        if (
            requested is not None
            and self._valid_for(requested, mac, None)
            and leases.is_free_for(requested, cid, now)
        ):
            return requested
        return leases.allocate(now, lambda a: self._acceptable(a, mac))

    def _discover(self, pkt: DhcpPacket, mac: str, now: float) -> list[Reply]:
        cid = self._client_id(pkt)
        fixed = self._fixed(mac)
        ip = self._choose(cid, mac, fixed, pkt.option_address(_O.REQUESTED_IP_ADDRESS), now)
        if ip is None:
            return []  # pool exhausted (RFC 2131 §4.3.1: no address, no offer)
        leases = self.leases
        current = leases.by_client(cid)
        if (
            current is not None
            and current.ip != ip
            and current.state in (LeaseState.BOUND, LeaseState.OFFERED)
            and current.expires > now
        ):
            # A client in INIT state has given up its old address (RFC 2131
            # §4.4.1); it gets a new one, so free the old one now.
            leases.put(
                replace(current, expires=now, state=LeaseState.RELEASED),
                persist=current.state is LeaseState.BOUND,
            )
        held = leases.by_ip(ip)
        if not (
            held is not None
            and held.client_id == cid
            and held.state is LeaseState.BOUND
            and held.expires > now
        ):
            # Reserve the address for a short while; not persisted.
            hostname = self._hostname(pkt)
            leases.put(
                Lease(ip, mac, cid, hostname, now + self.offer_time, LeaseState.OFFERED),
                persist=False,
            )
        reply = self._address_reply(pkt, _OFFER_B, mac, ip, ZERO)
        self._address_step(mac, ip, "dhcp-offer")
        return [reply]

    def _nak(self, pkt: DhcpPacket, mac: str, ip: IPv4Address) -> list[Reply]:
        # RFC 2131 §4.3.2 / table 3: NAK carries 53, 54 (and 56); broadcast, or
        # to the relay with the broadcast bit set (§4.1).
        reply = self._build(
            pkt,
            _NAK_B,
            params={_O.MESSAGE: b"requested address not available"},
            dest=self._dest(pkt, nak=True),
            flags=(pkt.flags | FLAG_BROADCAST) if pkt.giaddr != ZERO else pkt.flags,
        )
        self._address_step(mac, ip, "dhcp-nak")
        return [reply]

    def _request(self, pkt: DhcpPacket, mac: str, now: float) -> list[Reply]:
        opts = pkt.options
        cid = self._client_id(pkt)
        leases = self.leases
        sid = opts.get(_O.SERVER_IDENTIFIER)
        requested = pkt.option_address(_O.REQUESTED_IP_ADDRESS)
        ciaddr = pkt.ciaddr
        if sid is not None:
            # SELECTING (RFC 2131 §4.3.2): the client picked a server.
            if sid != self._sid:
                # It chose another server: free our offer at once.
                mine = leases.by_client(cid)
                if mine is not None and mine.state is LeaseState.OFFERED:
                    leases.put(replace(mine, expires=now, state=LeaseState.RELEASED), persist=False)
                return []
            ip = requested if requested is not None else (ciaddr if ciaddr != ZERO else None)
            if ip is None:
                return []
            state = "selecting"
        elif requested is not None and ciaddr == ZERO:
            ip = requested
            state = "init-reboot"
        elif ciaddr != ZERO:
            ip = ciaddr
            state = "renewing"  # or REBINDING: both are answered the same way here
        else:
            return []
        if not self._in_subnet(ip):
            # §4.3.2: a client on the wrong network is NAKed (SELECTING, INIT-REBOOT);
            # a RENEWING/REBINDING client of another network is not ours to answer.
            return self._nak(pkt, mac, ip) if state != "renewing" else []
        fixed = self._fixed(mac)
        if fixed is not None and ip != fixed and leases.is_free_for(fixed, cid, now):
            return self._nak(pkt, mac, ip)  # move the node to its reserved address
        if not self._valid_for(ip, mac, fixed):
            return self._nak(pkt, mac, ip)
        held = leases.by_ip(ip)
        if held is not None and held.client_id == cid and held.state is not LeaseState.DECLINED:
            pass  # the client's own record (possibly expired): confirm it
        elif held is not None and held.holds(now):
            return self._nak(pkt, mac, ip)  # someone else's, or quarantined
        elif state == "init-reboot" and ip != fixed:
            # §4.3.2: "If the DHCP server has no record of this client, then it
            # MUST remain silent"; if it knows another address for it, NAK.
            current = leases.by_client(cid)
            if current is None or current.state is LeaseState.DECLINED:
                return []
            return self._nak(pkt, mac, ip)
        # ACK: bind (RFC 2131 §4.3.2); a different old address of the client is freed.
        old = leases.by_client(cid)
        if old is not None and old.ip != ip and old.state is LeaseState.BOUND:
            leases.put(replace(old, expires=now, state=LeaseState.RELEASED))
        hostname = self._hostname(pkt)
        if hostname is None and held is not None and held.client_id == cid:
            hostname = held.hostname
        leases.put(Lease(ip, mac, cid, hostname, now + self.config.lease_time, LeaseState.BOUND))
        reply = self._address_reply(pkt, _ACK_B, mac, ip, ciaddr)
        self._address_step(mac, ip, "dhcp-ack")
        return [reply]

    def _release(self, pkt: DhcpPacket, now: float) -> None:
        # RFC 2131 §4.3.4: mark the client's lease of ciaddr as not allocated.
        sid = pkt.options.get(_O.SERVER_IDENTIFIER)
        if sid is not None and sid != self._sid:
            return
        lease = self.leases.by_ip(pkt.ciaddr)
        if lease is None or lease.client_id != self._client_id(pkt):
            return
        if lease.state is LeaseState.BOUND or lease.state is LeaseState.OFFERED:
            self.leases.put(replace(lease, expires=now, state=LeaseState.RELEASED))

    def _decline(self, pkt: DhcpPacket, now: float) -> None:
        # RFC 2131 §4.3.3: the address is in use elsewhere; keep it out of the
        # pool for a while (it may be a misconfigured host).
        sid = pkt.options.get(_O.SERVER_IDENTIFIER)
        if sid is not None and sid != self._sid:
            return
        ip = pkt.option_address(_O.REQUESTED_IP_ADDRESS)
        if ip is None:
            return
        lease = self.leases.by_ip(ip)
        if lease is None or lease.client_id != self._client_id(pkt):
            return
        self.leases.put(replace(lease, expires=now + self.decline_time, state=LeaseState.DECLINED))

    def _inform(self, pkt: DhcpPacket, mac: str, src: tuple[str, int]) -> list[Reply]:
        # RFC 2131 §4.3.5: configuration only: no yiaddr, no lease time; sent to ciaddr.
        params = dict(self._net_params)
        siaddr = ZERO
        file = b""
        ip = pkt.ciaddr if pkt.ciaddr != ZERO else None
        got = self._boot_offer(pkt, mac, ip)
        if got is not None:
            kind, offer, ipxe = got
            file, boot = self._boot_fields(pkt, kind, offer, ipxe)
            params.update(boot)
            siaddr = offer.next_server
        reply = self._build(
            pkt,
            _ACK_B,
            ciaddr=pkt.ciaddr,
            siaddr=siaddr,
            file=file,
            params=params,
            dest=self._dest(pkt),
        )
        return [reply]
