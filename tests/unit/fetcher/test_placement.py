"""services/fetcher/placement.py: which replica polls which mailbox."""

from __future__ import annotations

import zlib

from services.fetcher.placement import PARTITIONS, Change, Ownership, owned_mailboxes, partition_of

MAILBOXES = tuple(f"box{n}" for n in range(20))


def test_a_mailbox_is_placed_by_the_crc32_of_its_id_on_one_of_64_partitions() -> None:
    assert PARTITIONS == 64
    assert partition_of("box1") == zlib.crc32(b"box1") % 64
    assert partition_of("box1") == partition_of("box1")  # stable: no per-process hash seed
    assert partition_of("catchall", 4) == zlib.crc32(b"catchall") % 4


def test_pinned_placements_never_change_between_releases() -> None:
    # Replicas of two releases running side by side during a rolling update must agree.
    assert [partition_of(m) for m in ("box0", "box1", "catchall", "sales@example.com")] == [
        zlib.crc32(m.encode()) % 64 for m in ("box0", "box1", "catchall", "sales@example.com")
    ]
    assert partition_of("box0") == 27


def test_replicas_holding_disjoint_partitions_own_disjoint_mailboxes_that_cover_all() -> None:
    even = owned_mailboxes(MAILBOXES, set(range(0, 64, 2)))
    odd = owned_mailboxes(MAILBOXES, set(range(1, 64, 2)))
    assert even.isdisjoint(odd)
    assert even | odd == set(MAILBOXES)


def test_gained_mailboxes_are_stale_until_their_memory_is_refreshed() -> None:
    ownership = Ownership(MAILBOXES)
    change = ownership.update(set(range(64)))
    assert change == Change(gained=frozenset(MAILBOXES))
    assert all(ownership.owns(m) and ownership.is_stale(m) for m in MAILBOXES)
    ownership.refreshed(["box1"])
    assert not ownership.is_stale("box1")
    assert ownership.is_stale("box2")


def test_a_revoked_mailbox_is_not_owned_and_a_regained_one_is_stale_again() -> None:
    ownership = Ownership(MAILBOXES)
    ownership.update(set(range(64)))
    ownership.refreshed(MAILBOXES)
    box = "box3"
    change = ownership.update(set(range(64)) - {partition_of(box)})
    assert box in change.lost
    assert not ownership.owns(box)
    assert not ownership.update(set(range(64)) - {partition_of(box)})  # nothing changed: falsy
    assert box in ownership.update(set(range(64))).gained
    assert ownership.is_stale(box)
    assert not ownership.is_stale("box4")


def test_before_the_first_assignment_nothing_is_owned() -> None:
    ownership = Ownership(MAILBOXES)
    assert not any(ownership.owns(m) for m in MAILBOXES)
    assert not ownership.update(set())
