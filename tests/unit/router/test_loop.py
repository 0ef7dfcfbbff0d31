"""services/router/loop.py: the plain router loop on the embedded log, its dedupe table kept in the log."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas import codec
from schemas.events import MailFetched, RecipientsResolved
from schemas.topics import FETCHED, PLAIN_ROUTER_TOPICS, ROUTED, ROUTER_SEEN_COPIES, TOPICS
from services.router.dedupe import apply_dedupe, encode_seen
from services.router.loop import RouterLoop, SeenTable, load_table, route_record
from services.runtime.embedded import EmbeddedLog
from services.runtime.idle import is_idle
from services.runtime.log import Outgoing, Record
from services.runtime.settings import DeploymentSettings, Mailbox, MailConfig, RoutingRules, SmtpTarget

T = datetime(2026, 11, 27, 8, tzinfo=UTC)
RULES = RoutingRules(
    primary_domain="example.com",
    local_domains=("example.com",),
    postmaster="postmaster@example.com",
    users=("alice", "bob", "postmaster"),
    aliases={"sales": ("alice@example.com", "bob@example.com")},
    trusted_received_hosts=("mx.isp.example.net",),
)
CONFIG = MailConfig(
    delivery=SmtpTarget(host="127.0.0.1"),
    mailboxes=(Mailbox(id="catchall", host="pop", username="c", password_env="P", routing=RULES),),
)
SETTINGS = DeploymentSettings(topic_prefix="t.")


def copy_of(rcpt: str, message_id: str = "<m1@sender.example>") -> bytes:
    return (
        f"Delivered-To: {rcpt}@example.com\r\n"
        "Received: from out.sender.example by mx.isp.example.net with ESMTPS id 1;\r\n"
        "\tFri, 27 Nov 2026 08:00:00 +0000\r\n"
        f"Message-ID: {message_id}\r\nTo: someone@outside.example\r\nSubject: hi\r\n\r\nbody\r\n"
    ).encode()


def fetched(fetch_id: str, raw: bytes) -> MailFetched:
    return MailFetched(fetch_id=fetch_id, mailbox_id="catchall", pop3_host="pop", uidl=fetch_id,
                       size=len(raw), sha256="", fetched_at=T, raw=raw)


def record(value: bytes, offset: int = 0) -> Record:
    return Record("t." + FETCHED, 0, offset, b"k", value, 0)


def recipients(event: RecipientsResolved) -> list[str]:
    return [r.address for r in event.recipients]


def test_a_second_copy_routes_only_recipients_the_first_did_not_get() -> None:
    table: SeenTable = {}
    first = route_record(record(codec.encode(fetched("f1", copy_of("sales")))), CONFIG, table, T)
    second = route_record(record(codec.encode(fetched("f2", copy_of("alice")))), CONFIG, table, T)
    assert first is not None
    assert second is not None
    assert recipients(first.event) == ["alice@example.com", "bob@example.com"]
    assert recipients(second.event) == []
    assert [r.address for r in second.event.suppressed] == ["alice@example.com"]
    assert second.seen is not None
    assert second.seen[0] == b"m1@sender.example"


def test_routing_the_same_copy_again_emits_it_again() -> None:
    table: SeenTable = {}
    value = codec.encode(fetched("f1", copy_of("alice")))
    route_record(record(value), CONFIG, table, T)
    again = route_record(record(value), CONFIG, table, T)
    assert again is not None
    assert recipients(again.event) == ["alice@example.com"]


def test_a_record_that_is_not_an_event_is_skipped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert route_record(record(b"\x00garbage", offset=7), CONFIG, {}, T) is None
    assert "t.popbridge.mail.fetched[0]@7 skipped" in caplog.text


def test_a_message_the_core_fails_on_goes_to_the_postmaster(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> RecipientsResolved:
        raise RuntimeError("bug")

    monkeypatch.setattr("services.router.loop.route_fetched", broken)
    with caplog.at_level(logging.ERROR):
        routed = route_record(record(codec.encode(fetched("f9", copy_of("alice")))), CONFIG, {}, T)
    assert routed is not None
    assert routed.failed
    assert recipients(routed.event) == ["postmaster@example.com"]
    assert "fetch_id=f9" in caplog.text


def test_the_table_keeps_the_latest_value_per_key_and_forgets_old_entries() -> None:
    _, old = apply_dedupe(route_record_event("f1", "alice"), {}, T - timedelta(days=30))
    _, fresh = apply_dedupe(route_record_event("f2", "bob"), {}, T)
    values = [(b"a", encode_seen(fresh)), (b"a", encode_seen(old)), (b"b", encode_seen(fresh)), (None, b"x"),
              (b"c", b"not msgpack")]
    table = load_table(values, T, timedelta(days=7))
    assert set(table) == {b"b"}


def route_record_event(fetch_id: str, rcpt: str) -> RecipientsResolved:
    routed = route_record(record(codec.encode(fetched(fetch_id, copy_of(rcpt)))), CONFIG, {}, T)
    assert routed is not None
    return routed.event


async def publish(log: EmbeddedLog, *events: MailFetched) -> None:
    async with log.producer() as producer:
        await producer.send_all(
            [Outgoing("t." + FETCHED, codec.encode(e), e.fetch_id.encode()) for e in events]
        )


async def routed_events(log: EmbeddedLog) -> list[RecipientsResolved]:
    return [codec.decode(r.value, RecipientsResolved) async for r in log.scan("t." + ROUTED)]


async def new_log(path: Path) -> EmbeddedLog:
    log = EmbeddedLog(path)
    specs = [s for s in (*TOPICS, *PLAIN_ROUTER_TOPICS) if s.name in (FETCHED, ROUTED, ROUTER_SEEN_COPIES)]
    await log.ensure_topics([type(s)("t." + s.name, s.partitions, dict(s.config)) for s in specs])
    return log


async def test_the_loop_routes_until_idle_and_a_restart_remembers_the_copies_routed(tmp_path: Path) -> None:
    log = await new_log(tmp_path)
    await publish(log, fetched("f1", copy_of("sales")), fetched("f2", copy_of("other", "<m2@x>")))

    first = await RouterLoop(log, SETTINGS, CONFIG, clock=lambda: T, poll_seconds=0.05).run(until_idle=True)
    await publish(log, fetched("f3", copy_of("bob")))  # a later copy of m1, after a restart
    second = await RouterLoop(log, SETTINGS, CONFIG, clock=lambda: T, poll_seconds=0.05).run(until_idle=True)

    assert (first.routed, second.routed, second.suppressed) == (2, 1, 1)
    by_fetch = {e.fetch_id: e for e in await routed_events(log)}
    assert recipients(by_fetch["f1"]) == ["alice@example.com", "bob@example.com"]
    assert recipients(by_fetch["f2"]) == ["postmaster@example.com"]
    assert recipients(by_fetch["f3"]) == []
    topic = "t." + FETCHED
    assert is_idle(await log.end_offsets(topic), await log.committed("popbridge-router", topic))


async def test_a_bad_record_does_not_stop_the_loop(tmp_path: Path) -> None:
    log = await new_log(tmp_path)
    async with log.producer() as producer:
        await producer.send(Outgoing("t." + FETCHED, b"garbage", b"f0"))
    await publish(log, fetched("f1", copy_of("alice")))

    counts = await RouterLoop(log, SETTINGS, CONFIG, clock=lambda: T, poll_seconds=0.05).run(until_idle=True)

    assert (counts.routed, counts.skipped) == (1, 1)
    assert [recipients(e) for e in await routed_events(log)] == [["alice@example.com"]]
