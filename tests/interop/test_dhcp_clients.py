"""Real DHCP clients against DhcpService, in network namespaces we create and delete.

Server namespace ``mbxdhcps*`` and client namespace ``mbxdhcpc*`` are joined
by a veth pair (vsrv0 <-> vcli0). Clients: ISC dhclient, busybox udhcpc,
Kea's perfdhcp (as a relay), a PXE-like raw UDP client, and dnsmasq as the
address server next to our ProxyDHCP.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dhcp_helpers import (
    ServerProcess,
    Topology,
    have_root,
    missing_tool,
    probe_args,
    probe_replies,
    topology,
)

from mobinux.dhcp.leases import LeaseState, read_leases

pytestmark = [
    pytest.mark.interop,
    pytest.mark.timeout(60),
    pytest.mark.skipif(not have_root(), reason="needs root to create network namespaces"),
]

SERVER_IP = "10.78.0.1"
POOL = ("10.78.0.100", "10.78.0.150")


def need(*tools: str) -> None:
    tool = missing_tool("ip", *tools)
    if tool is not None:
        pytest.skip(f"{tool} is not installed")


@pytest.fixture
def net() -> Iterator[tuple[Topology, str, str]]:
    """(topology, server ns, client ns) with vsrv0 (10.78.0.1/24) <-> vcli0 (no address)."""
    need()
    with topology() as topo:
        s = topo.netns("s")
        c = topo.netns("c")
        topo.veth(s, "vsrv0", f"{SERVER_IP}/24", c, "vcli0", None)
        yield topo, s, c


def serve(topo: Topology, ns: str, db: Path, *extra: str) -> ServerProcess:
    args = [
        "--interface", "vsrv0",
        "--server-ip", SERVER_IP,
        "--subnet", "10.78.0.0/24",
        "--router", SERVER_IP,
        "--db", str(db),
    ]  # fmt: skip
    if "--mode" not in extra or "full" in extra:
        args += ["--pool", f"{POOL[0]}-{POOL[1]}"]
    return ServerProcess(topo, ns, [*args, *extra])


def mac_of(topo: Topology, ns: str, ifname: str) -> str:
    out = topo.exec(ns, "ip", "-j", "link", "show", ifname).stdout
    return str(json.loads(out)[0]["address"]).lower()


def in_pool(ip: IPv4Address) -> bool:
    return IPv4Address(POOL[0]) <= ip <= IPv4Address(POOL[1])


def wait_for(pred: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def kill_pidfile(pidfile: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)


# -- ISC dhclient -----------------------------------------------------------------------


def test_dhclient_dora_reboot_release(net: tuple[Topology, str, str], tmp_path: Path) -> None:
    need("dhclient")
    topo, s, c = net
    db = tmp_path / "leases.db"
    srv = serve(topo, s, db)
    lf, pf = tmp_path / "dhclient.leases", tmp_path / "dhclient.pid"
    topo.pidfiles.append(pf)
    dh = ["dhclient", "-1", "-v", "-sf", "/bin/true", "-lf", str(lf), "-pf", str(pf), "vcli0"]
    r = topo.exec(c, *dh, check=False)
    assert r.returncode == 0, r.stderr
    m = re.search(r"DHCPACK of (\S+) from 10\.78\.0\.1", r.stderr)
    assert m, r.stderr
    ip = IPv4Address(m.group(1))
    assert in_pool(ip)
    mac = mac_of(topo, c, "vcli0")
    (lease,) = read_leases(db)
    assert (lease.ip, lease.mac, lease.state) == (ip, mac, LeaseState.BOUND)
    assert lease.expires > time.time() + 3000
    first_expiry = lease.expires

    # Restart of the client: INIT-REBOOT (REQUEST with option 50) -> same address.
    kill_pidfile(pf)
    time.sleep(1.1)
    r = topo.exec(c, *dh, check=False)
    assert r.returncode == 0, r.stderr
    assert f"DHCPREQUEST for {ip}" in r.stderr and f"DHCPACK of {ip}" in r.stderr
    assert "DHCPDISCOVER" not in r.stderr
    (lease,) = read_leases(db)
    assert lease.ip == ip and lease.expires > first_expiry

    # Release (unicast from the configured address).
    topo.exec(c, "ip", "addr", "add", f"{ip}/24", "dev", "vcli0")
    r = topo.exec(
        c,
        "dhclient",
        "-r",
        "-v",
        "-sf",
        "/bin/true",
        "-lf",
        str(lf),
        "-pf",
        str(pf),
        "vcli0",
        check=False,
    )
    assert "DHCPRELEASE" in r.stderr, r.stderr
    assert wait_for(lambda: read_leases(db)[0].state is LeaseState.RELEASED, 5)
    srv.stop()
    assert f"{mac} {ip} dhcp-offer {ip}" in srv.steps
    assert srv.steps.count(f"{mac} {ip} dhcp-ack {ip}") == 2
    assert srv.stats["malformed"] == 0 and srv.stats["errors"] == 0


# -- busybox udhcpc ----------------------------------------------------------------------

UDHCPC_SCRIPT = """#!/bin/sh
echo "$1 ip=$ip mask=$mask router=$router lease=$lease serverid=$serverid" >> {log}
case "$1" in
  bound|renew) ip addr replace "$ip/$mask" dev "$interface" ;;
  deconfig) ip addr flush dev "$interface" ;;
esac
exit 0
"""


def udhcpc_script(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "udhcpc.log"
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT.format(log=log))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, log


def test_udhcpc_once(net: tuple[Topology, str, str], tmp_path: Path) -> None:
    need("busybox")
    topo, s, c = net
    db = tmp_path / "leases.db"
    srv = serve(topo, s, db)
    script, log = udhcpc_script(tmp_path)
    r = topo.exec(
        c,
        "busybox",
        "udhcpc",
        "-n",
        "-q",
        "-f",
        "-i",
        "vcli0",
        "-s",
        str(script),
        "-t",
        "5",
        "-T",
        "1",
        check=False,
    )
    assert r.returncode == 0, r.stderr
    events = log.read_text()
    m = re.search(
        r"bound ip=(\S+) mask=24 router=10\.78\.0\.1 lease=3600 serverid=10\.78\.0\.1", events
    )
    assert m, events
    ip = IPv4Address(m.group(1))
    assert in_pool(ip)
    leases = read_leases(db)
    assert [(x.ip, x.mac, x.state) for x in leases] == [
        (ip, mac_of(topo, c, "vcli0"), LeaseState.BOUND)
    ]
    srv.stop()


def test_udhcpc_renew_and_release(net: tuple[Topology, str, str], tmp_path: Path) -> None:
    need("busybox")
    topo, s, c = net
    db = tmp_path / "leases.db"
    srv = serve(topo, s, db)
    script, log = udhcpc_script(tmp_path)
    proc = topo.popen(
        c, "busybox", "udhcpc", "-f", "-i", "vcli0", "-s", str(script), "-t", "5", "-T", "1"
    )
    # The process is `ip netns exec` which execs busybox: signals reach udhcpc.
    assert wait_for(lambda: log.exists() and "bound ip=" in log.read_text()), (
        log.read_text() if log.exists() else "no log"
    )
    ip = IPv4Address(re.findall(r"bound ip=(\S+)", log.read_text())[0])
    assert in_pool(ip)
    (lease,) = read_leases(db)
    before = lease.expires
    time.sleep(1.1)
    proc.send_signal(signal.SIGUSR1)  # renew: unicast REQUEST with ciaddr (RENEWING)
    assert wait_for(lambda: "renew ip=" in log.read_text()), log.read_text()
    (lease,) = read_leases(db)
    assert lease.ip == ip and lease.state is LeaseState.BOUND and lease.expires > before
    proc.send_signal(signal.SIGUSR2)  # release
    assert wait_for(lambda: read_leases(db)[0].state is LeaseState.RELEASED, 5)
    proc.terminate()
    proc.wait(timeout=5)
    srv.stop()
    acks = [x for x in srv.steps if x.endswith(f"dhcp-ack {ip}")]
    assert len(acks) == 2  # bind + renew


# -- ProxyDHCP next to dnsmasq -------------------------------------------------------------


def test_proxy_mode_next_to_dnsmasq(net: tuple[Topology, str, str], tmp_path: Path) -> None:
    need("dnsmasq", "dhclient")
    topo, s, c = net
    topo.popen(
        s,
        "dnsmasq", "--no-daemon", "--port=0", "--interface=vsrv0", "--bind-interfaces",
        "--dhcp-range=10.78.0.160,10.78.0.200,1h", "--no-ping", "--conf-file=/dev/null",
        f"--dhcp-leasefile={tmp_path / 'dnsmasq.leases'}", f"--pid-file={tmp_path / 'dnsmasq.pid'}",
    )  # fmt: skip
    time.sleep(0.5)
    srv = serve(topo, s, tmp_path / "leases.db", "--mode", "proxy")

    # A PXE ROM broadcasts DISCOVER with option 60: two offers come back.
    r = topo.exec(c, *probe_args("vcli0", wait=2.5))
    replies = probe_replies(r.stdout)
    proxy = [x for x in replies if x["yiaddr"] == "0.0.0.0"]
    address = [x for x in replies if x["yiaddr"] != "0.0.0.0"]
    assert len(proxy) == 1, replies
    assert len(address) == 1, replies
    p = proxy[0]
    opts = p["options"]
    assert isinstance(opts, dict)
    assert p["type"] == 2 and p["file"] == "pxelinux.0" and p["siaddr"] == SERVER_IP
    assert bytes.fromhex(opts["60"]) == b"PXEClient"
    assert bytes.fromhex(opts["67"]) == b"pxelinux.0"
    assert bytes.fromhex(opts["43"]) == bytes([6, 1, 8, 255])
    assert "51" not in opts and "1" not in opts
    a = address[0]
    assert isinstance(a["options"], dict)
    assert "67" not in a["options"] and a["file"] == ""  # dnsmasq gives no boot file
    given = str(a["yiaddr"])

    # With its address, the client asks the boot server on port 4011 (as iPXE does).
    topo.exec(c, "ip", "addr", "add", f"{given}/24", "dev", "vcli0")
    r = topo.exec(
        c,
        *probe_args(
            "vcli0",
            mtype=3,
            to=SERVER_IP,
            to_port=4011,
            bind=given,
            port=0,
            ciaddr=given,
            user_class="iPXE",
        ),
    )
    (ack,) = probe_replies(r.stdout)
    assert ack["from"] == [SERVER_IP, 4011]
    assert ack["type"] == 5 and ack["yiaddr"] == "0.0.0.0" and ack["file"] == "pxelinux.0"
    assert isinstance(ack["options"], dict) and "43" not in ack["options"]  # iPXE: no option 43
    topo.exec(c, "ip", "addr", "flush", "dev", "vcli0")

    # A plain client gets its lease from dnsmasq and nothing at all from us.
    lf, pf = tmp_path / "dhclient.leases", tmp_path / "dhclient.pid"
    topo.pidfiles.append(pf)
    r = topo.exec(
        c,
        "dhclient",
        "-1",
        "-v",
        "-sf",
        "/bin/true",
        "-lf",
        str(lf),
        "-pf",
        str(pf),
        "vcli0",
        check=False,
    )
    acked = re.search(r"DHCPACK of (\S+) from (\S+)", r.stderr)
    assert r.returncode == 0 and acked is not None, r.stderr
    # the lease is dnsmasq's: from its server address and its range, .160-.200
    assert acked.group(2) == SERVER_IP
    assert IPv4Address("10.78.0.160") <= IPv4Address(acked.group(1)) <= IPv4Address("10.78.0.200")
    kill_pidfile(pf)
    time.sleep(0.3)
    stats = srv.stop()
    assert stats["sent"] == 2  # the proxy offer and the 4011 ACK, nothing for dhclient
    assert stats["received"] >= 4  # it did see dhclient's DISCOVER and REQUEST
    assert [x.split(" ", 2)[2] for x in srv.steps] == [
        "proxy-offer pxelinux.0",
        "proxy-ack pxelinux.0",
    ]
    assert read_leases(tmp_path / "leases.db") == []


# -- interface restriction ---------------------------------------------------------------


def test_requests_on_another_interface_get_no_reply(
    net: tuple[Topology, str, str], tmp_path: Path
) -> None:
    topo, s, c = net
    topo.veth(s, "vsrv1", "10.79.0.1/24", c, "vcli1", None)  # a second wire
    srv = serve(topo, s, tmp_path / "leases.db")
    r = topo.exec(c, *probe_args("vcli1", vendor=None, mac="52:54:00:00:aa:01", wait=1.5))
    assert probe_replies(r.stdout) == []
    # Control: the same request on the served interface is answered.
    r = topo.exec(c, *probe_args("vcli0", vendor=None, mac="52:54:00:00:aa:02", wait=1.5))
    replies = probe_replies(r.stdout)
    assert len(replies) == 1 and replies[0]["type"] == 2
    stats = srv.stop()
    assert stats["received"] == 1


# -- perfdhcp (relay) -----------------------------------------------------------------------


def perfdhcp_stats(out: str) -> dict[str, dict[str, float]]:
    """{"DISCOVER-OFFER": {"sent": .., "received": .., "drops": .., "rejected": ..}, ...}"""
    result: dict[str, dict[str, float]] = {}
    for block in re.split(r"\*\*\*Statistics for: ", out)[1:]:
        name = block.split("*", 1)[0]
        vals = {}
        for key, pat in [
            ("sent", r"sent packets: (\d+)"),
            ("received", r"received packets: (\d+)"),
            ("drops", r"drops: (\d+)"),
            ("rejected", r"rejected leases: (\d+)"),
        ]:
            m = re.search(pat, block)
            assert m, block
            vals[key] = float(m.group(1))
        result[name] = vals
    return result


def test_perfdhcp_relay_load(tmp_path: Path) -> None:
    need("perfdhcp")
    with topology() as topo:
        s = topo.netns("s")
        c = topo.netns("c")
        topo.veth(s, "vsrv0", "10.78.0.1/16", c, "vcli0", "10.78.0.2/16")
        srv = ServerProcess(
            topo,
            s,
            [
                "--quiet", "--interface", "vsrv0", "--server-ip", "10.78.0.1",
                "--subnet", "10.78.0.0/16", "--pool", "10.78.1.0-10.78.255.254",
                "--db", str(tmp_path / "leases.db"),
            ],
        )  # fmt: skip
        r = topo.exec(
            c, "perfdhcp", "-4", "-l", "10.78.0.2", "-r", "500", "-R", "5000", "-p", "5", "10.78.0.1",
            timeout=30, check=False,
        )  # fmt: skip
        stats = perfdhcp_stats(r.stdout)
        assert set(stats) == {"DISCOVER-OFFER", "REQUEST-ACK"}, r.stdout
        for name, v in stats.items():
            assert v["sent"] >= 2000, (name, v)
            assert v["rejected"] == 0, (name, v)
            assert v["drops"] / v["sent"] < 0.01, (name, v)
        served = srv.stop()
        assert served["malformed"] == 0 and served["errors"] == 0
        leases = read_leases(tmp_path / "leases.db")
        # perfdhcp draws MACs from 5000 clients: each bound lease is unique per address.
        assert len(leases) >= 1000
        assert all(x.state is LeaseState.BOUND for x in leases)
