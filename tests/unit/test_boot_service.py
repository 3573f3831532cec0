from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from mobinux.boot import BootRequest
from mobinux.errors import PathRefused
from mobinux.inventory.db import Inventory, Node, UnknownPolicy
from mobinux.service.boot import BootService, Endpoint, normalise_mac
from mobinux.service.steps import StepLog
from tests.unit.inventory_helpers import add_fake_image

MAC = "52:54:00:00:00:01"
SERVER = IPv4Address("10.77.0.1")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Inventory, BootService, StepLog, Path]:
    inv = Inventory(tmp_path / "data")
    add_fake_image(inv, "lab", cmdline="console=ttyS0 host={hostname}")
    add_fake_image(inv, "rescue", cmdline="")
    loaders = tmp_path / "loaders"
    loaders.mkdir()
    for name in ("pxelinux.0", "ldlinux.c32", "undionly.kpxe", "snponly.efi"):
        (loaders / name).write_bytes(name.encode())
    root = tmp_path / "tftproot"
    root.mkdir()
    (root / "pxelinux.0").write_bytes(b"custom pxelinux")
    (root / "motd.txt").write_bytes(b"hello")
    steps = StepLog()
    service = BootService(inv, Endpoint(SERVER, 8080, IPv4Network("10.77.0.0/24")), steps,
                          tftp_root=root, loader_dirs=(loaders,))
    return inv, service, steps, root


def _node(**kw: object) -> Node:
    values: dict[str, object] = {"name": "pc1", "mac": MAC, "ip": None, "images": ("lab",)}
    values.update(kw)
    return Node(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arch", "ipxe", "loader", "expected"),
    [
        (0, False, "ipxe", "undionly.kpxe"),
        (0, True, "ipxe", "http://10.77.0.1:8080/boot/52-54-00-00-00-01.ipxe"),
        (0, False, "pxelinux", "pxelinux.0"),
        (0, True, "pxelinux", "pxelinux.0"),  # pxelinux wins under iPXE too
        (7, False, "ipxe", "snponly.efi"),
        (9, False, "pxelinux", "snponly.efi"),  # UEFI always gets iPXE
        (7, True, "pxelinux", "http://10.77.0.1:8080/boot/52-54-00-00-00-01.ipxe"),
        (None, False, "ipxe", "undionly.kpxe"),
    ],
)
def test_boot_file_by_architecture(setup: tuple[Inventory, BootService, StepLog, Path],
                                   arch: int | None, ipxe: bool, loader: str, expected: str) -> None:
    inv, service, _, _ = setup
    inv.add_node(_node(loader=loader))
    offer = service.boot_offer(BootRequest(MAC, arch=arch, is_ipxe=ipxe))
    assert offer is not None
    assert offer.filename == expected and offer.next_server == SERVER


def test_uefi_http_boot_gets_url(setup: tuple[Inventory, BootService, StepLog, Path]) -> None:
    inv, service, _, _ = setup
    inv.add_node(_node())
    offer = service.boot_offer(BootRequest(MAC, arch=16, http_client=True))
    assert offer is not None and offer.filename == "http://10.77.0.1:8080/snponly.efi"


def test_unsupported_arch_gets_nothing(setup: tuple[Inventory, BootService, StepLog, Path]) -> None:
    inv, service, _, _ = setup
    inv.add_node(_node())
    assert service.boot_offer(BootRequest(MAC, arch=11)) is None  # no ARM64 iPXE here


def test_unknown_policies(setup: tuple[Inventory, BootService, StepLog, Path]) -> None:
    inv, service, _, _ = setup
    assert service.boot_offer(BootRequest(MAC, arch=0)) is None  # default: deny
    inv.set_unknown_policy(UnknownPolicy("default", "rescue"))
    assert service.boot_offer(BootRequest(MAC, arch=0)) is not None
    assert inv.nodes() == []  # default does not register
    script = service.resolve("boot/52-54-00-00-00-01.ipxe", "10.77.0.9")
    assert script is not None and script.data is not None and b"images/rescue/vmlinuz" in script.data
    inv.set_unknown_policy(UnknownPolicy("enroll", "lab"))
    assert service.boot_offer(BootRequest(MAC, arch=0)) is not None
    enrolled = inv.node_by_mac(MAC)
    assert enrolled is not None and enrolled.name == "node-525400000001" and enrolled.images == ("lab",)


def test_cli_change_seen_without_restart(setup: tuple[Inventory, BootService, StepLog, Path]) -> None:
    inv, service, _, _ = setup
    other = Inventory(inv.data_dir)  # the CLI's own connection
    assert not service.is_known(MAC)
    other.add_node(_node(ip="10.77.0.50"))
    assert service.is_known(MAC)
    assert service.fixed_address(MAC) == IPv4Address("10.77.0.50")
    assert service.fixed_owner(IPv4Address("10.77.0.50")) == MAC
    assert service.fixed_owner(IPv4Address("10.77.0.51")) is None
    other.replace_node("pc1", _node(boot="local"))
    script = service.resolve("boot/525400000001.ipxe", "10.77.0.50")
    assert script is not None and script.data is not None and b"exit" in script.data


def test_ipxe_script_fills_placeholders(setup: tuple[Inventory, BootService, StepLog, Path]) -> None:
    inv, service, _, _ = setup
    inv.add_node(_node(cmdline="{ipconfig} srv={server}"))
    f = service.resolve("boot/52-54-00-00-00-01.ipxe", "10.77.0.60")
    assert f is not None and f.data is not None and f.mac == MAC
    text = f.data.decode()
    assert "kernel http://10.77.0.1:8080/images/lab/vmlinuz initrd=initrd.img console=ttyS0 host=pc1" in text
    assert "ip=10.77.0.60:10.77.0.1::255.255.255.0:pc1::off srv=10.77.0.1" in text
    assert "initrd --name initrd.img http://10.77.0.1:8080/images/lab/initrd.img" in text


def test_menu_when_several_images(setup: tuple[Inventory, BootService, StepLog, Path]) -> None:
    inv, service, _, _ = setup
    inv.add_node(_node(images=("lab", "rescue")))
    f = service.resolve("boot.ipxe", "10.77.0.60", "mac=52:54:00:00:00:01")
    assert f is not None and f.data is not None
    assert b"choose --default img0" in f.data and b"item img1 rescue" in f.data


def test_pxelinux_names(setup: tuple[Inventory, BootService, StepLog, Path]) -> None:
    inv, service, steps, _ = setup
    inv.add_node(_node(loader="pxelinux"))
    by_mac = service.resolve("pxelinux.cfg/01-52-54-00-00-00-01", "10.77.0.70")
    assert by_mac is not None and by_mac.data is not None
    assert b"KERNEL /images/lab/vmlinuz" in by_mac.data and b"APPEND console=ttyS0 host=pc1" in by_mac.data
    assert service.resolve("pxelinux.cfg/01-52-54-00-00-00-02", "10.77.0.71") is None
    assert service.resolve("pxelinux.cfg/b8945908-d6a6-41a9-611d-74a6ab80b83d", "10.77.0.70") is None
    # the client's address is now known to belong to the node: its hex name and default work
    hex_file = service.resolve("pxelinux.cfg/0A4D0046", "10.77.0.70")
    assert hex_file is not None and hex_file.data == by_mac.data
    assert service.resolve("pxelinux.cfg/0A4D004", "10.77.0.70") is None
    default = service.resolve("pxelinux.cfg/default", "10.77.0.99")
    assert default is not None and default.data is not None and b"LOCALBOOT 0" in default.data
    assert steps.mac_by_ip["10.77.0.70"] == MAC


def test_local_boot_node_pxelinux(setup: tuple[Inventory, BootService, StepLog, Path]) -> None:
    inv, service, _, _ = setup
    inv.add_node(_node(loader="pxelinux", boot="local"))
    f = service.resolve("pxelinux.cfg/01-52-54-00-00-00-01", "10.77.0.70")
    assert f is not None and f.data is not None and b"LOCALBOOT 0" in f.data


def test_static_files_and_loaders(setup: tuple[Inventory, BootService, StepLog, Path]) -> None:
    _, service, _, root = setup
    custom = service.resolve("pxelinux.0", "10.77.0.5")
    assert custom is not None and custom.path is not None and custom.path.read_bytes() == b"custom pxelinux"
    system = service.resolve("ldlinux.c32", "10.77.0.5")
    assert system is not None and system.path is not None and system.path.read_bytes() == b"ldlinux.c32"
    kernel = service.resolve("images/lab/vmlinuz", "10.77.0.5")
    assert kernel is not None and kernel.path is not None and kernel.path.read_bytes() == b"KERNEL-lab"
    assert service.resolve("nothing-here", "10.77.0.5") is None
    assert service.resolve("images/lab/missing", "10.77.0.5") is None
    (root / "escape").symlink_to("/etc/passwd")
    with pytest.raises(PathRefused):
        service.resolve("escape", "10.77.0.5")


@pytest.mark.parametrize(
    ("text", "mac"),
    [("52-54-00-00-00-01", MAC), ("525400000001", MAC), ("52:54:00:00:00:01", MAC),
     ("01-52-54-00-00-00-01", MAC), ("52:54:00:00:00", None), ("zz-54-00-00-00-01", None)],
)
def test_normalise_mac(text: str, mac: str | None) -> None:
    assert normalise_mac(text) == mac


def test_steps_before_the_mac_is_known_are_attributed(tmp_path: Path) -> None:
    inv = Inventory(tmp_path / "steps")
    steps = StepLog()
    steps(None, "10.77.0.160", "tftp pxelinux.0")  # proxy mode: the address came from elsewhere
    steps.flush(inv)
    steps(None, "10.77.0.160", "tftp ldlinux.c32")
    steps.learn(MAC, "10.77.0.160")  # pxelinux.cfg/01-<mac> ties the address to the MAC
    steps(None, "10.77.0.160", "tftp images/lab/vmlinuz")
    steps(None, "10.77.0.161", "tftp other")
    steps.flush(inv)
    assert [s.step for s in inv.boot_steps(MAC)] == ["tftp pxelinux.0", "tftp ldlinux.c32",
                                                     "tftp images/lab/vmlinuz"]
    assert [s.mac for s in inv.boot_steps() if s.ip == "10.77.0.161"] == [None]


def test_boot_service_offers_fixed_owner_to_dhcp(setup: tuple[Inventory, BootService, StepLog, Path]) -> None:
    from mobinux.dhcp.server import FixedAddressOwners

    _, service, _, _ = setup
    assert isinstance(service, FixedAddressOwners)
