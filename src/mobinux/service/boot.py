"""Boot decisions from the inventory: what a client boots, and the files behind it.

:class:`BootService` implements both :class:`mobinux.boot.BootPolicy` (asked by
DHCP) and :class:`mobinux.boot.FileResolver` (asked by TFTP and HTTP). It reads
the inventory on every decision through a small cache refreshed whenever the
database changes, so CLI edits take effect without a restart.

The file namespace clients see (TFTP and HTTP alike)::

    boot/<mac>.ipxe          generated iPXE script of a node (also boot.ipxe?mac=...)
    pxelinux.cfg/<name>      generated pxelinux config (UUID, 01-<mac>, hex IP, default)
    images/<image>/<file>    kernels and initrds in <data-dir>/images
    <anything else>          --tftp-root first, then the system loader directories
                             (pxelinux.0, ldlinux.c32, undionly.kpxe, snponly.efi, ...)
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from urllib.parse import parse_qs

from mobinux.boot import BootOffer, BootRequest, Firmware, ResolvedFile
from mobinux.bootcfg import cmdline as cmdline_mod
from mobinux.bootcfg import ipxe, pxelinux
from mobinux.errors import InventoryError, PathRefused
from mobinux.inventory.db import BootLogin, Image, Inventory, Node
from mobinux.paths import contained_file
from mobinux.service.node_disks import node_base
from mobinux.service.steps import StepLog
from mobinux.users.passwords import hash_password, verify_password

log = logging.getLogger("mobinux.boot")

BIOS_IPXE_LOADER = "undionly.kpxe"  # iPXE over the firmware's UNDI driver (works on any NIC)
UEFI_IPXE_LOADER = "snponly.efi"  # iPXE over the firmware's SNP driver
PXELINUX_LOADER = "pxelinux.0"

_MAC_HEX = re.compile(r"^(?:01-)?([0-9a-f]{2})[-:]?([0-9a-f]{2})[-:]?([0-9a-f]{2})[-:]?"
                      r"([0-9a-f]{2})[-:]?([0-9a-f]{2})[-:]?([0-9a-f]{2})$")


def normalise_mac(text: str) -> str | None:
    """``52-54-00-00-00-01``, ``525400000001``, ``52:54:00:00:00:01`` -> colon form."""
    match = _MAC_HEX.match(text.strip().lower())
    return None if match is None else ":".join(match.groups())


def default_node_name(mac: str) -> str:
    return "node-" + mac.replace(":", "")


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the user does not exist, so a refusal takes as long either way."""
    return hash_password("no such user")


ENDPOINT_SETTING = "server.endpoint"  # written by `mobinux serve`, read by the CLI
DEFAULT_ISCSI_PORT = 3260
# IQNs are "iqn.<year-month the naming authority owned the domain>.<reversed domain>:<name>"
# (RFC 7143 §4.2.7.2); a site sets its own with --iqn-prefix.
DEFAULT_IQN_PREFIX = "iqn.2026-11.org.mobinux:"


@dataclass(frozen=True)
class Endpoint:
    """Where clients reach this server, and how it names its iSCSI targets."""

    server: IPv4Address
    http_port: int
    subnet: IPv4Network | None = None
    gateway: IPv4Address | None = None
    iscsi_port: int = DEFAULT_ISCSI_PORT
    iqn_prefix: str = DEFAULT_IQN_PREFIX

    def to_json(self) -> str:
        return json.dumps({"server": str(self.server), "http_port": self.http_port,
                           "subnet": None if self.subnet is None else str(self.subnet),
                           "gateway": None if self.gateway is None else str(self.gateway),
                           "iscsi_port": self.iscsi_port, "iqn_prefix": self.iqn_prefix})

    @classmethod
    def from_json(cls, text: str) -> Endpoint:
        d = json.loads(text)
        return cls(IPv4Address(d["server"]), int(d["http_port"]),
                   None if d["subnet"] is None else IPv4Network(d["subnet"]),
                   None if d["gateway"] is None else IPv4Address(d["gateway"]),
                   int(d.get("iscsi_port", DEFAULT_ISCSI_PORT)),
                   str(d.get("iqn_prefix", DEFAULT_IQN_PREFIX)))

    @property
    def portal(self) -> str:
        """``IP:PORT`` of the iSCSI portal."""
        return f"{self.server}:{self.iscsi_port}"

    def target_iqn(self, name: str) -> str:
        """The IQN of the exported target *name* (``mobinux target add``)."""
        return self.iqn_prefix + name

    def node_target_iqn(self, mac: str) -> str:
        """The IQN of a node's own target: from its MAC, so renaming a node keeps it."""
        return self.iqn_prefix + "node." + mac.replace(":", "")

    def node_initiator_iqn(self, mac: str) -> str:
        """The InitiatorName Mobinux gives a node (handed to iPXE); only it may log in."""
        return self.iqn_prefix + "initiator." + mac.replace(":", "")

    @classmethod
    def saved(cls, inventory: Inventory) -> Endpoint:
        """What the last ``mobinux serve`` ran with, for the CLI (0.0.0.0 before any run)."""
        text = inventory.get_setting(ENDPOINT_SETTING)
        return cls.from_json(text) if text else cls(IPv4Address("0.0.0.0"), 0)

    def http_url(self, path: str) -> str:
        host = str(self.server) if self.http_port == 80 else f"{self.server}:{self.http_port}"
        return f"http://{host}/{path.lstrip('/')}"


class BootService:
    def __init__(
        self,
        inventory: Inventory,
        endpoint: Endpoint,
        steps: StepLog,
        *,
        tftp_root: Path | None = None,
        loader_dirs: tuple[Path, ...] = (),
        on_boot: Callable[[str], None] | None = None,
        node_alive: Callable[[str], bool] | None = None,
    ) -> None:
        """*on_boot(mac)* is told of each sign that a registered node starts a new
        boot (its PXE DHCP request, its boot script or pxelinux config); the
        iSCSI side then ends that node's previous boot (its sessions, its overlay)."""
        self._inv = inventory
        self._on_boot = on_boot
        # Whether a node's iSCSI initiator is still talking (a login elsewhere is then refused).
        self._node_alive = node_alive
        self._endpoint = endpoint
        self._steps = steps
        self._tftp_root = tftp_root
        self._loader_dirs = loader_dirs
        self._images_dir = inventory.data_dir / "images"
        self._generation: tuple[int, int] | None = None
        self._nodes_by_mac: dict[str, Node] = {}
        self._mac_by_fixed_ip: dict[IPv4Address, str] = {}
        self._images: dict[str, Image] = {}
        self._policy = inventory.unknown_policy()
        self._warned: set[str] = set()

    # -- cache ------------------------------------------------------------

    def _refresh(self) -> None:
        generation = self._inv.generation()
        if generation == self._generation:
            return
        self._nodes_by_mac = {n.mac: n for n in self._inv.nodes()}
        self._mac_by_fixed_ip = {IPv4Address(n.ip): n.mac for n in self._nodes_by_mac.values() if n.ip}
        self._images = {i.name: i for i in self._inv.images()}
        self._policy = self._inv.unknown_policy()
        self._generation = generation

    def _node_for_mac(self, mac: str, *, enroll: bool) -> Node | None:
        """The registered node, or what the unknown-client policy makes of *mac*."""
        self._refresh()
        node = self._nodes_by_mac.get(mac)
        if node is not None:
            return node
        policy = self._policy
        if policy.action == "deny" or policy.image is None:
            return None
        transient = Node(name=default_node_name(mac), mac=mac, ip=None, images=(policy.image,),
                         created=time.time())
        if policy.action == "enroll" and enroll:
            try:
                self._inv.add_node(transient)
                log.info("%s enrolled as node %s with image %s", mac, transient.name, policy.image)
            except InventoryError as exc:
                log.warning("%s could not be enrolled: %s", mac, exc)
            self._generation = None
        return transient

    def _booting(self, mac: str) -> None:
        if self._on_boot is not None and mac in self._nodes_by_mac:
            try:
                self._on_boot(mac)
            except Exception:  # the boot goes on; the iSCSI side logs its own errors
                log.exception("%s: ending the previous boot failed", mac)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    # -- BootPolicy -------------------------------------------------------

    def is_known(self, mac: str) -> bool:
        self._refresh()
        return mac in self._nodes_by_mac

    def fixed_address(self, mac: str) -> IPv4Address | None:
        self._refresh()
        node = self._nodes_by_mac.get(mac)
        return None if node is None or node.ip is None else IPv4Address(node.ip)

    def fixed_owner(self, ip: IPv4Address) -> str | None:
        """The node whose fixed address *ip* is, so the pool never hands it to anyone else."""
        self._refresh()
        return self._mac_by_fixed_ip.get(ip)

    def boot_offer(self, request: BootRequest) -> BootOffer | None:
        node = self._node_for_mac(request.mac, enroll=True)
        if node is None:
            return None
        self._booting(node.mac)
        if request.ip is not None:
            self._steps.learn(request.mac, str(request.ip))
        filename = self._boot_filename(node, request)
        if filename is None:
            return None
        return BootOffer(filename=filename, next_server=self._endpoint.server)

    def _boot_filename(self, node: Node, request: BootRequest) -> str | None:
        firmware = request.firmware
        script = self.script_url(node.mac)
        if request.http_client:
            # UEFI HTTP boot: the firmware fetches an EFI binary by URL (UEFI 2.5+ §24.7).
            if firmware is Firmware.UEFI_X64 and not request.is_ipxe:
                return self._endpoint.http_url(UEFI_IPXE_LOADER)
            return script if request.is_ipxe else None
        if firmware is Firmware.BIOS:
            if node.loader == "pxelinux":
                return PXELINUX_LOADER  # wins even under iPXE, which then runs pxelinux.0
            return script if request.is_ipxe else BIOS_IPXE_LOADER
        if request.is_ipxe:
            return script
        if firmware is Firmware.UEFI_X64:
            return UEFI_IPXE_LOADER
        self._warn_once(f"arch-{request.arch}", f"{request.mac}: no iPXE loader for firmware "
                        f"{firmware.value} (option 93 = {request.arch}); not booting it")
        return None

    def script_url(self, mac: str) -> str:
        return self._endpoint.http_url(f"boot/{mac.replace(':', '-')}.ipxe")

    # -- per-node boot text ------------------------------------------------

    def _network(self, node: Node, client_ip: str | None) -> cmdline_mod.NodeNetwork:
        ip_text = node.ip or client_ip
        ip = None
        if ip_text:
            try:
                ip = IPv4Address(ip_text)
            except ValueError:
                ip = None
        iscsi = self.iscsi_info(node)
        login = self._login_of(node.mac) if node.login else None
        return cmdline_mod.NodeNetwork(
            mac=node.mac, hostname=node.name, server=self._endpoint.server, ip=ip,
            subnet=self._endpoint.subnet, gateway=self._endpoint.gateway,
            iscsi_target="" if iscsi is None else str(iscsi["target"]),
            iscsi_portal="" if iscsi is None else str(iscsi["portal"]),
            iscsi_initiator="" if iscsi is None else str(iscsi["initiator"]),
            iscsi_chap="" if login is None else f"{login.chap_user}:{login.chap_secret}",
        )

    def _login_of(self, mac: str) -> BootLogin | None:
        return next((b for b in self._inv.boot_logins() if b.mac == mac), None)

    def boot_cmdline(self, node: Node, image: Image, client_ip: str | None = None) -> str:
        template = cmdline_mod.join(image.cmdline, node.cmdline)
        return cmdline_mod.render(template, self._network(node, client_ip))

    def _entries(self, node: Node) -> list[Image]:
        self._refresh()
        images = [self._images[name] for name in node.images if name in self._images]
        if node.boot in ("local", "iscsi"):
            return []  # nothing to list: the firmware boots on, or iPXE sanboots the disk
        if node.boot == "kernel":
            return [i for i in images if i.kernel]  # RAM-disk images, or disks with a boot kernel
        return [i for i in images if i.kind == "ramdisk"]

    def node_has_disk(self, node: Node) -> bool:
        self._refresh()
        return node_base(node, self._images) is not None

    def iscsi_info(self, node: Node) -> dict[str, object] | None:
        """Where a node's own disk is (``--boot iscsi``, ``--boot kernel`` or ``--disk``):
        its own target, its own initiator name, LUN 0."""
        if not self.node_has_disk(node):
            return None
        return {
            "target": self._endpoint.node_target_iqn(node.mac),
            "portal": self._endpoint.portal,
            "initiator": self._endpoint.node_initiator_iqn(node.mac),
            "lun": 0,
        }

    def ipxe_script(self, node: Node, client_ip: str | None, *, logged_in: bool = False) -> str:
        if node.login and not logged_in and node.boot != "local":
            return self._login_prompt(node)
        if node.boot == "local":
            return ipxe.local_boot_script()
        if node.boot == "iscsi":
            root_path = ipxe.iscsi_root_path(str(self._endpoint.server), self._endpoint.iscsi_port,
                                             0, self._endpoint.node_target_iqn(node.mac))
            login = self._login_of(node.mac) if node.login else None
            return ipxe.sanboot_script(hostname=node.name, root_path=root_path,
                                       initiator_iqn=self._endpoint.node_initiator_iqn(node.mac),
                                       chap=None if login is None else (login.chap_user,
                                                                        login.chap_secret))
        entries = [
            ipxe.IpxeEntry(
                label=f"img{i}",
                title=image.name,
                kernel_url=self._endpoint.http_url(image.kernel),
                initrd_url=None if image.initrd is None else self._endpoint.http_url(image.initrd),
                cmdline=self.boot_cmdline(node, image, client_ip),
            )
            for i, image in enumerate(self._entries(node))
        ]
        return ipxe.render_script(entries, hostname=node.name)

    # -- boot-time login -----------------------------------------------------

    def _login_prompt(self, node: Node, message: str = "") -> str:
        url = self._endpoint.http_url(f"login/{node.mac.replace(':', '-')}.ipxe")
        return ipxe.login_script(hostname=node.name, login_url=url, message=message)

    async def _login(self, node: Node, query: str, client_ip: str) -> bytes:
        """Check a login from iPXE; attach the user's disk for this boot, or ask again."""
        form = parse_qs(query, keep_blank_values=True)
        name = (form.get("user") or [""])[0].strip()
        password = (form.get("password") or [""])[0]
        user = self._inv.get_user(name) if name else None
        stored = None if user is None else user.password
        # The hash is checked in a thread (scrypt takes ~0.1 s); an unknown user costs
        # the same, so timing does not tell which names exist.
        ok = await asyncio.to_thread(verify_password, password, stored or _dummy_hash())
        if user is None or stored is None or not ok:
            log.warning("%s (%s): login as %r refused: wrong user name or password", node.name,
                        client_ip, name[:64])
            return self._login_prompt(node, "login failed: wrong user name or password").encode()
        refusal = self._login_refusal(node, user.name)
        if refusal is not None:
            log.warning("%s (%s): login as %s refused: %s", node.name, client_ip, user.name, refusal)
            return self._login_prompt(node, f"login refused: {refusal}").encode()
        secret = secrets.token_urlsafe(18)  # 24 characters: a CHAP secret for this boot only
        self._inv.set_boot_login(BootLogin(node.mac, user.name, "mobinux-boot", secret, time.time()))
        self._generation = None
        log.info("%s (%s): user %s logged in; their disk is attached for this boot", node.name,
                 client_ip, user.name)
        self._steps(node.mac, client_ip, f"login {user.name}")
        return self.ipxe_script(node, client_ip, logged_in=True).encode()

    def _login_refusal(self, node: Node, user: str) -> str | None:
        """Why *user* may not attach their disk to *node* now, or None."""
        self._refresh()
        for other in self._nodes_by_mac.values():
            if other.user == user and other.mac != node.mac:
                return f"{user}'s disk is attached to node {other.name}"
        for login in self._inv.boot_logins():
            if login.user == user and login.mac != node.mac:
                other_node = self._nodes_by_mac.get(login.mac)
                alive = self._node_alive is not None and self._node_alive(login.mac)
                if alive:
                    where = other_node.name if other_node else login.mac
                    return f"{user} is logged in on node {where}"
        return None

    def pxelinux_config(self, node: Node | None, client_ip: str | None) -> str:
        if node is None or node.boot == "local":
            return pxelinux.render_config([], local_boot=True)
        entries = [
            pxelinux.PxeEntry(
                label=re.sub(r"[^A-Za-z0-9_.-]", "_", image.name),
                kernel="/" + image.kernel,
                initrd=None if image.initrd is None else "/" + image.initrd,
                append=self.boot_cmdline(node, image, client_ip),
                title=image.name,
            )
            for image in self._entries(node)
        ]
        return pxelinux.render_config(entries)

    # -- FileResolver -----------------------------------------------------

    def resolve(self, name: str, client_ip: str, query: str = "") -> ResolvedFile | None:
        head, _, rest = name.partition("/")
        if name == "boot.ipxe":
            macs = parse_qs(query).get("mac", [])
            mac = normalise_mac(macs[0]) if macs else self._steps.mac_by_ip.get(client_ip)
            return self._script_file(name, mac, client_ip)
        if head == "boot" and rest.endswith(".ipxe") and "/" not in rest:
            return self._script_file(name, normalise_mac(rest[: -len(".ipxe")]), client_ip)
        if head == "pxelinux.cfg" and rest and "/" not in rest:
            return self._pxelinux_file(name, rest, client_ip)
        if head == "login" and rest.endswith(".ipxe") and "/" not in rest and query:
            return self._login_file(name, normalise_mac(rest[: -len(".ipxe")]), query, client_ip)
        if head == "images" and rest:
            path = contained_file(self._images_dir, rest)
            return None if path is None else ResolvedFile(name, path=path,
                                                          mac=self._steps.mac_by_ip.get(client_ip))
        return self._static_file(name, client_ip)

    def _script_file(self, name: str, mac: str | None, client_ip: str) -> ResolvedFile | None:
        if mac is None:
            return None
        node = self._node_for_mac(mac, enroll=False)
        if node is None:
            text = ipxe.local_boot_script("this machine is not registered")
        else:
            self._booting(mac)
            text = self.ipxe_script(node, client_ip)
        self._steps.learn(mac, client_ip)
        return ResolvedFile(name, data=text.encode(), mac=mac)

    def _login_file(self, name: str, mac: str | None, query: str,
                    client_ip: str) -> ResolvedFile | None:
        node = None if mac is None else self._node_for_mac(mac, enroll=False)
        if node is None or not node.login or mac not in self._nodes_by_mac:
            return None
        self._steps.learn(node.mac, client_ip)
        return ResolvedFile(name, later=lambda: self._login(node, query, client_ip), mac=node.mac)

    def _pxelinux_file(self, name: str, leaf: str, client_ip: str) -> ResolvedFile | None:
        mac = pxelinux.mac_from_name(leaf)
        if mac is not None:
            node = self._node_for_mac(mac, enroll=False)
            if node is None:
                return None  # let pxelinux go on to the next name, as with a missing file
            self._booting(mac)
            self._steps.learn(mac, client_ip)
            return ResolvedFile(name, data=self.pxelinux_config(node, client_ip).encode(), mac=mac)
        known_mac = self._steps.mac_by_ip.get(client_ip)
        node = None if known_mac is None else self._node_for_mac(known_mac, enroll=False)
        try:
            ip = IPv4Address(client_ip)
        except ValueError:
            ip = None
        if leaf == "default" or (ip is not None and node is not None and leaf == pxelinux.ip_hex(ip)):
            text = self.pxelinux_config(node, client_ip)
            return ResolvedFile(name, data=text.encode(), mac=known_mac)
        return None  # UUID and shorter hex names: not found, pxelinux tries the next

    def _static_file(self, name: str, client_ip: str) -> ResolvedFile | None:
        mac = self._steps.mac_by_ip.get(client_ip)
        if self._tftp_root is not None:
            path = contained_file(self._tftp_root, name)
            if path is not None:
                return ResolvedFile(name, path=path, mac=mac)
        if "/" in name:
            return None
        for directory in self._loader_dirs:
            try:
                path = contained_file(directory, name)
            except PathRefused:
                continue  # a system file linking elsewhere is simply not offered
            if path is not None:
                return ResolvedFile(name, path=path, mac=mac)
        return None

    # -- for the CLI ------------------------------------------------------

    def describe_node(self, node: Node) -> dict[str, object]:
        self._refresh()
        image = self._images.get(node.image) if node.image else None
        boot_cmdline = ("" if image is None or node.boot in ("iscsi", "local") or not image.kernel
                        else self.boot_cmdline(node, image))
        info: dict[str, object] = {
            "name": node.name,
            "mac": node.mac,
            "ip": node.ip,
            "image": node.image,
            "images": list(node.images),
            "boot": node.boot,
            "loader": node.loader,
            "cmdline": node.cmdline,
            "boot_cmdline": boot_cmdline,
            "disk": node.disk_image if self.node_has_disk(node) else None,
            "persistent": node.persistent,
            "overlay_limit": node.overlay_limit,
            "user": node.user,
            "login": node.login,
            "script_url": self.script_url(node.mac),
        }
        iscsi = self.iscsi_info(node)
        if iscsi is not None:
            info["iscsi"] = iscsi
        return info
