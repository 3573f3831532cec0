from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from mobinux.inventory.db import Inventory
from mobinux.service.boot import ENDPOINT_SETTING, Endpoint
from tests.conftest import CliRunner
from tests.unit.inventory_helpers import add_fake_image

MAC = "52:54:00:00:00:01"


@pytest.fixture
def lab(data_dir: Path) -> None:
    inv = Inventory(data_dir)
    add_fake_image(inv, "lab", cmdline="console=ttyS0 {ipconfig}")
    add_fake_image(inv, "rescue", cmdline="")
    # as `mobinux serve` records it when it starts
    inv.set_setting(ENDPOINT_SETTING, Endpoint(IPv4Address("10.0.0.1"), 8080,
                                               IPv4Network("10.0.0.0/24")).to_json())
    inv.close()


def test_node_add_show_json(cli: CliRunner, lab: None) -> None:
    r = cli("node", "add", MAC, "--image", "lab", "--ip", "10.0.0.5", "--cmdline", "host={hostname}")
    assert r.code == 0, r.err
    info = cli("node", "show", "node-525400000001", "--json").json()
    assert info["name"] == "node-525400000001"
    assert info["mac"] == MAC and info["ip"] == "10.0.0.5" and info["image"] == "lab"
    assert info["boot"] == "ramdisk" and info["loader"] == "ipxe"
    assert info["cmdline"] == "host={hostname}"
    assert info["boot_cmdline"].startswith("console=ttyS0 ip=10.0.0.5:10.0.0.1::255.255.255.0:node-525400000001::off")
    assert info["boot_cmdline"].endswith("host=node-525400000001")
    # show by MAC too
    assert cli("node", "show", "52-54-00-00-00-01", "--json").json()["name"] == info["name"]


def test_node_list_json_and_table(cli: CliRunner, lab: None) -> None:
    cli("node", "add", MAC, "--name", "pc1", "--image", "lab")
    cli("node", "add", "52:54:00:00:00:02", "--name", "pc2", "--boot", "local")
    listed = cli("node", "list", "--json").json()
    assert [n["name"] for n in listed] == ["pc1", "pc2"]
    table = cli("node", "list").out.splitlines()
    assert table[0].split() == ["NAME", "MAC", "IP", "BOOT", "LOADER", "IMAGE"]
    assert table[2].split()[:4] == ["pc2", "52:54:00:00:00:02", "-", "local"]


def test_node_set_changes_only_given_options(cli: CliRunner, lab: None) -> None:
    cli("node", "add", MAC, "--name", "pc1", "--image", "lab", "--ip", "10.0.0.5", "--loader", "pxelinux")
    assert cli("node", "set", "pc1", "--image", "lab", "--image", "rescue", "--name", "pc9").code == 0
    info = cli("node", "show", "pc9", "--json").json()
    assert info["images"] == ["lab", "rescue"] and info["loader"] == "pxelinux" and info["ip"] == "10.0.0.5"
    assert cli("node", "set", "pc9", "--ip", "none").code == 0
    assert cli("node", "show", "pc9", "--json").json()["ip"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["node", "add", "not-a-mac", "--image", "lab"], "not a MAC address"),
        (["node", "add", MAC], "needs an image"),
        (["node", "add", MAC, "--image", "missing"], "no image named 'missing'"),
        (["node", "add", MAC, "--image", "lab", "--boot", "iscsi"], "boots a disk image"),
        (["node", "add", MAC, "--image", "lab", "--boot", "kernel"], "give --disk IMAGE"),
        (["node", "add", MAC, "--image", "lab", "--disk", "lab"], "not a disk image"),
        (["node", "add", MAC, "--image", "lab", "--persistent"], "this node has none"),
        (["node", "add", MAC, "--image", "lab", "--login"], "no disk for LUN 0"),
        (["node", "add", MAC, "--image", "lab", "--user", "ghost"], "no disk for LUN 0"),
        (["user", "add", "Bad Name"], "user name 'Bad Name'"),
        (["user", "passwd", "ghost", "--remove"], "no user named 'ghost'"),
        (["snapshot", "list", "ghost"], "no user named 'ghost'"),
        (["node", "add", MAC, "--image", "lab", "--overlay-limit", "lots"], "--overlay-limit"),
        (["node", "add", MAC, "--image", "lab", "--cmdline", "{bogus}"], "unknown placeholder"),
        (["node", "add", MAC, "--image", "lab", "--ip", "300.1.1.1"], "not an IPv4 address"),
        (["node", "add", MAC, "--image", "lab", "--name", "bad name"], "node name"),
        (["node", "show", "ghost"], "no node named 'ghost'"),
        (["node", "remove", "ghost"], "no node named 'ghost'"),
        (["policy", "unknown", "default"], "needs an image"),
        (["image", "remove", "ghost"], "no image named 'ghost'"),
    ],
)
def test_mistakes_get_one_line(cli: CliRunner, lab: None, args: list[str], message: str) -> None:
    r = cli(*args)
    assert r.code == 1
    assert message in r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err


def test_usage_error_is_one_line(cli: CliRunner) -> None:
    r = cli("node", "frobnicate")
    assert r.code == 2
    assert len(r.err.strip().splitlines()) == 1 and "--help" in r.err


def test_duplicate_node_refused(cli: CliRunner, lab: None) -> None:
    assert cli("node", "add", MAC, "--image", "lab").code == 0
    r = cli("node", "add", MAC.upper(), "--image", "rescue", "--name", "other")
    assert r.code == 1 and "already has the MAC address" in r.err


def test_policy_and_image_list(cli: CliRunner, lab: None) -> None:
    assert cli("policy", "unknown").out.strip() == "deny"
    assert cli("policy", "unknown", "enroll", "lab").code == 0
    assert cli("policy", "unknown", "--json").json() == {"action": "enroll", "image": "lab"}
    images = cli("image", "list", "--json").json()
    assert [i["name"] for i in images] == ["lab", "rescue"]
    r = cli("image", "remove", "lab")
    assert r.code == 1 and "policy" in r.err
    assert cli("image", "remove", "rescue").code == 0
    assert [i["name"] for i in cli("image", "list", "--json").json()] == ["lab"]


def test_node_remove(cli: CliRunner, lab: None) -> None:
    cli("node", "add", MAC, "--image", "lab")
    assert cli("node", "remove", MAC).code == 0
    assert cli("node", "list", "--json").json() == []


def test_status_json_without_server(cli: CliRunner, lab: None) -> None:
    cli("node", "add", MAC, "--image", "lab")
    status = cli("status", "--json").json()
    assert status["server"]["running"] is False
    assert status["leases"] == []
    assert status["clients"][0]["mac"] == MAC and status["clients"][0]["node"] == "node-525400000001"


def test_status_shows_the_latest_boot() -> None:
    from mobinux.cli.status import last_boot

    def steps(*names: str) -> list[dict[str, object]]:
        return [{"step": n} for n in names]

    previous = steps("dhcp-offer a", "dhcp-ack a", "tftp pxelinux.0", "tftp x")
    current = steps("proxy-offer p", "proxy-offer p", "tftp pxelinux.0", "tftp ldlinux.c32",
                    "tftp cfg", "tftp k", "tftp i")
    assert last_boot(previous + current) == current
    assert last_boot(steps("http x", "http y")) == steps("http x", "http y")
    assert last_boot([]) == []
