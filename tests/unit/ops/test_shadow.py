"""services/ops/shadow.py: comparing re-routed decisions, and a shadow run on the embedded log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas import codec
from schemas.events import MailFetched, Recipient, RecipientsResolved
from schemas.topics import FETCHED, ROUTED, topic_spec
from services.ops.shadow import Decision, Rerouted, compare, report_text, shadow_replay, shadow_spec
from services.router.stage import route_fetched, route_or_postmaster
from services.runtime.embedded import EmbeddedLog
from services.runtime.log import Outgoing
from services.runtime.settings import DeploymentSettings, Mailbox, MailConfig, RoutingRules, SmtpTarget

T = datetime(2026, 11, 27, 8, tzinfo=UTC)


def decision(*addresses: str, version: str = "v1") -> Decision:
    return Decision(tuple(sorted(addresses)), "to", version)


def test_only_messages_whose_addresses_changed_are_listed() -> None:
    rerouted = [
        Rerouted("f1", "catchall", "m1@x", decision("bob@example.com", version="v2")),
        Rerouted("f2", "catchall", "m2@x", decision("carol@example.com", version="v2")),
        Rerouted("f3", "catchall", None, decision("dave@example.com", version="v2")),
    ]
    old = {"f1": decision("alice@example.com"), "f2": decision("carol@example.com")}
    report = compare(rerouted, old, "shadow")
    assert [c.message.fetch_id for c in report.changes] == ["f1"]
    assert report.changes[0].added == ("bob@example.com",)
    assert report.changes[0].removed == ("alice@example.com",)
    assert (report.unchanged, report.never_routed, report.rules_versions) == (1, ("f3",), ("v2",))
    text = "\n".join(report_text(report, T, None))
    assert "1 would go to different recipients:" in text
    assert "  f1 mailbox catchall Message-ID <m1@x>" in text
    assert "    old: alice@example.com (to, rules v1)" in text
    assert "    new: bob@example.com (to, rules v2)" in text
    assert "1 unchanged; 1 not routed before (not compared)" in text


def test_recipients_suppressed_as_duplicates_still_count_as_routed() -> None:
    event = RecipientsResolved(
        fetch_id="f1", mailbox_id="m", pop3_host="p", message_id=None, envelope_sender=None,
        recipients=(Recipient(address="bob@example.com", reason="to"),), reason="to", rules_version="v1",
        routed_at=T, raw=b"", suppressed=(Recipient(address="alice@example.com", reason="duplicate"),),
    )
    assert Decision.of(event).addresses == ("alice@example.com", "bob@example.com")


def test_the_shadow_topic_is_the_routed_topic_with_a_suffix_and_a_shorter_retention() -> None:
    spec = shadow_spec(DeploymentSettings(topic_prefix="p-"))
    assert spec.name == "p-popbridge.mail.routed.shadow"
    assert spec.partitions == topic_spec(ROUTED).partitions
    assert spec.config["retention.ms"] == str(7 * 24 * 3600 * 1000)


def rules(*users: str) -> MailConfig:
    routing = RoutingRules(primary_domain="example.com", local_domains=("example.com",),
                           postmaster="postmaster@example.com", users=(*users, "postmaster"))
    mailbox = Mailbox(id="catchall", host="pop", username="c", password_env="P", routing=routing)
    return MailConfig(delivery=SmtpTarget(host="127.0.0.1"), mailboxes=(mailbox,))


def mail(fetch_id: str, to: str) -> MailFetched:
    raw = f"Message-ID: <{fetch_id}@x>\r\nTo: {to}\r\nSubject: hi\r\n\r\nbody\r\n".encode()
    return MailFetched(fetch_id=fetch_id, mailbox_id="catchall", pop3_host="pop", uidl=fetch_id,
                       size=len(raw), sha256="", fetched_at=T, raw=raw)


def keyed(topic: str, event: MailFetched | RecipientsResolved) -> Outgoing:
    return Outgoing(topic, codec.encode(event), key=event.fetch_id.encode())


class Clock:
    def __init__(self) -> None:
        self.now = T.timestamp()

    def __call__(self) -> float:
        return self.now


async def test_a_shadow_run_on_the_embedded_log_lists_the_changed_message_and_writes_the_shadow_topic(
    tmp_path: Path,
) -> None:
    settings = DeploymentSettings()
    clock = Clock()
    log = EmbeddedLog(tmp_path, clock=clock, synchronous="NORMAL")
    await log.ensure_topics([topic_spec(FETCHED), topic_spec(ROUTED)])
    old_rules, new_rules = rules("alice", "bob"), rules("alice")  # bob left: his mail goes to the postmaster
    before = [mail("f0", "bob@example.com")]
    inside = [mail("f1", "alice@example.com"), mail("f2", "bob@example.com")]
    async with log.producer() as producer:
        for batch in (before, inside):
            await producer.send_all([keyed(FETCHED, m) for m in batch])
            await producer.send_all([keyed(ROUTED, route_fetched(m, old_rules, T)) for m in batch])
            clock.now += 3600
    since = T + timedelta(minutes=30)
    report = await shadow_replay(log, settings, new_rules, route_or_postmaster, since=since, until=None)
    assert report.rerouted == 2  # f0 was fetched before --from
    assert [(c.message.fetch_id, c.old.addresses, c.message.new.addresses) for c in report.changes] == [
        ("f2", ("bob@example.com",), ("postmaster@example.com",))
    ]
    shadow = [codec.decode(r.value, RecipientsResolved) async for r in log.scan(shadow_spec(settings).name)]
    assert sorted(e.fetch_id for e in shadow) == ["f1", "f2"]
