"""Copies of one message in a catch-all mailbox: each recipient gets the message once, not once per copy.

ISPs drop one copy per recipient into the catch-all, all with the same Message-ID. Copies are matched by
Message-ID AND body digest, so a message without a Message-ID, or with a different body, is never taken
for a duplicate. A recipient is suppressed only when a DIFFERENT copy (another fetch id) routed it
within the window: re-processing the same copy after a crash re-emits it (the deliverer's ledger then
keeps it from being delivered twice), so an at-least-once redelivery can never lose a recipient.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

import msgspec

from schemas.events import Evidence, Recipient, RecipientsResolved
from services.router.headers import header_section

DUPLICATE = "duplicate"
# The reason services.router.stage gives mail of single-user mailboxes.
SINGLE_USER = "single-user"
DEFAULT_WINDOW = timedelta(days=7)


class SeenCopy(msgspec.Struct, frozen=True, kw_only=True):
    """Per recipient, which copy (fetch id) first routed the message to them, and when."""

    routed_by: dict[str, str]
    first_seen: datetime


# Table value: body digest -> SeenCopy, for one Message-ID.
SeenBodies = dict[str, SeenCopy]

_codec_encoder = msgspec.msgpack.Encoder()
_codec_decoder = msgspec.msgpack.Decoder(dict[str, SeenCopy])


def encode_seen(seen: SeenBodies) -> bytes:
    return _codec_encoder.encode(seen)


def decode_seen(data: bytes | None) -> SeenBodies:
    return _codec_decoder.decode(data) if data else {}


def body_digest(raw: bytes) -> str:
    """The digest of all after the header section: equal for copies that differ only in trace fields."""
    return hashlib.sha256(raw[len(header_section(raw)) :]).hexdigest()


def dedupe_key(resolved: RecipientsResolved) -> bytes | None:
    """The key copies meet under (the Message-ID), or None when the message is not deduplicated.

    Only catch-all mail is: the ISP's one-copy-per-recipient habit is a catch-all problem, and mail of a
    single-user mailbox is delivered as it was found, every message of it.
    """
    if resolved.reason == SINGLE_USER or not resolved.message_id:
        return None
    return resolved.message_id.encode("utf-8", "surrogateescape")


def apply_dedupe(
    resolved: RecipientsResolved, seen: SeenBodies, now: datetime, window: timedelta = DEFAULT_WINDOW
) -> tuple[RecipientsResolved, SeenBodies]:
    """The event to emit (recipients already routed by another copy moved to `suppressed`) and the new
    table value. Entries older than `window` are forgotten."""
    fresh = prune(seen, now, window)
    digest = body_digest(resolved.raw)
    earlier = fresh.get(digest)
    routed_by = dict(earlier.routed_by) if earlier else {}
    keep: list[Recipient] = []
    suppressed: list[Recipient] = []
    for recipient in resolved.recipients:
        other = routed_by.get(recipient.address)
        if other is not None and other != resolved.fetch_id:
            suppressed.append(_suppressed(recipient, other))
        else:
            routed_by[recipient.address] = resolved.fetch_id
            keep.append(recipient)
    fresh[digest] = SeenCopy(routed_by=routed_by, first_seen=earlier.first_seen if earlier else now)
    emitted = msgspec.structs.replace(resolved, recipients=tuple(keep), suppressed=tuple(suppressed))
    return emitted, fresh


def prune(seen: SeenBodies, now: datetime, window: timedelta = DEFAULT_WINDOW) -> SeenBodies:
    """The bodies of `seen` still inside the window (empty: the whole entry has expired)."""
    return {digest: copy for digest, copy in seen.items() if now - copy.first_seen <= window}


def oldest_seen(seen: SeenBodies) -> datetime | None:
    """When the oldest body of an entry was first seen: the entry needs pruning `window` after that."""
    return min((copy.first_seen for copy in seen.values()), default=None)


def _suppressed(recipient: Recipient, other_fetch_id: str) -> Recipient:
    evidence = (Evidence(source=DUPLICATE, value=other_fetch_id),)
    return Recipient(address=recipient.address, reason=DUPLICATE, evidence=evidence)
