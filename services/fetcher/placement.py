"""Which fetcher replica polls which mailbox: mailboxes placed on the partitions of the assignment topic.

Replicas share the mailboxes through Kafka's consumer-group protocol, with no other coordinator: they
subscribe in one group to `schemas.topics.FETCH_ASSIGNMENT`, which carries no records, and a replica
polls the mailboxes whose partition the group assigns to it. A mailbox's partition is a stable crc32 of
its id (never Python's hash(), which differs between processes), so every replica agrees on it.

Pure: `Ownership` is told the partitions held and answers which mailboxes are owned, which were gained
(their memory must be re-read before planning: another replica wrote to it) and which were lost.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from schemas.topics import FETCH_ASSIGNMENT, topic_spec

PARTITIONS = topic_spec(FETCH_ASSIGNMENT).partitions


def partition_of(mailbox_id: str, partitions: int = PARTITIONS) -> int:
    """The assignment partition of a mailbox: stable across processes, replicas and releases."""
    return zlib.crc32(mailbox_id.encode("utf-8")) % partitions


def owned_mailboxes(
    mailbox_ids: Iterable[str], held: Collection[int], partitions: int = PARTITIONS
) -> frozenset[str]:
    """The mailboxes placed on the partitions `held`."""
    return frozenset(m for m in mailbox_ids if partition_of(m, partitions) in held)


@dataclass(frozen=True)
class Change:
    """What one new assignment changed for this replica."""

    gained: frozenset[str] = frozenset()
    lost: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.gained or self.lost)


@dataclass
class Ownership:
    """The mailboxes this replica may poll now, and the owned ones whose memory is stale.

    A gained mailbox is stale until `refreshed`: its previous owner published and recorded fetches this
    replica has not read, and planning from the old memory would publish them again (keep mode).
    """

    mailbox_ids: tuple[str, ...]
    partitions: int = PARTITIONS
    owned: frozenset[str] = frozenset()
    stale: set[str] = field(default_factory=set)

    def update(self, held: Collection[int]) -> Change:
        """Take the partitions the group assigns now; returns the mailboxes gained and lost."""
        now = owned_mailboxes(self.mailbox_ids, held, self.partitions)
        change = Change(gained=now - self.owned, lost=self.owned - now)
        self.owned = now
        self.stale = (self.stale | change.gained) - change.lost
        return change

    def revoke(self, held: Collection[int]) -> frozenset[str]:
        """The group takes the partitions `held` away (a rebalance): their mailboxes are no longer owned,
        at once, before the next `update`; returns them."""
        lost = self.owned & owned_mailboxes(self.mailbox_ids, held, self.partitions)
        self.owned -= lost
        self.stale -= lost
        return lost

    def owns(self, mailbox_id: str) -> bool:
        return mailbox_id in self.owned

    def is_stale(self, mailbox_id: str) -> bool:
        return mailbox_id in self.stale

    def refreshed(self, mailbox_ids: Iterable[str]) -> None:
        """The memory of these mailboxes was re-read after their maildrop was ours."""
        self.stale.difference_update(mailbox_ids)
