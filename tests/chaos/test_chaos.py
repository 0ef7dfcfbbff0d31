"""The pipeline as an operator runs it (every stage replica its own process, real Kafka, Dovecot, SMTP)
under seeded faults: no message is lost, misrouted or duplicated beyond the post-DATA window, and no stage
crashes on its own. The short run is part of the default test run; the long ones are `slow`.

Each run prints its seed, its fault schedule and its table; rerun one with `python -m tests.chaos --seed N`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from services.demo.dovecot import dovecot_binary
from tests.chaos.harness import Options, run
from tests.chaos.report import Report, failures, table
from tests.support.parts import missing_part

pytestmark = pytest.mark.integration

SEEDS = (11, 12, 13, 14, 15)


def _needs_real_parts() -> None:
    missing = [
        name for name, found in (("dovecot", dovecot_binary()), ("java", shutil.which("java"))) if not found
    ]
    if missing:
        missing_part(f"the chaos suite needs {' and '.join(missing)} (see tests/run.sh)")


def _run(options: Options, tmp_path: Path) -> Report:
    _needs_real_parts()
    report = run(options)
    (tmp_path / "chaos.json").write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    return report


@pytest.mark.timeout(600)
def test_short_fault_run_loses_nothing_and_nothing_crashes(tmp_path: Path) -> None:
    seed = int(os.environ.get("POPBRIDGE_CHAOS_SEED", "1"))  # the run prints its seed and its faults
    report = _run(Options(seed=seed, messages=100, duration=45, short=True, settle=90), tmp_path)

    totals = report["totals"]
    assert (totals["lost"], totals["stuck"], totals["on-pop3"]) == (0, 0, 0), report["not_final"]
    assert report["misrouted"] == []
    assert [c["process"] for c in report["self_crashes"]] == [], [
        c["log_tail"] for c in report["self_crashes"]
    ]
    assert report["duplicates"]["unexplained"] == 0, report["duplicates"]["list"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", SEEDS)
def test_long_fault_run_meets_every_target(seed: int, tmp_path: Path) -> None:
    report = _run(Options(seed=seed, messages=1000, duration=300, settle=300), tmp_path)

    assert failures(report) == []


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("cold_start", [False, True], ids=["no-faults", "cold-start"])
def test_runs_without_faults_meet_every_target(cold_start: bool, tmp_path: Path) -> None:
    report = _run(
        Options(seed=21, messages=1000, duration=120, faults=False, cold_start=cold_start, settle=300),
        tmp_path,
    )

    assert failures(report) == []
