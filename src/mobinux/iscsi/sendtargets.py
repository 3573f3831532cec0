"""The text answering ``SendTargets`` (RFC 7143 §13.3, Appendix C "SendTargets Operation").

The answer is a sequence of ``TargetName=<iqn>`` records, each followed by
its ``TargetAddress=<address>:<port>,<tpgt>`` keys (§13.8). The full-feature
layer splits it across Text Response PDUs (a pair may straddle two PDUs).

Values of the key (Appendix C):

- ``All``: every target this initiator may see. On a normal session the
  RFC does not support ``All``; libiscsi's compliance suite nonetheless
  expects an answer there, so with ``session_target`` given we answer with
  that one target only, which discloses nothing the session does not know.
- ``<iSCSI name>``: that target, if the initiator may see it.
- empty: the target of the current (normal) session.

Anything else is not a value this key can take and is answered
``SendTargets=Reject``.
"""

from __future__ import annotations

from mobinux.iscsi.keys import REJECT, encode_text
from mobinux.iscsi.params import TargetDirectory, TargetEntry

# §4.2.7: the three iSCSI name formats ("iqn.", "eui.", "naa."), case-insensitive.
_NAME_PREFIXES = ("iqn.", "eui.", "naa.")


def send_targets_text(
    directory: TargetDirectory,
    initiator_name: str,
    value: str,
    *,
    session_target: str | None = None,
) -> bytes:
    """NUL-separated ``key=value`` text answering ``SendTargets=<value>``.

    ``session_target`` is the TargetName of a normal session (None on a
    discovery session). Targets the initiator's ACLs do not admit are never
    named: an unknown and a forbidden name get the same empty answer, so
    SendTargets tells nobody which names exist.
    """
    if value == "All":
        if session_target is not None:
            entries = _visible(directory, initiator_name, session_target)
        else:
            entries = list(directory.visible_to(initiator_name))
    elif value == "":
        entries = (
            [] if session_target is None else _visible(directory, initiator_name, session_target)
        )
    elif value[:4].lower() in _NAME_PREFIXES:
        entries = _visible(directory, initiator_name, value)
    else:
        return encode_text([("SendTargets", REJECT)])
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        pairs.append(("TargetName", entry.iqn))
        pairs.extend(("TargetAddress", address) for address in directory.portals(entry.iqn))
    return encode_text(pairs)


def _visible(directory: TargetDirectory, initiator_name: str, iqn: str) -> list[TargetEntry]:
    """The target named *iqn* if *initiator_name* may see it (names compare case-insensitively, §4.2.7.1)."""
    wanted = iqn.casefold()
    return [
        entry for entry in directory.visible_to(initiator_name) if entry.iqn.casefold() == wanted
    ]
