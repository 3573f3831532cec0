from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from mobinux.bootcfg.cmdline import NodeNetwork, check_template, join, kernel_ip_param, render
from mobinux.errors import InventoryError

NET = NodeNetwork(mac="52:54:00:00:00:01", hostname="pc1", server=IPv4Address("10.0.0.1"),
                  ip=IPv4Address("10.0.0.50"), subnet=IPv4Network("10.0.0.0/24"),
                  gateway=IPv4Address("10.0.0.254"))


def test_placeholders_filled() -> None:
    out = render("root=/dev/ram0 mac={mac} ip={ip} host={hostname} srv={server} {{literal}}", NET)
    assert out == "root=/dev/ram0 mac=52:54:00:00:00:01 ip=10.0.0.50 host=pc1 srv=10.0.0.1 {literal}"


def test_kernel_ip_param_static_and_dhcp() -> None:
    assert kernel_ip_param(NET) == "ip=10.0.0.50:10.0.0.1:10.0.0.254:255.255.255.0:pc1::off"
    assert kernel_ip_param(NET, device="eth0", autoconf="none").endswith(":pc1:eth0:none")
    no_ip = NodeNetwork(mac=NET.mac, hostname="pc1", server=NET.server)
    assert kernel_ip_param(no_ip) == "ip=dhcp"
    assert render("{ipconfig}", no_ip) == "ip=dhcp"


@pytest.mark.parametrize("bad", ["{nope}", "{mac", "x}", "{0}"])
def test_bad_templates_refused(bad: str) -> None:
    with pytest.raises(InventoryError):
        check_template(bad)


def test_good_template_accepted() -> None:
    check_template("console=ttyS0 {ipconfig} host={hostname} {{x}}")


def test_join_drops_empty_parts() -> None:
    assert join("  a ", "", "b") == "a b"
