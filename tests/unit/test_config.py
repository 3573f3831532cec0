from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from mobinux.config import ServeConfig, build, default_tftp_workers, load_toml
from mobinux.errors import ConfigError


def test_defaults_are_safe() -> None:
    config = ServeConfig(interface="eth0")
    assert config.dhcp == "proxy"
    assert config.tftp_port == 69 and config.http_port == 8080


def test_flags_override_file(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('interface = "br0"\ndhcp = "full"\ndhcp-range = "10.0.0.100-10.0.0.200"\n'
                 'router = ["10.0.0.254"]\ndns = "10.0.0.53,10.0.0.54"\nhttp_port = 8081\n')
    config = build(load_toml(f), {"http_port": 9000, "interface": None})
    assert config.interface == "br0"
    assert config.dhcp_range == (IPv4Address("10.0.0.100"), IPv4Address("10.0.0.200"))
    assert config.router == (IPv4Address("10.0.0.254"),)
    assert config.dns == (IPv4Address("10.0.0.53"), IPv4Address("10.0.0.54"))
    assert config.http_port == 9000


def test_tftp_workers_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServeConfig(dhcp="off").tftp_workers is None  # the default: default_tftp_workers()
    f = tmp_path / "m.toml"
    f.write_text('dhcp = "off"\ntftp-workers = 3\n')
    assert build(load_toml(f), {}).tftp_workers == 3
    assert build(load_toml(f), {"tftp_workers": 0}).tftp_workers == 0
    for cpus, want in ((None, 0), (1, 0), (2, 2), (3, 3), (16, 4)):
        monkeypatch.setattr("os.cpu_count", lambda cpus=cpus: cpus)
        assert default_tftp_workers() == want


def test_serve_table_accepted(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('[serve]\ndhcp = "off"\naddress = "10.1.1.1"\n')
    assert build(load_toml(f), {}).address == IPv4Address("10.1.1.1")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dhcp": "full", "interface": "eth0"}, "--dhcp-range"),
        ({"dhcp": "proxy"}, "--interface"),
        ({"dhcp": "bogus", "interface": "e"}, "--dhcp must be"),
        ({"dhcp": "off", "dhcp_range": "10.0.0.9-10.0.0.1"}, "after the last"),
        ({"dhcp": "off", "dhcp_range": "10.0.0.9"}, "FIRST-LAST"),
        ({"dhcp": "off", "address": "fe80::1"}, "IPv4"),
        ({"dhcp": "off", "tftp_port": 70000}, "0-65535"),
        ({"dhcp": "off", "lease_time": 5}, "at least 60"),
        ({"dhcp": "off", "tftp_workers": -1}, "--tftp-workers must be 0-64"),
        ({"dhcp": "off", "tftp_workers": "many"}, "whole number"),
    ],
)
def test_bad_values_refused_with_reason(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build({}, values)


def test_unknown_and_broken_file(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text("colour = 'red'\n")
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load_toml(f)
    f.write_text("interface = \n")
    with pytest.raises(ConfigError, match=r"m\.toml"):
        load_toml(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_toml(tmp_path / "missing.toml")
