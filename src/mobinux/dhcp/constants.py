"""DHCP constants in the words of the RFCs that define them.

Sources: RFC 2131 (DHCP), RFC 2132 (options), RFC 3004 (user class),
RFC 3046 (relay agent information), RFC 3396 (long options),
RFC 4578 (PXE options 93/94/97), PXE specification 2.1 (option 43 contents).
"""

from __future__ import annotations

import enum

#: RFC 2131 §3: the first four octets of the 'options' field.
MAGIC_COOKIE = b"\x63\x82\x53\x63"

#: RFC 2131 §4.1: DHCP messages from a client to a server go to port 67,
#: from a server to a client to port 68.
SERVER_PORT = 67
CLIENT_PORT = 68
#: PXE spec 2.1 §2.2.2: the boot server (ProxyDHCP REQUEST/INFORM) port.
PXE_PORT = 4011

#: RFC 2131 §2 figure 2: leftmost bit of 'flags' is the BROADCAST (B) flag.
FLAG_BROADCAST = 0x8000

#: RFC 2131 §2: fixed header (236 octets) followed by the magic cookie.
FIXED_HEADER_LEN = 236
OPTIONS_OFFSET = FIXED_HEADER_LEN + len(MAGIC_COOKIE)
#: RFC 1542 §2.1: a BOOTP message is at least 300 octets; relays and old
#: clients drop shorter ones, so replies are padded to this length.
MIN_MESSAGE_LEN = 300
#: RFC 2131 §2: "a DHCP client must be prepared to receive DHCP messages with
#: an 'options' field of at least length 312 octets" -> a 576-octet IP datagram.
DEFAULT_MAX_MESSAGE = 576
#: IPv4 header (20) + UDP header (8) that option 57 is taken to include.
IP_UDP_HEADERS = 28


class Op(enum.IntEnum):
    """RFC 2131 §2, field 'op'."""

    BOOTREQUEST = 1
    BOOTREPLY = 2


class HType(enum.IntEnum):
    """RFC 2131 §2 'htype' (hardware address types from RFC 1700 "ARP")."""

    ETHERNET = 1


class MessageType(enum.IntEnum):
    """DHCP Message Type, option 53 (RFC 2132 §9.6)."""

    DHCPDISCOVER = 1
    DHCPOFFER = 2
    DHCPREQUEST = 3
    DHCPDECLINE = 4
    DHCPACK = 5
    DHCPNAK = 6
    DHCPRELEASE = 7
    DHCPINFORM = 8


class OptionCode(enum.IntEnum):
    """Option codes, named as in RFC 2132 (section given per option)."""

    PAD = 0  # §3.1
    SUBNET_MASK = 1  # §3.3
    ROUTER = 3  # §3.5
    DOMAIN_NAME_SERVER = 6  # §3.8
    HOST_NAME = 12  # §3.14
    DOMAIN_NAME = 15  # §3.17
    VENDOR_SPECIFIC_INFORMATION = 43  # §8.4
    REQUESTED_IP_ADDRESS = 50  # §9.1
    IP_ADDRESS_LEASE_TIME = 51  # §9.2
    OPTION_OVERLOAD = 52  # §9.3
    DHCP_MESSAGE_TYPE = 53  # §9.6
    SERVER_IDENTIFIER = 54  # §9.7
    PARAMETER_REQUEST_LIST = 55  # §9.8
    MESSAGE = 56  # §9.9
    MAXIMUM_DHCP_MESSAGE_SIZE = 57  # §9.10
    RENEWAL_TIME_VALUE = 58  # §9.11 (T1)
    REBINDING_TIME_VALUE = 59  # §9.12 (T2)
    VENDOR_CLASS_IDENTIFIER = 60  # §9.13
    CLIENT_IDENTIFIER = 61  # §9.14
    TFTP_SERVER_NAME = 66  # §9.4
    BOOTFILE_NAME = 67  # §9.5
    USER_CLASS = 77  # RFC 3004 §4
    RELAY_AGENT_INFORMATION = 82  # RFC 3046 §2
    CLIENT_SYSTEM_ARCHITECTURE = 93  # RFC 4578 §2.1
    CLIENT_NETWORK_INTERFACE_ID = 94  # RFC 4578 §2.2
    CLIENT_MACHINE_ID = 97  # RFC 4578 §2.3 (UUID/GUID)
    IPXE_ENCAPSULATED = 175  # iPXE's encapsulated options; presence = iPXE
    END = 255  # §3.2


class Overload(enum.IntFlag):
    """Option Overload values, option 52 (RFC 2132 §9.3)."""

    FILE = 1
    SNAME = 2
    BOTH = 3


class PxeVendorOption(enum.IntEnum):
    """Sub-options of option 43 for PXE clients (PXE spec 2.1, table 2-1)."""

    PXE_DISCOVERY_CONTROL = 6
    END = 255


class PxeDiscoveryControl(enum.IntFlag):
    """PXE_DISCOVERY_CONTROL bits (PXE spec 2.1, table 2-1)."""

    DISABLE_BROADCAST = 1
    DISABLE_MULTICAST = 2
    ONLY_SERVER_LIST = 4
    #: "If set, and a boot file name is present in the initial DHCP or
    #: ProxyDHCP offer packet, download the boot file (do not prompt/menu/discover)."
    USE_BOOTFILE_DIRECTLY = 8


#: RFC 4578 §2.3: option 97 is a type octet (0 = GUID) and 16 octets.
CLIENT_MACHINE_ID_TYPE_GUID = 0
