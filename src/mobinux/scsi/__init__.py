"""SCSI target emulation (SPC-4, SBC-3) over a BlockDevice. Nothing here knows iSCSI.

Modules, one concern each::

    constants     spec-named enums: status, sense keys, ASC/ASCQ, opcodes, ...
    sense         sense data (fixed/descriptor) and the CheckCondition exception
    cdb           CDB field decoding (LBA, transfer length)
    opcodes       the command table: CDB usage maps, timeouts, access classes
    command       Command (handler input) and ScsiResult (what execute returns)
    inquiry       standard INQUIRY data and VPD pages, identifiers
    mode          mode pages and MODE SELECT validation
    reservations  RESERVE(6) and persistent reservations state machine
    spc           SPC-4 command handlers (INQUIRY, MODE SENSE, PR, ...)
    sbc           SBC-3 command handlers (READ, WRITE, UNMAP, ...)
    lu            LogicalUnit: shared state, unit attentions, dispatch
    target        ScsiTarget: LUN map, REPORT LUNS, resets, transport helpers
"""

from mobinux.scsi.command import ScsiResult
from mobinux.scsi.lu import LogicalUnit
from mobinux.scsi.target import ScsiTarget

__all__ = ["LogicalUnit", "ScsiResult", "ScsiTarget"]
