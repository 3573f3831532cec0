"""TFTP constants in the words of the specifications.

- RFC 1350 (TFTP revision 2): opcodes (§5), error codes (Appendix / §5),
  transfer modes (§1), the 512-byte default block (§2).
- RFC 2347 (option extension): the OACK opcode and error code 8.
- RFC 2348 (blksize), RFC 2349 (timeout, tsize), RFC 7440 (windowsize).
"""

from __future__ import annotations

import enum


class Opcode(enum.IntEnum):
    """Packet opcodes (RFC 1350 §5; OACK from RFC 2347 "Packet Formats")."""

    RRQ = 1  # read request
    WRQ = 2  # write request
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6  # option acknowledgment (RFC 2347)


class ErrorCode(enum.IntEnum):
    """Error codes (RFC 1350 Appendix "Error Codes"; 8 from RFC 2347)."""

    NOT_DEFINED = 0  # "Not defined, see error message (if any)."
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3  # "Disk full or allocation exceeded."
    ILLEGAL_OPERATION = 4  # "Illegal TFTP operation."
    UNKNOWN_TID = 5  # "Unknown transfer ID."
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_NEGOTIATION = 8  # RFC 2347: "terminate the transfer due to option negotiation"


class Mode(enum.StrEnum):
    """Transfer modes (RFC 1350 §1); compared case-insensitively (§5)."""

    NETASCII = "netascii"
    OCTET = "octet"
    MAIL = "mail"  # obsolete; "SHOULD NOT be implemented" per RFC 1350 §1 footnote


class Option(enum.StrEnum):
    """Option names (case-insensitive, RFC 2347 "Request Packet")."""

    BLKSIZE = "blksize"  # RFC 2348
    TIMEOUT = "timeout"  # RFC 2349 §2 ("Timeout Interval Option")
    TSIZE = "tsize"  # RFC 2349 §3 ("Transfer Size Option")
    WINDOWSIZE = "windowsize"  # RFC 7440 §3


DEFAULT_BLKSIZE = 512  # RFC 1350 §2
BLKSIZE_MIN = 8  # RFC 2348 "Blocksize Option Specification"
BLKSIZE_MAX = 65464  # RFC 2348
TIMEOUT_MIN = 1  # RFC 2349 §2, seconds
TIMEOUT_MAX = 255
WINDOWSIZE_MIN = 1  # RFC 7440 §3
WINDOWSIZE_MAX = 65535

# Our own policy caps (RFC 7440 §3 lets the server answer a smaller window).
# Beyond ~64 blocks in flight a single loss costs a large resend and the
# window no longer fits comfortably in a default 208 KiB socket buffer.
WINDOWSIZE_CAP = 64
WINDOW_BYTES_CAP = 128 * 1024

BLOCK_MODULUS = 1 << 16  # block numbers are 16 bits; after 65535 comes 0

DATA_HEADER_LEN = 4  # opcode + block number (RFC 1350 §5, DATA)
UDP_IPV4_OVERHEAD = 20 + 8  # IPv4 header without options + UDP header
