"""ScsiTarget: the LUN map of one SCSI target device and its entry point.

The transport (iSCSI) calls :meth:`ScsiTarget.execute` with a LUN, a CDB, the
data-out and an opaque I_T nexus name, and gets a :class:`ScsiResult` back.
Commands addressed to a LUN with no logical unit behind it are answered here
(SPC-4 6.4.2, 6.29, 6.33 and SAM-5 5.9.4): REPORT LUNS works on any LUN,
INQUIRY answers "no device here", anything else fails LOGICAL UNIT NOT
SUPPORTED.

Long reads: READ(6/10/12/16) has no transfer length limit (see
``inquiry.BlockLimits``), and executing one whole returns all of its data in
one buffer.  A transport that must not hold that much asks
:meth:`ScsiTarget.split_read` for READ(16) pieces and executes them one after
the other; the result is that of the whole READ.
"""

from __future__ import annotations

import struct
import threading

from mobinux.scsi import inquiry
from mobinux.scsi.cdb import decode_rw, u16, u32
from mobinux.scsi.command import Command, ScsiResult
from mobinux.scsi.constants import BLOCK_SIZE, Asc, Opcode, SenseKey, Status
from mobinux.scsi.lu import READ_OPCODES, LogicalUnit
from mobinux.scsi.opcodes import lookup, reserved_bits
from mobinux.scsi.sense import CheckCondition, build_sense, invalid_cdb

_EMPTY = memoryview(b"")

_NOWAIT_OPS = frozenset(
    (
        Opcode.READ_6,
        Opcode.READ_10,
        Opcode.READ_12,
        Opcode.READ_16,
        Opcode.WRITE_6,
        Opcode.WRITE_10,
        Opcode.WRITE_12,
        Opcode.WRITE_16,
    )
)
_RW_16_BYTE_LBA = frozenset((Opcode.READ_6, Opcode.WRITE_6))
_READ_16 = struct.Struct(">BBQIBB")  # READ(16) CDB: opcode, flags, LBA, length, group, control


def encode_lun(lun: int) -> bytes:
    """SAM-5 4.7: an 8-byte LUN, peripheral (<256) or flat space (<16384) addressing."""
    if lun < 256:
        return bytes((0, lun)) + bytes(6)
    return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)


class ScsiTarget:
    def __init__(self, luns: dict[int, LogicalUnit]) -> None:
        for lun in luns:
            if not 0 <= lun < 16384:
                raise ValueError(f"LUN {lun} outside 0..16383")
        self._luns: dict[int, LogicalUnit] = dict(luns)
        self._lock = threading.Lock()

    @property
    def luns(self) -> dict[int, LogicalUnit]:
        return dict(self._luns)

    # -- LUN map changes --------------------------------------------------------------

    def add_lun(self, lun: int, lu: LogicalUnit) -> None:
        """Add a LU; the others report REPORTED LUNS DATA HAS CHANGED (SPC-4 6.33)."""
        if not 0 <= lun < 16384:
            raise ValueError(f"LUN {lun} outside 0..16383")
        with self._lock:
            luns = dict(self._luns)
            luns[lun] = lu
            self._luns = luns
        for other_lun, other in luns.items():
            if other_lun != lun:
                other.queue_unit_attention(Asc.REPORTED_LUNS_DATA_HAS_CHANGED)

    def remove_lun(self, lun: int) -> LogicalUnit | None:
        with self._lock:
            luns = dict(self._luns)
            lu = luns.pop(lun, None)
            self._luns = luns
        if lu is not None:
            for other in luns.values():
                other.queue_unit_attention(Asc.REPORTED_LUNS_DATA_HAS_CHANGED)
        return lu

    # -- the entry point ------------------------------------------------------------------

    def execute(
        self,
        lun: int,
        cdb: bytes | bytearray | memoryview,
        data_out: bytes | bytearray | memoryview | None,
        nexus: str,
        *,
        nowait: bool = False,
        buffer: bytearray | None = None,
        continued: bool = False,
    ) -> ScsiResult:
        """Run one command.  Never raises, except ``storage.device.WouldBlock`` when *nowait*.

        *buffer*: a READ's data goes into it when it is big enough (the result
        is then a memoryview of it).  *continued*: *cdb* is a piece after the
        first of a READ split by :meth:`split_read` (ignored for other commands).
        """
        cdb_bytes = cdb if isinstance(cdb, bytes) else bytes(cdb)
        out = _EMPTY if data_out is None else memoryview(data_out).cast("B")
        lu = self._luns.get(lun) if lun >= 0 else None
        if not cdb_bytes:
            return _check(
                CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
            )
        op = cdb_bytes[0]
        if op == Opcode.REPORT_LUNS:
            return self._report_luns(cdb_bytes, nexus, lu)
        if lu is None:
            return self._no_lu(cdb_bytes)
        return lu.execute(Command(cdb_bytes, out, nexus, nowait, buffer, continued))

    def split_read(
        self, lun: int, cdb: bytes | bytearray | memoryview, max_blocks: int
    ) -> list[bytes] | None:
        """READ(16) CDBs of at most *max_blocks* blocks each that together do the READ *cdb*.

        None means "execute *cdb* whole": it is no READ(6/10/12/16), or it fits
        in *max_blocks*, or executing it whole fails before reading anything and
        before allocating a data buffer (no such LU, a CDB the LU refuses, a
        range beyond the capacity).

        Otherwise the pieces cover consecutive LBAs in order, each with the
        DPO/FUA/FUA_NV bits, GROUP NUMBER and CONTROL byte of *cdb*.  Execute
        them in order, the first with ``execute(...)`` and every other one with
        ``execute(..., continued=True)``, with the same LUN and nexus, and
        concatenate their data; ``nowait`` and ``buffer`` work per piece.  Stop
        at the first piece that does not return GOOD and report its status and
        sense as the command's: that is what the whole READ would report.  The
        caller may also stop once it has the Expected Data Transfer Length.

        Why that is the same as executing *cdb* whole:

        * The first piece runs every check the whole command runs, in the same
          order: a pending unit attention is reported (and cleared) by it, as
          are NOT READY and RESERVATION CONFLICT.  The CDB fields and the range
          were already checked here, on the whole command.
        * Continued pieces skip the unit attention and reservation checks: a
          unit attention or a reservation established while the READ runs
          concerns the next command, exactly as for the whole READ.
        * A READ changes no state (no unit attention, mode, reservation or
          medium state), so running it in pieces leaves the LU as one READ does.
          A medium error ends the command with the same sense either way; some
          data of the failed command may then already have gone to the
          initiator, which it ignores for a command that ended in CHECK CONDITION.

        The one difference: each piece, not the whole READ, is atomic with
        respect to COMPARE AND WRITE, ORWRITE and WRITE ATOMIC (``lu.gate``),
        so a concurrent WRITE ATOMIC across a piece boundary may be seen half
        done.  An initiator relying on read atomicity honours the MAXIMUM
        TRANSFER LENGTH of VPD B0h; with *max_blocks* at least that, only reads
        longer than what the LU advertises are split.
        """
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be positive, not {max_blocks}")
        cdb_bytes = cdb if isinstance(cdb, bytes) else bytes(cdb)
        if not cdb_bytes or cdb_bytes[0] not in READ_OPCODES:
            return None
        lu = self._luns.get(lun) if lun >= 0 else None
        spec = lookup(cdb_bytes)
        if (
            lu is None
            or spec is None
            or len(cdb_bytes) < spec.cdb_length
            or reserved_bits(spec, cdb_bytes) is not None
        ):
            return None
        rw = decode_rw(cdb_bytes)
        if rw.blocks <= max_blocks or rw.lba + rw.blocks > lu.num_blocks:
            return None
        op = cdb_bytes[0]
        if op == Opcode.READ_6:
            flags, group = 0, 0  # READ(6) has neither DPO/FUA nor a GROUP NUMBER
        else:
            flags = cdb_bytes[1]
            group = cdb_bytes[6 if op == Opcode.READ_10 else spec.cdb_length - 2]
        control = cdb_bytes[spec.cdb_length - 1]
        return [
            _READ_16.pack(
                Opcode.READ_16,
                flags,
                rw.lba + start,
                min(max_blocks, rw.blocks - start),
                group,
                control,
            )
            for start in range(0, rw.blocks, max_blocks)
        ]

    # -- commands answered by the target ----------------------------------------------------

    def _report_luns(self, cdb: bytes, nexus: str, lu: LogicalUnit | None) -> ScsiResult:
        """SPC-4 6.33 REPORT LUNS."""
        spec = lookup(cdb)
        descriptor = lu.mode.d_sense if lu is not None else False
        try:
            if spec is None or len(cdb) < spec.cdb_length:
                raise invalid_cdb(0)
            bad = reserved_bits(spec, cdb)
            if bad is not None:
                raise invalid_cdb(*bad)
            select = cdb[2]
            alloc = u32(cdb, 6)
            if alloc < 16:
                raise invalid_cdb(6)  # SPC-4 6.33: at least 16 bytes
            if select in (0x00, 0x02):
                luns = sorted(self._luns)
            elif select == 0x01:
                luns = []  # no well-known logical units
            else:
                raise invalid_cdb(2)
        except CheckCondition as exc:
            return ScsiResult(Status.CHECK_CONDITION, b"", exc.sense(descriptor=descriptor))
        # SAM-5 5.14: REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED for this nexus.
        for each in self._luns.values():
            each.clear_unit_attention(nexus, Asc.REPORTED_LUNS_DATA_HAS_CHANGED)
        body = b"".join(encode_lun(n) for n in luns)
        data = struct.pack(">I4x", len(body)) + body
        return ScsiResult(Status.GOOD, data[:alloc])

    @staticmethod
    def _no_lu(cdb: bytes) -> ScsiResult:
        op = cdb[0]
        if op == Opcode.INQUIRY and len(cdb) >= 6 and not cdb[1] & 0x01 and cdb[2] == 0:
            alloc = u16(cdb, 3)
            return ScsiResult(Status.GOOD, inquiry.not_present()[:alloc])
        if op == Opcode.REQUEST_SENSE and len(cdb) >= 6:
            sense = build_sense(
                SenseKey.ILLEGAL_REQUEST,
                Asc.LOGICAL_UNIT_NOT_SUPPORTED,
                descriptor=bool(cdb[1] & 1),
            )
            return ScsiResult(Status.GOOD, sense[: cdb[4]])
        return _check(CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED))

    # -- classification helpers for the transport ------------------------------------------------

    @staticmethod
    def is_nowait_candidate(cdb: bytes) -> bool:
        """READ/WRITE 6/10/12/16 without FUA: may be tried inline with ``nowait=True``."""
        if not cdb or cdb[0] not in _NOWAIT_OPS:
            return False
        if cdb[0] in _RW_16_BYTE_LBA:
            return True  # READ(6)/WRITE(6) have no FUA bit
        return len(cdb) > 1 and not cdb[1] & 0x08

    @staticmethod
    def touches_media(cdb: bytes) -> bool:
        """True if the command may do disk I/O, so the caller should run it in a thread."""
        spec = lookup(cdb)
        return spec is not None and spec.media

    @staticmethod
    def data_out_length(cdb: bytes, block_size: int = BLOCK_SIZE) -> int:
        """Bytes of data-out the CDB itself asks for (0 for commands without data-out)."""
        if not cdb:
            return 0
        op = cdb[0]
        try:
            if op == Opcode.WRITE_6:
                return (cdb[4] or 256) * block_size
            if op in (Opcode.WRITE_10, Opcode.WRITE_AND_VERIFY_10):
                return u16(cdb, 7) * block_size
            if op in (Opcode.WRITE_12, Opcode.WRITE_AND_VERIFY_12):
                return u32(cdb, 6) * block_size
            if op in (Opcode.WRITE_16, Opcode.WRITE_AND_VERIFY_16, Opcode.ORWRITE_16):
                return u32(cdb, 10) * block_size
            if op == Opcode.WRITE_ATOMIC_16:
                return u16(cdb, 12) * block_size
            if op == Opcode.COMPARE_AND_WRITE:
                return 2 * cdb[13] * block_size
            if op == Opcode.WRITE_SAME_10:
                return block_size
            if op == Opcode.WRITE_SAME_16:
                return 0 if cdb[1] & 0x01 else block_size  # NDOB
            if op in (Opcode.VERIFY_10, Opcode.VERIFY_12, Opcode.VERIFY_16):
                bytchk = (cdb[1] >> 1) & 0x03
                if bytchk == 0b11:
                    return block_size
                if bytchk != 0b01:
                    return 0
                if op == Opcode.VERIFY_10:
                    return u16(cdb, 7) * block_size
                if op == Opcode.VERIFY_12:
                    return u32(cdb, 6) * block_size
                return u32(cdb, 10) * block_size
            if op == Opcode.MODE_SELECT_6:
                return cdb[4]
            if op in (Opcode.MODE_SELECT_10, Opcode.UNMAP):
                return u16(cdb, 7)
            if op == Opcode.PERSISTENT_RESERVE_OUT:
                return u32(cdb, 5)
            if op == Opcode.EXTENDED_COPY:
                return u32(cdb, 10)
            if op == Opcode.SANITIZE:
                return u16(cdb, 7)
        except (IndexError, ValueError, struct.error):
            return 0  # CDB too short for its opcode; execute() will refuse it
        return 0

    # -- task management and session events ---------------------------------------------------------

    def nexus_lost(self, nexus: str) -> None:
        """The session of *nexus* ended: RESERVE(6) released, PR registrations kept (SPC-4 5.12.1)."""
        for lu in self._luns.values():
            lu.nexus_lost(nexus)

    def lun_reset(self, lun: int, nexus: str) -> bool:
        """LOGICAL UNIT RESET (SAM-5 7.7); False if there is no such LUN."""
        lu = self._luns.get(lun)
        if lu is None:
            return False
        lu.reset(Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
        return True

    def target_reset(self, nexus: str, cold: bool) -> None:
        """TARGET WARM/COLD RESET (RFC 7143 11.5.1) on every LU.

        Warm: as a LOGICAL UNIT RESET of each LU (UA 29/03).  Cold: as a power
        cycle (UA 29/01 POWER ON OCCURRED), which also loses persistent
        reservations since they are not persisted (PTPL not offered).
        """
        for lu in self._luns.values():
            if cold:
                lu.power_on_reset()
            else:
                lu.reset(Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED)

    def capacity_changed(self, lun: int) -> None:
        """UA CAPACITY DATA HAS CHANGED (SBC-3 4.9) to every nexus of the LU."""
        lu = self._luns.get(lun)
        if lu is not None:
            # A device that caches its size (FileDevice) re-reads it first.
            refresh = getattr(lu.device, "refresh_size", None)
            if callable(refresh):
                refresh()
            lu.queue_unit_attention(Asc.CAPACITY_DATA_HAS_CHANGED)


def _check(exc: CheckCondition) -> ScsiResult:
    return ScsiResult(Status.CHECK_CONDITION, b"", exc.sense())


__all__ = ["LogicalUnit", "ScsiResult", "ScsiTarget", "encode_lun"]
