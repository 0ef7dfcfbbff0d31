"""Prometheus metrics of one popbridge process, on a registry of its own (so tests never share state).

Names follow Prometheus conventions (`_total` counters, `_seconds` and `_bytes` units). Labels never carry
personal data: no addresses, subjects or Message-IDs. `mailbox` is the operator-chosen mailbox id of the
configuration (e.g. "sales-catchall"), not the POP3 user name or an address; `reason` is a routing reason
(a fixed word or a configured header name, e.g. "delivered-to"); `command` a POP3 verb; `outcome` one of
delivered/deferred/failed (an SMTP transaction whose recipients disagree is "mixed"); `state` a mailbox
failure state of services.fetcher.status (e.g. "auth-failed"); `tier` a retry tier ("retry-1"); `stage`,
`topic` and `partition` name the pipeline's own parts.

Alerts and the Grafana dashboard (deploy/monitoring/) query these names; tests/deploy/test_alerts.py and
tests/integration/test_prometheus.py keep them in step. services/runtime/pipeline_gauges.py
sets the lag and dead-letter gauges of the whole pipeline from topic offsets, in every process.

    metrics = Metrics()
    metrics.fetched("sales-catchall", size=2345)
    with metrics.pop3_command_seconds.labels("RETR").time(): ...
    body = metrics.render()                       # what /metrics serves
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from services.runtime.lag import StageLag

POP3_VERBS = frozenset({"CAPA", "STLS", "USER", "PASS", "APOP", "AUTH", "STAT", "LIST", "UIDL", "RETR", "TOP",
                        "DELE", "NOOP", "RSET", "QUIT", "CONNECT"})
_COMMAND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TRANSACTION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Every metric popbridge exports; each stage uses the ones that concern it."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.messages_fetched = Counter(
            "popbridge_messages_fetched", "Messages retrieved from POP3 and published.", ["mailbox"],
            registry=r)
        self.bytes_fetched = Counter(
            "popbridge_bytes_fetched", "Bytes of the messages retrieved from POP3.", ["mailbox"], registry=r)
        self.messages_routed = Counter(
            "popbridge_messages_routed", "Messages routed, by routing reason.", ["reason"], registry=r)
        self.deliveries = Counter(
            "popbridge_deliveries", "Delivery attempts of one recipient's copy, by outcome.", ["outcome"],
            registry=r)
        self.dead_letters = Counter(
            "popbridge_dead_letters", "Recipient copies given up and sent to the dead letters.", registry=r)
        self.messages_skipped = Counter(
            "popbridge_messages_skipped", "Messages left on the POP3 server for now, by reason (too-big, "
            "refused, unpublishable).", ["mailbox", "reason"], registry=r)
        self.pop3_command_seconds = Histogram(
            "popbridge_pop3_command_seconds", "Duration of POP3 commands, by verb.", ["command"],
            buckets=_COMMAND_BUCKETS, registry=r)
        self.smtp_transaction_seconds = Histogram(
            "popbridge_smtp_transaction_seconds", "Duration of one SMTP/LMTP transaction (MAIL to the reply "
            "to the data), by outcome.", ["outcome"], buckets=_TRANSACTION_BUCKETS, registry=r)
        self.consumer_lag = Gauge(
            "popbridge_consumer_lag", "Records not yet processed by a stage's consumer group.",
            ["stage", "topic", "partition"], registry=r)
        self.oldest_unprocessed_seconds = Gauge(
            "popbridge_oldest_unprocessed_seconds", "Age of the oldest record a stage has not processed "
            "(0 when caught up).", ["stage", "topic", "partition"], registry=r)
        self.retries_in_flight = Gauge(
            "popbridge_retries_in_flight", "Retries waiting in the retry tiers (one per message with "
            "deferred recipients).", registry=r)
        self.seconds_since_progress = Gauge(
            "popbridge_seconds_since_progress", "Seconds since the stage last made progress.", registry=r)
        self._mailbox_metrics(r)
        self.retry_depth = Gauge(
            "popbridge_retry_depth", "Copies waiting in one retry tier (the lag of the tier's group).",
            ["tier"], registry=r)
        self.dead_letter_records = Gauge(
            "popbridge_dead_letter_records", "Records kept in the dead-letter topic (end minus start "
            "offsets, all partitions); only retention removes them.", registry=r)
        self.records_skipped = Counter(
            "popbridge_records_skipped", "Records a stage skipped because they were not a valid event.",
            ["stage"], registry=r)

    def _mailbox_metrics(self, r: CollectorRegistry) -> None:
        self.poll_failures = Counter(
            "popbridge_mailbox_poll_failures", "Failed POP3 polls of a mailbox, by the failure state.",
            ["mailbox", "state"], registry=r)
        self.mailbox_failing = Gauge(
            "popbridge_mailbox_failing", "1 while the last poll of a mailbox failed, 0 after a success.",
            ["mailbox"], registry=r)
        self.last_successful_poll = Gauge(
            "popbridge_mailbox_last_successful_poll_timestamp_seconds", "Unix time of the last poll of a "
            "mailbox that succeeded.", ["mailbox"], registry=r)
        self.oversized_messages = Gauge(
            "popbridge_mailbox_oversized_messages", "Messages the last poll left on the server because they "
            "exceed max_message_size.", ["mailbox"], registry=r)
        self.oversized_seen = Counter(
            "popbridge_oversized_messages", "Messages found over max_message_size (each counted once per "
            "process).", ["mailbox"], registry=r)
        # OAuth2 (services.runtime.oauth2_tokens); `mailbox` is "delivery" for the deliverer's SMTP login.
        self.oauth2_login_required = Gauge(
            "popbridge_oauth2_login_required", "1 while a mailbox's refresh token is missing or was refused: "
            "a person must run `popbridge oauth login MAILBOX`.", ["mailbox"], registry=r)
        self.oauth2_token_failures = Counter(
            "popbridge_oauth2_token_failures", "Failed token requests, by reason (login-required, "
            "config-refused, endpoint-down).", ["mailbox", "reason"], registry=r)
        self.oauth2_token_renewals = Counter(
            "popbridge_oauth2_token_renewals", "Access tokens obtained from the token endpoint.", ["mailbox"],
            registry=r)

    def fetched(self, mailbox_id: str, size: int) -> None:
        self.messages_fetched.labels(mailbox_id).inc()
        self.bytes_fetched.labels(mailbox_id).inc(size)

    def routed(self, reason: str) -> None:
        self.messages_routed.labels(reason).inc()

    def delivery(self, outcome: str) -> None:
        self.deliveries.labels(outcome).inc()

    def poll_succeeded(self, mailbox_id: str, at: datetime) -> None:
        """A pass over the mailbox ended without a failure at `at` (aware)."""
        self.mailbox_failing.labels(mailbox_id).set(0)
        self.last_successful_poll.labels(mailbox_id).set(at.timestamp())

    def poll_failed(self, mailbox_id: str, state: str) -> None:
        """A pass over the mailbox failed; `state` is its failure state (e.g. "unreachable")."""
        self.mailbox_failing.labels(mailbox_id).set(1)
        self.poll_failures.labels(mailbox_id, state).inc()

    def oversized(self, mailbox_id: str, waiting: int, new: int = 0) -> None:
        """`waiting` messages are too big to fetch (left on the server), `new` of them seen the first time."""
        self.oversized_messages.labels(mailbox_id).set(waiting)
        if new:
            self.oversized_seen.labels(mailbox_id).inc(new)

    def skipped(self, stage: str, count: int = 1) -> None:
        """`count` records of the stage's input were not valid events and were skipped."""
        if count:
            self.records_skipped.labels(stage).inc(count)

    def smtp_transaction(self, seconds: float, outcomes: Iterable[str]) -> None:
        """One SMTP/LMTP transaction took `seconds`; its recipients' outcomes name the series."""
        distinct = set(outcomes)
        label = distinct.pop() if len(distinct) == 1 else "mixed"
        self.smtp_transaction_seconds.labels(label).observe(seconds)

    def pop3_command(self, verb: str) -> Histogram:
        """The timer of one POP3 verb (`with metrics.pop3_command("RETR").time():`); unknown verbs pool."""
        verb = verb.upper()
        return self.pop3_command_seconds.labels(verb if verb in POP3_VERBS else "OTHER")

    def observe_lag(self, stage: StageLag) -> None:
        """Set the lag gauges of every partition of `stage` from a lag report."""
        for p in stage.partitions:
            labels = (stage.stage, p.topic, str(p.partition))
            self.consumer_lag.labels(*labels).set(p.lag)
            self.oldest_unprocessed_seconds.labels(*labels).set(p.oldest_age or 0.0)
        if stage.waits:  # a retry tier (services.runtime.stages): "deliverer-retry-2" is tier "retry-2"
            self.retry_depth.labels(stage.stage.removeprefix("deliverer-")).set(stage.total)

    def render(self) -> bytes:
        """The exposition text of every metric (what /metrics serves)."""
        return generate_latest(self.registry)
