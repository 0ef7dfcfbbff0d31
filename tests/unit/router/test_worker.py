"""services.router.worker: which failures end the router, and how long it waits before starting again."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    NotCoordinatorForGroupError,
    RebalanceInProgressError,
    RequestTimedOutError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
)
from faust.exceptions import ConsistencyError

from services.router.worker import (
    RESTART_DELAYS,
    describe,
    discard_state,
    is_outage,
    is_permanent,
    restart_delay,
    state_directory,
)
from services.runtime.kafka import KafkaLogError
from services.runtime.kafka_faults import PERMANENT
from services.runtime.settings import ConfigError, DeploymentSettings


@pytest.mark.parametrize(
    "reason",
    [
        KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]"),
        CommitFailedError("Commit cannot be completed since the group has already rebalanced"),
        IllegalStateError("IllegalStateError: partition 3 is not assigned"),
        RebalanceInProgressError(),
        NotCoordinatorForGroupError(),
        RequestTimedOutError(),
        KafkaLogError("kafka: create topics: KafkaConnectionError: unreachable", retriable=True),
        TimeoutError(),
        RuntimeError("a faust crash we do not know yet"),
    ],
)
def test_what_kafka_recovers_from_starts_the_router_again(reason: BaseException) -> None:
    assert not is_permanent(reason)


@pytest.mark.parametrize(
    "reason",
    [
        ConfigError("environment: POPBRIDGE_KAFKA_SASL_PASSWORD_FILE: cannot read /run/secrets/kafka"),
        SaslAuthenticationFailed(),
        TopicAuthorizationFailedError(),
        KafkaLogError("kafka: create topics: SASL PLAIN login as 'popbridge' refused", retriable=False),
    ],
)
def test_a_refusal_of_who_we_are_ends_the_router(reason: BaseException) -> None:
    assert is_permanent(reason)


@pytest.mark.parametrize("error", PERMANENT, ids=lambda error: error.__name__)
def test_the_router_ends_on_exactly_the_kafka_errors_every_stage_counts_permanent(
    error: type[BaseException],
) -> None:
    # One classification (services.runtime.kafka_faults) for faust's raw aiokafka errors and our LogErrors.
    assert is_permanent(error())
    assert not is_permanent(KafkaLogError(f"kafka: {error.__name__}", retriable=True))


def test_a_reason_is_one_short_line() -> None:
    reason = KafkaConnectionError("Unable to bootstrap\n  from [('127.0.0.1', 1)]" + "x" * 500)
    line = describe(reason)
    assert "\n" not in line
    assert line.startswith("KafkaConnectionError: KafkaConnectionError: Unable to bootstrap from")
    assert len(line) == 300


@pytest.mark.parametrize(
    "reason",
    [
        KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]"),
        KafkaLogError("kafka: create topics: KafkaConnectionError: Unable connect to node 1", retriable=True),
    ],
)
def test_a_broker_out_of_reach_is_an_outage(reason: BaseException) -> None:
    assert is_outage(reason, broker_down=False)


def test_any_failure_while_the_broker_is_down_is_part_of_the_outage() -> None:
    crash = CommitFailedError("Commit cannot be completed since the group has already rebalanced")
    assert is_outage(crash, broker_down=True)
    assert not is_outage(crash, broker_down=False)


def test_the_wait_grows_with_failures_in_a_row_and_stays_bounded() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [*RESTART_DELAYS, 30.0, 30.0]


def test_replicas_sharing_a_data_directory_each_lock_their_own_state_directory(tmp_path: Path) -> None:
    settings = DeploymentSettings(data_dir=str(tmp_path))
    with state_directory(settings) as first, state_directory(settings) as second:
        assert (first, second) == (tmp_path / "router", tmp_path / "router-2")
    with state_directory(settings) as again:  # the first's lock was released: its state is reused
        assert again == tmp_path / "router"


def test_without_a_data_directory_the_state_lives_in_a_temporary_directory_until_exit() -> None:
    with state_directory(DeploymentSettings()) as temporary:
        assert temporary.is_dir()
    assert not temporary.exists()


def test_state_ahead_of_its_changelog_is_deleted(tmp_path: Path) -> None:
    (tmp_path / "c-0.sqlite3").write_bytes(b"x")
    (tmp_path / "c-0.sqlite3-wal").write_bytes(b"x")
    discard_state(tmp_path, ConsistencyError("persisted offset 10 > highwater 3"))
    assert list(tmp_path.iterdir()) == []
