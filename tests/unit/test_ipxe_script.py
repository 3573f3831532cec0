from __future__ import annotations

from mobinux.bootcfg import ipxe

ENTRY = ipxe.IpxeEntry("img0", "lab", "http://10.0.0.1:8080/images/lab/vmlinuz",
                       "http://10.0.0.1:8080/images/lab/initrd.img", "console=ttyS0 x=${y}")


def test_single_entry_boots_directly() -> None:
    lines = ipxe.render_script([ENTRY], hostname="pc1").splitlines()
    assert lines[0] == "#!ipxe"
    kernel = next(line for line in lines if line.startswith("kernel "))
    assert kernel.startswith("kernel http://10.0.0.1:8080/images/lab/vmlinuz initrd=initrd.img console=ttyS0")
    assert "$${y}" in kernel  # no accidental iPXE setting expansion
    assert "initrd --name initrd.img http://10.0.0.1:8080/images/lab/initrd.img" in lines
    assert lines[-1] == "boot"
    assert not any(line.startswith("menu") for line in lines)


def test_menu_for_several_entries() -> None:
    other = ipxe.IpxeEntry("img1", "rescue", "http://s/k", None, "")
    text = ipxe.render_script([ENTRY, other], hostname="pc1", timeout_s=2)
    lines = text.splitlines()
    assert "item img0 lab" in lines and "item img1 rescue" in lines and "item local Boot from the next boot device" in lines
    assert "choose --default img0 --timeout 2000 target && goto ${target}" in lines
    assert ":img1" in lines and ":local" in lines
    # the rescue entry has no initrd: no initrd line and no initrd= argument
    rescue = lines[lines.index(":img1") + 1]
    assert rescue == "kernel http://s/k"


def test_local_boot_script_exits() -> None:
    lines = ipxe.local_boot_script().splitlines()
    assert lines[0] == "#!ipxe" and "exit" in lines
    assert not any(line.startswith("kernel") for line in lines)


def test_no_entries_is_local_boot() -> None:
    assert "exit" in ipxe.render_script([], hostname="x").splitlines()
