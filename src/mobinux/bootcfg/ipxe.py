"""iPXE scripts (https://ipxe.org/scripting), the same text for BIOS and UEFI.

With UEFI the kernel's EFI stub finds the initrd by name, so the script names
the initrd (``initrd --name initrd.img``) and passes ``initrd=initrd.img`` on
the command line; BIOS kernels ignore that parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

INITRD_NAME = "initrd.img"


@dataclass(frozen=True)
class IpxeEntry:
    label: str
    title: str
    kernel_url: str
    initrd_url: str | None
    cmdline: str


def _quote(text: str) -> str:
    # iPXE expands ${...} in command arguments; a literal "$" must not start an expansion.
    return text.replace("${", "$${")


def _boot_lines(entry: IpxeEntry) -> list[str]:
    args = entry.cmdline
    if entry.initrd_url:
        args = f"initrd={INITRD_NAME} {args}".strip()
    lines = [f"kernel {entry.kernel_url} {_quote(args)}".rstrip()]
    if entry.initrd_url:
        lines.append(f"initrd --name {INITRD_NAME} {entry.initrd_url}")
    lines.append("boot")
    return lines


def local_boot_script(reason: str = "") -> str:
    """Hand the machine back to its firmware, which tries the next boot device.

    ``exit`` returns from iPXE to the BIOS / UEFI boot manager; it is what
    ipxe.org recommends for "boot from local disk".
    """
    lines = ["#!ipxe"]
    if reason:
        lines.append(f"echo mobinux: {reason}")
    lines += ["echo mobinux: booting from the next boot device", "exit", ""]
    return "\n".join(lines)


def render_script(entries: list[IpxeEntry], *, hostname: str, timeout_s: int = 5) -> str:
    """One entry boots straight away; several give a menu with a timed default."""
    if not entries:
        return local_boot_script("no image assigned")
    lines = ["#!ipxe", f"echo mobinux: booting {_quote(hostname)}"]
    if len(entries) == 1:
        lines += _boot_lines(entries[0])
        lines.append("")
        return "\n".join(lines)
    lines.append(f"menu mobinux: {_quote(hostname)}")
    for entry in entries:
        lines.append(f"item {entry.label} {_quote(entry.title)}")
    lines.append("item local Boot from the next boot device")
    lines.append(f"choose --default {entries[0].label} --timeout {timeout_s * 1000} target && goto ${{target}}")
    lines.append("goto local")
    for entry in entries:
        lines.append(f":{entry.label}")
        lines += _boot_lines(entry)
        lines.append("goto local")
    lines += [":local", "exit", ""]
    return "\n".join(lines)


def iscsi_root_path(server: str, port: int, lun: int, target_iqn: str) -> str:
    """iPXE's iSCSI root path ``iscsi:<server>:<protocol>:<port>:<lun>:<target>`` (RFC 4173 §5).

    The protocol field is empty (TCP); the port is left out when it is 3260.
    """
    return f"iscsi:{server}::{'' if port == 3260 else port}:{lun}:{target_iqn}"


def sanboot_script(*, hostname: str, initiator_iqn: str, root_path: str,
                   chap: tuple[str, str] | None = None) -> str:
    """Boot a whole disk over iSCSI: iPXE logs in as *initiator_iqn*, hooks the disk into
    INT 13h (BIOS) or a block I/O protocol (UEFI), describes it in the iBFT so the booted
    system can log in again, and boots it (https://ipxe.org/cmd/sanboot).

    *chap* (user, secret): iPXE's iSCSI uses the ``username`` and ``password``
    settings for CHAP and hands them to the booted system in the iBFT."""
    creds = ([f"set username {_quote(chap[0])}", f"set password {_quote(chap[1])}"] if chap
             else ["clear username", "clear password"])
    return "\n".join([
        "#!ipxe",
        f"echo mobinux: booting {_quote(hostname)} from {_quote(root_path)}",
        f"set initiator-iqn {_quote(initiator_iqn)}",
        *creds,
        f"sanboot {_quote(root_path)} || goto failed",
        ":failed",
        "echo mobinux: sanboot failed; booting from the next boot device",
        "exit",
        "",
    ])


def login_script(*, hostname: str, login_url: str, message: str = "") -> str:
    """Ask for a user name and password (iPXE ``login``) and send them to *login_url*.

    The stock iPXE builds have neither HTTPS nor form parameters (``params``),
    so they travel in the query string of a plain GET, ``uristring``-encoded;
    the server never logs query strings. The answer is the boot script itself
    (or this script again, with *message*)."""
    lines = ["#!ipxe"]
    if message:
        lines.append(f"echo mobinux: {_quote(message)}")
    lines += [
        f"echo mobinux: {_quote(hostname)}: log in to attach your disk",
        ":login",
        # login prefills its boxes from these settings: start empty every time
        "clear username",
        "clear password",
        "login || goto login",
        f"chain --replace {login_url}?user=${{username:uristring}}&password=${{password:uristring}}"
        " || goto failed",
        ":failed",
        "echo mobinux: the server did not answer; try again",
        "sleep 2",
        "goto login",
        "",
    ]
    return "\n".join(lines)
