"""The POP3 fetch plan: which messages of a mailbox to retrieve, which only to delete, which to leave.

Pure: it sees the server's listing and the fetcher's durable memory (`FetchRecorded` per UIDL), and
decides. Deletion of a retrieved message is never planned here: the service deletes only after the
broker acknowledged the publish.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from schemas.events import FetchRecorded


@dataclass(frozen=True)
class Listed:
    """One message as the server lists it in this session."""

    number: int
    uidl: str
    size: int


@dataclass(frozen=True)
class Plan:
    retrieve: list[Listed] = field(default_factory=list)
    delete_only: list[Listed] = field(default_factory=list)
    too_big: list[Listed] = field(default_factory=list)


def already_published(message: Listed, known: FetchRecorded | None) -> bool:
    """Published before: same UIDL and the same size (an ISP that reuses a UIDL changes the size)."""
    return known is not None and known.size == message.size


def plan_pass(
    listing: list[Listed],
    known: Mapping[str, FetchRecorded],
    *,
    mode: Literal["delete", "keep"],
    max_message_size: int,
) -> Plan:
    """Decide one pass over a mailbox; `known` maps UIDL to what this mailbox published earlier."""
    plan = Plan()
    for message in listing:
        if already_published(message, known.get(message.uidl)):
            if mode == "delete":
                plan.delete_only.append(message)  # the session that published it dropped before QUIT
        elif message.size > max_message_size:
            plan.too_big.append(message)
        else:
            plan.retrieve.append(message)
    return plan
