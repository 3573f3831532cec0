"""Login phase (RFC 7143 §6, §11.12-11.13, §12, §13): security and operational negotiation.

CONTRACT (being implemented; the full-feature connection core builds on it):

    login = Login(directory, limits, tpgt=1, new_tsih=registry.allocate, random_bytes=os.urandom)
    step = login.receive(pdu)        # one Login Request PDU (opcode 0x03)
    step.reply                       # wire buffers of one Login Response to send
    step.params                      # SessionParams when this reply enters the full-feature phase
    step.close                       # True: send the reply, then close the connection (login refused)

Login never raises for a bad request from the peer: it answers with the
right Login Response status (§11.13.5) and sets ``close``. It raises
:class:`~mobinux.errors.MalformedPacket` only for bytes that are not a Login
Request at all: a PDU with a target opcode (0x20-0x3f). Another initiator
opcode gets "invalid request during login" (0x020B).

An optional ``session_exists(initiator_name, isid, tsih)`` keyword lets the
refusal of a non-zero TSIH say which of 0x0206/0x020A applies (below).

How a login runs here::

    first request ──> names, session type, target, ACL (§13.4-§13.7, §13.21)
        │
        ├─ CSG=0 security:     AuthMethod ─> [CHAP_A ─> CHAP_I/CHAP_C ─> CHAP_N/CHAP_R]
        │                      leave with T=1 once authenticated (or when none is needed)
        ├─ CSG=1 operational:  every offered key answered (keys.OperationalNegotiation);
        │                      our MaxRecvDataSegmentLength declared once
        └─ T=1, NSG=3 ──────> new TSIH, SessionParams, full feature phase

Text may arrive in several requests (C bit, §11.12.2): the pieces are joined
(at most 64 KiB) and answered with empty responses until the last one. A
response longer than 8192 bytes, the MaxRecvDataSegmentLength in force during
login (§13.12), goes out in pieces with the C bit set, each fetched by an
empty request.

Sessions with more than one connection are not supported (MaxConnections=1),
so a request with a non-zero TSIH is always refused, after authentication as
LIO does so that guessed ISID/TSIH pairs reveal nothing: "too many
connections" if ``session_exists`` knows the session, "session does not
exist" otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

from mobinux.errors import MalformedPacket
from mobinux.iscsi.chap import ChapAuthenticator, ChapConfigError, ChapFailure, ChapState
from mobinux.iscsi.constants import (
    LOGIN_CONTINUE,
    LOGIN_CSG_MASK,
    LOGIN_CSG_SHIFT,
    LOGIN_MAX_RECV_DATA_SEGMENT_LENGTH,
    LOGIN_NSG_MASK,
    LOGIN_TRANSIT,
    LoginStatus,
    Opcode,
    Stage,
)
from mobinux.iscsi.keys import (
    LEADING_DECLARATIONS,
    NONE,
    NOT_UNDERSTOOD,
    OPERATIONAL_KEYS,
    NegotiationError,
    OperationalNegotiation,
    encode_text,
    offers_reserved_value,
    parse_text,
)
from mobinux.iscsi.params import (
    ChapSecret,
    SessionParams,
    SessionType,
    TargetDirectory,
    TargetEntry,
    TargetLimits,
)
from mobinux.iscsi.pdu import Pdu, encode_pdu, new_bhs, put_u16, put_u32

ISCSI_VERSION = 0x00  # §11.12.4: the only version RFC 7143 defines
# §6.1 asks every implementation to take at least 8192 bytes of key=value
# text in a negotiation, 64 KiB when an authentication method needs long
# items. That is our ceiling: text beyond it ends the login.
MAX_LOGIN_TEXT = 64 * 1024
# A login needs a handful of requests; continuations of 64 KiB in both
# directions need about 30. A peer looping past this is stalling the target.
MAX_LOGIN_REQUESTS = 128
ISCSI_NAME_MAX_LEN = 223  # §4.2.7.1: iSCSI names are at most 223 bytes
_FIRST_TARGET_OPCODE = 0x20  # §11.2.1.2: 0x20-0x3f are target opcodes
_CHAP_KEYS = ("CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R")


@dataclasses.dataclass(slots=True)
class LoginStep:
    reply: list[bytes | bytearray | memoryview]
    params: SessionParams | None = None
    close: bool = False


class _Refused(Exception):
    """Ends the login with a non-success Login Response (§11.13.5) and a closed connection."""

    def __init__(self, status: LoginStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class _Header:
    """The fields of a Login Request BHS (§11.12)."""

    transit: bool
    cont: bool
    csg: int
    nsg: int
    version_max: int
    version_min: int
    isid: bytes
    tsih: int
    itt: int
    cid: int
    cmd_sn: int

    @classmethod
    def parse(cls, pdu: Pdu) -> _Header:
        flags = pdu.flags
        return cls(
            transit=bool(flags & LOGIN_TRANSIT),
            cont=bool(flags & LOGIN_CONTINUE),
            csg=(flags & LOGIN_CSG_MASK) >> LOGIN_CSG_SHIFT,
            nsg=flags & LOGIN_NSG_MASK,
            version_max=pdu.bhs[2],
            version_min=pdu.bhs[3],
            isid=bytes(pdu.bhs[8:14]),
            tsih=pdu.u16(14),
            itt=pdu.itt,
            cid=pdu.u16(20),
            cmd_sn=pdu.u32(24),
        )


class Login:
    """The target side of one connection's Login Phase, sans-I/O.

    ``new_tsih`` hands out the TSIH of a new session (1-65535); ``random_bytes``
    supplies the initial StatSN and the CHAP identifiers and challenges;
    ``portal_address`` ("IP:PORT") is kept for TargetAddress answers (a login
    redirection would need it; this target never redirects);
    ``session_exists(initiator_name, isid, tsih)`` tells whether a session a
    non-zero TSIH names is alive (only the status of the refusal depends on it).
    """

    def __init__(
        self,
        directory: TargetDirectory,
        limits: TargetLimits,
        *,
        tpgt: int = 1,
        new_tsih: Callable[[], int],
        random_bytes: Callable[[int], bytes] = os.urandom,
        portal_address: str = "",
        session_exists: Callable[[str, bytes, int], bool] | None = None,
    ) -> None:
        self._directory = directory
        self._limits = limits
        self._tpgt = tpgt & 0xFFFF
        self._new_tsih = new_tsih
        self._random_bytes = random_bytes
        self.portal_address = portal_address
        self._session_exists = session_exists
        self._window = max(1, limits.queue_depth)

        self.stage = Stage.SECURITY_NEGOTIATION
        # Why the login was refused, for the log (never holds a secret).
        self.failure: str | None = None
        self._ended = False
        self._requests = 0
        self._first: _Header | None = None
        self._stat_sn = 0
        self._text = bytearray()  # the initiator's text so far (C bit)
        self._out: list[bytes] = []  # pieces of our response still to send (C bit)
        self._out_transit = False
        self._out_nsg = 0

        self._seen_keys: set[str] = set()
        self._started = False
        self._session_type = SessionType.NORMAL
        self._initiator_name = ""
        self._initiator_alias = ""
        self._target: TargetEntry | None = None
        self._chap_secret: ChapSecret | None = None
        self._mutual_secret: ChapSecret | None = None
        self._auth_method: str | None = None
        self._chap: ChapAuthenticator | None = None
        self._security_passed = False
        self._ops = OperationalNegotiation(limits, discovery=False)

    def __repr__(self) -> str:
        return (
            f"Login(stage={self.stage.name}, initiator={self._initiator_name!r}, "
            f"session_type={self._session_type.value}, failure={self.failure!r})"
        )

    # -- entry point ---------------------------------------------------------------------

    def receive(self, pdu: Pdu) -> LoginStep:
        """Handle one request of the Login Phase and return the one response to send."""
        if pdu.opcode >= _FIRST_TARGET_OPCODE:
            raise MalformedPacket(f"target opcode 0x{pdu.opcode:02x} received from an initiator")
        header = _Header.parse(pdu)
        if self._ended:
            # A caller bug or a peer that ignored our answer: refuse again, keep the first reason.
            return self._refusal(
                header,
                LoginStatus.INITIATOR_ERROR,
                self.failure or "login request after the login ended",
            )
        try:
            return self._receive(pdu, header)
        except _Refused as refused:
            return self._refusal(header, refused.status, refused.reason)

    def _receive(self, pdu: Pdu, h: _Header) -> LoginStep:
        self._requests += 1
        if self._requests > MAX_LOGIN_REQUESTS:
            raise _Refused(LoginStatus.INITIATOR_ERROR, "too many login requests")
        if self._first is None:
            self._stat_sn = int.from_bytes(self._random(4), "big")
        if pdu.opcode != Opcode.LOGIN_REQUEST:
            # §11.13.5 0x020B: a non-login request during the Login Phase.
            raise _Refused(
                LoginStatus.INVALID_DURING_LOGIN, f"opcode 0x{pdu.opcode:02x} during login"
            )
        self._check_header(h)
        if len(pdu.data) > LOGIN_MAX_RECV_DATA_SEGMENT_LENGTH:
            raise _Refused(LoginStatus.INITIATOR_ERROR, "login data segment over 8192 bytes")

        if self._out:
            # §11.13 C bit: the initiator fetches the rest of our text with empty requests.
            if pdu.data or h.cont:
                raise _Refused(
                    LoginStatus.INITIATOR_ERROR, "text sent while the target's response continues"
                )
            return self._emit(h, self._out.pop(0))

        if len(self._text) + len(pdu.data) > MAX_LOGIN_TEXT:
            raise _Refused(LoginStatus.INITIATOR_ERROR, f"login text over {MAX_LOGIN_TEXT} bytes")
        self._text += pdu.data
        if h.cont:
            # §11.12.2: more text follows; an empty response asks for it.
            return LoginStep(self._pdu(h, b"", transit=False, nsg=0))
        try:
            pairs = parse_text(self._text)
        except MalformedPacket as exc:
            raise _Refused(LoginStatus.INITIATOR_ERROR, f"bad login text: {exc}") from None
        self._text.clear()
        return self._negotiate(h, pairs)

    def _check_header(self, h: _Header) -> None:
        first = self._first
        # §11.12.4: a Version-min above the one version we speak.
        if first is None and (h.version_min > ISCSI_VERSION or h.version_max < h.version_min):
            raise _Refused(
                LoginStatus.UNSUPPORTED_VERSION,
                f"versions 0x{h.version_min:02x}-0x{h.version_max:02x}",
            )
        if h.transit and h.cont:
            raise _Refused(LoginStatus.INITIATOR_ERROR, "T and C bits both set")  # §11.12.2
        if h.csg not in (Stage.SECURITY_NEGOTIATION, Stage.LOGIN_OPERATIONAL_NEGOTIATION):
            raise _Refused(LoginStatus.INITIATOR_ERROR, f"CSG {h.csg} is not a login stage")
        if h.transit and (h.nsg == 2 or h.nsg <= h.csg):
            raise _Refused(
                LoginStatus.INITIATOR_ERROR, f"transit from stage {h.csg} to {h.nsg}"
            )  # §11.12.3
        if first is None:
            self._first = h
            self.stage = Stage(h.csg)
            return
        # §6.3: one login, one ITT; the ISID, TSIH and CID name the connection being built.
        if (h.isid, h.tsih, h.cid, h.itt, h.version_max, h.version_min) != (
            first.isid,
            first.tsih,
            first.cid,
            first.itt,
            first.version_max,
            first.version_min,
        ):
            raise _Refused(
                LoginStatus.INITIATOR_ERROR, "ISID, TSIH, CID, ITT or versions changed during login"
            )
        if h.csg != self.stage:
            raise _Refused(
                LoginStatus.INITIATOR_ERROR,
                f"request in stage {h.csg}, login is in stage {int(self.stage)}",
            )

    # -- negotiation ---------------------------------------------------------------------

    def _negotiate(self, h: _Header, pairs: list[tuple[str, str]]) -> LoginStep:
        names = [key for key, _ in pairs]
        fresh = set(names)
        if len(fresh) != len(names) or fresh & self._seen_keys:
            # §6: neither side may negotiate or declare a key twice in a login; the
            # target answers such a renegotiation with Initiator Error.
            raise _Refused(LoginStatus.INITIATOR_ERROR, "key offered twice")
        self._seen_keys |= fresh
        keys = dict(pairs)

        reply: list[tuple[str, str]] = []
        if not self._started:
            reply += self._start(h, keys)
            self._started = True
        elif LEADING_DECLARATIONS & fresh:
            raise _Refused(
                LoginStatus.INITIATOR_ERROR,
                "InitiatorName/TargetName/SessionType after the first request",
            )
        if "InitiatorAlias" in keys:
            self._initiator_alias = keys["InitiatorAlias"]

        if self.stage is Stage.SECURITY_NEGOTIATION:
            reply += self._security(keys, pairs)
            transit, nsg = self._security_transition(h)
        else:
            reply += self._operational(pairs)
            transit, nsg = self._operational_transition(h, reply)
        return self._respond(h, reply, transit=transit, nsg=nsg)

    def _start(self, h: _Header, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        """The first complete request: who is logging in, to what, and must it authenticate."""
        name = keys.get("InitiatorName", "")
        if not name:
            raise _Refused(LoginStatus.MISSING_PARAMETER, "no InitiatorName")  # §13.5
        if len(name.encode("utf-8")) > ISCSI_NAME_MAX_LEN:
            raise _Refused(LoginStatus.INITIATOR_ERROR, "InitiatorName over 223 bytes")
        self._initiator_name = name
        session_type = keys.get("SessionType", SessionType.NORMAL.value)  # §13.21: default Normal
        if session_type not in (SessionType.NORMAL.value, SessionType.DISCOVERY.value):
            raise _Refused(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType={session_type}")
        self._session_type = SessionType(session_type)

        declarations: list[tuple[str, str]] = []
        if self._session_type is SessionType.NORMAL:
            target_name = keys.get("TargetName", "")
            if not target_name:
                raise _Refused(
                    LoginStatus.MISSING_PARAMETER, "no TargetName in a normal session"
                )  # §13.4
            entry = self._directory.lookup(target_name)
            if entry is None:
                raise _Refused(LoginStatus.NOT_FOUND, f"no target {target_name}")
            allowed = entry.allowed_initiators
            # §4.2.7.1: iSCSI names compare case-insensitively.
            if allowed is not None and name.casefold() not in {n.casefold() for n in allowed}:
                raise _Refused(
                    LoginStatus.AUTHORIZATION_FAILURE, f"{name} may not log in to {entry.iqn}"
                )
            self._target = entry
            self._chap_secret = entry.chap
            self._mutual_secret = entry.mutual_chap
            # §13.9: the tag MUST be in the first Login Response of a normal session.
            declarations.append(("TargetPortalGroupTag", str(self._tpgt)))
            if entry.alias:
                declarations.append(("TargetAlias", entry.alias))  # §13.6
        else:
            self._chap_secret = self._directory.discovery_chap()
        self._ops = OperationalNegotiation(
            self._limits, discovery=self._session_type is SessionType.DISCOVERY
        )
        if self.stage is Stage.LOGIN_OPERATIONAL_NEGOTIATION:
            # The initiator skipped the security stage (§6.3: allowed when it proposes
            # no security), which a target that requires CHAP cannot accept.
            if self._chap_secret is not None:
                raise _Refused(
                    LoginStatus.AUTHENTICATION_FAILURE, "CHAP required but security stage skipped"
                )
            self._pass_security(h)
        return declarations

    def _security(
        self, keys: Mapping[str, str], pairs: Sequence[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """AuthMethod and CHAP (§12.1); any other non-declarative key is out of place here."""
        reply: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "AuthMethod":
                reply.append((key, self._choose_auth_method(value)))
            elif key in _CHAP_KEYS or key in LEADING_DECLARATIONS or key == "InitiatorAlias":
                continue
            else:
                # Operational keys belong to the next stage (LIO and tgt answer the same way).
                reply.append((key, NOT_UNDERSTOOD))

        chap_keys = {key: keys[key] for key in _CHAP_KEYS if key in keys}
        if self._auth_method is None and self._chap_secret is not None:
            raise _Refused(
                LoginStatus.AUTHENTICATION_FAILURE, "CHAP required but no AuthMethod offered"
            )
        chap = self._chap
        if chap is None:
            if chap_keys:
                raise _Refused(LoginStatus.INITIATOR_ERROR, "CHAP keys without AuthMethod=CHAP")
            return reply
        try:
            if chap.state is ChapState.WAIT_ALGORITHM:
                if "AuthMethod" in keys and not chap_keys:
                    return reply  # the target has just chosen CHAP; CHAP_A comes next
                if set(chap_keys) != {"CHAP_A"}:
                    raise ChapFailure("expected CHAP_A")
                reply += chap.start(chap_keys["CHAP_A"])
            elif chap.state is ChapState.WAIT_RESPONSE:
                reply += chap.finish(chap_keys)
            elif chap_keys:
                raise ChapFailure("CHAP keys after authentication")
        except ChapFailure as exc:
            raise _Refused(LoginStatus.AUTHENTICATION_FAILURE, str(exc)) from None
        except ChapConfigError as exc:
            raise _Refused(LoginStatus.TARGET_ERROR, str(exc)) from None
        return reply

    def _choose_auth_method(self, value: str) -> str:
        """§6.2.1 list negotiation, with the target's policy deciding: CHAP when required, else None."""
        if offers_reserved_value(value):
            raise _Refused(LoginStatus.INITIATOR_ERROR, f"AuthMethod={value}")
        methods = value.split(",")
        if self._chap_secret is not None:
            if "CHAP" not in methods:
                raise _Refused(
                    LoginStatus.AUTHENTICATION_FAILURE, f"CHAP required, offered AuthMethod={value}"
                )
            self._auth_method = "CHAP"
            self._chap = ChapAuthenticator(self._chap_secret, self._mutual_secret, self._random)
            return "CHAP"
        if NONE not in methods:
            # We hold no secret to check CHAP with, and support no other method.
            raise _Refused(
                LoginStatus.AUTHENTICATION_FAILURE, f"no acceptable method in AuthMethod={value}"
            )
        self._auth_method = NONE
        return NONE

    def _security_transition(self, h: _Header) -> tuple[bool, int]:
        authenticated = self._chap_secret is None or (
            self._chap is not None and self._chap.state is ChapState.DONE
        )
        if not (h.transit and authenticated):
            return False, 0  # stay: CHAP is under way, or the initiator is not done
        self._pass_security(h)
        nsg = h.nsg
        if nsg == Stage.FULL_FEATURE_PHASE and self._ops.needs_proposals():
            # Going straight to full feature would leave defaults above our limits in
            # force; answering NSG=1 brings the initiator to the operational stage.
            nsg = Stage.LOGIN_OPERATIONAL_NEGOTIATION
        return True, nsg

    def _pass_security(self, h: _Header) -> None:
        """Checks that wait for authentication: adding a connection to a session (TSIH != 0)."""
        if self._security_passed:
            return
        self._security_passed = True
        if h.tsih:
            exists = self._session_exists is not None and self._session_exists(
                self._initiator_name, h.isid, h.tsih
            )
            if exists:
                raise _Refused(
                    LoginStatus.TOO_MANY_CONNECTIONS, f"session {h.tsih} allows one connection"
                )
            raise _Refused(LoginStatus.SESSION_DOES_NOT_EXIST, f"no session {h.tsih}")

    def _operational(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        ops = self._ops
        negotiable: list[tuple[str, str]] = []
        not_understood: list[tuple[str, str]] = []
        for key, value in pairs:
            if key in OPERATIONAL_KEYS or key in ops.proposed:
                negotiable.append((key, value))
            elif key in LEADING_DECLARATIONS or key == "InitiatorAlias":
                continue
            else:
                # Unknown and X- keys (§6.2, §13.22), and keys of another stage or sender.
                not_understood.append((key, NOT_UNDERSTOOD))
        try:
            answers = ops.answer(negotiable)
        except NegotiationError as exc:
            raise _Refused(LoginStatus.INITIATOR_ERROR, str(exc)) from None
        return answers + not_understood + ops.declarations()

    def _operational_transition(self, h: _Header, reply: list[tuple[str, str]]) -> tuple[bool, int]:
        ops = self._ops
        if ops.proposed:
            missing = ", ".join(sorted(ops.proposed))
            raise _Refused(LoginStatus.INITIATOR_ERROR, f"no answer to the target's {missing}")
        if not h.transit:
            return False, 0
        # The initiator is done offering; keys it left at a default above our limits
        # are offered now, and the stage ends only once they are answered (§6.2).
        proposals = ops.proposals()
        if proposals:
            reply += proposals
            return False, 0
        return True, Stage.FULL_FEATURE_PHASE

    # -- responses -----------------------------------------------------------------------

    def _respond(
        self, h: _Header, pairs: list[tuple[str, str]], *, transit: bool, nsg: int
    ) -> LoginStep:
        # A key goes out once per response: when an initiator offers a key only
        # targets send (TargetPortalGroupTag...) in the request we declare it in,
        # the declaration stands and the NotUnderstood is dropped.
        unique: dict[str, str] = {}
        for key, value in pairs:
            unique.setdefault(key, value)
        data = encode_text(unique.items())
        size = LOGIN_MAX_RECV_DATA_SEGMENT_LENGTH
        pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        self._out = pieces[1:]
        self._out_transit = transit
        self._out_nsg = nsg
        return self._emit(h, pieces[0])

    def _emit(self, h: _Header, piece: bytes) -> LoginStep:
        """One response: a C-bit piece, or the last piece carrying the stage decision."""
        if self._out:
            return LoginStep(self._pdu(h, piece, transit=False, nsg=0, cont=True))
        if not self._out_transit:
            return LoginStep(self._pdu(h, piece, transit=False, nsg=0))
        if self._out_nsg == Stage.FULL_FEATURE_PHASE:
            return self._finish(h, piece)
        step = LoginStep(self._pdu(h, piece, transit=True, nsg=self._out_nsg))
        self.stage = Stage(self._out_nsg)
        return step

    def _finish(self, h: _Header, piece: bytes) -> LoginStep:
        """The Login Final-Response: the new TSIH (given in this response only, §11.13) and the parameters."""
        try:
            tsih = self._new_tsih()
        except RuntimeError:  # SessionRegistry.allocate_tsih: every TSIH in use
            tsih = 0
        if not 1 <= tsih <= 0xFFFF:
            raise _Refused(LoginStatus.OUT_OF_RESOURCES, "no TSIH available")
        reply = self._pdu(h, piece, transit=True, nsg=Stage.FULL_FEATURE_PHASE, tsih=tsih)
        params = SessionParams(
            session_type=self._session_type,
            initiator_name=self._initiator_name,
            initiator_alias=self._initiator_alias,
            target_name=self._target.iqn if self._target is not None else "",
            isid=h.isid,
            tsih=tsih,
            cid=h.cid,
            tpgt=self._tpgt,
            # §4.2.2.1: login requests are immediate, so the first command reuses their CmdSN.
            exp_cmd_sn=h.cmd_sn,
            stat_sn=self._stat_sn,
        )
        self._ops.apply(params)
        self.stage = Stage.FULL_FEATURE_PHASE
        self._ended = True
        return LoginStep(reply, params=params)

    def _refusal(self, h: _Header, status: LoginStatus, reason: str) -> LoginStep:
        self._ended = True
        self._out = []
        self._text = bytearray()
        self.failure = reason
        reply = self._pdu(h, b"", transit=False, nsg=0, status=status)
        return LoginStep(reply, close=True)

    def _pdu(
        self,
        h: _Header,
        data: bytes,
        *,
        transit: bool,
        nsg: int,
        cont: bool = False,
        status: LoginStatus = LoginStatus.SUCCESS,
        tsih: int | None = None,
    ) -> list[bytes | bytearray | memoryview]:
        """A Login Response (§11.13) in the current stage, echoing the request's ISID and ITT."""
        # CSG is the stage this response belongs to (always 0 or 1; a refusal after
        # the login ended reports the operational stage).
        flags = min(int(self.stage), Stage.LOGIN_OPERATIONAL_NEGOTIATION) << LOGIN_CSG_SHIFT
        if transit:
            flags |= LOGIN_TRANSIT | nsg
        if cont:
            flags |= LOGIN_CONTINUE
        bhs = new_bhs(Opcode.LOGIN_RESPONSE, flags)
        bhs[2] = ISCSI_VERSION  # Version-max
        bhs[3] = ISCSI_VERSION  # Version-active
        bhs[8:14] = h.isid
        put_u16(bhs, 14, h.tsih if tsih is None else tsih)
        put_u32(bhs, 16, h.itt)
        put_u32(bhs, 24, self._stat_sn)
        self._stat_sn = (self._stat_sn + 1) & 0xFFFFFFFF
        put_u32(bhs, 28, h.cmd_sn)  # ExpCmdSN: login requests are immediate (§4.2.2.1)
        put_u32(bhs, 32, h.cmd_sn + self._window - 1)
        bhs[36] = status >> 8  # Status-Class
        bhs[37] = status & 0xFF  # Status-Detail
        return encode_pdu(bhs, data)

    def _random(self, n: int) -> bytes:
        data = bytes(self._random_bytes(n))
        if len(data) != n:
            raise _Refused(LoginStatus.TARGET_ERROR, "random source returned too few bytes")
        return data
