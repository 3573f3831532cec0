"""Session registry: TSIH allocation and session reinstatement (RFC 7143 §6.3.5)."""

from __future__ import annotations

import dataclasses

from mobinux.iscsi.params import SessionParams, SessionType
from mobinux.iscsi.session import Session, SessionRegistry

IQN = "iqn.2024-01.org.mobinux:node1"


def params(tsih: int, *, isid: str = "400001370000", initiator: str = "iqn.2010-04.org.ipxe:node1",
           target: str = IQN, session_type: SessionType = SessionType.NORMAL) -> SessionParams:
    return SessionParams(
        session_type=session_type,
        initiator_name=initiator,
        initiator_alias="",
        target_name=target,
        isid=bytes.fromhex(isid),
        tsih=tsih,
        cid=0,
        tpgt=1,
    )


@dataclasses.dataclass
class Recorder:
    closed: list[str] = dataclasses.field(default_factory=list)
    ended: int = 0

    def session(self, p: SessionParams) -> Session:
        def on_end() -> None:
            self.ended += 1

        return Session(p, "10.0.0.5:40000", 1000.0, self.closed.append, on_end)


def test_tsihs_are_unique_nonzero_and_skip_live_ones() -> None:
    reg = SessionRegistry()
    rec = Recorder()
    first = reg.allocate_tsih()
    reg.add(rec.session(params(first)))
    seen = {first}
    for _ in range(0x10000 + 5):
        tsih = reg.allocate_tsih()
        assert 1 <= tsih <= 0xFFFF and tsih != first
        seen.add(tsih)
    assert len(seen) == 0xFFFF


def test_same_initiator_and_isid_reinstates_the_session() -> None:
    reg = SessionRegistry()
    old_rec, new_rec = Recorder(), Recorder()
    old = old_rec.session(params(1))
    reg.add(old)
    new = new_rec.session(params(2, initiator="IQN.2010-04.org.ipxe:NODE1"))  # names compare case-insensitively
    assert reg.add(new) == [old]
    assert old.ended and old_rec.ended == 1 and len(old_rec.closed) == 1
    assert "reinstated" in old_rec.closed[0]
    assert list(reg) == [new] and new_rec.ended == 0
    # The old connection's close arrives later: it must not end anything again.
    assert reg.remove(old) is False
    assert old_rec.ended == 1 and list(reg) == [new]


def test_other_isids_and_targets_are_separate_sessions() -> None:
    reg = SessionRegistry()
    rec = Recorder()
    ipxe = rec.session(params(1, isid="400001370000"))
    kernel = rec.session(params(2, isid="00023d000001"))
    other_target = rec.session(params(3, target="iqn.2024-01.org.mobinux:node2"))
    for s in (ipxe, kernel, other_target):
        assert reg.add(s) == []
    assert len(reg) == 3 and rec.closed == []
    assert reg.for_target(IQN.upper()) == [ipxe, kernel]


def test_remove_ends_once_and_discovery_sessions_have_no_target() -> None:
    reg = SessionRegistry()
    rec = Recorder()
    disc = rec.session(params(1, target="", session_type=SessionType.DISCOVERY))
    reg.add(disc)
    assert reg.for_target("") == []
    assert reg.get(1) is disc
    assert reg.remove(disc) is True
    assert reg.remove(disc) is False
    assert rec.ended == 1 and len(reg) == 0 and reg.get(1) is None
