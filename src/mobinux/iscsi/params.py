"""What a login agreed on, and the target-side view of exports the iSCSI layer needs.

These are the contracts between the iSCSI modules:

- :mod:`mobinux.iscsi.login` turns Login PDUs into :class:`SessionParams`,
  consulting a :class:`TargetDirectory` for names, ACLs and CHAP secrets;
- :mod:`mobinux.iscsi.connection` runs the full-feature phase with them;
- :mod:`mobinux.iscsi.aio` builds the directory from the inventory.

Nothing here knows SCSI: a target's LUNs are opaque to this layer.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Protocol


class SessionType(enum.StrEnum):
    DISCOVERY = "Discovery"
    NORMAL = "Normal"


@dataclasses.dataclass(frozen=True, slots=True)
class ChapSecret:
    """A CHAP user name and secret (RFC 7143 §12.1.3; RFC 1994). Never logged: repr hides the secret."""

    user: str
    secret: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class TargetLimits:
    """What this target declares and accepts (§13); the login may only lower these.

    Defaults follow what Linux targets (LIO) declare, which every initiator
    has been tested against.
    """

    max_recv_data_segment_length: int = 262144  # what we accept per PDU
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    max_outstanding_r2t: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 0  # ERL 0 only: nothing to retain
    max_connections: int = 1
    error_recovery_level: int = 0
    # The command window we open (MaxCmdSN - ExpCmdSN + 1), §4.2.2.1.
    queue_depth: int = 128


@dataclasses.dataclass(slots=True)
class SessionParams:
    """Operational parameters in force after a successful login (§13 keys, negotiated).

    ``initiator_max_recv_data_segment_length`` is the initiator's declaration:
    the most this target may put in one PDU it sends (§13.12, declarative).
    ``target_max_recv_data_segment_length`` is what we declared to receive.
    """

    session_type: SessionType
    initiator_name: str
    initiator_alias: str
    target_name: str  # "" for a discovery session
    isid: bytes  # 6 bytes
    tsih: int
    cid: int
    tpgt: int
    header_digest: bool = False
    data_digest: bool = False
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    max_connections: int = 1
    initiator_max_recv_data_segment_length: int = 8192
    target_max_recv_data_segment_length: int = 8192
    # CmdSN state at the end of login (§4.2.2.1): ExpCmdSN of the first full-feature command.
    exp_cmd_sn: int = 0
    # StatSN the target sends next (§4.2.2.2).
    stat_sn: int = 0

    @property
    def nexus(self) -> str:
        """The I_T nexus name SCSI needs (SPC-4 PR; RFC 7143 §4.2.7.2 iSCSI port names)."""
        return f"{self.initiator_name},i,0x{self.isid.hex()},{self.target_name},t,0x{self.tpgt:04x}"


@dataclasses.dataclass(frozen=True, slots=True)
class TargetEntry:
    """One exported target as the login and discovery see it."""

    iqn: str
    # None: any initiator may log in; otherwise only these InitiatorNames (case-insensitive, §4.2.7.1).
    allowed_initiators: frozenset[str] | None = None
    chap: ChapSecret | None = None  # the initiator must prove this (one-way CHAP)
    mutual_chap: ChapSecret | None = None  # the target proves this to the initiator
    alias: str = ""


class TargetDirectory(Protocol):
    """The exports the login and SendTargets consult; the asyncio adapter implements it."""

    def lookup(self, iqn: str) -> TargetEntry | None:
        """The target named *iqn* (compared case-insensitively, §4.2.7.1), or None."""
        ...

    def visible_to(self, initiator_name: str) -> Sequence[TargetEntry]:
        """Targets SendTargets=All shows this initiator (those its ACLs admit)."""
        ...

    def portals(self, iqn: str) -> Sequence[str]:
        """TargetAddress values for *iqn*: ``IP:PORT,TPGT`` (§13.9)."""
        ...

    def discovery_chap(self) -> ChapSecret | None:
        """CHAP required for discovery sessions, or None."""
        ...
