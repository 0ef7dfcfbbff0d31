"""Prometheus metrics of one popbridge process, on a registry of its own (so tests never share state).

Names follow Prometheus conventions (`_total` counters, `_seconds` and `_bytes` units). Labels never carry
personal data: no addresses, subjects or Message-IDs. `mailbox` is the operator-chosen mailbox id of the
configuration (e.g. "sales-catchall"), not the POP3 user name or an address; `reason` is a routing reason
(a fixed word or a configured header name, e.g. "delivered-to"); `command` a POP3 verb; `outcome` one of
delivered/deferred/failed; `stage`, `topic` and `partition` name the pipeline's own parts.

    metrics = Metrics()
    metrics.fetched("sales-catchall", size=2345)
    with metrics.pop3_command_seconds.labels("RETR").time(): ...
    body = metrics.render()                       # what /metrics serves
"""

from __future__ import annotations

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
        self.pop3_failures = Counter(
            "popbridge_pop3_failures", "Mailbox passes that failed, by mailbox and state (e.g. "
            "limit-exceeded, unreachable).", ["mailbox", "state"], registry=r)
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

    def fetched(self, mailbox_id: str, size: int) -> None:
        self.messages_fetched.labels(mailbox_id).inc()
        self.bytes_fetched.labels(mailbox_id).inc(size)

    def routed(self, reason: str) -> None:
        self.messages_routed.labels(reason).inc()

    def delivery(self, outcome: str) -> None:
        self.deliveries.labels(outcome).inc()

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

    def render(self) -> bytes:
        """The exposition text of every metric (what /metrics serves)."""
        return generate_latest(self.registry)
