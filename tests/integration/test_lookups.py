"""`popbridge trace` and `popbridge dlq` answering from one partition and a time window, with `--json`, on
the real broker and on the embedded log (the same commands, the same answers).

Each test has its own deployment: a topic prefix on the session's broker, or an embedded log in a temp
dir. The CLI runs in a worker thread (it calls asyncio.run), as an operator runs it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas import codec
from schemas.events import (
    DeliveryAttempted,
    DeliveryDeadLettered,
    Event,
    MailFetched,
    RecipientDelivered,
    RecipientsResolved,
    RetryScheduled,
    fetch_id_for,
)
from schemas.topics import (
    DEAD_LETTERS,
    DELIVERED,
    DELIVERY_ATTEMPTS,
    FETCHED,
    RETRY_TOPICS,
    ROUTED,
    TOPICS,
    TopicSpec,
)
from services.ops.locate import kafka_partition
from services.runtime.connect import open_log
from services.runtime.embedded.records import partition_for_key
from services.runtime.log import Outgoing, Record
from services.runtime.settings import DeploymentSettings
from services.runtime.stages import router_repartition_topic
from tests.support.operator import fetch_id_of, popbridge

pytestmark = pytest.mark.integration

T = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)


@pytest.fixture(params=["kafka", "embedded"])
async def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> DeploymentSettings:
    """A deployment of its own, with every mail topic and the faust router's by-message-id topic."""
    if request.param == "kafka":
        bootstrap: str = request.getfixturevalue("kafka_bootstrap")
        prefix: str = request.getfixturevalue("kafka_topic_prefix")
        settings = DeploymentSettings(
            kafka_bootstrap=bootstrap, topic_prefix=prefix, group_prefix=prefix.removesuffix("-")
        )
    else:
        settings = DeploymentSettings(data_dir=str(tmp_path / "log"))
    specs = [TopicSpec(settings.topic(s.name), s.partitions, s.config) for s in TOPICS]
    specs.append(TopicSpec(router_repartition_topic(settings), 6, {}))
    await open_log(settings).ensure_topics(specs)
    return settings


async def publish(settings: DeploymentSettings, topic: str, events: Sequence[tuple[bytes, Event]]) -> None:
    async with open_log(settings).producer() as producer:
        await producer.send_all([Outgoing(topic, codec.encode(e), key=key) for key, e in events])


def keyed(*events: Event) -> list[tuple[bytes, Event]]:
    """Each event keyed by its fetch id, as the stages key them."""
    return [(fetch_id_of(e).encode(), e) for e in events]


def fetched(fetch_id: str, message_id: str) -> MailFetched:
    raw = f"Message-ID: <{message_id}>\r\nTo: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n".encode()
    return MailFetched(
        fetch_id=fetch_id,
        mailbox_id="catchall",
        pop3_host="pop.isp.example",
        uidl=f"u-{fetch_id[:6]}",
        size=len(raw),
        sha256="",
        fetched_at=T,
        raw=raw,
    )


def routed(fetch_id: str, message_id: str) -> RecipientsResolved:
    return RecipientsResolved(
        fetch_id=fetch_id,
        mailbox_id="catchall",
        pop3_host="pop.isp.example",
        message_id=message_id,
        envelope_sender=None,
        recipients=(),
        reason="to-cc",
        rules_version="v1",
        routed_at=T + timedelta(seconds=1),
        raw=b"Subject: hi\r\n\r\nbody\r\n",
    )


def attempt(fetch_id: str, n: int) -> DeliveryAttempted:
    return DeliveryAttempted(
        fetch_id=fetch_id,
        recipient="a@example.com",
        outcome="deferred",
        smtp_code=451,
        smtp_text="busy",
        attempt=n,
        attempted_at=T + timedelta(seconds=1 + n),
    )


def dead(fetch_id: str, recipient: str) -> DeliveryDeadLettered:
    return DeliveryDeadLettered(
        routed=routed(fetch_id, f"{fetch_id}@sender.example"),
        recipient=recipient,
        reason="rejected by the server",
        smtp_code=550,
        smtp_text="no such user",
        attempts=2,
        dead_lettered_at=T + timedelta(minutes=1),
    )


def partition_of(settings: DeploymentSettings, key: bytes, partitions: int) -> int:
    return (
        kafka_partition(key, partitions) if settings.kafka_bootstrap else partition_for_key(key, partitions)
    )


# --- trace -----------------------------------------------------------------------------------------


async def test_trace_json_of_a_fetch_id_among_others_reads_its_partition(
    deployment: DeploymentSettings,
) -> None:
    ids = [fetch_id_for("catchall", f"u{i}") for i in range(40)]
    traced = ids[17]
    await publish(deployment, deployment.topic(FETCHED), keyed(*(fetched(f, f"{f}@x") for f in ids)))
    await publish(deployment, deployment.topic(ROUTED), keyed(*(routed(f, f"{f}@x") for f in ids)))
    await publish(
        deployment, deployment.topic(DELIVERY_ATTEMPTS), keyed(*(attempt(f, n) for f in ids for n in (1, 2)))
    )

    result = await popbridge(deployment, "trace", traced, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) == {"query", "since", "until", "messages"}
    assert (document["query"], document["since"], document["until"]) == (traced, None, None)
    (message,) = document["messages"]
    assert message["fetch_id"] == traced
    assert [s["kind"] for s in message["steps"]] == ["fetched", "routed", "attempt", "attempt"]
    assert [s["attempt"] for s in message["steps"][2:]] == [1, 2]
    partitions_of = {deployment.topic(spec.name): spec.partitions for spec in TOPICS}
    for step in message["steps"]:
        assert set(step["stored"]) == {"topic", "partition", "offset", "appended_at_ms"}
        partitions = partitions_of[step["stored"]["topic"]]
        assert step["stored"]["partition"] == partition_of(deployment, traced.encode(), partitions)
        assert step["fetch_id"] == traced
        assert "raw" not in step

    text = await popbridge(deployment, "trace", traced)
    assert f"message {traced} (Message-ID <{traced}@x>)" in text.stdout

    # the window bounds the read: nothing was appended in the future
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert (await popbridge(deployment, "trace", traced, "--since", future)).exit_code == 1
    missing = await popbridge(deployment, "trace", fetch_id_for("catchall", "never"))
    assert missing.exit_code == 1
    assert "nothing found for" in missing.stdout


async def test_trace_shows_a_message_fetched_twice_with_both_fetched_records(
    deployment: DeploymentSettings,
) -> None:
    # A second fetch of one UIDL (its POP3 DELE was lost) gives a second fetched record with the same key;
    # the trace anchors on the newer one and must still show the older.
    others = [fetch_id_for("catchall", f"u{i}") for i in range(12)]
    copies = [*others, "f" * 32, *others, "f" * 32, *others]
    await publish(deployment, deployment.topic(FETCHED), keyed(*(fetched(f, f"{f}@x") for f in copies)))

    found = json.loads((await popbridge(deployment, "trace", "f" * 32, "--json")).stdout)["messages"]
    offsets = [s["stored"]["offset"] for s in found[0]["steps"] if s["kind"] == "fetched"]
    assert len(offsets) == 2
    assert offsets[0] < offsets[1]


async def test_trace_by_message_id_names_every_copy_through_the_by_message_id_topic(
    deployment: DeploymentSettings,
) -> None:
    copies = [fetch_id_for("catchall", "c1"), fetch_id_for("catchall", "c2")]
    other = fetch_id_for("catchall", "other")
    await publish(
        deployment,
        deployment.topic(FETCHED),
        keyed(*(fetched(f, "m1@sender.example") for f in copies), fetched(other, "m2@sender.example")),
    )
    # the router keys the copies by Message-ID on its internal topic; only the first copy was routed on
    # (the second was a duplicate), so only the by-message-id topic names the second
    await publish(
        deployment,
        router_repartition_topic(deployment),
        [(b"m1@sender.example", routed(f, "m1@sender.example")) for f in copies],
    )
    await publish(deployment, deployment.topic(ROUTED), keyed(routed(copies[0], "m1@sender.example")))

    result = await popbridge(deployment, "trace", "<m1@sender.example>", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["since"] is not None  # a Message-ID is looked for within 7 days by default
    shown = {m["fetch_id"]: [s["kind"] for s in m["steps"]] for m in document["messages"]}
    assert shown == {copies[0]: ["fetched", "routed"], copies[1]: ["fetched"]}


async def test_trace_by_message_id_falls_back_to_the_routed_topic(deployment: DeploymentSettings) -> None:
    single = fetch_id_for("alice", "u1")  # single-user mail never passes the by-message-id topic
    await publish(deployment, deployment.topic(FETCHED), keyed(fetched(single, "s1@sender.example")))
    await publish(deployment, deployment.topic(ROUTED), keyed(routed(single, "s1@sender.example")))
    result = await popbridge(deployment, "trace", "s1@sender.example", "--json")
    assert result.exit_code == 0, result.output
    assert [m["fetch_id"] for m in json.loads(result.stdout)["messages"]] == [single]


# --- dlq -------------------------------------------------------------------------------------------


async def appended(settings: DeploymentSettings, topic: str) -> list[Record]:
    return [r async for r in open_log(settings).scan(topic)]


async def test_dlq_list_json_is_bounded_by_since_and_filtered(deployment: DeploymentSettings) -> None:
    old, new = fetch_id_for("catchall", "old"), fetch_id_for("catchall", "new")
    topic = deployment.topic(DEAD_LETTERS)
    await publish(deployment, topic, keyed(dead(old, "bob@example.com")))
    (first,) = await appended(deployment, topic)
    # the clock passes the first append's millisecond (at most 2 ms): the next append is later
    await asyncio.sleep(max(0.0, (first.timestamp_ms + 2) / 1000 - time.time()))
    await publish(deployment, topic, keyed(dead(new, "bob@example.com"), dead(new, "eve@example.com")))
    await publish(
        deployment,
        deployment.topic(DELIVERED),
        [(b"ledger", RecipientDelivered(fetch_id=new, recipient="eve@example.com", delivered_at=T))],
    )

    every = json.loads((await popbridge(deployment, "dlq", "list", "--json", "--all")).stdout)
    assert {(d["fetch_id"], d["recipient"], d["status"]) for d in every["dead_letters"]} == {
        (old, "bob@example.com", "open"),
        (new, "bob@example.com", "open"),
        (new, "eve@example.com", "delivered"),
    }
    since = datetime.fromtimestamp((first.timestamp_ms + 1) / 1000, UTC).isoformat()
    recent = await popbridge(deployment, "dlq", "list", "--json", "--since", since)
    assert recent.exit_code == 0, recent.output
    document = json.loads(recent.stdout)
    assert document["since"] == since
    assert [(d["fetch_id"], d["recipient"]) for d in document["dead_letters"]] == [(new, "bob@example.com")]
    assert set(document["dead_letters"][0]) == {
        "id",
        "fetch_id",
        "status",
        "recipient",
        "reason",
        "smtp_code",
        "enhanced_code",
        "smtp_text",
        "server",
        "attempts",
        "dead_lettered_at",
        "mailbox_id",
        "pop3_host",
        "message_id",
    }
    only_eve = await popbridge(deployment, "dlq", "list", "--all", "--recipient", "eve@example.com")
    assert only_eve.stdout.count("\n") == 1
    assert "eve@example.com" in only_eve.stdout
    bad = await popbridge(deployment, "dlq", "list", "--since", "last tuesday")
    assert bad.exit_code == 2
    assert "not a duration" in bad.output


async def test_dlq_retry_dry_run_plans_and_execute_requeues(deployment: DeploymentSettings) -> None:
    letter = fetch_id_for("catchall", "gone")
    await publish(deployment, deployment.topic(DEAD_LETTERS), keyed(dead(letter, "gone@example.com")))
    retry_topic = deployment.topic(RETRY_TOPICS[0])

    planned = await popbridge(deployment, "dlq", "retry", letter, "--dry-run", "--json")
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.stdout)
    assert plan["executed"] is False
    assert [d["recipient"] for d in plan["requeue"]] == ["gone@example.com"]
    assert await appended(deployment, retry_topic) == []

    done = await popbridge(deployment, "dlq", "retry", letter[:10])
    assert done.exit_code == 0, done.output
    assert "dlq: 1 copies queued for retry" in done.stdout
    (record,) = await appended(deployment, retry_topic)
    retry = codec.decode(record.value, RetryScheduled)
    assert (record.key, retry.recipients) == (letter.encode(), ("gone@example.com",))
