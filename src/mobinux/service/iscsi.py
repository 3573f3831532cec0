"""What the iSCSI target exports, read from the inventory.

:class:`IscsiExports` is the directory the iSCSI layer consults at login
(:class:`mobinux.iscsi.aio.Exports`): the targets added with ``mobinux target
add`` and one target per ``--boot iscsi`` node, which only that node's
initiator name may open. Like :class:`~mobinux.service.boot.BootService` it
re-reads the inventory whenever the database changes, so targets added while
the server runs are visible at the next login, without a restart.

A target's SCSI state (its open file, unit attentions, reservations) lives in
one :class:`~mobinux.scsi.ScsiTarget` shared by all its sessions; it is
rebuilt only when the target's definition changes, and sessions already
logged in keep the object they started with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mobinux.inventory.db import Inventory
from mobinux.iscsi.params import ChapSecret, TargetEntry
from mobinux.scsi import LogicalUnit, ScsiTarget
from mobinux.service.boot import Endpoint
from mobinux.storage.file import FileDevice

log = logging.getLogger("mobinux.iscsi")


@dataclass(frozen=True)
class ExportSpec:
    """Everything that decides a target's SCSI object; a change rebuilds it."""

    iqn: str
    file: str
    readonly: bool
    node: str | None  # the node whose own disk this is


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
            specs[iqn.lower()] = ExportSpec(iqn, t.file, t.readonly, None)
        images = {i.name: i for i in self._inv.images()}
        for node in self._inv.nodes():
            image = images.get(node.image) if node.image else None
            if node.boot != "iscsi" or image is None or image.disk is None:
                continue
            iqn = self._endpoint.node_target_iqn(node.mac)
            entries[iqn.lower()] = TargetEntry(
                iqn=iqn,
                allowed_initiators=frozenset({self._endpoint.node_initiator_iqn(node.mac).lower()}),
                alias=node.name)
            specs[iqn.lower()] = ExportSpec(iqn, str(self._inv.data_dir / image.disk), False, node.name)
        self._entries, self._specs = entries, specs
        self._generation = generation

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

    def node_of(self, iqn: str) -> str | None:
        """The node whose own disk target *iqn* is, for ``mobinux status``."""
        self._refresh()
        spec = self._specs.get(iqn.lower())
        return None if spec is None else spec.node

    def close(self) -> None:
        for _, _, device in self._scsi.values():
            device.close()
        for device in self._retired:
            device.close()
        self._scsi.clear()
        self._retired.clear()
