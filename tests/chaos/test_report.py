"""The chaos run's verdict: which findings fail a run (issue 13's "done when")."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.accounting import Copy
from tests.chaos.harness import Timeline
from tests.chaos.report import Report, broker_figures, failures


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


def test_log_lines_in_the_outage_count_from_the_broker_exit_not_from_the_stop_command() -> None:
    # The stop command at 90; the broker served (and the deliverer logged its deliveries) until its
    # process exited at 100; it accepted connections again at 130.
    timeline = Timeline(
        broker_stopped_at=90.0, broker_exited_at=100.0, broker_ready_at=130.0,
        lines_at_exit={"router-1.0.log": 40, "deliverer-1.0.log": 75, "smtp.0.log": 9},
        lines_at_ready={"router-1.0.log": 41, "router-1.1.log": 1, "deliverer-1.0.log": 75, "smtp.0.log": 90},
    )  # fmt: skip
    first_after = Copy(token="t1", recipient="a@example.com", session="s1", at=133.5)

    figures = broker_figures(timeline, [first_after])

    # Per replica (all its incarnations), per minute of the 30 s outage; the SMTP server is not a stage.
    assert figures["log_lines_per_minute_during_outage"] == {"deliverer-1": 0.0, "router-1": 4.0}
    assert figures["max_log_lines_per_minute"] == 4.0
    assert (figures["outage_seconds"], figures["recovery_seconds"]) == (30.0, 3.5)
