"""services/runtime/lag.py, services/ops/lag.py, services/runtime/stages.py: lag figures, thresholds and
the stages they cover."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.ops.lag import CRITICAL, OK, WARNING, Thresholds, breaches, lag_json, lag_status, lag_text
from services.router.app import repartition_topic
from services.runtime.lag import PartitionLag, StageLag, lag_report
from services.runtime.log import TopicPartition
from services.runtime.settings import DeploymentSettings
from services.runtime.stages import declared_stages, router_repartition_topic, stage_named

NOW = datetime(2026, 11, 27, 9, tzinfo=UTC)
TP0, TP1 = TopicPartition("fetched", 0), TopicPartition("fetched", 1)


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def test_lag_is_the_end_minus_the_committed_offset_and_the_age_that_of_the_next_record() -> None:
    rows = lag_report({TP0: 10, TP1: 4}, {TP0: 7, TP1: 4}, {TP0: ms(NOW - timedelta(minutes=5))}, NOW)
    assert rows == (
        PartitionLag("fetched", 0, 7, 10, 3, 300.0),
        PartitionLag("fetched", 1, 4, 4, 0, None),
    )


def test_a_partition_never_committed_counts_from_the_log_start() -> None:
    rows = lag_report({TP0: 10}, {}, {}, NOW, starts={TP0: 4})
    assert (rows[0].committed, rows[0].lag, rows[0].oldest_age) == (None, 6, None)


def test_a_commit_older_than_the_retention_counts_from_the_log_start() -> None:
    assert lag_report({TP0: 10}, {TP0: 2}, {}, NOW, starts={TP0: 8})[0].lag == 2


def test_a_caught_up_partition_has_no_oldest_message_even_if_a_timestamp_is_known() -> None:
    assert lag_report({TP0: 3}, {TP0: 3}, {TP0: 0}, NOW)[0].oldest_age is None


def stage(name: str, lag: int, age: float | None, *, waits: bool = False) -> StageLag:
    return StageLag(name, f"popbridge-{name}", (PartitionLag("t", 0, 0, lag, lag, age),), waits=waits)


def test_thresholds_name_the_stage_that_exceeds_them() -> None:
    stages = [stage("router", 5, 10.0), stage("deliverer", 50, 900.0)]
    assert breaches(stages, Thresholds(max_lag=10)) == ["deliverer: lag 50 > 10"]
    too_old = "deliverer: oldest unprocessed message 900s old > 600s"
    assert breaches(stages, Thresholds(max_age=600)) == [too_old]
    assert breaches(stages, Thresholds(max_lag=50, max_age=900)) == []
    assert breaches(stages, Thresholds()) == []


def test_retry_tiers_wait_on_purpose_and_raise_no_alert() -> None:
    assert breaches([stage("deliverer-retry-5", 40, 20000.0, waits=True)], Thresholds(0, 0)) == []


def test_the_json_report_carries_every_partition_and_the_breaches() -> None:
    document = lag_json([stage("router", 5, 12.5)], Thresholds(max_lag=1), NOW)
    assert document["stages"][0]["total_lag"] == 5
    assert document["stages"][0]["partitions"] == [
        {"topic": "t", "partition": 0, "committed": 0, "end": 5, "lag": 5, "oldest_age_seconds": 12.5}
    ]
    assert document["breaches"] == ["router: lag 5 > 1"]


def test_the_table_flags_an_exceeded_threshold() -> None:
    text = "\n".join(lag_text([stage("router", 5, 4000.0)], Thresholds(max_lag=1)))
    assert "router (group popbridge-router): lag 5, oldest 67m" in text
    assert "THRESHOLD EXCEEDED: router: lag 5 > 1" in text


def test_the_router_reads_the_fetched_topic_and_its_own_repartition_topic() -> None:
    settings = DeploymentSettings(topic_prefix="p-", group_prefix="acme")
    router = stage_named(settings, "router")
    assert router.group == "acme-router"
    assert router.topics == ("p-popbridge.mail.fetched", repartition_topic(settings))
    assert router_repartition_topic(settings) == repartition_topic(settings)
    assert router.replay_topic == "p-popbridge.mail.fetched"


def test_the_deliverer_and_its_retry_tiers_are_declared() -> None:
    stages = {s.name: s for s in declared_stages(DeploymentSettings())}
    assert stages["deliverer"].topics == ("popbridge.mail.routed",)
    assert not stages["deliverer"].waits
    assert stages["deliverer-retry-1"].group == "popbridge-deliverer"  # one group reads routed and tiers
    assert stages["deliverer-retry-1"].topics == ("popbridge.delivery.retry-1",)
    assert stages["deliverer-retry-1"].waits


def test_the_exit_status_is_the_worst_limit_exceeded_whatever_the_flags() -> None:
    stages = [stage("deliverer", 50, 1200.0), stage("deliverer-retry-1", 900, 90000.0, waits=True)]
    assert lag_status(stages, Thresholds()) == OK  # no limits: a report, never an alarm
    assert lag_status(stages, Thresholds(max_lag=100)) == OK
    assert lag_status(stages, Thresholds(max_lag=10)) == WARNING
    assert lag_status(stages, Thresholds(max_lag=10, critical_age=600)) == CRITICAL
    assert lag_status(stages, Thresholds(critical_lag=100, critical_age=3600)) == OK  # retry tiers wait


def test_the_json_report_says_its_status_and_which_stages_thresholds_apply_to() -> None:
    document = lag_json([stage("router", 5, 12.5), stage("deliverer-retry-1", 9, 99.0, waits=True)],
                        Thresholds(max_lag=1, critical_lag=4), NOW)
    assert document["status"] == "critical"
    assert document["critical"] == ["router: lag 5 > 4"]
    assert [s["thresholds_apply"] for s in document["stages"]] == [True, False]
