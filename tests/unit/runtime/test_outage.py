"""The broker-outage log bound (services.runtime.outage), driven by an injected clock."""

from __future__ import annotations

import logging

import pytest

from services.runtime.outage import BrokerOutage, KafkaLogThrottle, Outage, is_unreachable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def aiokafka_record(
    msg: str, *args: object, name: str = "aiokafka", level: int = logging.ERROR
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_an_outage_says_first_failure_then_one_summary_a_minute_then_reconnected() -> None:
    outage = Outage(every=60)
    assert outage.failure(0.0) == "first"
    assert [outage.failure(t) for t in (0.1, 1.0, 59.9)] == [None, None, None]
    assert outage.failure(60.0) == "kafka: still unreachable for 60 s (5 attempts)"
    assert outage.failure(61.0) is None
    assert outage.recovery(75.4) == "kafka: reconnected after 75 s (6 failed attempts)"
    assert outage.recovery(76.0) is None  # no outage any more: nothing to say
    assert outage.failure(200.0) == "first"  # a new outage starts afresh


def test_the_hiccups_right_after_a_reconnection_say_nothing_unless_they_last() -> None:
    outage = Outage(every=60)
    outage.failure(0.0)
    assert outage.recovery(30.0) == "kafka: reconnected after 30 s (1 failed attempts)"
    assert outage.failure(30.5) is None  # "coordinator not available" while the broker loads its groups
    assert outage.recovery(31.0) is None
    assert outage.failure(32.0) is None
    assert outage.failure(92.0) == "kafka: still unreachable for 60 s (2 attempts)"  # it lasted: said
    assert outage.recovery(95.0) == "kafka: reconnected after 63 s (2 failed attempts)"


def test_a_flood_of_connection_errors_becomes_a_few_lines_a_minute() -> None:
    clock = Clock()
    throttle = KafkaLogThrottle(BrokerOutage(clock=clock))
    passed = []
    start = clock.now
    for step in range(1, 38_401):  # ten minutes at 64 failures a second
        clock.now = start + step / 64
        record = aiokafka_record("Unable connect to node with id %s: %s", 1, "refused", name="aiokafka.conn")
        if throttle.filter(record):
            passed.append(record.getMessage())
    assert len(passed) == 10  # the first failure and one summary per minute (the tenth falls after the end)
    assert passed[0] == "Unable connect to node with id 1: refused"
    assert passed[1] == (
        "kafka: still unreachable for 60 s (3841 attempts): Unable connect to node with id 1: refused"
    )


def test_reconnecting_is_said_once_and_ends_the_outage(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    broker = BrokerOutage(clock=clock)
    throttle = KafkaLogThrottle(broker)
    assert throttle.filter(aiokafka_record("Heartbeat send request failed: %s. Will retry.", "x"))
    clock.now += 12
    with caplog.at_level(logging.WARNING, "popbridge.kafka"):
        broker.recovered()
        broker.recovered()
    assert [r.getMessage() for r in caplog.records] == ["kafka: reconnected after 12 s (1 failed attempts)"]
    assert not broker.down


def test_other_aiokafka_warnings_pass_within_a_burst_per_template() -> None:
    clock = Clock()
    throttle = KafkaLogThrottle(BrokerOutage(clock=clock), burst=2)
    rebalancing = "Heartbeat failed for group %s because it is rebalancing"
    assert [throttle.filter(aiokafka_record(rebalancing, "g", level=logging.WARNING)) for _ in range(4)] == [
        True, True, False, False,
    ]
    clock.now += 60
    assert throttle.filter(aiokafka_record(rebalancing, "g", level=logging.WARNING))


def test_our_own_lines_are_not_touched_and_aiokafka_info_is_never_written() -> None:
    throttle = KafkaLogThrottle(BrokerOutage(clock=Clock()))
    assert throttle.filter(aiokafka_record("Unable connect to node", name="popbridge.deliverer"))
    assert not throttle.filter(aiokafka_record("Joined group", level=logging.INFO))


def test_a_consumer_finding_its_coordinator_again_ends_the_outage(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    broker = BrokerOutage(clock=clock)
    throttle = KafkaLogThrottle(broker)
    throttle.filter(aiokafka_record("Unable connect to node with id %s: %s", 1, "refused"))
    clock.now += 30
    found = aiokafka_record("Discovered coordinator %s for group %s", 1, "g", level=logging.INFO)
    with caplog.at_level(logging.WARNING, "popbridge.kafka"):
        assert not throttle.filter(found)
    assert caplog.messages == ["kafka: reconnected after 30 s (1 failed attempts)"]


def test_a_stage_failure_counts_as_an_attempt_of_the_same_outage(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    broker = BrokerOutage(clock=clock)
    with caplog.at_level(logging.WARNING, "popbridge.kafka"):
        for _ in range(100):
            clock.now += 1
            broker.failed("deliverer: waiting for the broker: KafkaConnectionError")  # one a second
    waiting = "deliverer: waiting for the broker: KafkaConnectionError"
    assert [r.getMessage() for r in caplog.records] == [
        f"kafka: {waiting}",
        f"kafka: still unreachable for 60 s (61 attempts): {waiting}",
    ]


CONNECTION_FAILURES = [
    "Unable connect to node with id %s: %s",
    'Unable connect to "%s:%s": %s',
    "Failed fetch messages from %s: %s",
    "Group Coordinator Request failed: %s",
]


@pytest.mark.parametrize("template", CONNECTION_FAILURES)
def test_connection_failures_are_recognised(template: str) -> None:
    assert is_unreachable(template)


def test_a_rebalance_message_is_not_an_outage() -> None:
    assert not is_unreachable("Heartbeat failed for group %s because it is rebalancing")


def test_an_authorization_refusal_from_aiokafka_is_left_to_the_caller_s_one_line() -> None:
    throttle = KafkaLogThrottle(BrokerOutage(clock=lambda: 0.0))
    record = logging.LogRecord("aiokafka.producer.sender", logging.ERROR, __file__, 1,
                               "Unexpected error during InitProducerIdRequest: %s",
                               ("<class 'aiokafka.errors.ClusterAuthorizationFailedError'>",), None)
    assert throttle.filter(record) is False
    other = logging.LogRecord("aiokafka.consumer.group_coordinator", logging.WARNING, __file__, 1,
                              "Heartbeat failed: local member_id was not recognized", (), None)
    assert throttle.filter(other) is True
