"""services/runtime/metrics.py: names, labels and isolation of the Prometheus metrics."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client.parser import text_string_to_metric_families

from services.runtime.lag import PartitionLag, StageLag
from services.runtime.metrics import Metrics
from services.runtime.settings import DeploymentSettings
from services.runtime.stages import declared_stages


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def used() -> Metrics:
    """Every metric touched once."""
    metrics = Metrics(process=False)
    metrics.fetched("sales-catchall", size=2048)
    metrics.routed("delivered-to")
    metrics.delivery("delivered")
    metrics.dead_letters.inc()
    metrics.pop3_command("retr").observe(0.2)
    metrics.smtp_transaction_seconds.labels("delivered").observe(1.5)
    metrics.retries_in_flight.set(4)
    metrics.observe_lag(StageLag("router", "g", (PartitionLag("fetched", 0, 1, 2, 1, 3.0),)))
    return metrics


def test_counters_and_histograms_have_conventional_names() -> None:
    found = samples(used())
    assert found[("popbridge_messages_fetched_total", (("mailbox", "sales-catchall"),))] == 1
    assert found[("popbridge_bytes_fetched_total", (("mailbox", "sales-catchall"),))] == 2048
    assert found[("popbridge_messages_routed_total", (("reason", "delivered-to"),))] == 1
    assert found[("popbridge_deliveries_total", (("outcome", "delivered"),))] == 1
    assert found[("popbridge_dead_letters_total", ())] == 1
    assert found[("popbridge_pop3_command_seconds_count", (("command", "RETR"),))] == 1
    assert found[("popbridge_smtp_transaction_seconds_count", (("outcome", "delivered"),))] == 1
    assert found[("popbridge_retries_in_flight", ())] == 4


def test_an_unknown_pop3_verb_is_pooled_so_labels_stay_few() -> None:
    metrics = Metrics(process=False)
    metrics.pop3_command("XSECRET alice@example.com").observe(0.1)
    assert ("popbridge_pop3_command_seconds_count", (("command", "OTHER"),)) in samples(metrics)


def test_lag_gauges_per_stage_topic_and_partition() -> None:
    metrics = Metrics(process=False)
    metrics.observe_lag(StageLag("router", "g", (PartitionLag("fetched", 2, 5, 9, 4, 30.0),
                                                 PartitionLag("fetched", 3, 9, 9, 0, None))))
    found = samples(metrics)
    labels = (("partition", "2"), ("stage", "router"), ("topic", "fetched"))
    assert found[("popbridge_consumer_lag", labels)] == 4
    assert found[("popbridge_oldest_unprocessed_seconds", labels)] == 30.0
    assert found[("popbridge_oldest_unprocessed_seconds", (("partition", "3"), ("stage", "router"),
                                                            ("topic", "fetched")))] == 0.0


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(process=False), Metrics(process=False)
    first.routed("to")
    assert ("popbridge_messages_routed_total", (("reason", "to"),)) not in samples(second)


def test_no_label_is_meant_for_personal_data() -> None:
    names = {label for family in used().registry.collect() for s in family.samples for label in s.labels}
    assert names == {"mailbox", "reason", "outcome", "command", "stage", "topic", "partition", "le"}


def test_new_labels_are_configured_ids_and_fixed_words() -> None:
    metrics = Metrics(process=False)
    metrics.poll_failed("isp-catchall", "unreachable")
    metrics.oversized("isp-catchall", waiting=1, new=1)
    metrics.observe_lag(StageLag("deliverer-retry-1", "g", (PartitionLag("r", 0, 0, 1, 1, 1.0),), waits=True))
    metrics.smtp_transaction(0.1, ["failed"])
    names = {label for family in metrics.registry.collect() for s in family.samples for label in s.labels}
    assert names == {"mailbox", "state", "tier", "outcome", "stage", "topic", "partition", "le"}


def test_process_metrics_are_included_by_default() -> None:
    assert any(name == "process_cpu_seconds_total" for name, _ in samples(Metrics()))


def test_mailbox_poll_health_per_configured_mailbox_id() -> None:
    metrics = Metrics(process=False)
    metrics.poll_failed("isp-catchall", "auth-failed")
    metrics.poll_failed("isp-catchall", "auth-failed")
    metrics.poll_succeeded("alice-legacy", datetime(2026, 12, 1, tzinfo=UTC))
    found = samples(metrics)
    box = (("mailbox", "isp-catchall"),)
    assert found[("popbridge_mailbox_poll_failures_total", (*box, ("state", "auth-failed")))] == 2
    assert found[("popbridge_mailbox_failing", box)] == 1
    assert found[("popbridge_mailbox_failing", (("mailbox", "alice-legacy"),))] == 0
    last = ("popbridge_mailbox_last_successful_poll_timestamp_seconds", (("mailbox", "alice-legacy"),))
    assert found[last] == datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    metrics.poll_succeeded("isp-catchall", datetime(2026, 12, 2, tzinfo=UTC))
    assert samples(metrics)[("popbridge_mailbox_failing", box)] == 0


def test_oversized_messages_waiting_and_first_seen() -> None:
    metrics = Metrics(process=False)
    metrics.oversized("isp-catchall", waiting=2, new=2)
    metrics.oversized("isp-catchall", waiting=1)
    found = samples(metrics)
    assert found[("popbridge_mailbox_oversized_messages", (("mailbox", "isp-catchall"),))] == 1
    assert found[("popbridge_oversized_messages_total", (("mailbox", "isp-catchall"),))] == 2


def test_retry_depth_per_tier_comes_from_the_waiting_stages_lag() -> None:
    metrics = Metrics(process=False)
    for stage in declared_stages(DeploymentSettings()):
        rows = tuple(PartitionLag(t, 0, 0, 3, 3, 1.0) for t in stage.topics)
        metrics.observe_lag(StageLag(stage.name, stage.group, rows, waits=stage.waits))
    depth = {labels: v for (name, labels), v in samples(metrics).items() if name == "popbridge_retry_depth"}
    assert depth == {(("tier", f"retry-{n}"),): 3 for n in range(1, 6)}


def test_smtp_transaction_by_outcome_or_mixed_and_skipped_records() -> None:
    metrics = Metrics(process=False)
    metrics.smtp_transaction(0.5, ["delivered", "delivered"])
    metrics.smtp_transaction(0.5, ["delivered", "deferred"])
    metrics.skipped("router")
    found = samples(metrics)
    assert found[("popbridge_smtp_transaction_seconds_count", (("outcome", "delivered"),))] == 1
    assert found[("popbridge_smtp_transaction_seconds_count", (("outcome", "mixed"),))] == 1
    assert found[("popbridge_records_skipped_total", (("stage", "router"),))] == 1
