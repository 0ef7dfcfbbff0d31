"""Journeys: a dead-lettered copy is reported to the postmaster once, and a failed notice only logged.

The routed events sit on the embedded log (no broker needed); the copies and notices go to a real
aiosmtpd sink over loopback.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from schemas.events import DeliveryDeadLettered
from schemas.topics import DEAD_LETTERS, TOPICS
from services.deliverer.service import Counts, Deliverer
from services.deliverer.smtp import SmtpTransport
from services.runtime.embedded import EmbeddedLog
from services.runtime.settings import DeploymentSettings
from tests.support.deliverer import FakeClock, publish, read_events, routed_event, smtp_target
from tests.support.smtp import SmtpSink

pytestmark = pytest.mark.integration

POSTMASTER = "postmaster@example.com"
REFUSALS = {"gone@example.com": "550 5.1.1 no such user"}


async def deliver(tmp_path: Path, sink: SmtpSink, postmaster: str | None) -> tuple[Counts, EmbeddedLog]:
    log, settings = EmbeddedLog(tmp_path), DeploymentSettings()
    await log.ensure_topics(TOPICS)
    await publish(log, settings, routed_event(recipients=("alice@example.com", "gone@example.com")))
    async with SmtpTransport(smtp_target(sink.port)) as transport:
        stage = Deliverer(log, settings, transport, clock=FakeClock(), poll_seconds=0.2,
                          postmaster=postmaster)
        return await stage.run(until_idle=True), log


async def test_a_dead_letter_is_reported_to_the_postmaster_never_to_the_sender(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    smtp_sink.rcpt_reply = REFUSALS.get

    counts, log = await deliver(tmp_path, smtp_sink, POSTMASTER)

    assert (counts.delivered, counts.failed) == (1, 1)
    copy, notice = smtp_sink.wait_for(2)
    assert copy.rcpt_tos == ("alice@example.com",)
    assert (notice.mail_from, notice.rcpt_tos) == ("<>", (POSTMASTER,))  # null sender: nothing answers it
    assert b"Recipient:     gone@example.com" in notice.content
    assert b"Server reply:  550 5.1.1 no such user" in notice.content
    assert b"popbridge dlq retry " in notice.content
    assert all(m.rcpt_tos != ("bob@remote.example",) for m in smtp_sink.messages)
    assert len(await read_events(log, DeploymentSettings(), DEAD_LETTERS, DeliveryDeadLettered)) == 1


async def test_a_notice_that_fails_is_logged_and_not_dead_lettered(
    tmp_path: Path, smtp_sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    smtp_sink.rcpt_reply = {**REFUSALS, POSTMASTER: "550 5.1.1 no postmaster here"}.get
    caplog.set_level(logging.INFO, logger="services.deliverer.service")

    counts, log = await deliver(tmp_path, smtp_sink, POSTMASTER)

    assert (counts.delivered, counts.failed) == (1, 1)
    [dead] = await read_events(log, DeploymentSettings(), DEAD_LETTERS, DeliveryDeadLettered)
    assert dead.recipient == "gone@example.com"
    assert [r.address for r in smtp_sink.refused_recipients] == ["gone@example.com", POSTMASTER]
    assert any("notice" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


async def test_without_notify_postmaster_no_notice_is_sent(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    smtp_sink.rcpt_reply = REFUSALS.get

    counts, _ = await deliver(tmp_path, smtp_sink, None)

    assert counts.failed == 1
    assert [m.rcpt_tos for m in smtp_sink.messages] == [("alice@example.com",)]
