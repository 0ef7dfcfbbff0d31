"""Shadow replay of the router: re-route history with the CURRENT rules and list who would now get what.

`popbridge replay router --from TIME [--to TIME] --shadow --config FILE` reads the fetched records of the
window with ranged reads (no consumer group), routes each with the router's pure decision (a `Reroute`
wired in by services.cli: services.router.stage.route_or_postmaster), writes the
results to the shadow topic (`<prefix>popbridge.mail.routed.shadow`, which no stage reads) and compares
them with the latest RecipientsResolved per fetch id on the real routed topic. Nothing users see changes:
the real routed topic, the router's group and the deliverer are not touched.

What is compared is the routing decision: the set of addresses a message was routed to, counting the
recipients the router's dedupe suppressed (another copy of the same message had them). Dedupe is not
re-run: it depends on the order copies arrive, not on the rules. Cost: the window of the fetched topic
plus the whole routed topic (14 days, message bodies included) are read once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from schemas import codec
from schemas.events import MailFetched, RecipientsResolved
from schemas.topics import DAY_MS, FETCHED, ROUTED, TopicSpec, topic_spec
from services.ops.reader import events, read_range
from services.ops.replay import to_ms
from services.runtime.context import Reroute
from services.runtime.log import LogProducer, Outgoing
from services.runtime.ops_log import OpsLog
from services.runtime.settings import DeploymentSettings, MailConfig

SHADOW_SUFFIX = ".shadow"
SHADOW_RETENTION_DAYS = 7
_BATCH = 50


def shadow_topic(settings: DeploymentSettings) -> str:
    return settings.topic(ROUTED) + SHADOW_SUFFIX


def shadow_spec(settings: DeploymentSettings) -> TopicSpec:
    """The routed topic's settings with a shorter retention: shadow results are for a look, not for keeps."""
    routed = topic_spec(ROUTED)
    config = {**routed.config, "retention.ms": str(SHADOW_RETENTION_DAYS * DAY_MS)}
    return TopicSpec(shadow_topic(settings), routed.partitions, config)


# --- the decision (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What routing decided for one fetched message, as far as a rule change can alter it."""

    addresses: tuple[str, ...]  # sorted; routed and dedupe-suppressed recipients alike
    reason: str
    rules_version: str

    @classmethod
    def of(cls, event: RecipientsResolved) -> Decision:
        addresses = {r.address for r in event.recipients} | {r.address for r in event.suppressed}
        return cls(tuple(sorted(addresses)), event.reason, event.rules_version)


@dataclass(frozen=True)
class Rerouted:
    """A message of the window and its decision under the current rules."""

    fetch_id: str
    mailbox_id: str
    message_id: str | None
    new: Decision


@dataclass(frozen=True)
class Change:
    """A message that would now go to different recipients."""

    message: Rerouted
    old: Decision

    @property
    def added(self) -> tuple[str, ...]:
        return tuple(a for a in self.message.new.addresses if a not in self.old.addresses)

    @property
    def removed(self) -> tuple[str, ...]:
        return tuple(a for a in self.old.addresses if a not in self.message.new.addresses)


@dataclass(frozen=True)
class ShadowReport:
    topic: str
    rerouted: int
    changes: tuple[Change, ...]
    unchanged: int
    never_routed: tuple[str, ...]  # fetch ids without an earlier decision on the routed topic
    undecodable: int = 0
    rules_versions: tuple[str, ...] = ()


def compare(
    rerouted: Sequence[Rerouted], old: Mapping[str, Decision], topic: str, undecodable: int = 0
) -> ShadowReport:
    """Which re-routed messages changed recipients against their latest real decision."""
    changes = tuple(Change(m, old[m.fetch_id]) for m in rerouted
                    if m.fetch_id in old and old[m.fetch_id].addresses != m.new.addresses)
    compared = sum(1 for m in rerouted if m.fetch_id in old)
    return ShadowReport(
        topic=topic,
        rerouted=len(rerouted),
        changes=changes,
        unchanged=compared - len(changes),
        never_routed=tuple(m.fetch_id for m in rerouted if m.fetch_id not in old),
        undecodable=undecodable,
        rules_versions=tuple(sorted({m.new.rules_version for m in rerouted} - {""})),
    )


def report_text(report: ShadowReport, since: datetime, until: datetime | None) -> list[str]:
    window = f"from {since.isoformat()}" + (f" to {until.isoformat()}" if until else "")
    versions = ", ".join(report.rules_versions) or "-"
    lines = [f"shadow replay of the router {window}: {report.rerouted} message(s) re-routed into "
             f"{report.topic} (rules {versions})"]
    lines.append(f"{len(report.changes)} would go to different recipients:" if report.changes
                 else "no message would go to different recipients")
    for change in report.changes:
        m = change.message
        named = f" Message-ID <{m.message_id}>" if m.message_id else ""
        lines.append(f"  {m.fetch_id} mailbox {m.mailbox_id}{named}")
        lines.append(f"    old: {_decision_text(change.old)}")
        lines.append(f"    new: {_decision_text(m.new)}")
    lines.append(f"{report.unchanged} unchanged; {len(report.never_routed)} not routed before (not compared)"
                 + (f"; {report.undecodable} unreadable record(s) skipped" if report.undecodable else ""))
    return lines


def _decision_text(decision: Decision) -> str:
    addresses = ", ".join(decision.addresses) or "-"
    return f"{addresses} ({decision.reason}, rules {decision.rules_version or '-'})"


# --- reading and writing ---------------------------------------------------------------------------


class ShadowLog(OpsLog, Protocol):
    """The ops log plus what writing the shadow topic takes."""

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> list[str]: ...

    def producer(self) -> AbstractAsyncContextManager[LogProducer]: ...


@dataclass
class _Window:
    """One shadow run: the fetched records of [since, until) routed with `config`, and what came of it."""

    config: MailConfig
    reroute: Reroute
    since: datetime
    until: datetime | None
    now: Callable[[], datetime]
    rerouted: list[Rerouted] = field(default_factory=list)
    undecodable: int = 0

    def route(self, value: bytes) -> RecipientsResolved | None:
        try:
            fetched = codec.decode(value, MailFetched)
        except codec.EventDecodeError:
            self.undecodable += 1
            return None
        resolved = self.reroute(fetched, self.config, self.now())
        self.rerouted.append(Rerouted(fetched.fetch_id, fetched.mailbox_id, resolved.message_id,
                                      Decision.of(resolved)))
        return resolved


async def shadow_replay(
    log_: ShadowLog, settings: DeploymentSettings, config: MailConfig, reroute: Reroute, *, since: datetime,
    until: datetime | None, now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> ShadowReport:
    """Re-route the fetched records of [since, until) into the shadow topic and compare (module docstring)."""
    target = shadow_spec(settings)
    await log_.ensure_topics([target])
    window = _Window(config, reroute, since, until, now)
    async with log_.producer() as producer:
        async for batch in _rerouted_batches(log_, settings.topic(FETCHED), window):
            await producer.send_all(
                [Outgoing(target.name, codec.encode(r), key=r.fetch_id.encode()) for r in batch]
            )
    old = await latest_decisions(log_, settings.topic(ROUTED), {m.fetch_id for m in window.rerouted})
    return compare(window.rerouted, old, target.name, window.undecodable)


async def _rerouted_batches(
    log_: OpsLog, topic: str, window: _Window
) -> AsyncIterator[list[RecipientsResolved]]:
    starts = await log_.offsets_for_time(topic, to_ms(window.since))
    until = window.until
    ends = await log_.offsets_for_time(topic, to_ms(until)) if until else await log_.end_offsets(topic)
    for partition, start in sorted(starts.items()):
        batch: list[RecipientsResolved] = []
        async for record in read_range(log_, topic, partition, start, ends.get(partition, start)):
            resolved = window.route(record.value)
            if resolved is not None:
                batch.append(resolved)
            if len(batch) >= _BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


async def latest_decisions(log_: OpsLog, topic: str, fetch_ids: set[str]) -> dict[str, Decision]:
    """The latest real decision per fetch id (all events of a fetch id share a partition, so the last one
    read is the latest)."""
    found: dict[str, Decision] = {}
    async for _, event in events(log_, topic, (RecipientsResolved,)):
        if event.fetch_id in fetch_ids:
            found[event.fetch_id] = Decision.of(event)
    return found
