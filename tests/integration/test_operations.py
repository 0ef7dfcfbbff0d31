"""The operator's tools on the real broker: lag, replay (dry run, execute, refusal, window copy, shadow),
trace, and the health and metrics endpoints.

Each test has its own topic prefix and group prefix. The CLI runs in a worker thread (it calls
asyncio.run) while the test's own loop keeps, where needed, a consumer alive in the group.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from schemas import codec
from schemas.events import (
    DeliveryAttempted,
    DeliveryDeadLettered,
    Event,
    MailFetched,
    Outcome,
    RecipientsResolved,
)
from schemas.topics import DEAD_LETTERS, DELIVERY_ATTEMPTS, FETCHED, ROUTED, TopicSpec, topic_spec
from services.ops.shadow import shadow_topic
from services.router.stage import route_fetched
from services.runtime.health import LagWatch, ProgressTracker, serve_health
from services.runtime.kafka import KafkaLog
from services.runtime.log import LogConsumer, Outgoing, Record, next_offsets
from services.runtime.metrics import Metrics
from services.runtime.settings import DeploymentSettings, load_config
from tests.support.mail_config import write_mail_config
from tests.support.operator import fetch_id_of, popbridge

pytestmark = pytest.mark.integration

T = datetime(2026, 11, 27, 8, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEADLINE = 60.0


@pytest.fixture
async def deployment(kafka_bootstrap: str, kafka_topic_prefix: str) -> DeploymentSettings:
    """A deployment of its own on the session's broker, with the topics the ops commands read."""
    prefix = kafka_topic_prefix
    settings = DeploymentSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, group_prefix=prefix.removesuffix("-")
    )
    specs = [topic_spec(name) for name in (FETCHED, ROUTED, DELIVERY_ATTEMPTS, DEAD_LETTERS)]
    await kafka(settings).ensure_topics([TopicSpec(prefix + s.name, s.partitions, s.config) for s in specs])
    return settings


def kafka(settings: DeploymentSettings) -> KafkaLog:
    assert settings.kafka_bootstrap
    return KafkaLog(settings.kafka_bootstrap)


async def publish(settings: DeploymentSettings, topic: str, events: Sequence[Event]) -> None:
    """The events on the deployment's `topic`, keyed by fetch id as the stages key them."""
    async with kafka(settings).producer() as producer:
        await producer.send_all(
            [Outgoing(settings.topic(topic), codec.encode(e), key=fetch_id_of(e).encode()) for e in events]
        )


def fetched(fetch_id: str, to: str = "alice@example.com") -> MailFetched:
    raw = f"Message-ID: <{fetch_id}@sender.example>\r\nTo: {to}\r\nSubject: hi\r\n\r\nbody\r\n".encode()
    return MailFetched(
        fetch_id=fetch_id,
        mailbox_id="catchall",
        pop3_host="pop.isp.example",
        uidl=f"u{fetch_id}",
        size=len(raw),
        sha256="",
        fetched_at=T,
        raw=raw,
    )


async def read(consumer: LogConsumer, count: int) -> list[Record]:
    records: list[Record] = []
    give_up = time.monotonic() + DEADLINE
    while len(records) < count and time.monotonic() < give_up:
        records += await consumer.fetch(1.0)
    return records


async def consume_and_commit(settings: DeploymentSettings, group: str, count: int) -> None:
    """A plain group consumer reads the fetched topic and commits exactly `count` records."""
    async with kafka(settings).consumer(group, [settings.topic(FETCHED)]) as consumer:
        records = await read(consumer, count)
        await consumer.commit(next_offsets(records[:count]))


async def scan(settings: DeploymentSettings, topic: str) -> list[Record]:
    return [r async for r in kafka(settings).scan(settings.topic(topic))]


def iso(ms: int) -> str:
    return (EPOCH + timedelta(milliseconds=ms)).isoformat()


# --- lag -------------------------------------------------------------------------------------------


async def test_lag_is_what_was_produced_minus_what_the_group_committed(
    deployment: DeploymentSettings,
) -> None:
    await publish(deployment, FETCHED, [fetched(f"f{i}") for i in range(20)])
    await consume_and_commit(deployment, deployment.group("router"), 8)

    result = await popbridge(deployment, "lag", "--json", "--stage", "router", "--stage", "deliverer")
    assert result.exit_code == 0, result.output
    stages = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    assert stages["router"]["total_lag"] == 12
    fetched_rows = [p for p in stages["router"]["partitions"] if p["topic"] == deployment.topic(FETCHED)]
    assert sum(p["end"] for p in fetched_rows) == 20
    assert sum(p["committed"] or 0 for p in fetched_rows) == 8
    assert all(p["oldest_age_seconds"] is not None for p in fetched_rows if p["lag"])
    assert stages["router"]["missing_topics"] == [f"{deployment.group('router')}-by-message-id"]
    assert stages["deliverer"]["total_lag"] == 0

    over = await popbridge(deployment, "lag", "--stage", "router", "--max-lag", "11")
    assert over.exit_code == 1
    assert "THRESHOLD EXCEEDED: router: lag 12 > 11" in over.stdout
    within = await popbridge(deployment, "lag", "--stage", "router", "--max-lag", "12", "--max-age", "3600")
    assert within.exit_code == 0, within.output
    critical = await popbridge(deployment, "lag", "--stage", "router", "--max-lag", "1",
                               "--critical-lag", "11")
    assert critical.exit_code == 2
    assert "CRITICAL: router: lag 12 > 11" in critical.stdout


# --- replay ----------------------------------------------------------------------------------------


async def two_batches(settings: DeploymentSettings) -> tuple[int, dict[int, int]]:
    """10 fetched records, then 10 more; returns the broker time of the second batch's first record and,
    per partition, the first offset at or after it (what a replay from then must commit)."""
    await publish(settings, FETCHED, [fetched(f"a{i}") for i in range(10)])
    first = {(r.partition, r.offset) for r in await scan(settings, FETCHED)}
    await publish(settings, FETCHED, [fetched(f"b{i}") for i in range(10)])
    records = await scan(settings, FETCHED)
    since = min(r.timestamp_ms for r in records if (r.partition, r.offset) not in first)
    ends = await kafka(settings).end_offsets(settings.topic(FETCHED))
    expected = {
        p: min((r.offset for r in records if r.partition == p and r.timestamp_ms >= since), default=end)
        for p, end in ends.items()
    }
    return since, expected


async def test_a_dry_run_changes_nothing_and_execute_moves_the_group_to_the_time(
    deployment: DeploymentSettings,
) -> None:
    since, expected = await two_batches(deployment)
    group = deployment.group("router")
    await consume_and_commit(deployment, group, 20)
    before = await kafka(deployment).committed(group, deployment.topic(FETCHED))
    assert sum(before.values()) == 20

    dry = await popbridge(deployment, "replay", "router", "--from", iso(since))
    assert dry.exit_code == 0, dry.output
    assert "dry run: nothing changed" in dry.stdout
    assert f"{sum(before.values()) - sum(expected.values())} record(s) to read again" in dry.stdout
    assert await kafka(deployment).committed(group, deployment.topic(FETCHED)) == before

    done = await popbridge(deployment, "replay", "router", "--from", iso(since), "--execute")
    assert done.exit_code == 0, done.output
    assert f"applied: group {group} on {deployment.topic(FETCHED)} now at" in done.stdout
    after = await kafka(deployment).committed(group, deployment.topic(FETCHED))
    assert after == expected
    assert sum(after.values()) < sum(before.values())


async def test_a_replay_is_refused_while_the_stage_runs(deployment: DeploymentSettings) -> None:
    group = deployment.group("deliverer")
    async with kafka(deployment).consumer(group, [deployment.topic(ROUTED)]) as consumer:
        give_up = time.monotonic() + DEADLINE
        while not consumer.consumer.assignment() and time.monotonic() < give_up:
            await consumer.fetch(0.2)  # until it joined the group: a live member
        dry = await popbridge(deployment, "replay", "deliverer", "--from", "2026-01-01")
        refused = await popbridge(deployment, "replay", "deliverer", "--from", "2026-01-01", "--execute")
    assert dry.exit_code == 0
    assert "active member(s): stop the deliverer first" in dry.stdout
    assert refused.exit_code == 1
    assert f"refusing to replay: the group {group!r} has 1 active member(s)" in refused.stderr
    assert await kafka(deployment).committed(group, deployment.topic(ROUTED)) == {}


async def three_batches(settings: DeploymentSettings) -> tuple[int, int]:
    """10 fetched records, 10 more, then 10 more; returns the broker times of the second and the third
    batch's first records: the window [since, until) is the second batch."""
    starts = []
    for batch in "abc":
        seen = {(r.partition, r.offset) for r in await scan(settings, FETCHED)}
        await publish(settings, FETCHED, [fetched(f"{batch}{i}") for i in range(10)])
        records = await scan(settings, FETCHED)
        starts.append(min(r.timestamp_ms for r in records if (r.partition, r.offset) not in seen))
    return starts[1], starts[2]


def keyed(records: Sequence[Record]) -> list[tuple[int, bytes | None, bytes]]:
    return sorted((r.partition, r.key, r.value) for r in records)


async def test_a_window_replay_copies_exactly_the_window_while_the_stage_runs(
    deployment: DeploymentSettings,
) -> None:
    since, until = await three_batches(deployment)
    topic, group = deployment.topic(FETCHED), deployment.group("router")
    window = [r for r in await scan(deployment, FETCHED) if since <= r.timestamp_ms < until]
    assert len(window) == 10
    async with kafka(deployment).consumer(group, [topic]) as consumer:  # the running router
        await consumer.commit(next_offsets(await read(consumer, 30)))
        committed = await kafka(deployment).committed(group, topic)
        ends = await kafka(deployment).end_offsets(topic)

        dry = await popbridge(deployment, "replay", "router", "--from", iso(since), "--to", iso(until))
        assert dry.exit_code == 0, dry.output
        assert "10 record(s) to copy" in dry.stdout
        assert "dry run: nothing copied" in dry.stdout
        assert await kafka(deployment).end_offsets(topic) == ends

        done = await popbridge(
            deployment, "replay", "router", "--from", iso(since), "--to", iso(until), "--execute"
        )
        assert done.exit_code == 0, done.output
        assert f"copied: 10 record(s) to {topic}" in done.stdout
        reread = await read(consumer, 10)  # the live member gets the copies, and nothing else
        assert keyed(reread) == keyed(window)
        assert await consumer.fetch(1.0) == []
    copies = [r for r in await scan(deployment, FETCHED) if r.offset >= ends[r.partition]]
    assert keyed(copies) == keyed(window)
    assert await kafka(deployment).committed(group, topic) == committed


# --- shadow replay ---------------------------------------------------------------------------------

def config_file(tmp_path: Path, name: str, *users: str) -> Path:
    routing = {"primary_domain": "example.com", "local_domains": ["example.com"],
               "postmaster": "postmaster@example.com", "users": [*users, "postmaster"]}
    catchall = {"id": "catchall", "host": "127.0.0.1", "username": "catchall", "password_env": "UNUSED"}
    return write_mail_config(tmp_path / f"{name}.toml", delivery={"host": "127.0.0.1"}, routing=routing,
                             mailboxes=[catchall])


async def test_a_shadow_replay_lists_exactly_the_messages_the_new_rules_route_elsewhere(
    deployment: DeploymentSettings, tmp_path: Path
) -> None:
    old_rules = load_config(config_file(tmp_path, "old", "alice", "bob", "carol"))
    new_rules = config_file(tmp_path, "new", "alice", "carol")  # bob left: his mail goes to the postmaster
    before = [fetched("old-bob", "bob@example.com")]
    window = [
        fetched("w-alice", "alice@example.com"),
        fetched("w-bob", "bob@example.com"),
        fetched("w-carol", "carol@example.com"),
        fetched("w-bob2", "Bob <bob@example.com>"),
    ]
    await publish(deployment, FETCHED, before)
    first = {(r.partition, r.offset) for r in await scan(deployment, FETCHED)}
    await publish(deployment, FETCHED, window)
    records = await scan(deployment, FETCHED)
    since = min(r.timestamp_ms for r in records if (r.partition, r.offset) not in first)
    await publish(deployment, ROUTED, [route_fetched(m, old_rules, T) for m in before + window])

    result = await popbridge(
        deployment, "replay", "router", "--from", iso(since), "--shadow", "--config", str(new_rules)
    )
    assert result.exit_code == 0, result.output
    changed = sorted(
        line.split()[0]
        for line in result.stdout.splitlines()
        if line.startswith("  w-") or line.startswith("  old-")
    )
    assert changed == ["w-bob", "w-bob2"]
    assert "2 would go to different recipients:" in result.stdout
    assert "    old: bob@example.com (" in result.stdout
    assert "    new: postmaster@example.com (" in result.stdout
    assert "2 unchanged; 0 not routed before" in result.stdout
    shadow = [
        codec.decode(r.value, RecipientsResolved)
        async for r in kafka(deployment).scan(shadow_topic(deployment))
    ]
    assert sorted(e.fetch_id for e in shadow) == sorted(m.fetch_id for m in window)
    assert await kafka(deployment).committed(deployment.group("router"), deployment.topic(FETCHED)) == {}


# --- trace -----------------------------------------------------------------------------------------


async def test_trace_shows_every_stage_of_a_delivered_and_of_a_dead_lettered_message(
    deployment: DeploymentSettings, tmp_path: Path
) -> None:
    rules = load_config(config_file(tmp_path, "rules", "alice", "bob"))
    delivered, dead = fetched("ok1", "alice@example.com"), fetched("dead1", "bob@example.com")
    routed_ok, routed_dead = route_fetched(delivered, rules, T), route_fetched(dead, rules, T)
    await publish(deployment, FETCHED, [delivered, dead, fetched("other", "alice@example.com")])
    await publish(deployment, ROUTED, [routed_ok, routed_dead])
    await publish(
        deployment,
        DELIVERY_ATTEMPTS,
        [
            attempt("ok1", "alice@example.com", 1, "deferred", 451, "mailbox busy"),
            attempt("ok1", "alice@example.com", 2, "delivered", 250, "queued as 4711"),
            attempt("dead1", "bob@example.com", 1, "failed", 550, "no such user"),
        ],
    )
    await publish(
        deployment,
        DEAD_LETTERS,
        [
            DeliveryDeadLettered(
                routed=routed_dead,
                recipient="bob@example.com",
                reason="rejected by the server",
                smtp_code=550,
                smtp_text="no such user",
                attempts=1,
                dead_lettered_at=T + timedelta(minutes=1),
            )
        ],
    )

    text = await popbridge(deployment, "trace", "ok1")
    assert text.exit_code == 0, text.output
    steps = [line.split()[2] for line in text.stdout.splitlines() if line.startswith("  2026-")]
    assert steps == ["fetched", "routed", "attempt", "attempt"]
    assert "mailbox catchall (pop.isp.example) UIDL uok1" in text.stdout
    assert "reason to-cc-fallback, rules " in text.stdout
    assert "to alice@example.com (to-cc-fallback: to-cc-fallback To[1]=alice@example.com)" in text.stdout
    assert "#1 alice@example.com: deferred 451 'mailbox busy'" in text.stdout
    assert "#2 alice@example.com: delivered 250 'queued as 4711'" in text.stdout

    by_message_id = await popbridge(deployment, "trace", "<dead1@sender.example>", "--json")
    assert by_message_id.exit_code == 0, by_message_id.output
    (message,) = json.loads(by_message_id.stdout)["messages"]
    assert message["fetch_id"] == "dead1"
    assert [s["kind"] for s in message["steps"]] == ["fetched", "routed", "attempt", "dead-letter"]
    assert message["steps"][2]["smtp_text"] == "no such user"
    assert message["steps"][3]["reason"] == "rejected by the server"

    missing = await popbridge(deployment, "trace", "no-such-id")
    assert missing.exit_code == 1


def attempt(fetch_id: str, to: str, n: int, outcome: Outcome, code: int, text: str) -> DeliveryAttempted:
    return DeliveryAttempted(
        fetch_id=fetch_id,
        recipient=to,
        outcome=outcome,
        smtp_code=code,
        smtp_text=text,
        attempt=n,
        attempted_at=T + timedelta(seconds=n),
    )


# --- health and metrics ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def get(session: aiohttp.ClientSession, port: int, path: str) -> tuple[int, str]:
    async with session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


def lag_of(metrics_text: str, stage: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("popbridge_consumer_lag{") and f'stage="{stage}"' in line
    )


async def test_metrics_are_scraped_and_move_and_healthz_fails_when_the_stage_stalls(
    deployment: DeploymentSettings,
) -> None:
    await publish(deployment, FETCHED, [fetched(f"f{i}") for i in range(6)])
    clock, metrics = Clock(), Metrics()
    tracker = ProgressTracker(stall_after=300.0, clock=clock)
    watch = LagWatch.of(kafka(deployment), deployment, "router", interval=3600.0)
    async with (
        serve_health(0, tracker, metrics, watch=watch, host="127.0.0.1") as server,
        aiohttp.ClientSession() as session,
    ):
        assert server.port
        await watch.poll_once(tracker, metrics)  # as the background watch does, but awaited here
        status, page = await get(session, server.port, "/metrics")
        assert status == 200
        assert lag_of(page, "router") == 6
        assert await get(session, server.port, "/readyz") == (503, json.dumps(tracker.status()))
        tracker.mark_ready()
        assert (await get(session, server.port, "/readyz"))[0] == 200
        assert (await get(session, server.port, "/healthz"))[0] == 200

        clock.now += 301  # work waits and nothing moved for longer than stall_after
        status, body = await get(session, server.port, "/healthz")
        assert status == 503
        assert json.loads(body)["lag"] == 6

        await consume_and_commit(deployment, deployment.group("router"), 4)  # the stage moves again
        metrics.routed("to")
        await watch.poll_once(tracker, metrics)
        assert (await get(session, server.port, "/healthz"))[0] == 200
        page = (await get(session, server.port, "/metrics"))[1]
        assert lag_of(page, "router") == 2
        assert 'popbridge_messages_routed_total{reason="to"} 1.0' in page
