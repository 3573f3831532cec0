"""A small progress bar for long CLI work (image packing, import)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Draws ``label [#####     ] 52% 10.1/19.4 MiB`` on stderr when it is a terminal."""

    def __init__(self, label: str, enabled: bool | None = None, width: int = 30) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.width = width
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        fraction = 1.0 if total <= 0 else min(done / total, 1.0)
        filled = int(fraction * self.width)
        bar = "#" * filled + " " * (self.width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {fraction * 100:3.0f}% "
                         f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
