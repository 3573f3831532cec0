from __future__ import annotations

from ipaddress import IPv4Address

from mobinux.bootcfg import pxelinux


def test_candidates_follow_pxelinux_order() -> None:
    names = pxelinux.candidates(
        "b8945908-d6a6-41a9-611d-74a6ab80b83d", "88:99:AA:BB:CC:DD", IPv4Address("192.168.2.91")
    )
    # the example of syslinux doc/pxelinux.txt
    assert names == [
        "b8945908-d6a6-41a9-611d-74a6ab80b83d",
        "01-88-99-aa-bb-cc-dd",
        "C0A8025B", "C0A8025", "C0A802", "C0A80", "C0A8", "C0A", "C0", "C",
        "default",
    ]


def test_candidates_without_uuid_or_ip() -> None:
    assert pxelinux.candidates(None, "52:54:00:00:00:01", None) == ["01-52-54-00-00-00-01", "default"]


def test_mac_from_name_round_trip_and_rejects() -> None:
    assert pxelinux.mac_from_name(pxelinux.mac_name("52:54:00:AB:cd:01")) == "52:54:00:ab:cd:01"
    for bad in ("default", "C0A8025B", "02-52-54-00-00-00-01", "01-52-54-00-00-00", "01-zz-54-00-00-00-01"):
        assert pxelinux.mac_from_name(bad) is None


def test_ip_hex_prefix() -> None:
    ip = IPv4Address("10.77.0.100")
    assert pxelinux.ip_hex(ip) == "0A4D0064"
    assert pxelinux.is_ip_hex_prefix("0A4D00", ip)
    assert not pxelinux.is_ip_hex_prefix("0A4D01", ip)
    assert not pxelinux.is_ip_hex_prefix("0a4d0064", ip)


def test_single_entry_config() -> None:
    text = pxelinux.render_config([pxelinux.PxeEntry("lab", "/images/lab/vmlinuz", "/images/lab/initrd.img", "console=ttyS0")])
    lines = [line.strip() for line in text.splitlines()]
    assert "DEFAULT lab" in lines
    assert "KERNEL /images/lab/vmlinuz" in lines
    assert "INITRD /images/lab/initrd.img" in lines
    assert "APPEND console=ttyS0" in lines
    assert "LOCALBOOT 0" not in lines


def test_several_entries_prompt_and_local() -> None:
    entries = [pxelinux.PxeEntry(n, f"/{n}/k", None, "") for n in ("a", "b")]
    lines = [line.strip() for line in pxelinux.render_config(entries, timeout_s=3).splitlines()]
    assert lines[1] == "DEFAULT a"
    assert "PROMPT 1" in lines and "TIMEOUT 30" in lines
    assert "LABEL b" in lines and "LABEL local" in lines and "LOCALBOOT 0" in lines


def test_local_boot_config() -> None:
    lines = [line.strip() for line in pxelinux.render_config([], local_boot=True).splitlines()]
    assert "DEFAULT local" in lines and "LOCALBOOT 0" in lines
    assert not any(line.startswith("KERNEL") for line in lines)
