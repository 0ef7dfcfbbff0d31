"""Every Kafka topic popbridge uses, with the partition counts and settings `popbridge topics create` applies.

The Strimzi KafkaTopic resources under deploy/k8s are checked against this module, so it is the one
place a topic is declared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024 * 1024
DAY_MS = 24 * 60 * 60 * 1000

# A raw message may be up to the fetcher's default size limit (50 MB) plus event framing.
MAX_MESSAGE_BYTES = 64 * MIB

FETCHED = "popbridge.mail.fetched"
ROUTED = "popbridge.mail.routed"
DELIVERY_ATTEMPTS = "popbridge.delivery.attempts"
DEAD_LETTERS = "popbridge.delivery.dead-letters"
# The deliverer's retry tiers, one topic per delay (1 min, 5 min, 30 min, 2 h, then every 6 h by default).
# Every record of one tier waits the same delay, so records fall due in the order they were written and
# a tier's consumer only ever waits for the record at its head.
RETRY_TOPICS = tuple(f"popbridge.delivery.retry-{tier}" for tier in range(1, 6))
# The delivered ledger: one record per (fetch id, recipient) handed over, keyed by both (for compaction) and
# written to the partition of its fetch id (co-partitioned with the routed topic, see DELIVERY_PARTITIONS).
DELIVERED = "popbridge.delivery.delivered"
# Compacted: per (mailbox, UIDL) the latest fetch record, so a restarted fetcher re-downloads nothing.
FETCH_STATE = "popbridge.fetch.state"
# Carries no records: fetcher replicas subscribe to it in one consumer group, and the partitions a replica
# is assigned name the mailboxes it polls (services.fetcher.placement). 64 partitions: up to 64 replicas.
FETCH_ASSIGNMENT = "popbridge.fetch.assignment"


# The deliverer's co-partitioned topics: the routed topic, the retry tiers and the delivered ledger hold one
# fetch id in the same partition number, and one deliverer replica owns partition N of all of them
# (services.deliverer.ledger); the deliverer refuses to start unless their counts are equal. 12 allows
# 1, 2, 3, 4, 6 or 12 replicas with an even share each.
DELIVERY_PARTITIONS = 12


@dataclass(frozen=True)
class TopicSpec:
    """A topic as popbridge creates it: the name, a partition count and topic-level configs."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def _mail_topic(name: str, partitions: int, retention_days: int) -> TopicSpec:
    return TopicSpec(
        name,
        partitions,
        {
            "max.message.bytes": str(MAX_MESSAGE_BYTES),
            "retention.ms": str(retention_days * DAY_MS),
            "cleanup.policy": "delete",
            # Replay by time (`popbridge replay --from`) looks records up by timestamp; the broker's
            # append time cannot be forged by a skewed fetcher clock.
            "message.timestamp.type": "LogAppendTime",
        },
    )


TOPICS: tuple[TopicSpec, ...] = (
    _mail_topic(FETCHED, 6, retention_days=14),
    _mail_topic(ROUTED, DELIVERY_PARTITIONS, retention_days=14),
    _mail_topic(DELIVERY_ATTEMPTS, 6, retention_days=30),
    _mail_topic(DEAD_LETTERS, 3, retention_days=90),
    TopicSpec(FETCH_STATE, 6, {"cleanup.policy": "compact", "min.compaction.lag.ms": str(60 * 60 * 1000)}),
    *(_mail_topic(name, DELIVERY_PARTITIONS, retention_days=14) for name in RETRY_TOPICS),
    # Compaction keeps one record per key, and keys never repeat (a pair is delivered once), so the delete
    # policy bounds the ledger: 30 days outlive the routed topic's 14 days of replay plus 5 days of retries.
    TopicSpec(
        DELIVERED, DELIVERY_PARTITIONS, {"cleanup.policy": "compact,delete", "retention.ms": str(30 * DAY_MS)}
    ),
    TopicSpec(FETCH_ASSIGNMENT, 64, {"cleanup.policy": "delete", "retention.ms": str(60 * 60 * 1000)}),
)


# The plain router loop's dedupe state (services.router.loop), used by `popbridge run` instead of the faust
# router: per Message-ID, which copy routed the message to whom. Compacted, keyed by Message-ID. Not in
# TOPICS, because the Kubernetes deployment runs the faust router, whose table has its own changelog.
ROUTER_SEEN_COPIES = "popbridge.router.seen-copies"
PLAIN_ROUTER_TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        ROUTER_SEEN_COPIES,
        6,
        {"cleanup.policy": "compact", "max.message.bytes": str(MIB), "min.compaction.lag.ms": str(DAY_MS)},
    ),
)


def topic_spec(name: str) -> TopicSpec:
    """The spec of one of popbridge's topics; KeyError names an unknown topic."""
    for spec in (*TOPICS, *PLAIN_ROUTER_TOPICS):
        if spec.name == name:
            return spec
    raise KeyError(name)
