"""One message's timeline across the topics, for `popbridge trace` (pure: records in, steps and text out).

A message is found by its fetch id or its Message-ID (with or without angle brackets). A Message-ID can
name several fetched copies (one per recipient in a catch-all); each copy gets its own timeline. The
events about a copy are keyed by its fetch id, so once the fetched and routed records named the fetch
ids, the delivery attempts and dead letters are matched by fetch id alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import msgspec

from schemas.events import (
    DeliveryAttempted,
    DeliveryDeadLettered,
    Event,
    Evidence,
    MailFetched,
    Recipient,
    RecipientsResolved,
)
from services.runtime.log import Record

StepKind = Literal["fetched", "routed", "attempt", "dead-letter"]
TracedEvent = MailFetched | RecipientsResolved | DeliveryAttempted | DeliveryDeadLettered
_HEADER_LIMIT = 256 * 1024  # a Message-ID lives in the header section; never scan a 50 MB body
# The topmost Message-ID field with its folded continuation lines. Not the stdlib email parser: it loads
# socket, and this module stays free of I/O libraries.
_MESSAGE_ID = re.compile(rb"^message-id:([^\n]*(?:\n[ \t][^\n]*)*)", re.IGNORECASE | re.MULTILINE)


def normalize_message_id(value: str) -> str:
    """A Message-ID as popbridge stores it: without white space and angle brackets."""
    return value.strip().removeprefix("<").removesuffix(">").strip()


def is_message_id(ident: str) -> bool:
    """Whether `popbridge trace` was given a Message-ID (it has an @: RFC 5322's id-left "@" id-right) rather
    than a fetch id (hex digits)."""
    return "@" in ident


def header_message_id(raw: bytes) -> str | None:
    """The topmost Message-ID of a raw message's header section, without angle brackets."""
    end = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0), default=len(raw))
    found = _MESSAGE_ID.search(raw[: min(end, _HEADER_LIMIT)])
    if found is None:
        return None
    value = b" ".join(found.group(1).split()).decode("utf-8", "replace")
    start = value.find("<")
    stop = value.find(">", start + 1) if start >= 0 else -1
    return normalize_message_id(value[start + 1 : stop] if stop >= 0 else value) or None


@dataclass
class TraceQuery:
    """Which records belong to the traced message; learns the fetch ids as the topics are read in order
    (fetched, routed, then attempts and dead letters)."""

    ident: str
    fetch_ids: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.ident = normalize_message_id(self.ident)

    def matches(self, event: Event) -> bool:
        if isinstance(event, MailFetched):
            return self._learn(event.fetch_id, lambda: header_message_id(event.raw))
        if isinstance(event, RecipientsResolved):
            return self._learn(event.fetch_id, lambda: event.message_id)
        # Attempts (30 days) and dead letters (90 days) outlive the fetched and routed records (14 days).
        if isinstance(event, DeliveryAttempted):
            return self._known(event.fetch_id)
        if isinstance(event, DeliveryDeadLettered):
            return self._known(event.routed.fetch_id)
        return False

    def _known(self, fetch_id: str) -> bool:
        return fetch_id in self.fetch_ids or fetch_id == self.ident

    def _learn(self, fetch_id: str, message_id: Any) -> bool:
        if fetch_id in self.fetch_ids or fetch_id == self.ident:
            self.fetch_ids.add(fetch_id)
            return True
        found: str | None = message_id()
        if found is not None and normalize_message_id(found) == self.ident:
            self.fetch_ids.add(fetch_id)
            return True
        return False


@dataclass(frozen=True)
class Step:
    """One event of the timeline and where it is stored."""

    kind: StepKind
    at: datetime
    fetch_id: str
    record: Record
    event: TracedEvent


def step_of(record: Record, event: TracedEvent) -> Step:
    """The step an event is; message bytes are dropped (a trace shows metadata, and holds many steps)."""
    if isinstance(event, MailFetched | RecipientsResolved):
        event = msgspec.structs.replace(event, raw=b"")
    if isinstance(event, DeliveryDeadLettered):
        event = msgspec.structs.replace(event, routed=msgspec.structs.replace(event.routed, raw=b""))
    if isinstance(event, MailFetched):
        return Step("fetched", event.fetched_at, event.fetch_id, record, event)
    if isinstance(event, RecipientsResolved):
        return Step("routed", event.routed_at, event.fetch_id, record, event)
    if isinstance(event, DeliveryAttempted):
        return Step("attempt", event.attempted_at, event.fetch_id, record, event)
    return Step("dead-letter", event.dead_lettered_at, event.routed.fetch_id, record, event)


def timelines(steps: Iterable[Step]) -> dict[str, list[Step]]:
    """Per fetch id (in order of first appearance), its steps in time order."""
    grouped: dict[str, list[Step]] = {}
    for step in steps:
        grouped.setdefault(step.fetch_id, []).append(step)
    return {fetch_id: sorted(found, key=_order) for fetch_id, found in grouped.items()}


_KIND_ORDER = {"fetched": 0, "routed": 1, "attempt": 2, "dead-letter": 3}


def _order(step: Step) -> tuple[datetime, int, int]:
    return step.at, _KIND_ORDER[step.kind], step.record.offset


# --- JSON ------------------------------------------------------------------------------------------


def trace_json(
    ident: str, found: dict[str, list[Step]], since: datetime | None = None, until: datetime | None = None
) -> dict[str, Any]:
    """The machine-readable timeline of `popbridge trace --json` (message bytes left out). The shape, for
    scripts: {"query", "since", "until" (ISO 8601 or null: the window searched), "messages": [{"fetch_id",
    "steps": [{"kind", "at", "stored": {"topic", "partition", "offset", "appended_at_ms"}, ...the event's
    fields}]}]}. New keys may be added; none is removed or changes meaning."""
    return {
        "query": ident,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "messages": [{"fetch_id": key, "steps": [_step_json(s) for s in found[key]]} for key in found],
    }


def _step_json(step: Step) -> dict[str, Any]:
    body: dict[str, Any] = msgspec.to_builtins(step.event)
    body.pop("raw", None)
    if isinstance(step.event, DeliveryDeadLettered):
        routed = step.event.routed
        body["routed"] = {"fetch_id": routed.fetch_id, "rules_version": routed.rules_version}
    where = {"topic": step.record.topic, "partition": step.record.partition, "offset": step.record.offset,
             "appended_at_ms": step.record.timestamp_ms}
    return {"kind": step.kind, "at": step.at.isoformat(), "stored": where, **body}


# --- text ------------------------------------------------------------------------------------------


def trace_text(ident: str, found: dict[str, list[Step]], since: datetime | None = None) -> list[str]:
    """The readable timeline of `popbridge trace`."""
    if not found:
        kind = "Message-ID" if is_message_id(ident) else "fetch id"
        searched = f" since {since:%Y-%m-%d %H:%M %Z}; --since searches further back" if since else ""
        return [f"nothing found for {ident!r} (no {kind} on the topics{searched})"]
    lines: list[str] = []
    for fetch_id, steps in found.items():
        routed = [s.event for s in steps if isinstance(s.event, RecipientsResolved)]
        message_ids = {r.message_id for r in routed if r.message_id}
        named = f" (Message-ID <{min(message_ids)}>)" if len(message_ids) == 1 else ""
        lines.append(f"message {fetch_id}{named}")
        for step in steps:
            head, *more = _describe(step)
            lines.append(f"  {step.at.strftime('%Y-%m-%d %H:%M:%S%z')}  {step.kind:<11}  {head}")
            lines += [f"  {'':<24}  {'':<11}  {line}" for line in more]
        lines.append("")
    return lines[:-1]


def _describe(step: Step) -> list[str]:
    event = step.event
    where = f"[{step.record.topic} {step.record.partition}@{step.record.offset}]"
    if isinstance(event, MailFetched):
        size = f"{event.size} bytes"
        return [f"mailbox {event.mailbox_id} ({event.pop3_host}) UIDL {event.uidl}, {size} {where}"]
    if isinstance(event, RecipientsResolved):
        return _describe_routed(event, where)
    if isinstance(event, DeliveryAttempted):
        server = f" from {event.server}" if event.server else ""
        reply = _reply(event.smtp_code, event.enhanced_code, event.smtp_text)
        return [f"#{event.attempt} {event.recipient}: {event.outcome} {reply}{server} {where}"]
    reply = _reply(event.smtp_code, event.enhanced_code, event.smtp_text)
    return [f"{event.recipient}: {event.reason} after {event.attempts} attempt(s), {reply} {where}"]


def _describe_routed(event: RecipientsResolved, where: str) -> list[str]:
    rules = f"rules {event.rules_version}" if event.rules_version else "no rules"
    lines = [f"reason {event.reason}, {rules}, {len(event.recipients)} recipient(s) {where}"]
    lines += [f"to {_recipient(r)}" for r in event.recipients]
    lines += [f"suppressed {_recipient(r)}" for r in event.suppressed]
    return lines


def _recipient(recipient: Recipient) -> str:
    return f"{recipient.address} ({recipient.reason}: {_evidence(recipient.evidence)})"


def _evidence(evidence: Sequence[Evidence]) -> str:
    parts = []
    for e in evidence:
        at = f"{e.field}[{e.field_index}]" if e.field is not None and e.field_index is not None else e.field
        hop = f" via {e.received_hop}" if e.received_hop else ""
        parts.append(f"{e.source}{' ' + at if at else ''}{'=' + e.value if e.value else ''}{hop}")
    return "; ".join(parts) or "no evidence"


def _reply(code: int | None, enhanced: str | None, text: str) -> str:
    parts = (str(code) if code else "", enhanced or "", repr(text) if text else "")
    return " ".join(part for part in parts if part)
