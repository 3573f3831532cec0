"""libiscsi's compliance suite (iscsi-test-cu) against IscsiService: the acceptance test of the target.

The main run is the whole destructive suite (``-d``) on a 128 MiB scratch
LUN configured as Mobinux exports disks (fixed, writable), with the same URL
given twice so that the MultipathIO tests run over two sessions. Short runs
cover what that run cannot: the PreventAllow and StartStopUnit suites on a
removable LUN, the ReadOnly suite on a write-protected one, and the Sanitize
suite with ``--allow-sanitize`` on a LUN of its own, over a single URL
(iscsi-test-cu 1.19 spins forever in Sanitize.BlockEraseReserved when
``--allow-sanitize`` is combined with a multipath URL, so the main run goes
without it and the Sanitize run without a second URL, under a timeout).

CUnit counts a skipped test as passed, so the skip messages are counted
separately. The test fails when any test fails, when a supplementary run
skips anything (the Sanitize run: anything but SANITIZE OVERWRITE, which is
not offered), or when the main run skips a test that
``iscsi_compliance_known.txt`` does not list (each entry says why it is
skipped). For reference, tgt 1.0.85 runs the same 615 tests with 17
failures and 205 skip messages.

A full run takes about 90 seconds here.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mobinux.scsi import LogicalUnit, ScsiTarget
from mobinux.storage.file import FileDevice
from tests.interop.iscsi_helpers import Export, file_export, iscsi_service

pytestmark = [
    pytest.mark.interop,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("iscsi-test-cu") is None, reason="libiscsi-bin is not installed"),
]

KNOWN_FILE = Path(__file__).with_name("iscsi_compliance_known.txt")
TGT_SKIP_MESSAGES = 205  # tgt 1.0.85 on the same suite, for comparison
# SANITIZE OVERWRITE is not offered (REPORT SUPPORTED OPERATION CODES says so);
# Sanitize.Overwrite, Readonly, Reservations and Reset print this and go on.
OVERWRITE_SKIP = "[SKIPPED] SANITIZE OVERWRITE is not implemented"
MiB = 1024 * 1024


@dataclasses.dataclass
class CuResult:
    """What one iscsi-test-cu run reported."""

    total: int = 0
    failed_count: int = 0
    results: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # "Suite.Test" -> outcomes
    skips: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    @property
    def failed(self) -> list[str]:
        return sorted(name for name, outcomes in self.results.items() if outcomes != {"passed"})

    @property
    def skip_messages(self) -> int:
        return sum(self.skips.values())


_BLOCK = re.compile(r"^(Suite: .*|  Test: .*? \.\.\.)", re.M)
# CUnit's own verdict; the tests' log lines say "[FAILED]" with brackets.
_VERDICT = re.compile(r"(?<!\[)\b(passed|FAILED)\b(?!\])")
_SUMMARY = re.compile(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\d+", re.M)


def parse_cunit(text: str) -> CuResult:
    """Per-test outcome and skip messages from CUnit's verbose output.

    A suite appears once per test family that contains it (ALL, SCSI, iSCSI,
    LINUX), so a test may run several times; its outcomes are collected.
    """
    result = CuResult()
    suite = ""
    current: str | None = None
    for piece in _BLOCK.split(text):
        if piece.startswith("Suite: "):
            suite, current = piece[7:].strip(), None
        elif piece.startswith("  Test: "):
            current = f"{suite}.{piece[8:-4]}"
        elif current is not None:
            verdict = _VERDICT.search(piece)
            body = piece[: verdict.start()] if verdict else piece
            result.results.setdefault(current, set()).add(verdict.group(1) if verdict else "unfinished")
            result.skips[current] += body.count("[SKIPPED]")
            current = None
    summary = _SUMMARY.search(text)
    if summary:
        result.total = int(summary.group(2))
        result.failed_count = int(summary.group(4))
    return result


def load_known(path: Path = KNOWN_FILE) -> dict[str, str]:
    """``Suite.Test`` -> the reason it may be skipped."""
    known: dict[str, str] = {}
    for line in path.read_text().splitlines():
        entry, _, why = line.partition("#")
        name = entry.strip()
        if name:
            assert why.strip(), f"{path.name}: {name} needs a comment saying why"
            known[name] = why.strip()
    return known


def run_suite(url: str, *extra: str, log: Path, timeout: float = 900) -> CuResult:
    with log.open("w") as out:
        proc = subprocess.run(
            ["iscsi-test-cu", "-d", *extra, url],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout,
        )  # fmt: skip
    text = log.read_text(errors="replace")
    assert "Run Summary" in text, f"iscsi-test-cu exited {proc.returncode} without a summary:\n{text[-3000:]}"
    return parse_cunit(text)


def lun(path: Path, **options: bool) -> ScsiTarget:
    return ScsiTarget({0: LogicalUnit(FileDevice(path), device_id=path.name, **options)})


def test_parse_cunit_output() -> None:
    sample = (
        "Suite: Read10\n  Test: Simple ...passed\n  Test: Beyond ...    [FAILED] READ10 x\nFAILED\n"
        "    1. a.c:3 - CU_ASSERT\nSuite: ExtendedCopy\n  Test: Simple ...    [SKIPPED] no\n"
        "    [SKIPPED] no\npassed\nSuite: Read10\n  Test: Simple ...passed    [SKIPPED] teardown\n"
        "Run Summary:    Type  Total    Ran Passed Failed Inactive\n"
        "              suites      3      3    n/a      0        0\n"
        "               tests      4      4      3      1        0\n"
    )
    result = parse_cunit(sample)
    assert result.total == 4 and result.failed_count == 1
    assert result.failed == ["Read10.Beyond"]
    assert result.skips == {"ExtendedCopy.Simple": 2, "Read10.Simple": 0, "Read10.Beyond": 0}
    assert result.results["Read10.Simple"] == {"passed"}


def test_known_list_is_well_formed() -> None:
    known = load_known()
    assert all(re.fullmatch(r"[A-Za-z0-9]+\.[A-Za-z0-9]+", name) for name in known)


def test_iscsi_test_cu_compliance(tmp_path: Path) -> None:
    main = file_export(tmp_path, size=128 * MiB)
    removable_path = tmp_path / "removable.img"
    readonly_path = tmp_path / "readonly.img"
    sanitize_path = tmp_path / "sanitize.img"
    for path in (removable_path, readonly_path, sanitize_path):
        with path.open("wb") as f:
            f.truncate(64 * MiB)
    removable = Export(
        dataclasses.replace(main.entry, iqn="iqn.2024-01.org.mobinux.test:removable"),
        lun(removable_path, removable=True),
        [removable_path],
    )
    readonly = Export(
        dataclasses.replace(main.entry, iqn="iqn.2024-01.org.mobinux.test:readonly"),
        lun(readonly_path, readonly=True),
        [readonly_path],
    )
    sanitize = Export(
        dataclasses.replace(main.entry, iqn="iqn.2024-01.org.mobinux.test:sanitize"),
        lun(sanitize_path),
        [sanitize_path],
    )
    with iscsi_service([main, removable, readonly, sanitize]) as srv:
        url = srv.url()
        # The same URL twice: the MultipathIO tests get a second session to the LUN.
        result = run_suite(url, url, log=tmp_path / "main.log")
        extra = {
            "removable": [
                run_suite(srv.url(removable.entry.iqn), "-t", f"ALL.{suite}", log=tmp_path / f"{suite}.log")
                for suite in ("PreventAllow", "StartStopUnit")
            ],
            "read-only": [run_suite(srv.url(readonly.entry.iqn), "-t", "ALL.ReadOnly", log=tmp_path / "ro.log")],
        }
        # One URL only: never --allow-sanitize with a multipath URL (see the module docstring).
        sanitize_log = tmp_path / "sanitize.log"
        sanitized = run_suite(
            srv.url(sanitize.entry.iqn), "--allow-sanitize", "-t", "ALL.Sanitize", log=sanitize_log, timeout=120
        )

    known = load_known()
    skipped = {name for name, count in result.skips.items() if count}
    report = (
        f"main run: {result.total} tests, {result.failed_count} failed, "
        f"{result.skip_messages} skip messages in {len(skipped)} tests (tgt 1.0.85: 615/17/205); "
        f"log in {tmp_path / 'main.log'}"
    )
    print(report)
    assert result.total >= 600, report
    assert result.failed == [] and result.failed_count == 0, f"{report}\nfailed: {result.failed}"
    assert skipped <= set(known), f"{report}\nnew skips: {sorted(skipped - set(known))}"
    assert result.skip_messages < TGT_SKIP_MESSAGES, report
    for what, runs in extra.items():
        for run in runs:
            assert run.total > 0 and run.failed == [] and run.failed_count == 0, (what, run.failed)
            assert run.skip_messages == 0, (what, dict(run.skips))
    sanitize_text = sanitize_log.read_text(errors="replace")
    print(
        f"sanitize run: {sanitized.total} tests, {sanitized.failed_count} failed, "
        f"{sanitized.skip_messages} skip messages ({OVERWRITE_SKIP!r})"
    )
    assert sanitized.total == 11 and sanitized.failed == [] and sanitized.failed_count == 0, sanitized.failed
    assert sanitize_text.count("[SKIPPED]") == sanitize_text.count(OVERWRITE_SKIP), dict(sanitized.skips)
    for name in ("BlockErase", "BlockEraseReserved", "CryptoErase", "CryptoEraseReserved", "ExitFailureMode"):
        assert sanitized.results[f"Sanitize.{name}"] == {"passed"} and not sanitized.skips[f"Sanitize.{name}"]
