"""Kernel command lines: placeholders filled in per node, and the ``ip=`` parameter.

Placeholders are ``{name}`` (``{{`` and ``}}`` for literal braces):

=============  ===========================================================
``{mac}``      the node's MAC, ``52:54:00:00:00:01``
``{ip}``       the node's address (fixed, leased, or the requesting address)
``{hostname}`` the node's name
``{server}``   the address clients reach Mobinux at
``{ipconfig}`` the whole kernel ``ip=`` parameter: static when the address
               is known, ``ip=dhcp`` otherwise (Documentation/admin-guide/
               nfs/nfsroot.rst, "ip=" syntax)
``{target}``   the IQN of the node's own iSCSI target (its disk, LUN 0)
``{portal}``   ``IP:PORT`` of the iSCSI portal
``{initiator}`` the InitiatorName the node must log in with (only it may)
``{chap}``     ``USER:SECRET``, the one-boot CHAP credentials of a ``--login``
               node's target after a user logged in (empty otherwise)
=============  ===========================================================

The three iSCSI placeholders are empty for a node without a disk (no
``--disk`` and not ``--boot iscsi``/``kernel`` on a disk).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from mobinux.errors import InventoryError

PLACEHOLDERS = ("mac", "ip", "hostname", "server", "ipconfig", "target", "portal", "initiator", "chap")


def check_template(template: str) -> None:
    """Refuse unknown placeholders and unbalanced braces, with a message saying which."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise InventoryError(
            f"bad kernel command line {template!r}: {exc} (write {{{{ and }}}} for literal braces)"
        ) from None
    for name in fields:
        if name not in PLACEHOLDERS:
            raise InventoryError(
                f"unknown placeholder {{{name}}} in kernel command line; known: "
                + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
            )


@dataclass(frozen=True)
class NodeNetwork:
    """What a node's command line may refer to."""

    mac: str
    hostname: str
    server: IPv4Address
    ip: IPv4Address | None = None
    subnet: IPv4Network | None = None
    gateway: IPv4Address | None = None
    iscsi_target: str = ""
    iscsi_portal: str = ""
    iscsi_initiator: str = ""
    iscsi_chap: str = ""


def kernel_ip_param(net: NodeNetwork, device: str = "", autoconf: str = "off") -> str:
    """``ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>`` or ``ip=dhcp``."""
    if net.ip is None or net.subnet is None:
        return "ip=dhcp"
    gateway = "" if net.gateway is None else str(net.gateway)
    fields = (str(net.ip), str(net.server), gateway, str(net.subnet.netmask), net.hostname,
              device, autoconf)
    return "ip=" + ":".join(fields)


def render(template: str, net: NodeNetwork) -> str:
    """Fill the placeholders of *template* (already checked) for one node."""
    values = {
        "mac": net.mac,
        "ip": "" if net.ip is None else str(net.ip),
        "hostname": net.hostname,
        "server": str(net.server),
        "ipconfig": kernel_ip_param(net),
        "target": net.iscsi_target,
        "portal": net.iscsi_portal,
        "initiator": net.iscsi_initiator,
        "chap": net.iscsi_chap,
    }
    return template.format_map(values)


def join(*parts: str) -> str:
    """Join command-line fragments, dropping empty ones."""
    return " ".join(p.strip() for p in parts if p.strip())
