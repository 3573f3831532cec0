"""INQUIRY data: the standard page (SPC-4 6.4.2) and the VPD pages (SPC-4 7.8, SBC-3 6.5).

Identifiers are derived from the LU's ``device_id`` by hashing, so they are
stable across restarts and unique per exported disk without any stored state.
Mobinux owns no IEEE OUI, so the NAA designator uses NAA 3h, "locally
assigned" (SPC-4 7.8.6.6.4): 60 bits of the hash under the 3h nibble.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from mobinux.scsi.constants import PeripheralDeviceType, PeripheralQualifier, VpdPage

# SPC-4 6.4.2 Table 144 / Annex E.9 version descriptor values.
VERSION_SAM5 = 0x00A0
VERSION_ISCSI = 0x0960
VERSION_SPC4 = 0x0460
VERSION_SBC3 = 0x04C0

STANDARD_LENGTH = 96  # bytes 0..95: through the version descriptors and the reserved tail

SUPPORTED_VPD: tuple[int, ...] = (
    VpdPage.SUPPORTED_VPD_PAGES,
    VpdPage.UNIT_SERIAL_NUMBER,
    VpdPage.DEVICE_IDENTIFICATION,
    VpdPage.BLOCK_LIMITS,
    VpdPage.BLOCK_DEVICE_CHARACTERISTICS,
    VpdPage.LOGICAL_BLOCK_PROVISIONING,
)


def _ascii_field(text: str, width: int) -> bytes:
    """Left-aligned, space-padded ASCII (SPC-4 4.3.1): printable 0x20..0x7E only."""
    clean = "".join(c if 0x20 <= ord(c) <= 0x7E else "_" for c in text)
    return clean.encode("ascii")[:width].ljust(width, b" ")


@dataclass(frozen=True, slots=True)
class Identity:
    """Everything INQUIRY reports about who the LU is."""

    vendor: str
    product: str
    revision: str
    serial: str
    naa: bytes  # 8 bytes, NAA 3h
    device_id: str

    @classmethod
    def derive(cls, device_id: str, vendor: str, product: str, revision: str) -> Identity:
        digest = hashlib.sha256(device_id.encode("utf-8")).digest()
        serial = digest[:12].hex()
        naa_value = (0x3 << 60) | (int.from_bytes(digest[12:20], "big") & ((1 << 60) - 1))
        return cls(vendor, product, revision, serial, naa_value.to_bytes(8, "big"), device_id)


def standard(identity: Identity, *, removable: bool) -> bytes:
    out = bytearray(STANDARD_LENGTH)
    out[0] = (PeripheralQualifier.CONNECTED << 5) | PeripheralDeviceType.DIRECT_ACCESS_BLOCK
    out[1] = 0x80 if removable else 0  # RMB
    out[2] = 0x06  # VERSION: SPC-4
    out[3] = 0x10 | 0x02  # HISUP=1, RESPONSE DATA FORMAT=2
    out[4] = STANDARD_LENGTH - 5  # ADDITIONAL LENGTH
    out[5] = 0x08  # SCCS=0 ACC=0 TPGS=00b (no ALUA) 3PC=1 (EXTENDED COPY) PROTECT=0
    out[6] = 0
    out[7] = 0x02  # CMDQUE: full task management model
    out[8:16] = _ascii_field(identity.vendor, 8)
    out[16:32] = _ascii_field(identity.product, 16)
    out[32:36] = _ascii_field(identity.revision, 4)
    for i, version in enumerate((VERSION_SAM5, VERSION_ISCSI, VERSION_SPC4, VERSION_SBC3)):
        struct.pack_into(">H", out, 58 + 2 * i, version)
    return bytes(out)


def not_present() -> bytes:
    """Standard INQUIRY data for a LUN with no logical unit behind it (SPC-4 6.4.2).

    Peripheral qualifier 011b with device type 1Fh: "not capable of supporting
    a device on this logical unit".
    """
    out = bytearray(36)
    out[0] = (PeripheralQualifier.NOT_SUPPORTED << 5) | PeripheralDeviceType.UNKNOWN_OR_NO_DEVICE
    out[2] = 0x06
    out[3] = 0x12
    out[4] = 31
    return bytes(out)


def _vpd(page: int, body: bytes) -> bytes:
    head = bytes((PeripheralDeviceType.DIRECT_ACCESS_BLOCK, page)) + struct.pack(">H", len(body))
    return head + body


def supported_pages() -> bytes:
    return _vpd(VpdPage.SUPPORTED_VPD_PAGES, bytes(SUPPORTED_VPD))


def unit_serial(identity: Identity) -> bytes:
    return _vpd(VpdPage.UNIT_SERIAL_NUMBER, identity.serial.encode("ascii"))


def _designator(code_set: int, assoc: int, dtype: int, value: bytes, protocol: int = 0) -> bytes:
    """SPC-4 7.8.6.1 designation descriptor."""
    piv = 0x80 if protocol else 0
    return bytes(((protocol << 4) | code_set, piv | (assoc << 4) | dtype, 0, len(value))) + value


def device_identification(identity: Identity) -> bytes:
    """VPD 83h (SPC-4 7.8.6): NAA, T10 vendor ID and relative target port designators."""
    binary, ascii_set = 1, 2
    lu_assoc, port_assoc = 0, 1
    iscsi_protocol = 5  # SPC-4 7.6.1 Table 362: Internet SCSI (iSCSI)
    t10 = _ascii_field(identity.vendor, 8) + f"{identity.product}:{identity.serial}".encode(
        "ascii", "replace"
    )
    body = (
        _designator(binary, lu_assoc, 3, identity.naa)
        + _designator(ascii_set, lu_assoc, 1, t10)
        # Relative target port 1: this target has one SCSI target port per LU.
        + _designator(binary, port_assoc, 4, struct.pack(">HH", 0, 1), protocol=iscsi_protocol)
    )
    return _vpd(VpdPage.DEVICE_IDENTIFICATION, body)


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """The SBC-3 6.5.3 block limits the LU advertises and enforces (in logical blocks).

    Transfer lengths, and where we knowingly accept more than we advertise:

    * ``max_transfer`` is the MAXIMUM TRANSFER LENGTH of VPD B0h, which Linux
      honours (it caps its requests at ``optimal_transfer``).  VERIFY and WRITE
      ATOMIC are held to it (MAXIMUM ATOMIC TRANSFER LENGTH is the same value).
    * READ(6/10/12/16) of any length within the capacity is accepted, as tgt
      does: iPXE before 2023 ignores VPD B0h and, when UEFI sanboots, reads a
      whole file in one READ (a 14 MB kernel is ~28,000 blocks).  A read needs
      no data-out buffered and changes no state, so the transport may split it
      (``ScsiTarget.split_read``) and stream it in pieces.
    * Commands whose Data-Out must be held whole before they run (WRITE, WRITE
      AND VERIFY, ORWRITE) are refused above ``max_write_transfer`` with
      INVALID FIELD IN CDB: 32 MiB, also lenient towards initiators that send
      more than ``max_transfer``, while bounding what one command buffers.
    * COMPARE AND WRITE and WRITE SAME have their own limits below.
    """

    max_transfer: int = 16384  # MAXIMUM TRANSFER LENGTH: 8 MiB
    # OPTIMAL TRANSFER LENGTH: 1 MiB.  Linux sd makes this its largest request
    # (max_sectors_kb) and its io_opt (readahead 2 x io_opt); a piece of this
    # size fits the largest read buffer the iSCSI layer pools.
    optimal_transfer: int = 2048
    max_write_transfer: int = 65536  # 32 MiB of Data-Out per command, enforced
    optimal_granularity: int = 8  # 4 KiB: the file systems under us allocate in 4 KiB blocks
    max_compare_and_write: int = 255
    max_unmap_lba_count: int = 0x100000  # 512 MiB per UNMAP descriptor
    max_unmap_descriptors: int = 256
    unmap_granularity: int = 8
    # 32 MiB - 512: WRITE SAME(10)'s own limit, and below the 65536 blocks that
    # libiscsi's WriteSame16.Unmap would otherwise write in one WRITE(16).
    max_write_same: int = 0xFFFF


def block_limits(limits: BlockLimits) -> bytes:
    body = bytearray(0x3C)
    body[0] = 0  # WSNZ=0: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 means "to the end"
    body[1] = limits.max_compare_and_write
    struct.pack_into(">H", body, 2, limits.optimal_granularity)
    struct.pack_into(">I", body, 4, limits.max_transfer)
    struct.pack_into(">I", body, 8, limits.optimal_transfer)
    struct.pack_into(">I", body, 12, limits.max_transfer)  # MAXIMUM PREFETCH LENGTH
    struct.pack_into(">I", body, 16, limits.max_unmap_lba_count)
    struct.pack_into(">I", body, 20, limits.max_unmap_descriptors)
    struct.pack_into(">I", body, 24, limits.unmap_granularity)
    struct.pack_into(">I", body, 28, 0x80000000)  # UGAVALID=1, alignment 0
    struct.pack_into(">Q", body, 32, limits.max_write_same)
    # SBC-4 6.6.4: WRITE ATOMIC(16) up to the normal maximum, any alignment
    # and granularity (0), no atomic boundaries.
    struct.pack_into(">IIIII", body, 40, limits.max_transfer, 0, 0, 0, 0)
    return _vpd(VpdPage.BLOCK_LIMITS, bytes(body))


def block_device_characteristics() -> bytes:
    body = bytearray(0x3C)
    struct.pack_into(">H", body, 0, 1)  # MEDIUM ROTATION RATE 0001h: non-rotating medium
    # SBC-4 6.6.2: WABEREQ=01b, WACEREQ=01b: reads after a SANITIZE erase succeed.
    body[3] = 0x50
    return _vpd(VpdPage.BLOCK_DEVICE_CHARACTERISTICS, bytes(body))


def logical_block_provisioning() -> bytes:
    """VPD B2h (SBC-3 6.5.4): UNMAP and WRITE SAME(10/16) with UNMAP, discarded blocks read zero."""
    lbpu, lbpws, lbpws10, lbprz = 0x80, 0x40, 0x20, 0x04
    thin = 0x02  # PROVISIONING TYPE 010b: thin provisioned
    return _vpd(
        VpdPage.LOGICAL_BLOCK_PROVISIONING, bytes((0, lbpu | lbpws | lbpws10 | lbprz, thin, 0))
    )
