"""What the iSCSI target exports, read from the inventory.

:class:`IscsiExports` is the directory the iSCSI layer consults at login
(:class:`mobinux.iscsi.aio.Exports`): the targets added with ``mobinux target
add`` and one target per node with a disk, which only that node's initiator
name may open. Like :class:`~mobinux.service.boot.BootService` it re-reads the
inventory whenever the database changes, so targets added while the server
runs are visible at the next login, without a restart.

A node's target serves the node's own copy-on-write overlay over the shared,
read-only base image (:mod:`mobinux.service.node_disks`); :meth:`node_booting`
starts a node's new boot (its old sessions closed, its overlay emptied) and
:meth:`poll` carries out ``mobinux node reset`` requests.

A target's SCSI state (its open file, unit attentions, reservations) lives in
one :class:`~mobinux.scsi.ScsiTarget` shared by all its sessions; it is
rebuilt only when the target's definition changes (or the node reboots), and
sessions already logged in keep the object they started with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mobinux.errors import MobinuxError
from mobinux.images.versions import collect_unused
from mobinux.inventory.db import BootLogin, Image, Inventory, Node
from mobinux.iscsi.params import ChapSecret, TargetEntry
from mobinux.scsi import LogicalUnit, ScsiTarget
from mobinux.service.boot import Endpoint
from mobinux.service.node_disks import NodeDisks, node_base, remove_overlay
from mobinux.service.user_disks import REQUEST_KINDS, UserDisks
from mobinux.storage.file import FileDevice

log = logging.getLogger("mobinux.iscsi")


@dataclass(frozen=True)
class ExportSpec:
    """Everything that decides a target's SCSI object; a change rebuilds it."""

    iqn: str
    file: str
    readonly: bool


@dataclass(frozen=True)
class NodeDiskSpec:
    """A node's own disk: its overlay's base and settings."""

    iqn: str
    mac: str
    name: str
    base: str  # the base image file, relative to the data directory
    persistent: bool
    limit: int | None
    user: str | None = None  # whose disk is LUN 1
    chap: tuple[str, str] | None = field(default=None, repr=False)  # one-boot CHAP after a login


SessionCloser = Callable[[str], int]
"""Closes every session logged in to a target IQN; returns how many."""

SessionCounter = Callable[[str], int]
"""How many sessions are logged in to a target IQN."""


class IscsiExports:
    def __init__(self, inventory: Inventory, endpoint: Endpoint) -> None:
        self._inv = inventory
        self._endpoint = endpoint
        self._generation: tuple[int, int] | None = None
        self._entries: dict[str, TargetEntry] = {}  # lower-case IQN -> entry
        self._specs: dict[str, ExportSpec] = {}
        self._scsi: dict[str, tuple[ExportSpec, ScsiTarget, FileDevice]] = {}
        self._retired: list[FileDevice] = []
        self._warned: set[str] = set()
        self._node_specs: dict[str, NodeDiskSpec] = {}  # MAC -> spec
        self._node_iqns: dict[str, str] = {}  # lower-case IQN -> MAC
        self._node_scsi: dict[str, tuple[NodeDiskSpec, ScsiTarget]] = {}  # MAC -> target
        self.disks = NodeDisks(inventory.data_dir)
        self.users = UserDisks(inventory.data_dir)
        self.close_sessions: SessionCloser = lambda iqn: 0  # set by the server
        self.count_sessions: SessionCounter = lambda iqn: 0  # set by the server
        self.target_alive: Callable[[str], bool] = lambda iqn: False  # set by the server

    # -- inventory --------------------------------------------------------

    def _refresh(self) -> None:
        generation = self._inv.generation()
        if generation == self._generation:
            return
        entries: dict[str, TargetEntry] = {}
        specs: dict[str, ExportSpec] = {}
        for t in self._inv.targets():
            iqn = self._endpoint.target_iqn(t.name)
            chap = None if t.chap_user is None or t.chap_secret is None else \
                ChapSecret(t.chap_user, t.chap_secret.encode())
            mutual = None if t.mutual_user is None or t.mutual_secret is None else \
                ChapSecret(t.mutual_user, t.mutual_secret.encode())
            entries[iqn.lower()] = TargetEntry(
                iqn=iqn, allowed_initiators=frozenset(a.lower() for a in t.allow) or None,
                chap=chap, mutual_chap=mutual, alias=t.name)
            specs[iqn.lower()] = ExportSpec(iqn, t.file, t.readonly)
        images = {i.name: i for i in self._inv.images()}
        logins = {b.mac: b for b in self._inv.boot_logins()}
        node_specs: dict[str, NodeDiskSpec] = {}
        for node in self._inv.nodes():
            spec = self._node_spec(node, images, logins.get(node.mac) if node.login else None)
            if spec is None:
                continue
            node_specs[node.mac] = spec
            entries[spec.iqn.lower()] = TargetEntry(
                iqn=spec.iqn,
                allowed_initiators=frozenset({self._endpoint.node_initiator_iqn(node.mac).lower()}),
                chap=None if spec.chap is None else ChapSecret(spec.chap[0], spec.chap[1].encode()),
                alias=node.name)
        for mac in self._node_specs.keys() - node_specs.keys():
            self._node_gone(mac)
        for mac, spec in node_specs.items():
            old = self._node_specs.get(mac)
            if old is not None and old.user != spec.user:
                # The user disk was attached or detached: the node logs in again to see it.
                closed = self.close_sessions(spec.iqn)
                self._node_scsi.pop(mac, None)
                log.info("node %s: user disk %s -> %s; %d session(s) closed", spec.name,
                         old.user or "none", spec.user or "none", closed)
        attached = {spec.user for spec in node_specs.values() if spec.user}
        for user in self.users.names():
            if user not in attached:
                self.users.close_user(user)
        for mac, spec in node_specs.items():
            disk = self.disks.get(mac)
            if disk is not None:
                disk.overlay.limit = spec.limit
        self._entries, self._specs = entries, specs
        self._node_specs = node_specs
        self._node_iqns = {s.iqn.lower(): mac for mac, s in node_specs.items()}
        self._generation = generation

    def _node_spec(self, node: Node, images: dict[str, Image],
                   login: BootLogin | None) -> NodeDiskSpec | None:
        base = node_base(node, images)
        if base is None:
            return None
        user = node.user if login is None else login.user
        chap = None if login is None else (login.chap_user, login.chap_secret)
        return NodeDiskSpec(self._endpoint.node_target_iqn(node.mac), node.mac, node.name, base,
                            node.persistent, node.overlay_limit, user, chap)

    def _node_gone(self, mac: str) -> None:
        """A node lost its disk (removed, or no disk any more): end its sessions, drop the overlay."""
        old = self._node_specs[mac]
        closed = self.close_sessions(old.iqn)
        self._node_scsi.pop(mac, None)
        self.disks.forget(mac)
        self._collect_versions()
        log.info("node %s (%s): no disk any more; %d session(s) closed, overlay removed",
                 old.name, mac, closed)

    # -- node boots and resets ----------------------------------------------

    def node_booting(self, mac: str) -> None:
        """The node starts a new boot (its PXE DHCP request or boot script was seen).

        Sessions of its previous boot are closed first (a power-cycled machine
        never logs out), then its overlay is emptied, unless it is persistent.
        Called before this boot's own logins, which come after the boot
        script; nothing calls it between iPXE's login and the booted system's.
        """
        if self._inv.clear_boot_login(mac):  # who logged in last time must log in again
            log.info("node %s: new boot: the last boot's login ended", mac)
        self._refresh()
        spec = self._node_specs.get(mac)
        if spec is None:
            return
        self._reset(spec, force=False, why="new boot")

    def _reset(self, spec: NodeDiskSpec, *, force: bool, why: str) -> None:
        disk = self.disks.get(spec.mac)
        if spec.persistent and not force:
            return
        if disk is not None and not disk.used and disk.base_rel == spec.base and not force:
            return  # untouched since its last reset: several DHCP packets per boot
        closed = self.close_sessions(spec.iqn)
        try:
            discarded = self.disks.reset(spec.mac, spec.base, persistent=spec.persistent,
                                         limit=spec.limit, force=force)
        except OSError as exc:
            log.error("node %s: cannot reset its overlay: %s", spec.name, exc.strerror or exc)
            return
        self._node_scsi.pop(spec.mac, None)  # new boot, new unit attentions and reservations
        if disk is not None and disk.base_rel != spec.base:
            self._collect_versions()  # it may have been the last node on an old version
        if discarded or closed:
            log.info("node %s: %s: %d old session(s) closed, overlay %s", spec.name, why, closed,
                     "emptied" if discarded else "unchanged")

    def _collect_versions(self) -> None:
        try:
            removed = collect_unused(self._inv.data_dir,
                                     {i.disk for i in self._inv.images() if i.disk is not None})
        except OSError as exc:
            log.warning("cannot remove unused image versions: %s", exc.strerror or exc)
            return
        for rel in removed:
            log.info("image version %s removed: no node uses it any more", rel)

    def poll(self) -> None:
        """Carry out ``mobinux node reset`` requests (the server calls this every second)."""
        self._refresh()
        for mac in self._inv.node_reset_requests():
            spec = self._node_specs.get(mac)
            if spec is not None:
                self._reset(spec, force=True, why="reset by mobinux node reset")
            else:
                self.disks.close_node(mac)
                remove_overlay(self._inv.data_dir, mac)
            self._inv.finish_node_reset(mac)
        for request, kind, user, arg in self._inv.pending_disk_requests():
            self._inv.finish_disk_request(request, self._disk_request(kind, user, arg))

    def _disk_request(self, kind: str, user: str, arg: str) -> str | None:
        """Carry out a CLI's snapshot request; the error message, or None."""
        if kind not in REQUEST_KINDS:
            return f"unknown request {kind!r}"
        if kind != "snapshot-create":
            for spec in self._node_specs.values():
                if spec.user == user and self.count_sessions(spec.iqn):
                    return (f"user {user}'s disk is attached to node {spec.name}, which is up; "
                            f"shut it down first (or detach the disk: mobinux node set {spec.name} "
                            "--user none)")
        try:
            self.users.run(kind, user, arg, time.time())
        except (OSError, ValueError, KeyError, MobinuxError) as exc:
            return str(exc)
        log.info("user %s: %s %s", user, kind, arg)
        return None

    # -- TargetDirectory ----------------------------------------------------

    def lookup(self, iqn: str) -> TargetEntry | None:
        self._refresh()
        return self._entries.get(iqn.lower())

    def visible_to(self, initiator_name: str) -> Sequence[TargetEntry]:
        self._refresh()
        name = initiator_name.lower()
        return [e for e in self._entries.values()
                if e.allowed_initiators is None or name in e.allowed_initiators]

    def portals(self, iqn: str) -> Sequence[str]:
        return [f"{self._endpoint.portal},1"]

    def discovery_chap(self) -> ChapSecret | None:
        return None

    # -- Exports --------------------------------------------------------------

    def scsi_target(self, iqn: str) -> ScsiTarget | None:
        self._refresh()
        key = iqn.lower()
        mac = self._node_iqns.get(key)
        if mac is not None:
            return self._node_target(self._node_specs[mac])
        spec = self._specs.get(key)
        if spec is None:
            return None
        cached = self._scsi.get(key)
        if cached is not None and cached[0] == spec:
            return cached[1]
        try:
            device = FileDevice(Path(spec.file), readonly=spec.readonly)
        except OSError as exc:
            if spec.file not in self._warned:
                self._warned.add(spec.file)
                log.warning("target %s: cannot open %s: %s", spec.iqn, spec.file, exc.strerror or exc)
            return None
        target = ScsiTarget({0: LogicalUnit(device, device_id=f"{spec.iqn}/0", readonly=spec.readonly)})
        if cached is not None:
            self._retired.append(cached[2])  # sessions logged in before the change still use it
        self._scsi[key] = (spec, target, device)
        return target

    def _node_target(self, spec: NodeDiskSpec) -> ScsiTarget | None:
        cached = self._node_scsi.get(spec.mac)
        disk = self.disks.get(spec.mac)
        if cached is not None and cached[0] == spec and disk is not None:
            disk.used = True
            return cached[1]
        # A node whose image changed while it runs keeps the base it booted
        # (disks.open returns the open overlay); node_booting moves it.
        try:
            disk = self.disks.open(spec.mac, spec.base, persistent=spec.persistent, limit=spec.limit)
        except OSError as exc:
            if spec.base not in self._warned:
                self._warned.add(spec.base)
                log.warning("node %s: cannot open its disk (%s): %s", spec.name, spec.base,
                            exc.strerror or exc)
            return None
        disk.used = True
        luns = {0: LogicalUnit(disk.overlay, device_id=f"{spec.iqn}/0")}
        if spec.user is not None:
            try:
                # The user's disk keeps its identity (VPD 83h) on whichever node it is attached.
                luns[1] = LogicalUnit(self.users.open(spec.user), device_id=f"mobinux-user/{spec.user}")
            except Exception as exc:  # the node still gets its own disk
                log.error("node %s: cannot open user %s's disk: %s", spec.name, spec.user, exc)
        target = ScsiTarget(luns)
        self._node_scsi[spec.mac] = (spec, target)
        return target

    def node_alive(self, mac: str) -> bool:
        """Whether the node's initiator still talks to its target (see IscsiService.target_alive)."""
        return self.target_alive(self._endpoint.node_target_iqn(mac))

    def node_of(self, iqn: str) -> str | None:
        """The node whose own disk target *iqn* is, for ``mobinux status``."""
        self._refresh()
        mac = self._node_iqns.get(iqn.lower())
        return None if mac is None else self._node_specs[mac].name

    def close(self) -> None:
        self.disks.close()
        self.users.close()
        self._node_scsi.clear()
        for _, _, device in self._scsi.values():
            device.close()
        for device in self._retired:
            device.close()
        self._scsi.clear()
        self._retired.clear()
