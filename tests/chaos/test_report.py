"""The chaos run's verdict: which findings fail a run (issue 13's "done when")."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.report import Report, failures


def clean(**changes: Any) -> Report:
    report: Report = {
        "totals": {"delivered": 10, "dead-lettered": 1, "retrying": 0, "stuck": 0, "on-pop3": 0, "lost": 0},
        "misrouted": [],
        "duplicates": {"unexplained": 0},
        "self_crashes": [],
        "broker": {"recovery_seconds": 4.0, "max_log_lines_per_minute": 3.0},
    }
    report.update(changes)
    return report


def test_a_clean_run_has_no_failures() -> None:
    assert failures(clean()) == []
    assert failures(clean(broker={})) == []  # a run without a broker stop


@pytest.mark.parametrize(
    ("changes", "finding"),
    [
        ({"totals": {"lost": 2, "stuck": 0, "retrying": 0, "on-pop3": 0}}, "2 pairs lost"),
        ({"totals": {"lost": 0, "stuck": 3, "retrying": 0, "on-pop3": 0}}, "3 pairs stuck"),
        ({"misrouted": [{}]}, "1 misrouted copies"),
        ({"duplicates": {"unexplained": 4}}, "4 unexplained duplicate pairs"),
        ({"self_crashes": [{"process": "router-1"}, {"process": "router-1"}]}, "2 self-crashes: router-1"),
        (
            {"broker": {"recovery_seconds": 61.0, "max_log_lines_per_minute": 3.0}},
            "recovery after the broker",
        ),
        (
            {"broker": {"recovery_seconds": None, "max_log_lines_per_minute": 3.0}},
            "recovery after the broker",
        ),
        ({"broker": {"recovery_seconds": 2.0, "max_log_lines_per_minute": 3000.0}}, "3000.0 log lines/min"),
    ],
)
def test_each_finding_fails_the_run(changes: dict[str, Any], finding: str) -> None:
    (found,) = failures(clean(**changes))

    assert finding in found
