"""The IPv4 address and network of a local interface (Linux ioctls, no subprocess)."""

from __future__ import annotations

import fcntl
import socket
import struct
from ipaddress import IPv4Address, IPv4Interface

from mobinux.errors import ConfigError

_SIOCGIFADDR = 0x8915  # linux/sockios.h
_SIOCGIFNETMASK = 0x891B
_IFNAMSIZ = 16


def interface_address(name: str) -> IPv4Interface:
    """The primary IPv4 address of *name* with its prefix, e.g. ``10.77.0.1/24``."""
    if not name or len(name.encode()) >= _IFNAMSIZ:
        raise ConfigError(f"--interface {name!r} is not a valid interface name")
    request = struct.pack("256s", name.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            addr = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            mask = fcntl.ioctl(sock.fileno(), _SIOCGIFNETMASK, request)
        except OSError as exc:
            if exc.errno == 19:  # ENODEV
                raise ConfigError(f"there is no interface {name!r} (see: ip link)") from None
            raise ConfigError(
                f"interface {name!r} has no IPv4 address; give it one or pass --address"
            ) from None
    ip = IPv4Address(addr[20:24])
    netmask = IPv4Address(mask[20:24])
    return IPv4Interface(f"{ip}/{netmask}")
