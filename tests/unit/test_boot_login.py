"""Boot-time login: iPXE's login prompt script, the password check, one user per node."""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from urllib.parse import quote

import pytest

from mobinux.boot import ResolvedFile
from mobinux.inventory.db import Image, Inventory, Node, User
from mobinux.service.boot import BootService, Endpoint
from mobinux.service.steps import StepLog
from mobinux.users.passwords import hash_password, verify_password

MAC1, MAC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"
SERVER = IPv4Address("10.77.0.1")


class Lab:
    def __init__(self, tmp_path: Path) -> None:
        self.inv = Inventory(tmp_path / "data")
        self.inv.add_image(Image("desk", "disk", "", None, "", 1 << 20, "", time.time(),
                                 disk="disks/desk/disk.raw"))
        self.inv.add_user(User("alice", 1 << 30, hash_password("wonder land"), None, time.time()))
        self.inv.add_user(User("bob", 1 << 30, None, None, time.time()))  # no password: no login
        for mac, name in ((MAC1, "pc1"), (MAC2, "pc2")):
            self.inv.add_node(Node(name, mac, None, ("desk",), boot="iscsi", login=True))
        self.alive: set[str] = set()
        self.booted: list[str] = []
        self.service = BootService(self.inv, Endpoint(SERVER, 8080, IPv4Network("10.77.0.0/24")),
                                   StepLog(), on_boot=self.booted.append,
                                   node_alive=lambda mac: mac in self.alive)

    def script(self, mac: str) -> str:
        got = self.service.resolve(f"boot/{mac.replace(':', '-')}.ipxe", "10.77.0.50")
        assert got is not None and got.data is not None
        return got.data.decode()

    def login(self, mac: str, user: str, password: str) -> str:
        query = f"user={quote(user)}&password={quote(password)}"
        got = self.service.resolve(f"login/{mac.replace(':', '-')}.ipxe", "10.77.0.50", query)
        assert isinstance(got, ResolvedFile) and got.later is not None
        return asyncio.run(got.later()).decode()


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


def test_passwords_are_scrypt_hashes_checked_in_constant_form() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$") and "correct horse" not in stored
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert hash_password("correct horse") != stored  # salted
    for broken in ("", "scrypt$", "md5$1$2$3$4$5", "scrypt$99$8$1$AAAA$AAAA", "scrypt$15$8$1$!!$!!"):
        assert not verify_password("x", broken)
    with pytest.raises(ValueError):
        hash_password("")


def test_login_node_asks_first_then_boots_with_one_boot_chap(lab: Lab) -> None:
    script = lab.script(MAC1)
    assert "login || goto login" in script
    assert "http://10.77.0.1:8080/login/52-54-00-00-00-01.ipxe?user=${username:uristring}" in script
    assert "sanboot" not in script  # nothing is booted before the login
    assert lab.booted == [MAC1]
    answer = lab.login(MAC1, "alice", "wonder land")
    assert "sanboot iscsi:10.77.0.1:::0:iqn.2026-11.org.mobinux:node.525400000001" in answer
    (login,) = lab.inv.boot_logins()
    assert (login.mac, login.user) == (MAC1, "alice")
    assert f"set password {login.chap_secret}" in answer and len(login.chap_secret) >= 16
    assert f"set username {login.chap_user}" in answer
    assert "wonder land" not in answer


@pytest.mark.parametrize(("user", "password"), [("alice", "guess-1234"), ("mallory", "wonder land"),
                                                ("bob", ""), ("", "")])
def test_wrong_credentials_attach_nothing_and_ask_again(lab: Lab, user: str, password: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    answer = lab.login(MAC1, user, password)
    assert "login failed: wrong user name or password" in answer and "login || goto login" in answer
    assert "sanboot" not in answer
    assert lab.inv.boot_logins() == []
    assert "refused" in caplog.text
    assert not password or password not in caplog.text  # never logged


def test_a_user_is_attached_to_one_running_node_at_a_time(lab: Lab) -> None:
    lab.login(MAC1, "alice", "wonder land")
    lab.alive.add(MAC1)  # pc1's initiator still talks to its target
    answer = lab.login(MAC2, "alice", "wonder land")
    assert "login refused: alice is logged in on node pc1" in answer
    assert [b.mac for b in lab.inv.boot_logins()] == [MAC1]
    lab.alive.clear()  # pc1 was switched off: it stopped talking
    answer = lab.login(MAC2, "alice", "wonder land")
    assert "sanboot" in answer
    assert [b.mac for b in lab.inv.boot_logins()] == [MAC2]  # moved with her
    # a disk attached with --user to another node is refused too
    lab.inv.add_user(User("carol", 1 << 30, hash_password("pw pw pw"), None, time.time()))
    lab.inv.add_node(Node("pc3", "52:54:00:00:00:03", None, ("desk",), boot="iscsi", user="carol"))
    assert "carol's disk is attached to node pc3" in lab.login(MAC1, "carol", "pw pw pw")


def test_login_endpoint_only_for_login_nodes_and_only_over_http(lab: Lab) -> None:
    lab.inv.add_node(Node("pc4", "52:54:00:00:00:04", None, ("desk",), boot="iscsi"))
    assert lab.service.resolve("login/52-54-00-00-00-04.ipxe", "10.0.0.9", "user=a&password=b") is None
    assert lab.service.resolve("login/52-54-00-00-00-01.ipxe", "10.0.0.9", "") is None  # TFTP
    assert lab.service.resolve("login/nonsense.ipxe", "10.0.0.9", "user=a") is None
