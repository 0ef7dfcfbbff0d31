"""The POP3 fetch plan: which messages of a mailbox to retrieve, which only to delete, which to leave.

Pure: it sees the server's listing and the fetcher's durable memory (`FetchRecorded` per UIDL), and
decides. Deletion of a retrieved message is never planned here: the service deletes only after the
broker acknowledged the publish.

Identity: the memory is keyed by UIDL, so a UIDL must name one message. An id the server lists that
is not RFC 1939's 1 to 70 characters in 0x21..0x7E, or that two messages share, or a message LIST shows
and UIDL does not, names nothing: such a message is identified by its content instead (`content_key`,
72 characters, so it can never equal a valid UIDL). It is retrieved on every pass, published once per
content, and deleted (delete mode) only in the session that retrieved it, after the broker acknowledged
it: a fetch id never stands for two different messages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from schemas.events import FetchRecorded, fetch_id_for
from services.fetcher.pop3_protocol import valid_unique_id


@dataclass(frozen=True)
class Listed:
    """One message as the server lists it in this session."""

    number: int
    uidl: str  # "" until retrieved when `by_content`, then its content_key
    size: int  # as LIST claims it; only the bytes received count against the size limit
    by_content: bool = False


def identify(uidls: Mapping[int, str], sizes: Mapping[int, int]) -> list[Listed]:
    """The listing of one session: each message by UIDL when its id can identify it, else by content."""
    shared = Counter(uidls.values())
    listing = []
    for number in sorted(set(uidls) | set(sizes)):
        uidl = uidls.get(number, "")
        usable = valid_unique_id(uidl) and shared[uidl] == 1
        listing.append(Listed(number, uidl if usable else "", sizes.get(number, 0), by_content=not usable))
    return listing


def content_key(sha256: str) -> str:
    """The identity of a message without a usable UIDL: longer than any valid UIDL, so never one."""
    return f"~sha256:{sha256}"


@dataclass(frozen=True)
class Plan:
    """`delete_only`: published before by UIDL and size, to delete now (delete mode, or keep mode past
    `keep_days`) without publishing again, once the service checked the digest (the same UIDL and size
    do not prove the same message: a server may reuse a UIDL after a deletion).
    `reused`: the UIDLs in `retrieve` that this mailbox published before for another message."""

    retrieve: list[Listed] = field(default_factory=list)
    delete_only: list[Listed] = field(default_factory=list)
    too_big: list[Listed] = field(default_factory=list)
    reused: frozenset[str] = frozenset()


def already_published(message: Listed, known: FetchRecorded | None) -> bool:
    """Published before: same UIDL and the same size (an ISP that reuses a UIDL changes the size)."""
    return known is not None and known.size == message.size


def deletable(
    record: FetchRecorded, *, mode: Literal["delete", "keep"], keep_days: float | None, now: datetime | None
) -> bool:
    """A published message may go: delete mode, or keep mode once `keep_days` have passed."""
    if mode == "delete":
        return True
    return keep_days is not None and now is not None and record.published_at < now - timedelta(days=keep_days)


def plan_pass(
    listing: list[Listed],
    known: Mapping[str, FetchRecorded],
    *,
    mode: Literal["delete", "keep"],
    max_message_size: int,
    keep_days: float | None = None,
    now: datetime | None = None,
    too_big_uidls: Collection[str] = (),
    leave: Collection[str] = (),
    leave_numbers: Collection[int] = (),
) -> Plan:
    """Decide one pass over a mailbox; `known` maps UIDL to what this mailbox published earlier.

    In keep mode with `keep_days`, a message published before `now - keep_days` is deleted.
    `too_big_uidls` were found too big by the bytes received (whatever LIST says now); `leave` (UIDLs)
    and `leave_numbers` are not to be retrieved again in this pass (refused, too slow): in no list.
    """
    retrieve: list[Listed] = []
    delete_only: list[Listed] = []
    too_big: list[Listed] = []
    reused: set[str] = set()
    for message in listing:
        uidl = None if message.by_content else message.uidl
        record = known.get(uidl) if uidl is not None else None
        if already_published(message, record):
            assert record is not None
            if deletable(record, mode=mode, keep_days=keep_days, now=now):
                delete_only.append(message)  # delete mode: the session that published it dropped before QUIT
        elif uidl in leave or message.number in leave_numbers:
            continue
        elif message.size > max_message_size or uidl in too_big_uidls:
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
