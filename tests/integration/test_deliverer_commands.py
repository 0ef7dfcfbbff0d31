"""`popbridge deliverer --until-idle` and `popbridge dlq list | show | retry`, as an operator runs them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.cli import cli, deployment_settings
from services.ops.dlq import dlq
from services.runtime.context import CommandContext
from tests.support.deliverer import deployment, publish, routed_event
from tests.support.mail_config import delivery_to, mailbox, write_mail_config
from tests.support.smtp import SmtpSink

pytestmark = pytest.mark.integration


def _environ(kafka_bootstrap: str, prefix: str) -> dict[str, str]:
    return {
        "POPBRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "POPBRIDGE_TOPIC_PREFIX": prefix,
        "POPBRIDGE_GROUP_PREFIX": prefix + "g",
        "SMTP_SECRET": "unused-secret",
    }


MAILBOX = mailbox("alice", "127.0.0.1", 110, "alice")


def _config(tmp_path: Path, port: int) -> Path:
    return write_mail_config(tmp_path / "mail.toml", delivery=delivery_to(port, timeout=2.0),
                             mailboxes=[MAILBOX])


def test_deliverer_until_idle_then_dlq_list_show_and_retry(
    kafka_bootstrap: str, kafka_topic_prefix: str, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    environ = _environ(kafka_bootstrap, kafka_topic_prefix)
    settings, log = asyncio.run(deployment(kafka_bootstrap, kafka_topic_prefix))
    event = routed_event(recipients=("alice@example.com", "gone@example.com"))
    asyncio.run(publish(log, settings, event))
    smtp_sink.rcpt_reply = {"gone@example.com": "550 5.1.1 no such user"}.get
    runner = CliRunner()

    run = runner.invoke(
        cli,
        ["deliverer", "--config", str(_config(tmp_path, smtp_sink.port)), "--until-idle"],
        env=environ,
        catch_exceptions=False,
    )
    assert run.exit_code == 0, run.output
    assert "1 delivered, 0 deferred, 1 failed" in run.output

    obj = CommandContext(settings=deployment_settings(environ), environ=environ)
    listed = runner.invoke(dlq, ["list"], obj=obj, catch_exceptions=False)
    assert listed.exit_code == 0
    assert event.fetch_id[:12] in listed.output
    assert "gone@example.com" in listed.output
    assert "550 5.1.1 no such user" in listed.output

    shown = runner.invoke(dlq, ["show", event.fetch_id[:8]], obj=obj, catch_exceptions=False)
    assert "reason:        rejected by the server" in shown.output
    assert "Subject:       hello" in shown.output

    smtp_sink.rcpt_reply = lambda _: None  # the operator created the mailbox
    retried = runner.invoke(
        dlq, ["retry", event.fetch_id[:8], "--recipient", "gone@example.com"], obj=obj, catch_exceptions=False
    )
    assert "1 copies queued for retry" in retried.output
    again = runner.invoke(
        cli,
        ["deliverer", "--config", str(_config(tmp_path, smtp_sink.port)), "--until-idle"],
        env=environ,
        catch_exceptions=False,
    )
    assert "1 delivered" in again.output
    assert [m.rcpt_tos for m in smtp_sink.messages] == [("alice@example.com",), ("gone@example.com",)]
    assert "open" not in runner.invoke(dlq, ["list", "--all"], obj=obj).output
    assert runner.invoke(dlq, ["list"], obj=obj).output == ""


def test_a_missing_password_variable_is_a_config_error_naming_it(tmp_path: Path) -> None:
    config = write_mail_config(
        tmp_path / "mail.toml", mailboxes=[MAILBOX],
        delivery={"host": "127.0.0.1", "username": "relay", "password_env": "NOT_SET_ANYWHERE"},
    )  # fmt: skip
    result = CliRunner().invoke(
        cli,
        ["deliverer", "--config", str(config), "--until-idle"],
        env={"POPBRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, Exception)
    assert "NOT_SET_ANYWHERE" in str(result.exception)


def test_a_deliverer_started_without_its_topics_exits_with_one_line_naming_them(
    kafka_bootstrap: str, kafka_topic_prefix: str, tmp_path: Path
) -> None:
    # A deployment mistake (`topics create` not run) ends the stage with one line; before saying so it
    # asks the broker again for a few seconds (a broker that has just restarted may not list them yet).
    result = CliRunner().invoke(
        cli, ["deliverer", "--config", str(_config(tmp_path, 25)), "--until-idle"],
        env=_environ(kafka_bootstrap, kafka_topic_prefix),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert f"missing topics {kafka_topic_prefix}" in result.output
    assert "run `popbridge topics create`" in result.output
    assert "Traceback" not in result.output
