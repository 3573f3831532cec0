from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from mobinux.errors import InventoryError
from mobinux.inventory.db import BootStep, Inventory, Node, UnknownPolicy
from tests.unit.inventory_helpers import add_fake_image


def test_nodes_crud_and_conflicts(tmp_path: Path) -> None:
    inv = Inventory(tmp_path)
    add_fake_image(inv, "lab")
    inv.add_node(Node("pc1", "52:54:00:00:00:01", "10.0.0.5", ("lab",)))
    with pytest.raises(InventoryError, match="already has the MAC"):
        inv.add_node(Node("pc2", "52:54:00:00:00:01", None, ("lab",)))
    with pytest.raises(InventoryError, match="already has the IP"):
        inv.add_node(Node("pc2", "52:54:00:00:00:02", "10.0.0.5", ("lab",)))
    with pytest.raises(InventoryError, match="no image named 'gone'"):
        inv.add_node(Node("pc2", "52:54:00:00:00:02", None, ("gone",)))
    inv.replace_node("pc1", Node("pc9", "52:54:00:00:00:01", None, ("lab",), loader="pxelinux"))
    node = inv.node_by_mac("52:54:00:00:00:01")
    assert node is not None and node.name == "pc9" and node.loader == "pxelinux" and node.ip is None
    with pytest.raises(InventoryError, match="used by node"):
        inv.remove_image("lab")
    inv.remove_node("pc9")
    assert inv.nodes() == []
    inv.remove_image("lab")
    assert inv.images() == []


def test_generation_changes_when_another_connection_writes(tmp_path: Path) -> None:
    server = Inventory(tmp_path)
    cli = Inventory(tmp_path)
    before = server.generation()
    add_fake_image(cli, "lab")
    assert server.generation() != before
    assert [i.name for i in server.images()] == ["lab"]


def test_unknown_policy(tmp_path: Path) -> None:
    inv = Inventory(tmp_path)
    assert inv.unknown_policy() == UnknownPolicy("deny", None)
    with pytest.raises(InventoryError):
        inv.set_unknown_policy(UnknownPolicy("enroll", "missing"))
    add_fake_image(inv, "lab")
    inv.set_unknown_policy(UnknownPolicy("enroll", "lab"))
    assert inv.unknown_policy() == UnknownPolicy("enroll", "lab")
    with pytest.raises(InventoryError, match="unknown-client policy"):
        inv.remove_image("lab")


def test_boot_steps_keep_newest(tmp_path: Path) -> None:
    inv = Inventory(tmp_path)
    inv.add_boot_steps([BootStep("aa", "1.2.3.4", float(i), f"s{i}") for i in range(30)])
    steps = inv.boot_steps("aa")
    assert len(steps) == Inventory.KEEP_STEPS_PER_CLIENT
    assert steps[-1].step == "s29"


def _writer(path: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    inv = Inventory(Path(path))
    i = 0
    while True:
        inv.add_node(Node(f"n{i}", f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", None, ()))
        os.write(1, b"")  # keep the loop honest
        i += 1
        if i == 50:
            ready.set()


def test_kill_minus_nine_leaves_a_consistent_database(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_writer, args=(str(tmp_path), ready))
    proc.start()
    assert ready.wait(20)
    os.kill(proc.pid or 0, signal.SIGKILL)
    proc.join()
    inv = Inventory(tmp_path)
    nodes = inv.nodes()
    assert len(nodes) >= 50
    # every committed node is complete and the names are contiguous: no torn transaction
    assert sorted(int(n.name[1:]) for n in nodes) == list(range(len(nodes)))
    assert inv._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
