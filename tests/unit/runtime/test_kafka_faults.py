"""Which Kafka failures a stage waits out (services.runtime.kafka_faults)."""

from __future__ import annotations

import pytest
from aiokafka import errors

from services.runtime.kafka import KafkaLogError, _wrap
from services.runtime.kafka_faults import recoverable

# What the chaos runs crashed on, and what a broker restart or a rebalance raises.
RECOVERABLE = [
    errors.CommitFailedError(),
    errors.IllegalStateError("Partition TopicPartition(topic='t', partition=1) is not assigned"),
    errors.IllegalGenerationError(),
    errors.UnknownMemberIdError(),
    errors.RebalanceInProgressError(),
    errors.NotCoordinatorForGroupError(),
    errors.GroupCoordinatorNotAvailableError(),
    errors.LeaderNotAvailableError(),
    errors.NotLeaderForPartitionError(),
    errors.KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]"),
    errors.KafkaTimeoutError(),
    errors.RequestTimedOutError(),
    errors.NodeNotReadyError(),
    ConnectionRefusedError(111, "Connect call failed"),
]
PERMANENT = [
    errors.SaslAuthenticationFailed("bad password"),
    errors.TopicAuthorizationFailedError(),
    errors.GroupAuthorizationFailedError(),
    errors.RecordTooLargeError(),
    errors.UnsupportedVersionError(),
]


@pytest.mark.parametrize("exc", RECOVERABLE, ids=lambda e: type(e).__name__)
def test_a_stage_waits_out_what_kafka_recovers_from(exc: BaseException) -> None:
    assert recoverable(exc)


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: type(e).__name__)
def test_a_refused_login_or_a_missing_right_ends_the_stage(exc: BaseException) -> None:
    assert not recoverable(exc)


def test_a_failed_commit_after_a_rebalance_is_a_retriable_log_error() -> None:
    # aiokafka flags CommitFailedError and IllegalStateError not retriable; the deliverer crashed on them.
    wrapped = _wrap(errors.CommitFailedError(), "commit")
    assert isinstance(wrapped, KafkaLogError)
    assert wrapped.retriable
    assert str(wrapped).startswith("kafka: commit: CommitFailedError")


def test_a_bug_is_not_taken_for_a_kafka_failure() -> None:
    assert not recoverable(ValueError("bad value"))
