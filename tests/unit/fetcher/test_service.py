"""services/fetcher/service.py: how a failed pass is classified."""

from __future__ import annotations

from services.fetcher.service import classify
from services.runtime.kafka import KafkaLogError


def test_a_publish_failure_the_broker_recovers_from_is_an_outage_not_a_mailbox_state() -> None:
    failure = classify(KafkaLogError("kafka: publish: KafkaConnectionError", retriable=True))
    assert (failure.state, failure.outage) == ("publish-failed", True)


def test_a_publish_refused_for_good_is_the_mailbox_s_failure() -> None:
    failure = classify(KafkaLogError("kafka: publish: TopicAuthorizationFailedError", retriable=False))
    assert (failure.state, failure.outage) == ("publish-failed", False)
