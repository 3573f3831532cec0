"""The iSCSI Login Phase (RFC 7143 §6, §11.12, §11.13, §12.1.3, §13) and SendTargets (Appendix C).

Requests are built byte for byte as the initiators build them (the key sets
and flags come from open-iscsi's usr/login.c, libiscsi's lib/login.c and
iPXE's src/net/tcp/iscsi.c), framed through :class:`PduReader` like the
connection does, and the responses are decoded from their wire bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import struct
from collections.abc import Callable, Iterable, Sequence

import pytest

from mobinux.errors import MalformedPacket
from mobinux.iscsi.constants import LoginStatus, Stage
from mobinux.iscsi.keys import encode_text, parse_text
from mobinux.iscsi.login import MAX_LOGIN_REQUESTS, Login, LoginStep
from mobinux.iscsi.params import ChapSecret, SessionParams, SessionType, TargetEntry, TargetLimits
from mobinux.iscsi.pdu import Pdu, PduReader
from mobinux.iscsi.sendtargets import send_targets_text

TARGET = "iqn.2024-01.org.mobinux:node1"
OTHER = "iqn.2024-01.org.mobinux:node2"
INITIATOR = "iqn.2004-10.com.ubuntu:01:5a1c7d2e"
ISID = bytes.fromhex("00023d000001")  # open-iscsi's default ISID (OUI format)
ITT = 0x1000
CMD_SN = 1
CHAP = ChapSecret("node1-user", b"node1-secret-0123")
MUTUAL = ChapSecret("target-user", b"target-secret-4567")

# What open-iscsi's login.c accepts in a response, stage by stage
# (get_security_text_keys, get_op_params_text_keys): anything else fails its login.
OPEN_ISCSI_SECURITY_KEYS = {
    "TargetAlias",
    "TargetAddress",
    "TargetPortalGroupTag",
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
}
OPEN_ISCSI_OPERATIONAL_KEYS = {
    "TargetAlias",
    "TargetAddress",
    "TargetPortalGroupTag",
    "InitialR2T",
    "ImmediateData",
    "MaxRecvDataSegmentLength",
    "FirstBurstLength",
    "MaxBurstLength",
    "HeaderDigest",
    "DataDigest",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "OFMarker",
    "OFMarkInt",
    "IFMarker",
    "IFMarkInt",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "MaxOutstandingR2T",
    "MaxConnections",
    "ErrorRecoveryLevel",
    "RDMAExtensions",
    "InitiatorRecvDataSegmentLength",
    "TargetRecvDataSegmentLength",
}


# -- fakes and wire helpers ------------------------------------------------------------


class FakeDirectory:
    """A TargetDirectory over a few entries; ACLs applied the way the real one applies them."""

    def __init__(self, *entries: TargetEntry, discovery_chap: ChapSecret | None = None) -> None:
        self.entries = list(entries)
        self.chap = discovery_chap

    def lookup(self, iqn: str) -> TargetEntry | None:
        return next((e for e in self.entries if e.iqn.casefold() == iqn.casefold()), None)

    def visible_to(self, initiator_name: str) -> Sequence[TargetEntry]:
        name = initiator_name.casefold()
        return [
            e
            for e in self.entries
            if e.allowed_initiators is None or name in {n.casefold() for n in e.allowed_initiators}
        ]

    def portals(self, iqn: str) -> Sequence[str]:
        return ["192.0.2.1:3260,1", "[2001:db8::1]:3260,1"]

    def discovery_chap(self) -> ChapSecret | None:
        return self.chap


def counting_random() -> Callable[[int], bytes]:
    """Bytes 0, 1, 2, ...: the first 4 make StatSN 0x00010203, then CHAP_I and CHAP_C follow."""
    counter = itertools.count()
    return lambda n: bytes(next(counter) & 0xFF for _ in range(n))


FIRST_STAT_SN = 0x00010203


def make_login(
    *entries: TargetEntry,
    limits: TargetLimits | None = None,
    discovery_chap: ChapSecret | None = None,
    new_tsih: Callable[[], int] | None = None,
    random_bytes: Callable[[int], bytes] | None = None,
    session_exists: Callable[[str, bytes, int], bool] | None = None,
) -> Login:
    if not entries:
        entries = (TargetEntry(TARGET, alias="node one"),)
    tsihs = itertools.count(0x42)
    return Login(
        FakeDirectory(*entries, discovery_chap=discovery_chap),
        limits or TargetLimits(),
        tpgt=7,
        new_tsih=new_tsih or (lambda: next(tsihs)),
        random_bytes=random_bytes or counting_random(),
        portal_address="192.0.2.1:3260",
        session_exists=session_exists,
    )


def request(
    *,
    csg: int,
    nsg: int = 0,
    transit: bool = False,
    cont: bool = False,
    text: bytes | Iterable[tuple[str, str]] = b"",
    isid: bytes = ISID,
    tsih: int = 0,
    itt: int = ITT,
    cid: int = 0,
    cmd_sn: int = CMD_SN,
    exp_stat_sn: int = 0,
    version: tuple[int, int] = (0, 0),
    opcode: int = 0x43,  # Login Request with the Immediate bit (§11.12)
) -> bytes:
    """A Login Request PDU as wire bytes (§11.12): BHS, text, zero padding to 4 bytes."""
    data = text if isinstance(text, bytes) else encode_text(text)
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | (nsg if transit else 0)
    bhs = struct.pack(
        "!BBBBB3s6sHIHHII16x",
        opcode,
        flags,
        version[0],
        version[1],
        0,
        len(data).to_bytes(3, "big"),
        isid,
        tsih,
        itt,
        cid,
        0,
        cmd_sn,
        exp_stat_sn,
    )
    return bhs + data + b"\0" * (-len(data) & 3)


@dataclasses.dataclass
class Response:
    """A Login Response decoded from its wire bytes (§11.13)."""

    opcode: int
    transit: bool
    cont: bool
    csg: int
    nsg: int
    version_max: int
    version_active: int
    isid: bytes
    tsih: int
    itt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    status: int
    data: bytes
    step: LoginStep

    @property
    def keys(self) -> dict[str, str]:
        pairs = parse_text(self.data)
        assert len({k for k, _ in pairs}) == len(pairs), "a key sent twice in one response"
        return dict(pairs)


def frame(wire: bytes) -> Pdu:
    reader = PduReader(8192)
    reader.feed(wire)
    pdu = reader.next_pdu()
    assert pdu is not None and reader.buffered == 0
    return pdu


def send(login: Login, wire: bytes) -> Response:
    step = login.receive(frame(wire))
    out = b"".join(bytes(b) for b in step.reply)
    reader = PduReader(2**24)
    reader.feed(out)
    pdu = reader.next_pdu()
    assert pdu is not None and reader.buffered == 0, "one reply is exactly one PDU"
    bhs = pdu.bhs
    assert bhs[4] == 0  # no AHS in a Login Response
    return Response(
        opcode=bhs[0],
        transit=bool(bhs[1] & 0x80),
        cont=bool(bhs[1] & 0x40),
        csg=(bhs[1] >> 2) & 3,
        nsg=bhs[1] & 3,
        version_max=bhs[2],
        version_active=bhs[3],
        isid=bytes(bhs[8:14]),
        tsih=pdu.u16(14),
        itt=pdu.itt,
        stat_sn=pdu.u32(24),
        exp_cmd_sn=pdu.u32(28),
        max_cmd_sn=pdu.u32(32),
        status=pdu.u16(36),
        data=pdu.data,
        step=step,
    )


def assert_refused(response: Response, status: LoginStatus) -> None:
    assert response.status == status, f"status 0x{response.status:04x}, wanted 0x{status:04x}"
    assert response.step.close
    assert response.step.params is None
    assert not response.transit
    assert response.data == b""


def final_params(response: Response) -> SessionParams:
    assert response.status == 0
    assert response.transit and response.nsg == 3
    assert not response.step.close
    assert response.step.params is not None
    return response.step.params


def chap_answer(ident: str, challenge: str, secret: bytes) -> str:
    raw = bytes.fromhex(challenge[2:])
    return "0x" + hashlib.md5(bytes([int(ident)]) + secret + raw).hexdigest()


# Key sets as the initiators send them.

LIBISCSI_OPERATIONAL = [
    ("HeaderDigest", "None,CRC32C"),
    ("DataDigest", "None"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "262144"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"),
    ("ErrorRecoveryLevel", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("MaxConnections", "1"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
]

OPEN_ISCSI_OPERATIONAL = [
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("ErrorRecoveryLevel", "0"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "16776192"),
    ("FirstBurstLength", "262144"),
    ("MaxOutstandingR2T", "1"),
    ("MaxConnections", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("MaxRecvDataSegmentLength", "262144"),
]

IPXE_OPERATIONAL = [
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("MaxConnections", "1"),
    ("InitialR2T", "Yes"),
    ("ImmediateData", "No"),
    ("MaxRecvDataSegmentLength", "8192"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "65536"),
    ("DefaultTime2Wait", "0"),
    ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("ErrorRecoveryLevel", "0"),
]


def leading(session_type: str = "Normal", target: str | None = TARGET) -> list[tuple[str, str]]:
    pairs = [("InitiatorName", INITIATOR)]
    if session_type == "Normal" and target is not None:
        pairs.append(("TargetName", target))
    pairs.append(("SessionType", session_type))
    return pairs


# -- whole logins as real initiators run them -----------------------------------------


def test_libiscsi_starts_in_the_operational_stage() -> None:
    login = make_login()
    wire = request(
        csg=1,
        nsg=3,
        transit=True,
        cmd_sn=0xDEADBEEF,
        itt=0x7777,
        text=leading() + LIBISCSI_OPERATIONAL,
    )
    r = send(login, wire)
    assert r.opcode == 0x23  # Login Response
    assert (r.transit, r.cont, r.csg, r.nsg) == (True, False, 1, 3)
    assert (r.version_max, r.version_active) == (0, 0)
    assert r.isid == ISID and r.itt == 0x7777
    assert r.tsih == 0x42  # the new TSIH, in the final response
    assert r.stat_sn == FIRST_STAT_SN
    assert r.exp_cmd_sn == 0xDEADBEEF  # login requests are immediate
    assert r.max_cmd_sn == 0xDEADBEEF + 127
    keys = r.keys
    assert keys["TargetPortalGroupTag"] == "7"  # §13.9: in the first response
    assert keys["TargetAlias"] == "node one"
    assert keys["HeaderDigest"] == "None"
    assert keys["InitialR2T"] == "Yes"
    assert keys["MaxRecvDataSegmentLength"] == "262144"
    params = final_params(r)
    assert params.session_type is SessionType.NORMAL
    assert params.initiator_name == INITIATOR
    assert params.target_name == TARGET
    assert (params.isid, params.tsih, params.cid, params.tpgt) == (ISID, 0x42, 0, 7)
    assert params.exp_cmd_sn == 0xDEADBEEF
    assert params.stat_sn == FIRST_STAT_SN + 1
    assert params.initiator_max_recv_data_segment_length == 262144
    assert params.target_max_recv_data_segment_length == 262144
    assert (params.initial_r2t, params.immediate_data) == (True, True)
    assert (params.max_burst_length, params.first_burst_length) == (262144, 262144)
    assert params.default_time2retain == 0
    assert login.stage is Stage.FULL_FEATURE_PHASE
    assert login.failure is None


def test_open_iscsi_normal_session() -> None:
    login = make_login()
    first = leading()
    first.insert(1, ("InitiatorAlias", "ubuntu"))
    r1 = send(login, request(csg=0, nsg=1, transit=True, text=[*first, ("AuthMethod", "None")]))
    assert (r1.status, r1.transit, r1.csg, r1.nsg) == (0, True, 0, 1)
    assert r1.tsih == 0  # only the final response carries the TSIH
    assert r1.keys == {"TargetPortalGroupTag": "7", "TargetAlias": "node one", "AuthMethod": "None"}
    assert set(r1.keys) <= OPEN_ISCSI_SECURITY_KEYS
    assert not r1.step.close and r1.step.params is None
    assert login.stage is Stage.LOGIN_OPERATIONAL_NEGOTIATION

    r2 = send(login, request(csg=1, nsg=3, transit=True, text=OPEN_ISCSI_OPERATIONAL))
    assert r2.stat_sn == r1.stat_sn + 1
    assert set(r2.keys) <= OPEN_ISCSI_OPERATIONAL_KEYS
    keys = r2.keys
    assert keys["MaxConnections"] == "1"  # open-iscsi fails on anything else
    assert keys["ErrorRecoveryLevel"] == "0"
    assert keys["HeaderDigest"] == "None" and keys["DataDigest"] == "None"
    assert keys["MaxBurstLength"] == "1048576"
    assert keys["MaxRecvDataSegmentLength"] == "262144"  # our declaration (§13.12)
    params = final_params(r2)
    assert params.initiator_alias == "ubuntu"
    assert params.max_burst_length == 1048576


def test_open_iscsi_discovery_goes_straight_to_full_feature() -> None:
    login = make_login()
    text = [("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")]
    r = send(login, request(csg=0, nsg=3, transit=True, text=text))
    assert (r.transit, r.csg, r.nsg) == (True, 0, 3)
    assert r.keys == {"AuthMethod": "None"}  # no TargetPortalGroupTag outside normal sessions
    params = final_params(r)
    assert params.session_type is SessionType.DISCOVERY
    assert params.target_name == ""
    assert params.target_max_recv_data_segment_length == 8192  # never declared


def test_open_iscsi_discovery_with_operational_stage() -> None:
    login = make_login()
    text = [("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")]
    r1 = send(login, request(csg=0, nsg=1, transit=True, text=text))
    assert (r1.transit, r1.nsg) == (True, 1)
    ops = [
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
        ("MaxRecvDataSegmentLength", "32768"),
    ]
    r2 = send(login, request(csg=1, nsg=3, transit=True, text=ops))
    assert set(r2.keys) <= OPEN_ISCSI_OPERATIONAL_KEYS
    assert "Irrelevant" not in r2.keys.values()
    params = final_params(r2)
    assert params.initiator_max_recv_data_segment_length == 32768


def test_libiscsi_discovery_gets_irrelevant_for_session_keys() -> None:
    login = make_login()
    text = [("InitiatorName", INITIATOR), ("SessionType", "Discovery"), *LIBISCSI_OPERATIONAL]
    r = send(login, request(csg=1, nsg=3, transit=True, text=text))
    keys = r.keys
    for key in (
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "MaxConnections",
    ):
        assert keys[key] == "Irrelevant"
    assert keys["HeaderDigest"] == "None"
    assert final_params(r).session_type is SessionType.DISCOVERY


def test_ipxe_without_chap() -> None:
    login = make_login()
    # iPXE: InitiatorName, TargetName, SessionType, AuthMethod, always with T=1.
    r1 = send(login, request(csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", "None")]))
    assert (r1.transit, r1.nsg) == (True, 1)
    r2 = send(login, request(csg=1, nsg=3, transit=True, text=IPXE_OPERATIONAL))
    keys = r2.keys
    assert "Reject" not in keys.values()  # iPXE treats any Reject as fatal
    assert keys["ImmediateData"] == "No"
    assert keys["DefaultTime2Wait"] == "2"  # Maximum of its 0 and our 2
    params = final_params(r2)
    assert params.immediate_data is False
    assert params.initiator_max_recv_data_segment_length == 8192
    assert params.first_burst_length == 65536


def test_ipxe_one_way_chap() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    r1 = send(
        login, request(csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", "CHAP,None")])
    )
    # CHAP has not run yet: the target does not transit even though iPXE asked to.
    assert (r1.status, r1.transit) == (0, False)
    assert r1.keys["AuthMethod"] == "CHAP"
    r2 = send(login, request(csg=0, nsg=1, transit=True, text=[("CHAP_A", "5")]))
    assert not r2.transit
    keys = r2.keys
    assert keys["CHAP_A"] == "5"
    assert keys["CHAP_I"] == "4"  # the byte after the 4 of the initial StatSN
    assert keys["CHAP_C"] == "0x" + bytes(range(5, 21)).hex()
    response = chap_answer(keys["CHAP_I"], keys["CHAP_C"], CHAP.secret)
    r3 = send(
        login,
        request(csg=0, nsg=1, transit=True, text=[("CHAP_N", CHAP.user), ("CHAP_R", response)]),
    )
    assert (r3.status, r3.transit, r3.nsg) == (0, True, 1)
    assert "CHAP_N" not in r3.keys  # no mutual CHAP asked for
    r4 = send(login, request(csg=1, nsg=3, transit=True, text=IPXE_OPERATIONAL))
    assert "Reject" not in r4.keys.values()
    final_params(r4)


def run_chap(
    login: Login,
    *,
    methods: str = "CHAP,None",
    algorithms: str = "5",
    user: str = CHAP.user,
    secret: bytes = CHAP.secret,
    encode: Callable[[str], str] = lambda hex_value: hex_value,
    mutual: Sequence[tuple[str, str]] = (),
    text: Sequence[tuple[str, str]] | None = None,
) -> Response:
    """libiscsi's security stage: AuthMethod (T=1), CHAP_A (T=0), CHAP_N/CHAP_R (T=1)."""
    r1 = send(
        login,
        request(csg=0, nsg=1, transit=True, text=[*(text or leading()), ("AuthMethod", methods)]),
    )
    if r1.step.close:
        return r1
    assert r1.keys["AuthMethod"] == "CHAP" and not r1.transit
    r2 = send(login, request(csg=0, nsg=1, transit=False, text=[("CHAP_A", algorithms)]))
    if r2.step.close:
        return r2
    keys = r2.keys
    response = encode(chap_answer(keys["CHAP_I"], keys["CHAP_C"], secret))
    return send(
        login,
        request(csg=0, nsg=1, transit=True, text=[("CHAP_N", user), ("CHAP_R", response), *mutual]),
    )


def test_libiscsi_chap_then_operational() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    r = run_chap(login)
    assert (r.status, r.transit, r.nsg) == (0, True, 1)
    r4 = send(login, request(csg=1, nsg=3, transit=True, text=LIBISCSI_OPERATIONAL))
    final_params(r4)


def test_mutual_chap_libiscsi() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP, mutual_chap=MUTUAL))
    peer_challenge = bytes(range(200, 232))  # libiscsi: 32 random bytes
    r = run_chap(login, mutual=[("CHAP_I", "1"), ("CHAP_C", "0x" + peer_challenge.hex().upper())])
    # libiscsi requires CHAP_N and CHAP_R in the response that leaves the security stage.
    assert (r.status, r.transit, r.nsg) == (0, True, 1)
    assert r.keys["CHAP_N"] == MUTUAL.user
    assert (
        r.keys["CHAP_R"] == "0x" + hashlib.md5(b"\x01" + MUTUAL.secret + peer_challenge).hexdigest()
    )
    assert set(r.keys) <= OPEN_ISCSI_SECURITY_KEYS


@pytest.mark.parametrize("algorithms", ["5", "5,6,7,8", "7,5"])
def test_chap_algorithm_lists(algorithms: str) -> None:
    # iscsi-test-cu iSCSI.iSCSICHAP.Simple offers "5,6,7,8".
    assert run_chap(make_login(TargetEntry(TARGET, chap=CHAP)), algorithms=algorithms).status == 0


@pytest.mark.parametrize("algorithms", ["56", "", "7", "6,8"])
def test_chap_without_md5_fails(algorithms: str) -> None:
    # iscsi-test-cu iSCSI.iSCSICHAP.Invalid: "56" (catches one-byte checks) and "".
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    assert_refused(run_chap(login, algorithms=algorithms), LoginStatus.AUTHENTICATION_FAILURE)
    assert login.failure is not None


def to_base64(hex_value: str) -> str:
    return "0b" + base64.b64encode(bytes.fromhex(hex_value[2:])).decode()


def test_chap_response_in_base64() -> None:
    # iscsi-test-cu iSCSI.iSCSICHAP.Base64.
    assert run_chap(make_login(TargetEntry(TARGET, chap=CHAP)), encode=to_base64).status == 0


def test_chap_base64_oversize_fails() -> None:
    # iscsi-test-cu iSCSI.iSCSICHAP.Base64Oversize: a valid base64 prefix glued on.
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    r = run_chap(login, encode=lambda h: "0bb3ZlcnNpemUK" + to_base64(h)[2:])
    assert_refused(r, LoginStatus.AUTHENTICATION_FAILURE)


@pytest.mark.parametrize("user", ["0x6162", "0bYWI="])
def test_chap_user_names_that_look_binary(user: str) -> None:
    secret = ChapSecret(user, b"sixteen-byte-key")
    login = make_login(TargetEntry(TARGET, chap=secret))
    assert run_chap(login, user=user, secret=secret.secret).status == 0


def test_wrong_chap_secret() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    assert_refused(run_chap(login, secret=b"guessed"), LoginStatus.AUTHENTICATION_FAILURE)
    assert login.stage is Stage.SECURITY_NEGOTIATION


def test_wrong_chap_user() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    assert_refused(run_chap(login, user="node2-user"), LoginStatus.AUTHENTICATION_FAILURE)


def test_reflected_mutual_challenge_is_refused() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP, mutual_chap=MUTUAL))
    our_challenge = "0x" + bytes(range(5, 21)).hex()  # what counting_random makes the target send
    r = run_chap(login, mutual=[("CHAP_I", "4"), ("CHAP_C", our_challenge)])
    assert_refused(r, LoginStatus.AUTHENTICATION_FAILURE)
    assert "reflect" in (login.failure or "")


def test_short_mutual_challenge_is_refused() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP, mutual_chap=MUTUAL))
    r = run_chap(login, mutual=[("CHAP_I", "4"), ("CHAP_C", "0x0102030405")])
    assert_refused(r, LoginStatus.AUTHENTICATION_FAILURE)


def test_mutual_chap_with_one_secret_for_both_ways_is_a_target_error() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP, mutual_chap=ChapSecret("t", CHAP.secret)))
    r = run_chap(login, mutual=[("CHAP_I", "4"), ("CHAP_C", "0x" + "ab" * 16)])
    assert_refused(r, LoginStatus.TARGET_ERROR)


def test_chap_target_refuses_authmethod_none() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    r = send(login, request(csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", "None")]))
    assert_refused(r, LoginStatus.AUTHENTICATION_FAILURE)


def test_chap_target_refuses_a_login_that_skips_security() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    r = send(login, request(csg=1, nsg=3, transit=True, text=leading() + LIBISCSI_OPERATIONAL))
    assert_refused(r, LoginStatus.AUTHENTICATION_FAILURE)


def test_chap_target_needs_an_authmethod() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    r = send(login, request(csg=0, nsg=1, transit=True, text=leading()))
    assert_refused(r, LoginStatus.AUTHENTICATION_FAILURE)


def test_chap_sequence_must_be_followed() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    send(login, request(csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", "CHAP")]))
    # CHAP_N/CHAP_R before the target has sent a challenge.
    r = send(
        login, request(csg=0, nsg=1, transit=True, text=[("CHAP_N", CHAP.user), ("CHAP_R", "0x00")])
    )
    assert_refused(r, LoginStatus.AUTHENTICATION_FAILURE)


def test_chap_cannot_leave_security_before_responding() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    send(login, request(csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", "CHAP")]))
    send(login, request(csg=0, nsg=1, transit=True, text=[("CHAP_A", "5")]))
    r = send(login, request(csg=0, nsg=1, transit=True))  # no CHAP_N/CHAP_R
    assert_refused(r, LoginStatus.AUTHENTICATION_FAILURE)


def test_chap_and_authmethod_in_one_request() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    r = send(
        login,
        request(
            csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", "CHAP"), ("CHAP_A", "5")]
        ),
    )
    assert set(r.keys) == {"TargetPortalGroupTag", "AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C"}


def test_chap_keys_without_chap_are_a_protocol_error() -> None:
    login = make_login()
    r = send(
        login,
        request(
            csg=0, nsg=1, transit=False, text=[*leading(), ("AuthMethod", "None"), ("CHAP_A", "5")]
        ),
    )
    assert_refused(r, LoginStatus.INITIATOR_ERROR)


@pytest.mark.parametrize(
    ("methods", "outcome"), [("SRP,None", "None"), ("KRB5,X-foo,None", "None"), ("None", "None")]
)
def test_authmethod_picks_none_without_chap(methods: str, outcome: str) -> None:
    r = send(
        make_login(),
        request(csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", methods)]),
    )
    assert r.keys["AuthMethod"] == outcome
    assert r.transit


@pytest.mark.parametrize("methods", ["CHAP", "SRP", "SRP,KRB5"])
def test_no_acceptable_authmethod(methods: str) -> None:
    r = send(
        make_login(),
        request(csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", methods)]),
    )
    assert_refused(r, LoginStatus.AUTHENTICATION_FAILURE)


def test_authmethod_reject_offered_is_a_protocol_error() -> None:
    r = send(
        make_login(),
        request(csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", "Reject")]),
    )
    assert_refused(r, LoginStatus.INITIATOR_ERROR)


def test_security_stage_without_authmethod_when_none_is_needed() -> None:
    r = send(make_login(), request(csg=0, nsg=1, transit=True, text=leading()))
    assert (r.status, r.transit, r.nsg) == (0, True, 1)


def test_discovery_chap() -> None:
    login = make_login(discovery_chap=CHAP)
    text = [("InitiatorName", INITIATOR), ("SessionType", "Discovery")]
    r = run_chap(login, text=text)
    assert (r.status, r.transit) == (0, True)
    r2 = send(login, request(csg=1, nsg=3, transit=True, text=[("HeaderDigest", "None")]))
    assert final_params(r2).session_type is SessionType.DISCOVERY


def test_discovery_chap_refuses_none() -> None:
    login = make_login(discovery_chap=CHAP)
    text = [("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")]
    assert_refused(
        send(login, request(csg=0, nsg=3, transit=True, text=text)),
        LoginStatus.AUTHENTICATION_FAILURE,
    )


def test_normal_target_chap_does_not_apply_to_discovery() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP))
    text = [("InitiatorName", INITIATOR), ("SessionType", "Discovery")]
    r = send(login, request(csg=1, nsg=3, transit=True, text=text))
    final_params(r)


# -- names, targets, ACLs --------------------------------------------------------------


def test_unknown_target() -> None:
    r = send(make_login(), request(csg=0, nsg=1, transit=True, text=leading(target=OTHER)))
    assert_refused(r, LoginStatus.NOT_FOUND)
    assert (r.csg, r.isid, r.itt) == (0, ISID, ITT)
    assert (r.version_max, r.version_active) == (0, 0)


def test_target_name_is_case_insensitive() -> None:
    r = send(make_login(), request(csg=1, nsg=3, transit=True, text=leading(target=TARGET.upper())))
    assert final_params(r).target_name == TARGET  # the configured spelling


def test_acl_refuses_other_initiators() -> None:
    entry = TargetEntry(TARGET, allowed_initiators=frozenset({"iqn.2024-01.org.example:other"}))
    r = send(make_login(entry), request(csg=0, nsg=1, transit=True, text=leading()))
    assert_refused(r, LoginStatus.AUTHORIZATION_FAILURE)


def test_acl_compares_names_case_insensitively() -> None:
    entry = TargetEntry(TARGET, allowed_initiators=frozenset({INITIATOR.upper()}))
    r = send(make_login(entry), request(csg=1, nsg=3, transit=True, text=leading()))
    final_params(r)


def test_missing_initiator_name() -> None:
    text = [("TargetName", TARGET), ("SessionType", "Normal")]
    assert_refused(
        send(make_login(), request(csg=0, nsg=1, transit=True, text=text)),
        LoginStatus.MISSING_PARAMETER,
    )


def test_empty_initiator_name() -> None:
    text = [("InitiatorName", ""), ("TargetName", TARGET)]
    assert_refused(send(make_login(), request(csg=1, text=text)), LoginStatus.MISSING_PARAMETER)


def test_missing_target_name_in_a_normal_session() -> None:
    text = [("InitiatorName", INITIATOR)]  # SessionType defaults to Normal (§13.21)
    assert_refused(send(make_login(), request(csg=0, text=text)), LoginStatus.MISSING_PARAMETER)


def test_unknown_session_type() -> None:
    text = [("InitiatorName", INITIATOR), ("SessionType", "Boot")]
    r = send(make_login(), request(csg=0, text=text))
    assert_refused(r, LoginStatus.SESSION_TYPE_NOT_SUPPORTED)


def test_initiator_name_too_long() -> None:
    text = [("InitiatorName", "iqn.2024-01.org.example:" + "x" * 200), ("TargetName", TARGET)]
    assert_refused(send(make_login(), request(csg=0, text=text)), LoginStatus.INITIATOR_ERROR)


def test_leading_keys_only_in_the_first_request() -> None:
    login = make_login()
    send(login, request(csg=0, text=[*leading(), ("AuthMethod", "None")]))
    r = send(login, request(csg=0, text=[("InitiatorName", INITIATOR + "x")]))
    assert_refused(r, LoginStatus.INITIATOR_ERROR)


def test_discovery_ignores_target_name() -> None:
    text = [
        ("InitiatorName", INITIATOR),
        ("SessionType", "Discovery"),
        ("TargetName", "iqn.nothing"),
    ]
    r = send(make_login(), request(csg=1, nsg=3, transit=True, text=text))
    assert final_params(r).target_name == ""


def test_no_alias_no_target_alias() -> None:
    r = send(make_login(TargetEntry(TARGET)), request(csg=1, nsg=3, transit=True, text=leading()))
    assert "TargetAlias" not in r.keys
    assert r.keys["TargetPortalGroupTag"] == "7"


# -- key rules ---------------------------------------------------------------------------


def test_unknown_and_private_keys_are_not_understood() -> None:
    text = [*leading(), ("X-com.example.Foo", "1"), ("X#org.example.bar", "2"), ("FooBar", "x")]
    r = send(make_login(), request(csg=1, nsg=3, transit=True, text=text))
    keys = r.keys
    assert (
        keys["X-com.example.Foo"] == keys["X#org.example.bar"] == keys["FooBar"] == "NotUnderstood"
    )
    final_params(r)


def test_operational_keys_in_the_security_stage_are_not_understood() -> None:
    text = [*leading(), ("AuthMethod", "None"), ("HeaderDigest", "CRC32C")]
    r = send(make_login(), request(csg=0, nsg=1, transit=True, text=text))
    assert r.keys["HeaderDigest"] == "NotUnderstood"


def test_security_and_target_keys_in_the_operational_stage_are_not_understood() -> None:
    text = [
        *leading(),
        ("AuthMethod", "None"),
        ("TargetPortalGroupTag", "1"),
        ("SendTargets", "All"),
    ]
    r = send(make_login(), request(csg=1, nsg=3, transit=True, text=text))
    keys = r.keys
    assert keys["AuthMethod"] == keys["SendTargets"] == "NotUnderstood"
    assert keys["TargetPortalGroupTag"] == "7"  # our declaration, not an echo
    final_params(r)


def test_duplicate_key_in_one_request() -> None:
    text = [*leading(), ("MaxBurstLength", "65536"), ("MaxBurstLength", "65536")]
    assert_refused(
        send(make_login(), request(csg=1, nsg=3, transit=True, text=text)),
        LoginStatus.INITIATOR_ERROR,
    )


def test_key_offered_again_in_a_later_request() -> None:
    login = make_login()
    send(login, request(csg=1, text=[*leading(), ("MaxBurstLength", "65536")]))
    r = send(login, request(csg=1, nsg=3, transit=True, text=[("MaxBurstLength", "65536")]))
    assert_refused(r, LoginStatus.INITIATOR_ERROR)


def test_answer_constants_cannot_be_offered() -> None:
    text = [*leading(), ("HeaderDigest", "Reject")]
    assert_refused(
        send(make_login(), request(csg=1, nsg=3, transit=True, text=text)),
        LoginStatus.INITIATOR_ERROR,
    )


def test_out_of_range_values_are_rejected_and_the_login_goes_on() -> None:
    text = [
        *leading(),
        ("MaxBurstLength", "100"),
        ("ErrorRecoveryLevel", "9"),
        ("InitialR2T", "Maybe"),
    ]
    r = send(make_login(), request(csg=1, nsg=3, transit=True, text=text))
    keys = r.keys
    assert keys["MaxBurstLength"] == keys["ErrorRecoveryLevel"] == keys["InitialR2T"] == "Reject"
    params = final_params(r)
    assert params.max_burst_length == 262144  # §6.2: a rejected key keeps its default


@pytest.mark.parametrize("value", ["511", "16777216", "lots"])
def test_invalid_max_recv_data_segment_length(value: str) -> None:
    text = [*leading(), ("MaxRecvDataSegmentLength", value)]
    assert_refused(
        send(make_login(), request(csg=1, nsg=3, transit=True, text=text)),
        LoginStatus.INITIATOR_ERROR,
    )


@pytest.mark.parametrize(
    ("header", "data"),
    [("CRC32C", "CRC32C"), ("None,CRC32C", "CRC32C,None"), ("CRC32C,None", "None")],
)
def test_digest_negotiation(header: str, data: str) -> None:
    text = [*leading(), ("HeaderDigest", header), ("DataDigest", data)]
    r = send(make_login(), request(csg=1, nsg=3, transit=True, text=text))
    params = final_params(r)
    assert params.header_digest == (header.split(",")[0] == "CRC32C")
    assert params.data_digest == (data.split(",")[0] == "CRC32C")
    assert r.keys["HeaderDigest"] == header.split(",")[0]


def test_keys_are_answered_only_when_offered() -> None:
    r = send(make_login(), request(csg=1, nsg=3, transit=True, text=leading()))
    # Nothing offered: only the declarations the target must make (§13.9, §13.6, §13.12).
    assert r.keys == {
        "TargetPortalGroupTag": "7",
        "TargetAlias": "node one",
        "MaxRecvDataSegmentLength": "262144",
    }


def test_task_reporting_and_protocol_level_when_offered() -> None:
    text = [
        *leading(),
        ("TaskReporting", "ResponseFence,FastAbort,RFC3720"),
        ("iSCSIProtocolLevel", "2"),
    ]
    keys = send(make_login(), request(csg=1, nsg=3, transit=True, text=text)).keys
    assert keys["TaskReporting"] == "RFC3720"
    assert keys["iSCSIProtocolLevel"] == "1"


def test_max_recv_data_segment_length_declared_once_across_requests() -> None:
    login = make_login(limits=TargetLimits(max_recv_data_segment_length=65536))
    r1 = send(login, request(csg=1, text=[*leading(), ("HeaderDigest", "None")]))
    assert r1.keys["MaxRecvDataSegmentLength"] == "65536"
    r2 = send(
        login, request(csg=1, nsg=3, transit=True, text=[("MaxRecvDataSegmentLength", "16384")])
    )
    assert "MaxRecvDataSegmentLength" not in r2.keys  # a declaration needs no answer
    params = final_params(r2)
    assert params.initiator_max_recv_data_segment_length == 16384
    assert params.target_max_recv_data_segment_length == 65536


def test_target_proposes_keys_whose_default_exceeds_its_limits() -> None:
    login = make_login(limits=TargetLimits(max_burst_length=65536, first_burst_length=32768))
    r1 = send(
        login, request(csg=1, nsg=3, transit=True, text=[*leading(), ("HeaderDigest", "None")])
    )
    # The initiator relied on the defaults (262144/65536); the target offers its own
    # values and holds the transition until they are answered (§6.2).
    assert (r1.status, r1.transit) == (0, False)
    assert r1.keys["MaxBurstLength"] == "65536"
    assert r1.keys["FirstBurstLength"] == "32768"
    r2 = send(
        login,
        request(
            csg=1,
            nsg=3,
            transit=True,
            text=[("MaxBurstLength", "65536"), ("FirstBurstLength", "16384")],
        ),
    )
    params = final_params(r2)
    assert (params.max_burst_length, params.first_burst_length) == (65536, 16384)


def test_unanswered_proposal_ends_the_login() -> None:
    login = make_login(limits=TargetLimits(max_burst_length=65536, first_burst_length=32768))
    send(login, request(csg=1, nsg=3, transit=True, text=leading()))
    r = send(login, request(csg=1, nsg=3, transit=True))
    assert_refused(r, LoginStatus.INITIATOR_ERROR)


def test_security_to_full_feature_detours_through_operational_when_proposals_are_needed() -> None:
    login = make_login(limits=TargetLimits(max_burst_length=65536, first_burst_length=32768))
    r = send(login, request(csg=0, nsg=3, transit=True, text=[*leading(), ("AuthMethod", "None")]))
    assert (r.transit, r.nsg) == (True, 1)
    assert login.stage is Stage.LOGIN_OPERATIONAL_NEGOTIATION


def test_normal_session_straight_from_security_to_full_feature() -> None:
    r = send(
        make_login(), request(csg=0, nsg=3, transit=True, text=[*leading(), ("AuthMethod", "None")])
    )
    params = final_params(r)
    assert params.max_burst_length == 262144  # defaults, within the default limits


# -- text continuation (C bit) ---------------------------------------------------------


def test_initiator_text_in_several_requests() -> None:
    login = make_login()
    text = encode_text(leading() + LIBISCSI_OPERATIONAL)
    pieces = [text[:10], text[10:101], text[101:]]  # splits inside a key and inside a value
    for piece in pieces[:-1]:
        r = send(login, request(csg=1, nsg=0, cont=True, text=piece))
        # §11.12.2: an empty response asks for the rest.
        assert (r.status, r.transit, r.cont, r.data) == (0, False, False, b"")
        assert r.tsih == 0
    r = send(login, request(csg=1, nsg=3, transit=True, text=pieces[-1]))
    assert r.keys["HeaderDigest"] == "None"
    assert r.stat_sn == FIRST_STAT_SN + 2
    final_params(r)


def test_continuation_with_transit_is_a_protocol_error() -> None:
    r = send(make_login(), request(csg=1, nsg=3, transit=True, cont=True, text=leading()))
    assert_refused(r, LoginStatus.INITIATOR_ERROR)


def test_continued_text_is_bounded() -> None:
    login = make_login()
    chunk = b"X-pad=" + b"p" * 200 + b"\0"
    piece = chunk * (8192 // len(chunk))
    r = None
    for _ in range(10):
        r = send(login, request(csg=1, cont=True, text=piece))
        if r.step.close:
            break
    assert r is not None
    assert_refused(r, LoginStatus.INITIATOR_ERROR)
    assert "64" in (login.failure or "") or "text" in (login.failure or "")


def test_long_response_goes_out_in_pieces() -> None:
    login = make_login()
    unknown = [(f"X-k{i:04d}", "v") for i in range(900)]  # 900 NotUnderstood answers: ~19 KiB
    text = encode_text(leading() + unknown)
    assert len(text) > 8192
    send(login, request(csg=1, cont=True, text=text[:8000]))
    r = send(login, request(csg=1, nsg=3, transit=True, text=text[8000:]))
    pieces = [r]
    while r.cont:
        assert not r.transit and r.status == 0
        assert len(r.data) == 8192
        r = send(login, request(csg=1, nsg=3, transit=True))  # empty: "send the rest"
        pieces.append(r)
    assert len(pieces) == 3
    assert [p.stat_sn for p in pieces] == [pieces[0].stat_sn + i for i in range(3)]
    answer = dict(parse_text(b"".join(p.data for p in pieces)))
    assert answer["X-k0899"] == "NotUnderstood"
    assert answer["TargetPortalGroupTag"] == "7"
    final_params(pieces[-1])  # the stage decision rides on the last piece


def test_text_while_the_response_continues_is_a_protocol_error() -> None:
    login = make_login()
    unknown = [(f"X-k{i:04d}", "v") for i in range(900)]
    text = encode_text(leading() + unknown)
    send(login, request(csg=1, cont=True, text=text[:8000]))
    r = send(login, request(csg=1, nsg=3, transit=True, text=text[8000:]))
    assert r.cont
    r = send(login, request(csg=1, text=[("HeaderDigest", "None")]))
    assert_refused(r, LoginStatus.INITIATOR_ERROR)


# -- header rules ------------------------------------------------------------------------


def test_unsupported_version() -> None:
    r = send(make_login(), request(csg=0, version=(2, 1), text=leading()))
    assert_refused(r, LoginStatus.UNSUPPORTED_VERSION)
    assert r.version_active == 0


def test_version_max_above_ours_is_fine() -> None:
    r = send(make_login(), request(csg=1, nsg=3, transit=True, version=(5, 0), text=leading()))
    assert r.version_active == 0
    final_params(r)


@pytest.mark.parametrize(
    "change",
    [
        {"isid": bytes.fromhex("00023d000002")},
        {"tsih": 5},
        {"cid": 1},
        {"itt": ITT + 1},
        {"version": (0x10, 0)},
        {"csg": 0},  # back to the security stage
    ],
)
def test_request_fields_must_not_change(change: dict[str, object]) -> None:
    login = make_login()
    send(login, request(csg=0, nsg=1, transit=True, text=[*leading(), ("AuthMethod", "None")]))
    fields: dict[str, object] = {"csg": 1, "nsg": 3, "transit": True, **change}
    r = send(login, request(**fields))  # type: ignore[arg-type]
    assert_refused(r, LoginStatus.INITIATOR_ERROR)


def test_cmd_sn_follows_the_last_request() -> None:
    login = make_login(limits=TargetLimits(queue_depth=16))
    send(login, request(csg=1, cmd_sn=0xFFFFFFF8, text=leading()))
    r = send(login, request(csg=1, nsg=3, transit=True, cmd_sn=0xFFFFFFFA))
    assert r.exp_cmd_sn == 0xFFFFFFFA
    assert r.max_cmd_sn == (0xFFFFFFFA + 15) & 0xFFFFFFFF  # serial arithmetic wraps
    assert final_params(r).exp_cmd_sn == 0xFFFFFFFA


@pytest.mark.parametrize(
    ("csg", "nsg", "transit"),
    [(2, 3, True), (3, 3, False), (1, 1, True), (1, 0, True), (0, 0, True), (0, 2, True)],
)
def test_bad_stage_fields(csg: int, nsg: int, transit: bool) -> None:
    r = send(make_login(), request(csg=csg, nsg=nsg, transit=transit, text=leading()))
    assert_refused(r, LoginStatus.INITIATOR_ERROR)


def test_non_login_request_during_login() -> None:
    wire = bytearray(request(csg=0, text=leading()))
    wire[0] = 0x41  # SCSI Command
    r = send(make_login(), bytes(wire))
    assert_refused(r, LoginStatus.INVALID_DURING_LOGIN)


def test_target_opcode_is_not_a_login_pdu_at_all() -> None:
    wire = bytearray(request(csg=0, text=leading()))
    wire[0] = 0x23  # a Login *Response*
    with pytest.raises(MalformedPacket):
        make_login().receive(frame(bytes(wire)))


def test_login_without_the_immediate_bit_is_tolerated() -> None:
    r = send(make_login(), request(csg=1, nsg=3, transit=True, opcode=0x03, text=leading()))
    final_params(r)


def test_oversized_data_segment() -> None:
    bhs = bytearray(request(csg=0)[:48])
    data = encode_text(leading()) + b"\0" * 9000
    bhs[5:8] = len(data).to_bytes(3, "big")
    step = make_login().receive(Pdu(bytes(bhs), b"", data))
    assert step.close


def test_bad_text_is_an_initiator_error() -> None:
    r = send(make_login(), request(csg=0, text=b"InitiatorName\0"))
    assert_refused(r, LoginStatus.INITIATOR_ERROR)


def test_too_many_requests() -> None:
    login = make_login()
    send(login, request(csg=1, text=leading()))
    r = None
    for _ in range(MAX_LOGIN_REQUESTS):
        r = send(login, request(csg=1))
        if r.step.close:
            break
    assert r is not None
    assert_refused(r, LoginStatus.INITIATOR_ERROR)


def test_requests_after_a_refusal_are_refused_again() -> None:
    login = make_login()
    send(login, request(csg=0, text=leading(target=OTHER)))
    first_reason = login.failure
    r = send(login, request(csg=0, text=leading()))
    assert_refused(r, LoginStatus.INITIATOR_ERROR)
    assert login.failure == first_reason


def test_request_after_full_feature_is_refused() -> None:
    login = make_login()
    final_params(send(login, request(csg=1, nsg=3, transit=True, text=leading())))
    r = send(login, request(csg=1, nsg=3, transit=True))
    assert_refused(r, LoginStatus.INITIATOR_ERROR)
    assert r.csg == 1


# -- sessions ----------------------------------------------------------------------------


def test_non_zero_tsih_for_a_session_that_does_not_exist() -> None:
    r = send(make_login(), request(csg=1, nsg=3, transit=True, tsih=9, text=leading()))
    assert_refused(r, LoginStatus.SESSION_DOES_NOT_EXIST)


def test_non_zero_tsih_for_a_live_session_is_one_connection_too_many() -> None:
    seen: list[tuple[str, bytes, int]] = []

    def exists(name: str, isid: bytes, tsih: int) -> bool:
        seen.append((name, isid, tsih))
        return True

    r = send(
        make_login(session_exists=exists),
        request(csg=1, nsg=3, transit=True, tsih=9, text=leading()),
    )
    assert_refused(r, LoginStatus.TOO_MANY_CONNECTIONS)
    assert seen == [(INITIATOR, ISID, 9)]


def test_tsih_checked_only_after_authentication() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP), session_exists=lambda *a: True)
    r1 = send(
        login,
        request(csg=0, nsg=1, transit=True, tsih=9, text=[*leading(), ("AuthMethod", "CHAP")]),
    )
    assert r1.status == 0  # nothing revealed before CHAP
    assert r1.tsih == 9
    r2 = send(login, request(csg=0, nsg=1, transit=True, tsih=9, text=[("CHAP_A", "5")]))
    response = chap_answer(r2.keys["CHAP_I"], r2.keys["CHAP_C"], CHAP.secret)
    r3 = send(
        login,
        request(
            csg=0, nsg=1, transit=True, tsih=9, text=[("CHAP_N", CHAP.user), ("CHAP_R", response)]
        ),
    )
    assert_refused(r3, LoginStatus.TOO_MANY_CONNECTIONS)


@pytest.mark.parametrize("tsih", [0, 0x10000, -1])
def test_no_tsih_available(tsih: int) -> None:
    r = send(make_login(new_tsih=lambda: tsih), request(csg=1, nsg=3, transit=True, text=leading()))
    assert_refused(r, LoginStatus.OUT_OF_RESOURCES)


def test_tsih_registry_exhausted() -> None:
    def full() -> int:
        raise RuntimeError("all 65535 TSIHs are in use")

    r = send(make_login(new_tsih=full), request(csg=1, nsg=3, transit=True, text=leading()))
    assert_refused(r, LoginStatus.OUT_OF_RESOURCES)


def test_short_random_source_is_a_target_error() -> None:
    r = send(
        make_login(random_bytes=lambda n: b""), request(csg=1, nsg=3, transit=True, text=leading())
    )
    assert_refused(r, LoginStatus.TARGET_ERROR)


def test_stat_sn_counts_every_response() -> None:
    login = make_login()
    r1 = send(login, request(csg=0, text=[*leading(), ("AuthMethod", "None")]))
    r2 = send(login, request(csg=0, nsg=1, transit=True))
    r3 = send(login, request(csg=1, nsg=3, transit=True))
    assert [r1.stat_sn, r2.stat_sn, r3.stat_sn] == [
        FIRST_STAT_SN,
        FIRST_STAT_SN + 1,
        FIRST_STAT_SN + 2,
    ]
    assert final_params(r3).stat_sn == FIRST_STAT_SN + 3


def test_secrets_never_show() -> None:
    login = make_login(TargetEntry(TARGET, chap=CHAP, mutual_chap=MUTUAL))
    run_chap(login, secret=b"wrong")
    text = repr(login) + (login.failure or "")
    for secret in (CHAP.secret, MUTUAL.secret):
        assert secret.decode() not in text


# -- SendTargets (Appendix C) ----------------------------------------------------------


def directory() -> FakeDirectory:
    return FakeDirectory(
        TargetEntry(TARGET),
        TargetEntry(OTHER, allowed_initiators=frozenset({"iqn.2024-01.org.example:someone"})),
        TargetEntry(
            "iqn.2024-01.org.mobinux:node3", allowed_initiators=frozenset({INITIATOR.upper()})
        ),
    )


def test_send_targets_all_in_discovery() -> None:
    text = send_targets_text(directory(), INITIATOR, "All")
    assert parse_text(text) == [
        ("TargetName", TARGET),
        ("TargetAddress", "192.0.2.1:3260,1"),
        ("TargetAddress", "[2001:db8::1]:3260,1"),
        ("TargetName", "iqn.2024-01.org.mobinux:node3"),
        ("TargetAddress", "192.0.2.1:3260,1"),
        ("TargetAddress", "[2001:db8::1]:3260,1"),
    ]
    assert text.endswith(b"\0")


def test_send_targets_one_name() -> None:
    assert parse_text(send_targets_text(directory(), INITIATOR, TARGET.upper()))[0] == (
        "TargetName",
        TARGET,
    )
    assert send_targets_text(directory(), INITIATOR, OTHER) == b""  # hidden by its ACL
    assert send_targets_text(directory(), INITIATOR, "iqn.2024-01.org.mobinux:none") == b""


def test_send_targets_in_a_normal_session() -> None:
    # Empty value: the session's target; "All" answered with that target only.
    for value in ("", "All"):
        pairs = parse_text(send_targets_text(directory(), INITIATOR, value, session_target=TARGET))
        assert [v for k, v in pairs if k == "TargetName"] == [TARGET]
    assert send_targets_text(directory(), INITIATOR, "") == b""  # empty value, discovery session


@pytest.mark.parametrize("value", ["Alle", "A", "all", "nothing"])
def test_send_targets_bad_values(value: str) -> None:
    # iscsi-test-cu iSCSI.iSCSISendTargets.Invalid expects these to fail.
    assert send_targets_text(directory(), INITIATOR, value) == b"SendTargets=Reject\0"
