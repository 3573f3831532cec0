"""Contracts between the protocol services (DHCP, TFTP, HTTP) and the boot logic.

The protocol cores know nothing about nodes or images. They describe the
client they are talking to with :class:`BootRequest` and ask a
:class:`BootPolicy` what to hand it; TFTP and HTTP ask a :class:`FileResolver`
for the bytes behind a path. ``mobinux.service`` implements both from the
inventory; tests implement them with a few lines.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Protocol


class ClientArch(enum.IntEnum):
    """Client System Architecture Type, DHCP option 93 (RFC 4578 §2.1, IANA registry)."""

    BIOS = 0
    NEC_PC98 = 1
    EFI_ITANIUM = 2
    DEC_ALPHA = 3
    ARC_X86 = 4
    INTEL_LEAN = 5
    EFI_IA32 = 6
    EFI_BC = 7  # EFI byte code; in practice every x86-64 UEFI firmware sends 7
    EFI_XSCALE = 8
    EFI_X64 = 9  # some firmwares send 9 for x86-64
    EFI_ARM32 = 10
    EFI_ARM64 = 11
    EFI_X64_HTTP = 16
    EFI_ARM64_HTTP = 19


class Firmware(enum.Enum):
    """What kind of loader a client can run, derived from option 93."""

    BIOS = "bios"
    UEFI_IA32 = "uefi-ia32"
    UEFI_X64 = "uefi-x64"
    UEFI_ARM64 = "uefi-arm64"


def firmware_of(arch: int | None) -> Firmware:
    """Map an option 93 value to the firmware family (absent means BIOS)."""
    if arch is None or arch == ClientArch.BIOS:
        return Firmware.BIOS
    if arch == ClientArch.EFI_IA32:
        return Firmware.UEFI_IA32
    if arch in (ClientArch.EFI_ARM64, ClientArch.EFI_ARM64_HTTP):
        return Firmware.UEFI_ARM64
    if arch in (ClientArch.EFI_BC, ClientArch.EFI_X64, ClientArch.EFI_X64_HTTP):
        return Firmware.UEFI_X64
    return Firmware.BIOS


@dataclass(frozen=True, slots=True)
class BootRequest:
    """A booting client as seen in its DHCP request."""

    mac: str  # lower-case, colon-separated: "52:54:00:00:00:01"
    arch: int | None = None  # option 93, first value
    is_ipxe: bool = False  # user class "iPXE" (option 77) or option 175 present
    http_client: bool = False  # vendor class starts with "HTTPClient" (UEFI HTTP boot)
    uuid: str | None = None  # option 97, canonical lower-case text form
    ip: IPv4Address | None = None  # the address the client has or is being given

    @property
    def firmware(self) -> Firmware:
        return firmware_of(self.arch)


@dataclass(frozen=True, slots=True)
class BootOffer:
    """What the DHCP server puts in the boot fields of its reply."""

    filename: str  # "pxelinux.0", "undionly.kpxe" or a full http:// URL for iPXE / HTTP boot
    next_server: IPv4Address  # siaddr and option 66


class BootPolicy(Protocol):
    """Decisions the DHCP service needs from the inventory."""

    def is_known(self, mac: str) -> bool:
        """True when *mac* is a registered node."""
        ...

    def fixed_address(self, mac: str) -> IPv4Address | None:
        """The node's configured address, if any."""
        ...

    def boot_offer(self, request: BootRequest) -> BootOffer | None:
        """What this client should boot, or None to give it no boot file."""
        ...



@dataclass(frozen=True, slots=True)
class ResolvedFile:
    """The bytes behind a TFTP/HTTP path: generated in memory or a real file."""

    name: str  # the normalised path that was asked for
    data: bytes | None = None  # generated content (pxelinux.cfg, iPXE script)
    path: Path | None = None  # a real file, already checked to lie inside its root
    mac: str | None = None  # the node this file was generated for, for logging
    # Content that takes a while to make (a login's password check): awaited by
    # HTTP only. A resolver returns it only for HTTP requests (with a query).
    later: Callable[[], Awaitable[bytes]] | None = None

    def __post_init__(self) -> None:
        if (self.data is not None) + (self.path is not None) + (self.later is not None) != 1:
            raise ValueError("exactly one of data, path and later")


class FileResolver(Protocol):
    """Maps a normalised client path to a file (TFTP and HTTP share one)."""

    def resolve(self, name: str, client_ip: str, query: str = "") -> ResolvedFile | None:
        """*name* comes from :func:`mobinux.paths.normalise`; None means not found.

        Raises :class:`mobinux.errors.PathRefused` when the path is unsafe.
        *query* is the HTTP query string (empty for TFTP).
        """
        ...


StepRecorder = Callable[[str | None, str | None, str], None]
"""``record_step(mac, client_ip, step)``: one boot step of one client.

Services call it once per boot step ("dhcp-offer 10.77.0.100",
"dhcp-ack 10.77.0.100", "tftp pxelinux.0", "http boot/01-52-54-00-00-00-01.ipxe")
and never log boot steps themselves: the recorder logs one line naming the MAC
and keeps the step for ``mobinux status``. *mac* may be None when unknown
(a TFTP client is known only by its address); the recorder then looks it up.
It must be cheap and must not block (it is called on the event loop).
"""
