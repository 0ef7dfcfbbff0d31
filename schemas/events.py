"""The events popbridge publishes: facts, named in the past tense, encoded by `schemas.codec`.

Evolution rules (see tests/unit/schemas/test_golden.py, which pins the bytes):
- a new field gets a default, so old records still decode;
- no field changes type; a breaking change is a new tag (`.../2`) and a new Struct;
- unknown fields are skipped on decode, so an old reader survives a newer writer.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

import msgspec

Outcome = Literal["delivered", "deferred", "failed"]


def fetch_id_for(mailbox_id: str, uidl: str) -> str:
    """The stable id of one message in one mailbox: the same mailbox and UIDL always give the same id.

    It is the Kafka key of every event about the message, so all of them land on one partition.
    """
    digest = hashlib.sha256(f"{mailbox_id}\x00{uidl}".encode()).hexdigest()
    return digest[:32]


class MailFetched(msgspec.Struct, frozen=True, kw_only=True, tag="popbridge.mail-fetched/1"):
    """A message was retrieved from a POP3 mailbox; `raw` holds its bytes exactly as retrieved."""

    fetch_id: str
    mailbox_id: str
    pop3_host: str
    uidl: str
    size: int
    sha256: str
    fetched_at: datetime
    raw: bytes


class Evidence(msgspec.Struct, frozen=True, kw_only=True):
    """What chose a recipient: the header field (and its position) or the Received hop consulted."""

    source: str
    field: str | None = None
    field_index: int | None = None
    value: str | None = None
    received_hop: str | None = None


class Recipient(msgspec.Struct, frozen=True, kw_only=True):
    """One local recipient of a routed message, with the reason and evidence that chose it."""

    address: str
    reason: str
    evidence: tuple[Evidence, ...] = ()


class RecipientsResolved(msgspec.Struct, frozen=True, kw_only=True, tag="popbridge.recipients-resolved/1"):
    """The router decided who receives a fetched message.

    `rules_version` is a hash of the routing rules used, so a replay with changed rules is visible.
    The raw bytes travel inline; a claim-check reference may replace them in a later version.
    """

    fetch_id: str
    mailbox_id: str
    pop3_host: str
    message_id: str | None
    envelope_sender: str | None
    recipients: tuple[Recipient, ...]
    reason: str
    rules_version: str
    routed_at: datetime
    raw: bytes
    # Recipients another copy of the same message (same Message-ID and body) already routed; their
    # evidence names that copy's fetch id. Not delivered again.
    suppressed: tuple[Recipient, ...] = ()


class DeliveryAttempted(msgspec.Struct, frozen=True, kw_only=True, tag="popbridge.delivery-attempted/1"):
    """One attempt to hand one recipient's copy to the destination server, and what the server said."""

    fetch_id: str
    recipient: str
    outcome: Outcome
    smtp_code: int | None
    enhanced_code: str | None = None
    smtp_text: str
    attempt: int
    attempted_at: datetime
    server: str = ""


class FetchRecorded(msgspec.Struct, frozen=True, kw_only=True, tag="popbridge.fetch-recorded/1"):
    """The fetcher's durable memory of one message of one mailbox (compacted topic, key mailbox + UIDL).

    Written after `MailFetched` was acknowledged; `deleted` once the server confirmed the deletion.
    """

    mailbox_id: str
    uidl: str
    fetch_id: str
    size: int
    sha256: str
    published_at: datetime
    deleted: bool = False


def fetch_state_key(mailbox_id: str, uidl: str) -> bytes:
    return f"{mailbox_id}\x00{uidl}".encode()


class RetryScheduled(msgspec.Struct, frozen=True, kw_only=True, tag="popbridge.retry-scheduled/1"):
    """Some recipients of a routed message were deferred; the deliverer tries them again at `due_at`.

    `routed` is the routed event as it arrived (its raw bytes included), `recipients` the addresses still
    to try, `attempts` how many attempts they have had, and `age_from` the instant their maximum age
    counts from (the routing time, or the time an operator retried a dead letter).
    """

    routed: RecipientsResolved
    recipients: tuple[str, ...]
    attempts: int
    due_at: datetime
    age_from: datetime
    last_reply: str = ""


class RecipientDelivered(msgspec.Struct, frozen=True, kw_only=True, tag="popbridge.recipient-delivered/1"):
    """The delivered ledger (a compacted topic keyed by fetch id and recipient): this copy was handed over."""

    fetch_id: str
    recipient: str
    delivered_at: datetime


class DeliveryDeadLettered(
    msgspec.Struct, frozen=True, kw_only=True, tag="popbridge.delivery-dead-lettered/1"
):
    """One recipient's copy could not be delivered; it waits for an operator (`popbridge dlq`).

    `routed` carries the message (its raw bytes included) so `popbridge dlq retry` can try it again, with
    only this copy's recipient in `routed.recipients` (and no `suppressed`): a message for N recipients
    gives at most N dead letters of one message each, never N copies of all N recipients (ROUTING.md
    section 6). `routed_recipients` says how many recipients the routed message had (0: written before).
    No bounce ever goes to the outside sender.
    """

    routed: RecipientsResolved
    recipient: str
    reason: str
    smtp_code: int | None
    enhanced_code: str | None = None
    smtp_text: str = ""
    attempts: int
    dead_lettered_at: datetime
    server: str = ""
    routed_recipients: int = 0


Event = (
    MailFetched
    | RecipientsResolved
    | DeliveryAttempted
    | FetchRecorded
    | RetryScheduled
    | RecipientDelivered
    | DeliveryDeadLettered
)
