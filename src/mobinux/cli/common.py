"""Helpers shared by the CLI command groups: data directory, output, errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_DATA_DIR = "./mobinux-data"


class CliParser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line saying what to do, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def data_dir(args: argparse.Namespace) -> Path:
    value = args.data_dir or os.environ.get("MOBINUX_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(value)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    text_rows = [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in text_rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
