"""The sessions of one target portal group: TSIH allocation and session reinstatement.

A session is identified on the wire by its TSIH (§4.2.6, chosen by the
target) and, for the SCSI layer, by the I_T nexus: InitiatorName, ISID,
TargetName and portal group tag (§4.2.7.2). A login that names the same
InitiatorName and ISID towards the same target as a live session *reinstates*
it (§6.3.5): the old session is closed and its nexus lost before the new one
starts. Different ISIDs are different sessions, so one initiator may hold
several at once; iPXE keeps its boot session open while the booted kernel
logs in with its own ISID.

This module is sans-I/O: closing a session's connection and telling the SCSI
layer about the lost nexus are callbacks the asyncio adapter supplies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from mobinux.iscsi.params import SessionParams, SessionType

__all__ = ["Session", "SessionRegistry"]


@dataclasses.dataclass(eq=False, slots=True)
class Session:
    """One logged-in session (ERL 0, MaxConnections=1: exactly one connection)."""

    params: SessionParams
    peer: str
    since: float
    # Ask the connection to close; the argument is the reason, for the log.
    close: Callable[[str], None]
    # Run once when the session ends (the adapter tells the SCSI layer the nexus is lost).
    on_end: Callable[[], None] | None = None
    ended: bool = False
    # Whether the initiator was heard from lately (None: assume it was).
    heard: Callable[[], bool] | None = None

    @property
    def tsih(self) -> int:
        return self.params.tsih

    @property
    def key(self) -> tuple[str, bytes, str, int]:
        p = self.params
        # §4.2.7.1: iSCSI names compare case-insensitively.
        return (p.initiator_name.lower(), p.isid, p.target_name.lower(), p.tpgt)

    def end(self) -> None:
        """Mark the session ended and run ``on_end`` (only the first time)."""
        if self.ended:
            return
        self.ended = True
        callback, self.on_end = self.on_end, None
        if callback is not None:
            callback()


class SessionRegistry:
    """The live sessions; hands out TSIHs and applies session reinstatement."""

    def __init__(self) -> None:
        self._by_tsih: dict[int, Session] = {}
        self._by_key: dict[tuple[str, bytes, str, int], Session] = {}
        self._next_tsih = 1

    def allocate_tsih(self) -> int:
        """A TSIH no live session uses (§11.12.6: never 0), for ``Login(new_tsih=...)``."""
        for _ in range(0x10000):
            tsih = self._next_tsih
            self._next_tsih = tsih % 0xFFFF + 1
            if tsih not in self._by_tsih:
                return tsih
        raise RuntimeError("all 65535 TSIHs are in use")

    def add(self, session: Session) -> list[Session]:
        """Register *session*; returns the sessions it reinstated (already ended and asked to close)."""
        replaced: list[Session] = []
        old = self._by_key.get(session.key)
        if old is not None and old is not session:
            self._drop(old)
            old.end()
            old.close("session reinstated by a new login (RFC 7143 §6.3.5)")
            replaced.append(old)
        stale = self._by_tsih.get(session.tsih)
        if stale is not None and stale is not session:
            # Only possible if a Login reused a live TSIH; keep the registry consistent.
            self._drop(stale)
            stale.end()
            stale.close("TSIH reused")
            replaced.append(stale)
        self._by_tsih[session.tsih] = session
        self._by_key[session.key] = session
        return replaced

    def remove(self, session: Session) -> bool:
        """The session's connection is gone: forget it and end it. False if it was not registered."""
        registered = self._by_tsih.get(session.tsih) is session
        if registered:
            self._drop(session)
        session.end()
        return registered

    def get(self, tsih: int) -> Session | None:
        return self._by_tsih.get(tsih)

    def exists(self, initiator_name: str, isid: bytes, tsih: int) -> bool:
        """A live session has this TSIH, initiator and ISID (``Login(session_exists=...)``)."""
        session = self._by_tsih.get(tsih)
        return (
            session is not None
            and session.params.isid == isid
            and session.params.initiator_name.lower() == initiator_name.lower()
        )

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_tsih.values()))

    def __len__(self) -> int:
        return len(self._by_tsih)

    def for_target(self, iqn: str) -> list[Session]:
        """Normal sessions logged in to *iqn* (compared case-insensitively)."""
        want = iqn.lower()
        return [
            s
            for s in self._by_tsih.values()
            if s.params.session_type == SessionType.NORMAL and s.params.target_name.lower() == want
        ]

    def _drop(self, session: Session) -> None:
        if self._by_tsih.get(session.tsih) is session:
            del self._by_tsih[session.tsih]
        if self._by_key.get(session.key) is session:
            del self._by_key[session.key]
