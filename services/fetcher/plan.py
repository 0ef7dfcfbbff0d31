"""The POP3 fetch plan: which messages of a mailbox to retrieve, which only to delete, which to leave.

Pure: it sees the server's listing and the fetcher's durable memory (`FetchRecorded` per UIDL), and
decides. Deletion of a retrieved message is never planned here: the service deletes only after the
broker acknowledged the publish.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from schemas.events import FetchRecorded, fetch_id_for


@dataclass(frozen=True)
class Listed:
    """One message as the server lists it in this session."""

    number: int
    uidl: str
    size: int


@dataclass(frozen=True)
class Plan:
    """`delete_only`: published before, to delete now (delete mode, or keep mode past `keep_days`).
    `reused`: the UIDLs in `retrieve` that this mailbox published before for another message."""

    retrieve: list[Listed] = field(default_factory=list)
    delete_only: list[Listed] = field(default_factory=list)
    too_big: list[Listed] = field(default_factory=list)
    reused: frozenset[str] = frozenset()


def already_published(message: Listed, known: FetchRecorded | None) -> bool:
    """Published before: same UIDL and the same size (an ISP that reuses a UIDL changes the size)."""
    return known is not None and known.size == message.size


def plan_pass(
    listing: list[Listed],
    known: Mapping[str, FetchRecorded],
    *,
    mode: Literal["delete", "keep"],
    max_message_size: int,
    keep_days: float | None = None,
    now: datetime | None = None,
) -> Plan:
    """Decide one pass over a mailbox; `known` maps UIDL to what this mailbox published earlier.

    In keep mode with `keep_days`, a message published before `now - keep_days` is deleted.
    """
    retrieve: list[Listed] = []
    delete_only: list[Listed] = []
    too_big: list[Listed] = []
    reused: set[str] = set()
    expired_before = None if keep_days is None or now is None else now - timedelta(days=keep_days)
    for message in listing:
        record = known.get(message.uidl)
        if already_published(message, record):
            assert record is not None
            if mode == "delete" or (expired_before is not None and record.published_at < expired_before):
                delete_only.append(message)  # delete mode: the session that published it dropped before QUIT
        elif message.size > max_message_size:
            too_big.append(message)
        else:
            retrieve.append(message)
            if record is not None:
                reused.add(message.uidl)  # the ISP reused the UIDL: a new message, see fetch_id_of
    return Plan(retrieve, delete_only, too_big, frozenset(reused))


def fetch_id_of(mailbox_id: str, uidl: str, sha256: str, *, reused: bool) -> str:
    """The fetch id of a retrieved message: `fetch_id_for(mailbox, uidl)`, except when the ISP reused the
    UIDL for another message, where the content hash tells the two apart (and stays the same if the
    session drops and the message is retrieved again)."""
    return fetch_id_for(mailbox_id, f"{uidl}#{sha256[:12]}" if reused else uidl)


def session_part(
    plan: Plan, *, quit_every: int, max_retrieve: int | None, deletes_retrieved: bool
) -> tuple[Plan, bool]:
    """What one POP3 session of a pass does, and whether the pass reconnects at once for the rest.

    A session deletes at most `quit_every` messages (then QUITs, so a dropped line loses little): the
    delete-only ones first, then retrieved ones when `deletes_retrieved` (delete mode). `max_retrieve`
    bounds what the whole pass retrieves; what it leaves waits for the next poll, not a reconnect.
    """
    delete_only = plan.delete_only[:quit_every]
    room = quit_every - len(delete_only) if deletes_retrieved else len(plan.retrieve)
    wanted = len(plan.retrieve) if max_retrieve is None else min(max_retrieve, len(plan.retrieve))
    retrieve = plan.retrieve[: min(room, wanted)]
    more = len(delete_only) < len(plan.delete_only) or len(retrieve) < wanted
    return replace(plan, retrieve=retrieve, delete_only=delete_only), more
