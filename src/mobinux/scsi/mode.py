"""Mode pages (SPC-4 7.5, SBC-3 6.4): current, changeable and default values.

Saved values are not implemented (nothing is persisted across restarts), so
PC=11b and SP=1 are refused the way SPC-4 6.11/6.9 ask.  The changeable bits:

* caching page WCE: with WCE=0 every write is made durable before it
  completes (SBC-3 6.4.5), i.e. the LU behaves as if each write had FUA set;
* control page D_SENSE: descriptor-format sense data (SPC-4 7.5.8);
* control page SWP: software write protect, writes fail DATA PROTECT.

Not thread-safe on its own; the LogicalUnit holds its lock around calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from mobinux.scsi.constants import ModePage, PageControl
from mobinux.scsi.sense import invalid_param


@dataclass(frozen=True, slots=True)
class _PageDef:
    default: bytes  # whole page, header included
    changeable: bytes  # same length: 1 bits may be changed by MODE SELECT


def _page(code: int, body: bytes) -> bytes:
    return bytes((code, len(body))) + body


def _defs(write_cache: bool) -> dict[int, _PageDef]:
    # SBC-3 6.4.8 read-write error recovery: nothing to recover from, all zero.
    rw_recovery = _page(ModePage.READ_WRITE_ERROR_RECOVERY, bytes(10))
    # SBC-3 6.4.5 caching: WCE (byte 2 bit 2).
    caching = bytearray(_page(ModePage.CACHING, bytes(18)))
    if write_cache:
        caching[2] |= 0x04
    caching_changeable = bytearray(len(caching))
    caching_changeable[2] = 0x04
    # SPC-4 7.5.8 control: QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering),
    # BUSY TIMEOUT PERIOD FFFFh (unlimited).
    control = bytearray(_page(ModePage.CONTROL, bytes(10)))
    control[3] = 0x10
    control[8:10] = b"\xff\xff"
    control_changeable = bytearray(len(control))
    control_changeable[2] = 0x04  # D_SENSE
    control_changeable[4] = 0x08  # SWP
    # SPC-4 7.5.13 informational exceptions control: DEXCPT=1, nothing reported.
    iec = bytearray(_page(ModePage.INFORMATIONAL_EXCEPTIONS_CONTROL, bytes(10)))
    iec[2] = 0x08
    return {
        ModePage.READ_WRITE_ERROR_RECOVERY: _PageDef(rw_recovery, bytes(len(rw_recovery))),
        ModePage.CACHING: _PageDef(bytes(caching), bytes(caching_changeable)),
        ModePage.CONTROL: _PageDef(bytes(control), bytes(control_changeable)),
        ModePage.INFORMATIONAL_EXCEPTIONS_CONTROL: _PageDef(bytes(iec), bytes(len(iec))),
    }


class ModePages:
    def __init__(self, *, write_cache: bool) -> None:
        self._defs = _defs(write_cache)
        self._current: dict[int, bytearray] = {}
        self.reset()

    def reset(self) -> None:
        """Current values back to defaults (there are no saved values): SPC-4 7.5.1."""
        self._current = {code: bytearray(d.default) for code, d in self._defs.items()}

    @property
    def codes(self) -> list[int]:
        return sorted(self._defs)

    def get(self, code: int, pc: PageControl) -> bytes:
        d = self._defs[code]
        if pc == PageControl.CURRENT:
            return bytes(self._current[code])
        if pc == PageControl.CHANGEABLE:
            # The mask has the real page code and length in its header (SPC-4 6.11.2).
            return d.default[:2] + d.changeable[2:]
        return d.default

    # -- the bits the rest of the LU reads ------------------------------------

    @property
    def wce(self) -> bool:
        return bool(self._current[ModePage.CACHING][2] & 0x04)

    @property
    def d_sense(self) -> bool:
        return bool(self._current[ModePage.CONTROL][2] & 0x04)

    @property
    def swp(self) -> bool:
        return bool(self._current[ModePage.CONTROL][4] & 0x08)

    # -- MODE SELECT ------------------------------------------------------------

    def select(self, pages: bytes, base: int) -> bool:
        """Apply the mode pages in *pages* (which starts at parameter list offset *base*).

        All pages are validated before any is applied, so a bad page leaves
        every value unchanged.  Returns True if any current value changed.
        Raises CheckCondition with INVALID FIELD IN PARAMETER LIST pointing at the
        first offending byte and bit (SPC-4 6.9).
        """
        updates: list[tuple[int, bytes]] = []
        pos = 0
        while pos < len(pages):
            if len(pages) - pos < 2:
                raise invalid_param(base + pos)
            hdr = pages[pos]
            code = hdr & 0x3F
            if hdr & 0x40:  # SPF: we have no subpages
                raise invalid_param(base + pos, 6)
            if hdr & 0x80:  # PS is reserved in MODE SELECT (SPC-4 7.5.7)
                raise invalid_param(base + pos, 7)
            d = self._defs.get(code)
            if d is None:
                raise invalid_param(base + pos, 5)
            length = pages[pos + 1]
            if length != len(d.default) - 2:
                raise invalid_param(base + pos + 1)
            if pos + 2 + length > len(pages):
                raise invalid_param(base + pos + 1)
            new = pages[pos : pos + 2 + length]
            cur = self._current[code]
            for i in range(2, len(new)):
                bad = (new[i] ^ cur[i]) & ~d.changeable[i] & 0xFF
                if bad:
                    raise invalid_param(base + pos + i, bad.bit_length() - 1)
            updates.append((code, bytes(new)))
            pos += 2 + length
        changed = False
        for code, new in updates:
            cur = self._current[code]
            merged = bytearray(cur)
            merged[2:] = new[2:]
            if merged != cur:
                changed = True
                self._current[code] = merged
        return changed
