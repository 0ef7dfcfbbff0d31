"""What a chaos run observed, read from its sources: the SMTP journal, the Kafka topics and the maildirs.

`journal_copies` turns journal lines into copies and sessions (pure); `read_kafka` reads every topic the
pipeline writes and the committed offsets of every stage's group once the stages are stopped.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import codec
from schemas.events import (
    DeliveryDeadLettered,
    MailFetched,
    RecipientDelivered,
    RecipientsResolved,
    RetryScheduled,
)
from schemas.topics import DEAD_LETTERS, DELIVERED, FETCHED, RETRY_TOPICS, ROUTED
from services.runtime.kafka import KafkaLog
from services.runtime.settings import DeploymentSettings
from services.runtime.stages import router_repartition_topic
from tests.chaos.accounting import Copy, SmtpSession

TOKEN = re.compile(rb"ctk-[0-9a-f]+-[0-9]+")


def journal_copies(entries: Iterable[Mapping[str, Any]]) -> tuple[list[Copy], dict[str, SmtpSession]]:
    """Copies (one per recipient of each journaled DATA) and sessions, from the SMTP journal's lines."""
    acked: set[tuple[str, str]] = set()
    replied: dict[tuple[str, str], float] = {}
    ended: dict[str, Mapping[str, Any]] = {}
    pids: dict[str, int | None] = {}
    datas: list[Mapping[str, Any]] = []
    for entry in entries:
        kind = entry["k"]
        if kind == "session":
            pids[entry["s"]] = entry.get("client_pid")
        elif kind == "end":
            ended[entry["s"]] = entry
        elif kind == "acked":
            acked.add((entry["s"], entry["token"]))
        elif kind == "replied":
            replied.setdefault((entry["s"], entry["token"]), entry["t"])
        elif kind == "data":
            datas.append(entry)
    copies = [
        Copy(token=d["token"], recipient=rcpt, session=d["s"], at=d["t"], fetch_id=d.get("fetch_id", ""),
             dropped=d["outcome"] == "dropped", acked=(d["s"], d["token"]) in acked,
             replied_at=replied.get((d["s"], d["token"])))
        for d in datas
        for rcpt in d["rcpts"]
    ]  # fmt: skip
    sessions = {
        sid: SmtpSession(client_pid=pid, ended_at=ended[sid]["t"] if sid in ended else None,
                         quit=bool(ended[sid]["quit"]) if sid in ended else False)
        for sid, pid in pids.items()
    }  # fmt: skip
    return copies, sessions


def tokens_in_maildirs(root: Path) -> set[str]:
    """The tokens of every message still in any Maildir under `root` (new/ or cur/)."""
    found: set[str] = set()
    for path in root.glob("*/Maildir/*/*"):
        if path.parent.name in ("new", "cur") and path.is_file():
            match = TOKEN.search(path.read_bytes()[:4096])
            if match:
                found.add(match.group().decode())
    return found


def token_of(raw: bytes) -> str:
    match = TOKEN.search(raw)
    return match.group().decode() if match else ""


@dataclass
class Sighting:
    """One record about a message on a topic, and whether its consumer group has committed past it."""

    topic: str
    partition: int
    offset: int
    committed_past: bool
    detail: str = ""

    def describe(self) -> str:
        state = "committed past" if self.committed_past else "NOT committed past"
        return f"{self.topic}[{self.partition}]@{self.offset} ({state}) {self.detail}".rstrip()


@dataclass
class KafkaState:
    fetched_at: dict[str, float] = field(default_factory=dict)  # token -> first fetched_at
    sightings: dict[str, list[Sighting]] = field(default_factory=lambda: defaultdict(list))
    dead_letters: dict[tuple[str, str], str] = field(default_factory=dict)
    retrying: set[tuple[str, str]] = field(default_factory=set)
    stuck: set[str] = field(default_factory=set)
    routed_to: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    ledger: dict[tuple[str, str], float] = field(default_factory=dict)  # (fetch id, rcpt) -> first record


async def read_kafka(bootstrap: str, settings: DeploymentSettings) -> KafkaState:
    """Every record the pipeline wrote, by token, with the committed offsets of the groups reading it."""
    log = KafkaLog(bootstrap)
    state = KafkaState()
    fetched = settings.topic(FETCHED)
    async for record, past in _records(log, fetched, settings.group("router")):
        event = codec.decode(record.value, MailFetched)
        token = token_of(event.raw)
        at = event.fetched_at.timestamp()
        state.fetched_at[token] = min(at, state.fetched_at.get(token, at))
        _sight(state, token, record, past, f"fetch_id={event.fetch_id[:8]} mailbox={event.mailbox_id}")
    for topic, group in (
        (router_repartition_topic(settings), "router"),
        (settings.topic(ROUTED), "deliverer"),
    ):
        async for record, past in _records(log, topic, settings.group(group)):
            routed = codec.decode(record.value, RecipientsResolved)
            token = token_of(routed.raw)
            recipients = {r.address for r in routed.recipients}
            if topic == settings.topic(ROUTED):
                state.routed_to[token] |= recipients
            _sight(state, token, record, past, f"fetch_id={routed.fetch_id[:8]} to={sorted(recipients)}")
    for name in RETRY_TOPICS:
        async for record, past in _records(
            log, settings.topic(name), settings.group("deliverer")  # one group reads every tier
        ):
            retry = codec.decode(record.value, RetryScheduled)
            token = token_of(retry.routed.raw)
            _sight(state, token, record, past, f"retry to={list(retry.recipients)}")
            if not past:
                state.retrying.update((token, r) for r in retry.recipients)
    async for record in log.scan(settings.topic(DEAD_LETTERS)):
        letter = codec.decode(record.value, DeliveryDeadLettered)
        reply = letter.smtp_text.splitlines()[0] if letter.smtp_text else ""
        reason = f"{letter.reason}: {letter.smtp_code or '-'} {reply}".strip()
        state.dead_letters[token_of(letter.routed.raw), letter.recipient] = reason
    async for record in log.scan(settings.topic(DELIVERED)):
        entry = codec.decode(record.value, RecipientDelivered)
        at = record.timestamp_ms / 1000  # the producer's time: when the deliverer wrote it
        pair = (entry.fetch_id, entry.recipient)
        state.ledger[pair] = min(at, state.ledger.get(pair, at))
    return state


def _sight(state: KafkaState, token: str, record: Any, past: bool, detail: str) -> None:
    state.sightings[token].append(Sighting(record.topic, record.partition, record.offset, past, detail))
    if not past and not record.topic.endswith(tuple(RETRY_TOPICS)):
        state.stuck.add(token)


async def _records(log: KafkaLog, topic: str, group: str) -> Any:
    """(record, whether `group` has committed past it) for every record of `topic`."""
    committed = await log.committed(group, topic)
    async for record in log.scan(topic):
        yield record, record.offset < committed.get(record.partition, 0)


def stuck_tokens(state: KafkaState) -> frozenset[str]:
    return frozenset(state.stuck)
