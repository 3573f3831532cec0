"""iSCSI text keys: the ``key=value`` codec (RFC 7143 §6.1) and the negotiation rules (§6.2, §13).

The codec turns a Login or Text data segment into ``(key, value)`` pairs and
back. The rules are those of a *responder*: the target answers what an
initiator offered. :class:`OperationalNegotiation` holds the operational keys
of one login (§13) and knows, for each, its range, its result function
(Minimum, Maximum, AND, OR, list) and whether it is irrelevant in a discovery
session; it never agrees to more than :class:`~mobinux.iscsi.params.TargetLimits`
allows.

Value grammar (§6.1): a numerical value is a decimal or ``0x`` hex constant
below 2**64; a binary value (CHAP_C, CHAP_R) is ``0x`` hex or ``0b`` base64;
a list is comma-separated. Key names are at most 63 bytes, values at most 255
bytes except the long binary CHAP values (at most 1024 bytes once decoded,
§12.1.3).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import re
from collections.abc import Iterable, Sequence

from mobinux.errors import MalformedPacket
from mobinux.iscsi.params import SessionParams, TargetLimits

KEY_MAX_LEN = 63  # §6.1: "key names MUST NOT exceed 63 bytes"
VALUE_MAX_LEN = 255  # §6.1: a simple-value is at most 255 bytes
BINARY_MAX_LEN = 1024  # §12.1.3: CHAP_C/CHAP_R binary length limit
# The long binary values are the only ones allowed past 255 bytes: 0x + two hex digits a byte.
LONG_BINARY_KEYS = frozenset({"CHAP_C", "CHAP_R"})
LONG_VALUE_MAX_LEN = 2 + 2 * BINARY_MAX_LEN

# §6.2: reserved constants. "Reject", "Irrelevant" and "NotUnderstood" are
# answers only; offering one of them is a protocol error.
NONE = "None"
REJECT = "Reject"
IRRELEVANT = "Irrelevant"
NOT_UNDERSTOOD = "NotUnderstood"
RESERVED_ANSWERS = frozenset({REJECT, IRRELEVANT, NOT_UNDERSTOOD})
YES = "Yes"
NO = "No"

# §6.1 key-name: letters, digits, dot, minus, plus, commercial at, underscore;
# '#' appears in the X#<IANA name> private extension format (§13.22).
_KEY_NAME = re.compile(r"[A-Za-z0-9.\-+@_#]+")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")

SECURITY_KEYS = frozenset({"AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"})
# Declarations an initiator makes in the first Login Request (§13.4-§13.7, §13.21).
LEADING_DECLARATIONS = frozenset({"InitiatorName", "TargetName", "SessionType"})
# Keys only a target may send (§13.6, §13.8, §13.9): an initiator offering them is confused.
TARGET_ONLY_KEYS = frozenset({"TargetAlias", "TargetAddress", "TargetPortalGroupTag"})
# Full Feature Phase only (§13.3).
FFP_ONLY_KEYS = frozenset({"SendTargets"})


def parse_text(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """The ``key=value`` pairs of a NUL-separated text (§6.1), in order, duplicates kept.

    Empty segments (the terminating NUL, zero padding) are skipped. Raises
    :class:`MalformedPacket` on a pair without ``=``, an empty or over-long
    key, a key with characters outside §6.1, a key that is not ASCII or a
    value that is not UTF-8, and a value over 255 bytes (2050 for CHAP_C and
    CHAP_R, whose binary form may reach 1024 bytes).
    """
    pairs: list[tuple[str, str]] = []
    for raw in bytes(data).split(b"\0"):
        if not raw:
            continue
        key_bytes, sep, value_bytes = raw.partition(b"=")
        if not sep:
            raise MalformedPacket(f"text item without '=': {raw[:40]!r}")
        if not key_bytes or len(key_bytes) > KEY_MAX_LEN:
            raise MalformedPacket(f"key of {len(key_bytes)} bytes (1 to {KEY_MAX_LEN} allowed)")
        try:
            key = key_bytes.decode("ascii")
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacket(f"text item is not UTF-8: {raw[:40]!r}") from exc
        if not _KEY_NAME.fullmatch(key):
            raise MalformedPacket(f"invalid key name {key!r}")
        limit = LONG_VALUE_MAX_LEN if key in LONG_BINARY_KEYS else VALUE_MAX_LEN
        if len(value_bytes) > limit:
            raise MalformedPacket(f"value of {key} is {len(value_bytes)} bytes (at most {limit})")
        pairs.append((key, value))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """``key=value\\0`` for each pair (§6.1: every pair, the last included, ends with a NUL)."""
    out = bytearray()
    for key, value in pairs:
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"cannot encode text key {key!r}")
        out += key.encode("ascii")
        out += b"="
        out += value.encode("utf-8")
        out += b"\0"
    return bytes(out)


def parse_number(value: str) -> int | None:
    """A numerical value (§6.1: decimal-constant or hex-constant, below 2**64), or None.

    Leading zeros in decimals are tolerated (the grammar forbids them but no
    initiator relies on that); octal is never assumed.
    """
    if value[:2] in ("0x", "0X"):
        digits = value[2:]
        if not digits or len(digits) > 16 or not _HEX_DIGITS.issuperset(digits):
            return None
        return int(digits, 16)
    if not value or len(value) > 20 or not value.isascii() or not value.isdigit():
        return None
    number = int(value)
    return number if number < 2**64 else None


def parse_boolean(value: str) -> bool | None:
    """``Yes``/``No`` (§6.1 boolean-value, case-sensitive), or None."""
    if value == YES:
        return True
    if value == NO:
        return False
    return None


def decode_binary(value: str) -> bytes:
    """A binary value (§6.1: ``0x`` hex or ``0b`` base64). Raises ValueError when it is neither.

    An odd number of hex digits is read with an implied leading zero digit.
    """
    prefix, body = value[:2], value[2:]
    if not body:
        raise ValueError("empty binary value")
    if prefix in ("0x", "0X"):
        if not _HEX_DIGITS.issuperset(body):
            raise ValueError("invalid hex digit")
        if len(body) % 2:
            body = "0" + body
        return bytes.fromhex(body)
    if prefix in ("0b", "0B"):
        try:
            return base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise ValueError("invalid base64") from exc
    raise ValueError("binary value needs a 0x or 0b prefix")


def encode_hex(data: bytes) -> str:
    """A binary value as ``0x`` hex, the encoding every initiator accepts (libiscsi only takes hex)."""
    return "0x" + data.hex()


def offers_reserved_value(value: str) -> bool:
    """True when an offered value, or an item of an offered list, is an answer-only constant (§6.2)."""
    return any(item in RESERVED_ANSWERS for item in value.split(","))


def first_supported(offered: str, supported: Sequence[str]) -> str | None:
    """List negotiation (§6.2.1): the first value of the originator's list that we support."""
    for item in offered.split(","):
        if item in supported:
            return item
    return None


class Kind(enum.Enum):
    """How a key is negotiated (§6.2.1, §6.2.2, §13)."""

    MINIMUM = "minimum"  # numerical, result is the smaller value
    MAXIMUM = "maximum"  # numerical, result is the larger value
    AND = "and"  # boolean, result is the AND
    OR = "or"  # boolean, result is the OR
    LIST = "list"  # the first value of the initiator's list we support
    DECLARATIVE = "declarative"  # numerical declaration, no negotiation (§13.12)
    OBSOLETE_INTERVAL = "obsolete-interval"  # OFMarkInt/IFMarkInt (see _OBSOLETE below)


@dataclasses.dataclass(frozen=True, slots=True)
class KeySpec:
    """One operational key of §13: its grammar, default and result function."""

    name: str
    kind: Kind
    default: int | bool | str
    low: int = 0
    high: int = 0
    # Irrelevant when SessionType=Discovery (the "Irrelevant when" line of each §13 key).
    discovery_irrelevant: bool = False


_MAX_24 = 2**24 - 1

OPERATIONAL_KEYS: dict[str, KeySpec] = {
    spec.name: spec
    for spec in (
        KeySpec("HeaderDigest", Kind.LIST, NONE),  # §13.1
        KeySpec("DataDigest", Kind.LIST, NONE),  # §13.1
        KeySpec("MaxConnections", Kind.MINIMUM, 1, 1, 65535, discovery_irrelevant=True),  # §13.2
        KeySpec("InitialR2T", Kind.OR, True, discovery_irrelevant=True),  # §13.10
        KeySpec("ImmediateData", Kind.AND, True, discovery_irrelevant=True),  # §13.11
        KeySpec("MaxRecvDataSegmentLength", Kind.DECLARATIVE, 8192, 512, _MAX_24),  # §13.12
        # §13.13, §13.14
        KeySpec("MaxBurstLength", Kind.MINIMUM, 262144, 512, _MAX_24, discovery_irrelevant=True),
        KeySpec("FirstBurstLength", Kind.MINIMUM, 65536, 512, _MAX_24, discovery_irrelevant=True),
        KeySpec("DefaultTime2Wait", Kind.MAXIMUM, 2, 0, 3600),  # §13.15
        KeySpec("DefaultTime2Retain", Kind.MINIMUM, 20, 0, 3600),  # §13.16
        # §13.17
        KeySpec("MaxOutstandingR2T", Kind.MINIMUM, 1, 1, 65535, discovery_irrelevant=True),
        KeySpec("DataPDUInOrder", Kind.OR, True, discovery_irrelevant=True),  # §13.18
        KeySpec("DataSequenceInOrder", Kind.OR, True, discovery_irrelevant=True),  # §13.19
        KeySpec("ErrorRecoveryLevel", Kind.MINIMUM, 0, 0, 2),  # §13.20
        KeySpec("TaskReporting", Kind.LIST, "RFC3720", discovery_irrelevant=True),  # §13.23
        KeySpec("iSCSIProtocolLevel", Kind.MINIMUM, 1, 0, 31, discovery_irrelevant=True),  # §13.24
        # §13.25 obsoletes the RFC 3720 markers. We answer OFMarker/IFMarker with "No"
        # (allowed, and what every initiator offers) and the intervals with "Reject"
        # (required: an interval is meaningless without markers).
        KeySpec("OFMarker", Kind.AND, False),
        KeySpec("IFMarker", Kind.AND, False),
        KeySpec("OFMarkInt", Kind.OBSOLETE_INTERVAL, ""),
        KeySpec("IFMarkInt", Kind.OBSOLETE_INTERVAL, ""),
        # RFC 7145 (iSER): not over TCP; "No" is the AND result with our No.
        KeySpec("RDMAExtensions", Kind.AND, False),
    )
}

# What this target supports for the list keys, in no particular order (the initiator's order wins).
_SUPPORTED_LISTS: dict[str, tuple[str, ...]] = {
    "HeaderDigest": ("CRC32C", NONE),
    "DataDigest": ("CRC32C", NONE),
    "TaskReporting": ("RFC3720",),  # FastAbort/ResponseFence are not implemented
}

# Keys whose RFC default may exceed what the target accepts, so the target proposes
# them itself when the initiator stays silent (a key nobody offers keeps its default).
# DefaultTime2Retain is left out on purpose: at ErrorRecoveryLevel 0 nothing is
# retained, so a larger value costs nothing and proposing it would add a round trip.
_MUST_PROPOSE_WHEN_ABOVE_LIMIT = (
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxConnections",
    "MaxOutstandingR2T",
)


class NegotiationError(Exception):
    """The initiator broke a negotiation rule (§6.2); the login fails with Initiator Error."""


class OperationalNegotiation:
    """The operational keys of one login, answered as the target (§6.2, §13).

    ``answer`` takes the operational pairs of one complete Login Request and
    returns the reply pairs in the same order. ``declarations`` gives what the
    target declares without being asked (its MaxRecvDataSegmentLength), and
    ``proposals`` the keys it must offer itself because their defaults exceed
    its limits. ``apply`` writes the outcome into :class:`SessionParams`.
    """

    __slots__ = ("_discovery", "_ours", "_values", "declared_mrdsl", "offered", "proposed")

    def __init__(self, limits: TargetLimits, *, discovery: bool) -> None:
        self._discovery = discovery
        self._values: dict[str, int | bool | str] = {
            name: spec.default for name, spec in OPERATIONAL_KEYS.items()
        }
        # What the target would choose if it were alone, clamped into each key's range.
        max_burst = _clamp(limits.max_burst_length, 512, _MAX_24)
        self._ours: dict[str, int | bool] = {
            # The login adds no connection to an existing session, so whatever the
            # limits say, one connection per session is all we can honour.
            "MaxConnections": 1,
            # InitialR2T=Yes: no unsolicited Data-Out beyond immediate data (LIO's default too).
            "InitialR2T": True,
            "ImmediateData": True,
            "MaxRecvDataSegmentLength": _clamp(limits.max_recv_data_segment_length, 512, _MAX_24),
            "MaxBurstLength": max_burst,
            "FirstBurstLength": min(_clamp(limits.first_burst_length, 512, _MAX_24), max_burst),
            "DefaultTime2Wait": _clamp(limits.default_time2wait, 0, 3600),
            "DefaultTime2Retain": _clamp(limits.default_time2retain, 0, 3600),
            "MaxOutstandingR2T": _clamp(limits.max_outstanding_r2t, 1, 65535),
            "DataPDUInOrder": True,  # we need in-order data (§13.18 OR: our Yes wins)
            "DataSequenceInOrder": True,
            "ErrorRecoveryLevel": _clamp(limits.error_recovery_level, 0, 2),
            "iSCSIProtocolLevel": 1,  # RFC 7143 is level 1 (§13.24)
            "OFMarker": False,
            "IFMarker": False,
            "RDMAExtensions": False,
        }
        self.offered: set[str] = set()
        # Keys the target offered, awaiting the initiator's answer.
        self.proposed: dict[str, int] = {}
        self.declared_mrdsl = False

    def value(self, name: str) -> int | bool | str:
        return self._values[name]

    def answer(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Replies to the operational *pairs* of one request, in their order.

        Raises :class:`NegotiationError` for an offered answer-only constant or
        a bad reply to one of our proposals. MaxBurstLength is settled before
        FirstBurstLength so the latter can be capped by it (§13.14).
        """
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0] == "FirstBurstLength")
        replies: dict[int, tuple[str, str]] = {}
        for index in order:
            key, value = pairs[index]
            if key in self.proposed:
                self._take_reply(key, value)
                continue
            self.offered.add(key)
            reply = self._answer_one(OPERATIONAL_KEYS[key], value)
            if reply is not None:
                replies[index] = (key, reply)
        return [replies[i] for i in sorted(replies)]

    def _answer_one(self, spec: KeySpec, value: str) -> str | None:
        """The reply to one offered key (None: nothing to send back)."""
        if offers_reserved_value(value):
            raise NegotiationError(f"{spec.name}={value}: answer-only constant offered")
        if self._discovery and spec.discovery_irrelevant:
            return IRRELEVANT
        name = spec.name
        match spec.kind:
            case Kind.LIST:
                chosen = first_supported(value, _SUPPORTED_LISTS[name])
                if chosen is None:
                    return REJECT
                self._values[name] = chosen
                return chosen
            case Kind.AND | Kind.OR:
                offered = parse_boolean(value)
                if offered is None:
                    return REJECT
                ours = bool(self._ours[name])
                result = (offered and ours) if spec.kind is Kind.AND else (offered or ours)
                self._values[name] = result
                return YES if result else NO
            case Kind.MINIMUM | Kind.MAXIMUM:
                number = parse_number(value)
                if number is None or not spec.low <= number <= spec.high:
                    return REJECT
                ours_n = int(self._ours[name])
                if name == "FirstBurstLength":
                    ours_n = min(ours_n, int(self._values["MaxBurstLength"]))
                result_n = min(number, ours_n) if spec.kind is Kind.MINIMUM else max(number, ours_n)
                self._values[name] = result_n
                return str(result_n)
            case Kind.DECLARATIVE:
                # The initiator's MaxRecvDataSegmentLength bounds what we send (§13.12);
                # our answer is our own declaration.
                # A declaration cannot be answered with Reject in any useful way: a
                # peer that cannot say how much it receives cannot be talked to.
                number = parse_number(value)
                if number is None or not spec.low <= number <= spec.high:
                    raise NegotiationError(f"{name}={value} outside {spec.low}..{spec.high}")
                self._values[name] = number
                if self.declared_mrdsl:
                    return None  # ours went out already; a declaration needs no answer
                self.declared_mrdsl = True
                return str(self._ours[name])
            case Kind.OBSOLETE_INTERVAL:
                return REJECT
        raise AssertionError(spec.kind)  # pragma: no cover - every Kind is handled above

    def _take_reply(self, key: str, value: str) -> None:
        """The initiator's answer to a key we proposed (§6.2.2: the acceptor's value wins if admissible)."""
        proposal = self.proposed.pop(key)
        spec = OPERATIONAL_KEYS[key]
        number = parse_number(value)
        if number is None or not spec.low <= number <= proposal:
            # Reject/Irrelevant leaves the default, which is above our limit; anything
            # else breaks the Minimum rule. Either way we cannot agree.
            raise NegotiationError(f"{key}={value} in reply to our {key}={proposal}")
        self._values[key] = number
        self.offered.add(key)

    def declarations(self) -> list[tuple[str, str]]:
        """Our MaxRecvDataSegmentLength, declared once in the operational stage (§13.12).

        Declared even when the initiator did not declare its own: open-iscsi
        and libiscsi read it from the target, and without it the initiator
        must assume 8192.
        """
        if self.declared_mrdsl:
            return []
        self.declared_mrdsl = True
        return [("MaxRecvDataSegmentLength", str(self._ours["MaxRecvDataSegmentLength"]))]

    def needs_proposals(self) -> bool:
        """Whether some key left at its default would exceed our limits (normal sessions only)."""
        return bool(self._pending_proposals())

    def _pending_proposals(self) -> list[tuple[str, int]]:
        if self._discovery:
            return []
        out = []
        for name in _MUST_PROPOSE_WHEN_ABOVE_LIMIT:
            if name in self.offered or name in self.proposed:
                continue
            ours = int(self._ours[name])
            if name == "FirstBurstLength":
                ours = min(ours, int(self._values["MaxBurstLength"]))
            if int(self._values[name]) > ours:
                out.append((name, ours))
        return out

    def proposals(self) -> list[tuple[str, str]]:
        """Offer the keys whose default exceeds our limits; the initiator must answer them."""
        out = []
        for name, ours in self._pending_proposals():
            self.proposed[name] = ours
            out.append((name, str(ours)))
        return out

    def apply(self, params: SessionParams) -> None:
        """Write the outcome into *params* (values never offered keep their §13 defaults)."""
        v = self._values
        params.header_digest = v["HeaderDigest"] == "CRC32C"
        params.data_digest = v["DataDigest"] == "CRC32C"
        params.max_connections = int(v["MaxConnections"])
        params.initial_r2t = bool(v["InitialR2T"])
        params.immediate_data = bool(v["ImmediateData"])
        params.max_burst_length = int(v["MaxBurstLength"])
        # §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength, whatever order they came in.
        params.first_burst_length = min(int(v["FirstBurstLength"]), params.max_burst_length)
        params.default_time2wait = int(v["DefaultTime2Wait"])
        params.default_time2retain = int(v["DefaultTime2Retain"])
        params.max_outstanding_r2t = int(v["MaxOutstandingR2T"])
        params.data_pdu_in_order = bool(v["DataPDUInOrder"])
        params.data_sequence_in_order = bool(v["DataSequenceInOrder"])
        params.error_recovery_level = int(v["ErrorRecoveryLevel"])
        params.initiator_max_recv_data_segment_length = int(v["MaxRecvDataSegmentLength"])
        params.target_max_recv_data_segment_length = (
            int(self._ours["MaxRecvDataSegmentLength"]) if self.declared_mrdsl else 8192
        )


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))
