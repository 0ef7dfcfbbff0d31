"""Scale part `lookups`: `popbridge trace` of one message among N on each topic, and `dlq list`.

Synthetic history: N messages spread evenly over 14 days (the fetched topic's retention), each with one
fetched, one routed and one delivery-attempt record (small bodies, `--body-bytes`), and one dead letter
per 100 messages. The bench topics are the mail topics' specs with `message.timestamp.type=CreateTime`,
so the history can carry past times (production topics use LogAppendTime: the broker stamps the append,
which is what the time index then holds; the lookups use it the same way either way).

"before" is the previous implementation, still reachable through the one reader: every record of the
fetched, routed, attempt and dead-letter topics decoded and matched (`reader.events` + `TraceQuery`),
and `dlq list` decoding the whole dead-letter and ledger topics. "after" is `collect_trace` / the dlq
read of services.ops as the commands run them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from scale_common import Keyed, Row, create_topics, fill, seconds

from schemas.codec import encode
from schemas.events import (
    DeliveryAttempted,
    DeliveryDeadLettered,
    MailFetched,
    RecipientsResolved,
    fetch_id_for,
)
from schemas.topics import DEAD_LETTERS, DELIVERED, DELIVERY_ATTEMPTS, FETCHED, ROUTED, TopicSpec, topic_spec
from services.ops.actions import TRACE_TOPICS, collect_trace
from services.ops.dlq import dead_letters
from services.ops.locate import Window
from services.ops.reader import events
from services.ops.replay import to_ms
from services.ops.trace import Step, TraceQuery, step_of, timelines
from services.runtime.kafka import KafkaLog
from services.runtime.settings import DeploymentSettings

SPAN = timedelta(days=14)
NOW = datetime.now(UTC).replace(microsecond=0)
TARGET = "<= 1 s"
NOTE = "2 cores shared with other helpers' runs: see the load average"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--body-bytes", type=int, default=512, help="lookups: bytes per message body")
    parser.add_argument("--skip-before", action="store_true", help="lookups: do not time the old scans")
    parser.add_argument("--lookups-prefix", help="lookups: reuse topics filled with the same --records")
    parser.add_argument(
        "--compression", choices=("none", "gzip"), default="none",
        help="lookups: the fill's compression (none: a deployment's, POPBRIDGE_KAFKA_COMPRESSION unset)",
    )


def _at(i: int, n: int) -> datetime:
    return NOW - SPAN + SPAN * (i / n)


def _routed(fetch_id: str, i: int, n: int, raw: bytes) -> RecipientsResolved:
    return RecipientsResolved(fetch_id=fetch_id, mailbox_id="catchall", pop3_host="pop.isp.example",
                              message_id=f"m{i}@sender.example", envelope_sender=None, recipients=(),
                              reason="to-cc", rules_version="v1", routed_at=_at(i, n) + timedelta(seconds=1),
                              raw=raw)


def _history(topic: str, n: int, body: int) -> Iterator[Keyed]:
    """The records of one topic, oldest first (each partition's time index then increases)."""
    for i in range(n) if topic != DEAD_LETTERS else range(0, n, 100):
        fetch_id = fetch_id_for("catchall", f"u{i}")
        raw = f"Message-ID: <m{i}@sender.example>\r\nSubject: s{i}\r\n\r\n".encode() + b"x" * body
        at = _at(i, n)
        event: MailFetched | RecipientsResolved | DeliveryAttempted | DeliveryDeadLettered
        if topic == FETCHED:
            event = MailFetched(fetch_id=fetch_id, mailbox_id="catchall", pop3_host="pop.isp.example",
                                uidl=f"u{i}", size=len(raw), sha256="", fetched_at=at, raw=raw)
        elif topic == ROUTED:
            event = _routed(fetch_id, i, n, raw)
        elif topic == DELIVERY_ATTEMPTS:
            event = DeliveryAttempted(fetch_id=fetch_id, recipient="a@example.com", outcome="delivered",
                                      smtp_code=250, smtp_text="ok", attempt=1,
                                      attempted_at=at + timedelta(seconds=2))
        else:
            event = DeliveryDeadLettered(routed=_routed(fetch_id, i, n, raw), recipient="a@example.com",
                                         reason="rejected", smtp_code=550, smtp_text="no such user",
                                         attempts=3, dead_lettered_at=at + timedelta(minutes=1))
        yield Keyed(fetch_id.encode(), encode(event), to_ms(at) + (60_000 if topic == DEAD_LETTERS else 0))


async def _scan_trace(log: KafkaLog, settings: DeploymentSettings, ident: str) -> dict[str, list[Step]]:
    """The previous `collect_trace`: every record of the four topics, decoded and matched."""
    query, steps = TraceQuery(ident), []
    wanted = (MailFetched, RecipientsResolved, DeliveryAttempted, DeliveryDeadLettered)
    for name in TRACE_TOPICS:
        async for record, event in events(log, settings.topic(name), wanted):
            if query.matches(event):
                steps.append(step_of(record, event))
    return timelines(steps)


async def _timed(work: object) -> tuple[float, object]:
    started = time.perf_counter()
    result = await work  # type: ignore[misc]
    return time.perf_counter() - started, result


async def _run(args: argparse.Namespace) -> list[Row]:
    n, bootstrap = args.records, args.bootstrap
    prefix = args.lookups_prefix or f"scale-{uuid.uuid4().hex[:6]}-"
    settings = DeploymentSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix, group_prefix=prefix)
    topics = (FETCHED, ROUTED, DELIVERY_ATTEMPTS, DEAD_LETTERS, DELIVERED)
    specs = [topic_spec(t) for t in topics]
    await create_topics(bootstrap, [TopicSpec(prefix + s.name, s.partitions,
                                              {**s.config, "message.timestamp.type": "CreateTime"})
                                    for s in specs])
    notes = []
    for topic in topics[:4] if not args.lookups_prefix else ():
        stats = await fill(bootstrap, settings.topic(topic), _history(topic, n, args.body_bytes),
                           compression=None if args.compression == "none" else args.compression)
        name = topic.rsplit(".", 1)[-1]
        notes.append(f"{name} {stats.records} in {stats.seconds:.0f} s ({stats.rate:,.0f}/s)")
    print(f"filled {prefix}: " + "; ".join(notes), flush=True)
    log = KafkaLog(bootstrap)
    rows = []
    for label, hours in (("1 h old", 1), ("3 days old", 72), ("13 days old", 312)):
        ident = fetch_id_for("catchall", f"u{n - n * hours // 336}")
        after, found = await _timed(collect_trace(log, settings, ident))
        assert isinstance(found, dict) and len(found) == 1, found  # noqa: PT018 - a bench checks its answer
        before = "skipped"
        if not args.skip_before:
            took, old = await _timed(_scan_trace(log, settings, ident))
            assert isinstance(old, dict) and len(old[ident]) == len(found[ident]), (old, found)  # noqa: PT018
            before = seconds(took)
        rows.append(Row(f"trace by fetch id, message {label}, among {n:,} per topic", before, seconds(after),
                        TARGET, NOTE))
    window = Window(to_ms(NOW - timedelta(days=7)))
    after, letters = await _timed(dead_letters(log, settings, window))
    before = "skipped"
    if not args.skip_before:
        took, _ = await _timed(dead_letters(log, settings, Window()))
        before = seconds(took)
    count = len(letters) if isinstance(letters, list) else 0
    rows.append(Row(f"dlq list --since 7d ({count:,} of {n // 100:,} dead letters)", before, seconds(after),
                    "-", "before: the whole dead-letter topic (the old list)"))
    if notes:
        fill_rate = f"fill rate (one aiokafka producer, {args.compression}, acks=1)"
        rows.append(Row(fill_rate, "-", "; ".join(notes), "-", f"{args.body_bytes} B bodies, 2 busy cores"))
    return rows


def rows(args: argparse.Namespace) -> list[Row]:
    return asyncio.run(_run(args))
