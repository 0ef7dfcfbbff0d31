"""services/single/run.py: the `popbridge run` command's errors and summary."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest

from services.cli import main
from services.fetcher.service import PassResult
from services.runtime.embedded import EmbeddedLogError
from services.single.run import RunSummary, log_error_in


def test_a_missing_config_file_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = logging.getLogger()  # the CLI sets logging up on this test's captured stderr: undo it after
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--config", str(tmp_path / "nope.toml")])
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("popbridge: config error: ")
    assert "nope.toml" in line


def test_a_log_error_is_found_inside_a_task_group_failure() -> None:
    problem = EmbeddedLogError("disk full", retriable=True)
    nested = ExceptionGroup("stages", [ValueError("x"), ExceptionGroup("inner", [problem])])
    assert log_error_in(nested) is problem
    assert log_error_in(ExceptionGroup("stages", [ValueError("x")])) is None


def test_the_summary_names_each_stage() -> None:
    lines = RunSummary().lines()
    assert lines[0].startswith("route: 0 routed")
    assert lines[1].startswith("deliver: 0 delivered")


def test_the_summary_says_what_each_mailbox_left_and_that_a_signal_stopped_the_run() -> None:
    summary = RunSummary(fetched=[PassResult("box", published=2, deleted=2, too_big=1, skipped=1)])
    assert summary.lines()[0] == "fetch box: published=2 deleted=2 too_big=1 skipped=1 ok"
    summary.stopped_by = signal.SIGTERM
    assert summary.lines()[0].startswith("stopped by SIGTERM: the fetch pass was abandoned")
