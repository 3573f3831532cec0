"""Reservations: SPC-2 RESERVE(6)/RELEASE(6) and SPC-4 persistent reservations (5.12).

Pure state plus the PERSISTENT RESERVE IN/OUT codecs; no locking (the
LogicalUnit holds its lock around every call) and no I/O.  Persistent
reservations are kept in memory only: PTPL (persist through power loss) is
not offered, and REPORT CAPABILITIES says so.

I_T nexuses are the opaque strings the transport hands to ``execute``.  As
Mobinux has a single SCSI target port per target, ALL_TG_PT is not offered
and SPEC_I_PT/REGISTER AND MOVE are not supported (their TransportIDs would
name nexuses we cannot map).

Unit attentions the standard asks for (RESERVATIONS PREEMPTED, RESERVATIONS
RELEASED, REGISTRATIONS PREEMPTED) are returned to the caller as
``(nexus, asc)`` pairs to queue, keeping this module free of UA bookkeeping.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from mobinux.scsi.constants import Asc, PrOutAction, PrType, SenseKey, Status
from mobinux.scsi.opcodes import Access
from mobinux.scsi.sense import CheckCondition, StatusError, invalid_cdb, invalid_param

PR_OUT_PARAMETER_LENGTH = 24  # SPC-4 6.16.3 basic PERSISTENT RESERVE OUT parameter list
INVALID_RELEASE_OF_PERSISTENT_RESERVATION = 0x2604  # SPC-4 Annex D

_ALL_REGISTRANTS = frozenset(
    (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
)
_REGISTRANTS_ONLY = frozenset(
    (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
)
_EXCLUSIVE_ACCESS = frozenset(
    (
        PrType.EXCLUSIVE_ACCESS,
        PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
        PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
    )
)

UnitAttentions = list[tuple[str, Asc]]


@dataclass(slots=True)
class PersistentReservation:
    holder: str  # the reserving nexus (meaningless for all-registrants types)
    type: PrType


@dataclass(slots=True)
class ReservationState:
    """All reservation state of one logical unit."""

    # SPC-2 RESERVE(6)/(10): the nexus holding the LU, if any.
    reserved_by: str | None = None
    # SPC-4 5.12: nexus -> reservation key, in registration order (READ KEYS order).
    registrations: dict[str, int] = field(default_factory=dict)
    generation: int = 0
    reservation: PersistentReservation | None = None

    # -- conflict checks --------------------------------------------------------

    def is_holder(self, nexus: str) -> bool:
        res = self.reservation
        if res is None:
            return False
        if res.type in _ALL_REGISTRANTS:
            return nexus in self.registrations
        return res.holder == nexus

    def conflicts(self, nexus: str, access: Access, *, allowed_when_reserved: bool) -> bool:
        """True if a command of this access class from *nexus* must get RESERVATION CONFLICT."""
        if self.reserved_by is not None and self.reserved_by != nexus:
            # SPC-2 5.5.1: everything but a short list conflicts.
            return not allowed_when_reserved
        res = self.reservation
        if res is None or access is Access.ALWAYS or access is Access.SPECIAL:
            return False
        if self.is_holder(nexus):
            return False
        if res.type in _REGISTRANTS_ONLY and nexus in self.registrations:
            return False  # SPC-4 5.12.9 Table 64: registrants have full access
        if access is Access.WRITE:
            return True
        return res.type in _EXCLUSIVE_ACCESS

    def reserve6_conflicts(self, nexus: str) -> bool:
        """SPC-4 5.12.3 (compatible reservation handling): RESERVE/RELEASE(6) vs PR.

        While any PR registration exists, RESERVE and RELEASE conflict.
        """
        return bool(self.registrations) or self.reservation is not None

    # -- RESERVE(6) / RELEASE(6) -------------------------------------------------

    def reserve6(self, nexus: str) -> None:
        if self.reserve6_conflicts(nexus) or (
            self.reserved_by is not None and self.reserved_by != nexus
        ):
            raise StatusError(Status.RESERVATION_CONFLICT)
        self.reserved_by = nexus

    def release6(self, nexus: str) -> None:
        if self.reserve6_conflicts(nexus):
            raise StatusError(Status.RESERVATION_CONFLICT)
        # SPC-2 7.17: a RELEASE from a nexus that does not hold the
        # reservation is not an error and changes nothing.
        if self.reserved_by == nexus:
            self.reserved_by = None

    def drop_reserve6(self, nexus: str | None = None) -> None:
        """Release the SPC-2 reservation (of *nexus* only, if given): resets, nexus loss."""
        if nexus is None or self.reserved_by == nexus:
            self.reserved_by = None

    # -- PERSISTENT RESERVE IN ---------------------------------------------------

    def read_keys(self) -> bytes:
        keys = b"".join(struct.pack(">Q", k) for k in self.registrations.values())
        return struct.pack(">II", self.generation, len(keys)) + keys

    def read_reservation(self) -> bytes:
        res = self.reservation
        if res is None:
            return struct.pack(">II", self.generation, 0)
        key = 0 if res.type in _ALL_REGISTRANTS else self.registrations.get(res.holder, 0)
        # SPC-4 6.15.3.2: key, obsolete(4), reserved, SCOPE/TYPE, obsolete(2).
        body = struct.pack(">QIBBH", key, 0, 0, res.type, 0)
        return struct.pack(">II", self.generation, len(body)) + body

    @staticmethod
    def report_capabilities() -> bytes:
        # SPC-4 6.15.4 Table 172.  CRH=1: RESERVE/RELEASE(6) conflict with PR
        # (5.12.3).  TMV=1 with ALLOW COMMANDS 000b ("no information").
        crh = 0x10
        tmv = 0x80
        mask = (
            (1 << 7)  # WR_EX_AR
            | (1 << 6)  # EX_AC_RO
            | (1 << 5)  # WR_EX_RO
            | (1 << 3)  # EX_AC
            | (1 << 1)  # WR_EX
        )
        return struct.pack(">HBBBBH", 8, crh, tmv, mask, 0x01, 0)  # byte 5 bit 0: EX_AC_AR

    def read_full_status(self) -> bytes:
        out = bytearray()
        for nexus, key in self.registrations.items():
            holder = self.is_holder(nexus)
            scope_type = self.reservation.type if holder and self.reservation else 0
            tid = _transport_id(nexus)
            # SPC-4 6.15.5 Table 174: key, reserved(4), ALL_TG_PT/R_HOLDER,
            # SCOPE/TYPE, reserved(4), RELATIVE TARGET PORT ID, length, TransportID.
            out += struct.pack(
                ">QIBBIHI", key, 0, 0x01 if holder else 0, scope_type, 0, 1, len(tid)
            )
            out += tid
        return struct.pack(">II", self.generation, len(out)) + bytes(out)

    # -- PERSISTENT RESERVE OUT --------------------------------------------------

    def prout(
        self, nexus: str, action: int, scope_type: int, params: bytes, list_length: int
    ) -> UnitAttentions:
        """Run one PERSISTENT RESERVE OUT service action (SPC-4 5.12.5-5.12.11)."""
        if list_length != PR_OUT_PARAMETER_LENGTH or len(params) < PR_OUT_PARAMETER_LENGTH:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
        if self.reserved_by is not None and self.reserved_by != nexus:
            raise StatusError(Status.RESERVATION_CONFLICT)
        rk, sark = struct.unpack_from(">QQ", params, 0)
        flags = params[20]
        if flags & 0x08:  # SPEC_I_PT
            raise invalid_param(20, 3)
        if flags & 0x04:  # ALL_TG_PT (ATP_C=0)
            raise invalid_param(20, 2)
        if flags & 0x01:  # APTPL (PTPL_C=0)
            raise invalid_param(20, 0)
        if action in (PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY):
            return self._register(
                nexus, rk, sark, ignore=action == PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY
            )
        # Every other action needs a registered nexus with the right key.
        current = self.registrations.get(nexus)
        if current is None or current != rk:
            raise StatusError(Status.RESERVATION_CONFLICT)
        if action == PrOutAction.CLEAR:
            return self._clear(nexus)
        # RESERVE, RELEASE, PREEMPT (AND ABORT) carry a scope and type.
        if scope_type >> 4 != 0:  # only LU_SCOPE (SPC-4 6.16.2)
            raise invalid_cdb(2, 7)
        try:
            pr_type = PrType(scope_type & 0x0F)
        except ValueError:
            raise invalid_cdb(2, 3) from None
        if action == PrOutAction.RESERVE:
            self._reserve(nexus, pr_type)
            return []
        if action == PrOutAction.RELEASE:
            return self._release(nexus, pr_type)
        if action in (PrOutAction.PREEMPT, PrOutAction.PREEMPT_AND_ABORT):
            return self._preempt(nexus, sark, pr_type)
        raise invalid_cdb(1, 4)

    def _register(self, nexus: str, rk: int, sark: int, *, ignore: bool) -> UnitAttentions:
        current = self.registrations.get(nexus)
        if current is None:
            if rk != 0 and not ignore:
                raise StatusError(Status.RESERVATION_CONFLICT)
            if sark == 0:
                return []  # SPC-4 5.12.7: unregistered nexus, zero key: nothing to do
            self.registrations[nexus] = sark
            self.generation += 1
            return []
        if not ignore and rk != current:
            raise StatusError(Status.RESERVATION_CONFLICT)
        self.generation += 1
        if sark != 0:
            self.registrations[nexus] = sark
            return []
        return self._unregister(nexus)

    def _unregister(self, nexus: str) -> UnitAttentions:
        """SPC-4 5.12.11.2.3: removing a registration may release the reservation."""
        del self.registrations[nexus]
        res = self.reservation
        if res is None:
            return []
        if res.type in _ALL_REGISTRANTS:
            if not self.registrations:
                self.reservation = None
            return []
        if res.holder != nexus:
            return []
        self.reservation = None
        if res.type in _REGISTRANTS_ONLY:
            return [(n, Asc.RESERVATIONS_RELEASED) for n in self.registrations]
        return []

    def _reserve(self, nexus: str, pr_type: PrType) -> None:
        res = self.reservation
        if res is None:
            self.reservation = PersistentReservation(nexus, pr_type)
            return
        if self.is_holder(nexus) and res.type == pr_type:
            return  # SPC-4 5.12.9: re-reserving the same reservation is a no-op
        raise StatusError(Status.RESERVATION_CONFLICT)

    def _release(self, nexus: str, pr_type: PrType) -> UnitAttentions:
        res = self.reservation
        if res is None or not self.is_holder(nexus):
            return []  # SPC-4 5.12.11.2.1: not the holder: GOOD, nothing changes
        if res.type != pr_type:
            raise CheckCondition(
                SenseKey.ILLEGAL_REQUEST, INVALID_RELEASE_OF_PERSISTENT_RESERVATION
            )
        self.reservation = None
        if res.type in _REGISTRANTS_ONLY or res.type in _ALL_REGISTRANTS:
            return [(n, Asc.RESERVATIONS_RELEASED) for n in self.registrations if n != nexus]
        return []

    def _clear(self, nexus: str) -> UnitAttentions:
        uas = [(n, Asc.RESERVATIONS_PREEMPTED) for n in self.registrations if n != nexus]
        self.registrations.clear()
        self.reservation = None
        self.generation += 1
        return uas

    def _preempt(self, nexus: str, sark: int, pr_type: PrType) -> UnitAttentions:
        res = self.reservation
        uas: UnitAttentions = []

        def remove_matching(key: int | None) -> list[str]:
            victims = [
                n for n, k in self.registrations.items() if n != nexus and (key is None or k == key)
            ]
            for n in victims:
                del self.registrations[n]
                uas.append((n, Asc.REGISTRATIONS_PREEMPTED))
            return victims

        if res is not None and res.type in _ALL_REGISTRANTS:
            # SPC-4 5.12.11.2.4.3: a zero key preempts everyone else and the
            # reservation; a non-zero key only removes those registrations.
            if sark == 0:
                remove_matching(None)
                self.reservation = PersistentReservation(nexus, pr_type)
            else:
                remove_matching(sark)
        elif res is None:
            if sark == 0:
                raise invalid_param(8)
            if not remove_matching(sark):
                raise StatusError(Status.RESERVATION_CONFLICT)
        else:
            holder_key = self.registrations.get(res.holder)
            if sark == holder_key:
                remove_matching(sark)
                self.reservation = PersistentReservation(nexus, pr_type)
            else:
                if sark == 0:
                    raise invalid_param(8)
                if not remove_matching(sark):
                    raise StatusError(Status.RESERVATION_CONFLICT)
        self.generation += 1
        return uas

    def reset(self) -> None:
        """What a reset does: drops the SPC-2 reservation; PR state survives (SPC-4 5.12.1)."""
        self.reserved_by = None


def _transport_id(nexus: str) -> bytes:
    """An iSCSI TransportID (SPC-4 7.6.4.6) naming the initiator port of *nexus*.

    The nexus string is opaque to this layer, but when it follows the iSCSI
    port-name convention the transport uses (``<name>,i,0x<ISID>,...``) the
    initiator port is reported with format 01b (name and ISID); otherwise the
    whole string goes out as a format 00b name.  Either way NUL-terminated and
    padded to a multiple of 4 bytes, at least 20 bytes in all.
    """
    name, sep, rest = nexus.partition(",i,0x")
    if sep and rest:
        port = f"{name},i,0x{rest.split(',', 1)[0]}"
        head = 0x40 | 0x05  # FORMAT CODE 01b, PROTOCOL IDENTIFIER iSCSI
    else:
        port = nexus
        head = 0x05
    text = port.encode("utf-8", "replace")[:251] + b"\x00"
    text += bytes(-len(text) % 4)
    if len(text) < 16:
        text += bytes(16 - len(text))
    return struct.pack(">BBH", head, 0, len(text)) + text
