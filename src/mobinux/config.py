"""``mobinux serve`` settings: one frozen dataclass, from flags and/or a TOML file.

Every field can be set in the TOML file given with ``--config`` (same names,
``-`` or ``_``); a flag given on the command line wins over the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, fields
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Any

from mobinux.errors import ConfigError

DHCP_MODES = ("off", "proxy", "full")
_IQN_PREFIX = re.compile(r"^iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9][a-z0-9.-]*[a-z0-9]([:.][a-z0-9.:-]*)?$")


@dataclass(frozen=True)
class ServeConfig:
    interface: str | None = None  # where DHCP listens and answers (required unless dhcp=off)
    address: IPv4Address | None = None  # the address clients reach; default: the interface's
    subnet: IPv4Network | None = None  # default: the interface's
    dhcp: str = "proxy"  # off | proxy | full; proxy is safe next to an existing DHCP server
    dhcp_range: tuple[IPv4Address, IPv4Address] | None = None  # full mode address pool
    router: tuple[IPv4Address, ...] = ()
    dns: tuple[IPv4Address, ...] = ()
    domain: str | None = None
    lease_time: int = 3600  # seconds
    deny_unknown: bool = False  # full mode: lease only to registered nodes
    tftp_root: Path | None = None  # extra static files, served over TFTP and HTTP
    tftp_port: int = 69
    tftp_workers: int | None = None  # data-pump worker processes; None: default_tftp_workers()
    http_port: int = 8080
    iscsi_port: int = 3260  # 0: no iSCSI target
    iqn_prefix: str = "iqn.2026-11.org.mobinux:"  # target IQN = prefix + target name
    loader_dirs: tuple[Path, ...] = (
        Path("/usr/lib/ipxe"),
        Path("/usr/lib/PXELINUX"),
        Path("/usr/lib/syslinux/modules/bios"),
    )

    def __post_init__(self) -> None:
        if self.dhcp not in DHCP_MODES:
            raise ConfigError(f"--dhcp must be one of {', '.join(DHCP_MODES)}, not {self.dhcp!r}")
        if self.dhcp != "off" and not self.interface:
            raise ConfigError("--interface is required when DHCP is on (or use --dhcp off)")
        if self.dhcp == "full" and self.dhcp_range is None:
            raise ConfigError("--dhcp full needs an address pool: --dhcp-range FIRST-LAST")
        if not _IQN_PREFIX.match(self.iqn_prefix):
            raise ConfigError(f"--iqn-prefix {self.iqn_prefix!r}: write it like "
                              "iqn.2026-11.org.example: (iqn., the year-month the domain was "
                              "owned, the reversed domain in lower case; RFC 7143 §4.2.7.2)")
        for port_name in ("tftp_port", "http_port", "iscsi_port"):
            port = getattr(self, port_name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"--{port_name.replace('_', '-')} must be 0-65535, not {port}")
        if self.tftp_workers is not None and not 0 <= self.tftp_workers <= 64:
            raise ConfigError(f"--tftp-workers must be 0-64, not {self.tftp_workers}")
        if self.lease_time < 60:
            raise ConfigError("--lease-time must be at least 60 seconds")
        if self.dhcp_range is not None and int(self.dhcp_range[0]) > int(self.dhcp_range[1]):
            raise ConfigError("--dhcp-range: the first address is after the last")


def default_tftp_workers() -> int:
    """TFTP data-pump workers when none are configured: one per core, at most 4, none on one core."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 1 else min(cpus, 4)


def parse_ip(text: str, what: str) -> IPv4Address:
    try:
        value = ip_address(text.strip())
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not an IPv4 address") from None
    if not isinstance(value, IPv4Address):
        raise ConfigError(f"{what}: {text!r} is not an IPv4 address (IPv6 is not supported yet)")
    return value


def parse_range(text: str) -> tuple[IPv4Address, IPv4Address]:
    first, sep, last = text.partition("-")
    if not sep:
        first, sep, last = text.partition(",")
    if not sep:
        raise ConfigError(f"--dhcp-range: expected FIRST-LAST, e.g. 10.0.0.100-10.0.0.200, not {text!r}")
    return parse_ip(first, "--dhcp-range"), parse_ip(last, "--dhcp-range")


def parse_ip_list(value: str | list[str] | tuple[str, ...], what: str) -> tuple[IPv4Address, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(parse_ip(i, what) for i in items if i.strip())


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML or flag value into the field's type."""
    if value is None:
        return None
    match name:
        case "address":
            return parse_ip(str(value), "address")
        case "subnet":
            try:
                return IPv4Network(str(value), strict=False)
            except ValueError:
                raise ConfigError(f"subnet: {value!r} is not an IPv4 network like 10.0.0.0/24") from None
        case "dhcp_range":
            return parse_range(value) if isinstance(value, str) else parse_range("-".join(value))
        case "router" | "dns":
            return parse_ip_list(value, name)
        case "tftp_root":
            return Path(value)
        case "loader_dirs":
            return tuple(Path(v) for v in value)
        case "lease_time" | "tftp_port" | "http_port" | "tftp_workers" | "iscsi_port":
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ConfigError(f"{name} must be a whole number")
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
        case "deny_unknown":
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false")
            return value
        case _:
            return str(value)


FIELD_NAMES = tuple(f.name for f in fields(ServeConfig))


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    table = raw.get("serve", raw)
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in FIELD_NAMES:
            raise ConfigError(f"config {path}: unknown setting {key!r}; known: {', '.join(FIELD_NAMES)}")
        out[name] = value
    return out


def build(file_values: dict[str, Any], flag_values: dict[str, Any]) -> ServeConfig:
    """Merge file and flags (flags win; None means "not given") into a checked config."""
    merged = dict(file_values)
    merged.update({k: v for k, v in flag_values.items() if v is not None})
    return ServeConfig(**{k: _coerce(k, v) for k, v in merged.items()})
