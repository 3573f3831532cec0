"""iSCSI constants in the words of RFC 7143.

Section numbers refer to RFC 7143 ("iSCSI Protocol (Consolidated)").
"""

from __future__ import annotations

import enum

BHS_LEN = 48  # §11.2.1: the Basic Header Segment is always 48 bytes
DIGEST_LEN = 4  # §11.2.3/§11.2.4: CRC32C header and data digests
DEFAULT_PORT = 3260  # §13.1 / IANA "iscsi-target"
RESERVED_TAG = 0xFFFFFFFF  # §11.2.1.8 / §11.18.1: "no task" Initiator/Target Transfer Tag
# §13.12: MaxRecvDataSegmentLength before (and during) login is 8192.
LOGIN_MAX_RECV_DATA_SEGMENT_LENGTH = 8192


class Opcode(enum.IntEnum):
    """PDU opcodes (§11.2.1.2). Initiator opcodes are 0x00-0x1f, target opcodes 0x20-0x3f."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    SCSI_DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10

    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    SCSI_DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


# Byte 0 of every BHS: bit 6 is the Immediate flag on initiator PDUs (§11.2.1.1).
IMMEDIATE_BIT = 0x40
OPCODE_MASK = 0x3F
# Byte 1: the Final bit (§11.2.1.3) for PDUs that have one.
FINAL_BIT = 0x80

# SCSI Command flags, byte 1 (§11.3.1).
CMD_READ = 0x40
CMD_WRITE = 0x20
CMD_ATTR_MASK = 0x07

# SCSI Data-In flags, byte 1 (§11.7.1).
DATAIN_ACK = 0x40
DATAIN_OVERFLOW = 0x04  # O
DATAIN_UNDERFLOW = 0x02  # U
DATAIN_STATUS = 0x01  # S: phase-collapsed status (§11.7.4)

# SCSI Response flags, byte 1 (§11.4.1).
RESP_BIDI_OVERFLOW = 0x10
RESP_BIDI_UNDERFLOW = 0x08
RESP_OVERFLOW = 0x04
RESP_UNDERFLOW = 0x02

# Login request/response byte 1 (§11.12.1 / §11.13).
LOGIN_TRANSIT = 0x80
LOGIN_CONTINUE = 0x40
LOGIN_CSG_MASK = 0x0C
LOGIN_CSG_SHIFT = 2
LOGIN_NSG_MASK = 0x03


class TaskAttribute(enum.IntEnum):
    """ATTR field of a SCSI Command (§11.3.1.1)."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class Stage(enum.IntEnum):
    """Login stages, CSG/NSG (§11.12.3)."""

    SECURITY_NEGOTIATION = 0
    LOGIN_OPERATIONAL_NEGOTIATION = 1
    FULL_FEATURE_PHASE = 3


class LoginStatusClass(enum.IntEnum):
    """Status-Class of a Login Response (§11.13.5)."""

    SUCCESS = 0
    REDIRECTION = 1
    INITIATOR_ERROR = 2
    TARGET_ERROR = 3


class LoginStatus(enum.IntEnum):
    """(Status-Class << 8) | Status-Detail of a Login Response (§11.13.5)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class TmfFunction(enum.IntEnum):
    """Task Management Function Request functions (§11.5.1)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    """Task Management Function Response codes (§11.6.1)."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    TASK_ALLEGIANCE_REASSIGNMENT_NOT_SUPPORTED = 4
    FUNCTION_NOT_SUPPORTED = 5
    FUNCTION_AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


class LogoutReason(enum.IntEnum):
    """Logout Request reason codes (§11.14.1)."""

    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_CONNECTION_FOR_RECOVERY = 2


class LogoutResponse(enum.IntEnum):
    """Logout Response codes (§11.15.1)."""

    CLOSED_SUCCESSFULLY = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class RejectReason(enum.IntEnum):
    """Reject reasons (§11.17.1)."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    DEPRECATED_NEGOTIATION_RESET = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class AsyncEvent(enum.IntEnum):
    """Asynchronous Message AsyncEvent codes (§11.9.1)."""

    SCSI_ASYNC_EVENT = 0
    LOGOUT_REQUEST = 1
    CONNECTION_DROP = 2
    SESSION_DROP = 3
    NEGOTIATION_REQUEST = 4
    TASK_TERMINATION = 5
    VENDOR_SPECIFIC = 255


class ScsiResponseCode(enum.IntEnum):
    """The Response field of a SCSI Response (§11.4.3)."""

    COMMAND_COMPLETED_AT_TARGET = 0x00
    TARGET_FAILURE = 0x01
