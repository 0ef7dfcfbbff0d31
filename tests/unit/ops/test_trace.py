"""services/ops/trace.py: finding a message's records and telling its story."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.events import (
    DeliveryAttempted,
    DeliveryDeadLettered,
    Evidence,
    MailFetched,
    Outcome,
    Recipient,
    RecipientsResolved,
)
from services.ops.trace import (
    Step,
    TraceQuery,
    header_message_id,
    step_of,
    timelines,
    trace_json,
    trace_text,
)
from services.runtime.log import Record

T = datetime(2026, 11, 27, 8, tzinfo=UTC)
RAW = b"Message-ID:\r\n <m1@sender.example>\r\nSubject: hi\r\n\r\nMessage-ID: <not-this@body>\r\n"


def fetched(fetch_id: str, raw: bytes = RAW) -> MailFetched:
    return MailFetched(fetch_id=fetch_id, mailbox_id="catchall", pop3_host="pop.isp.example",
                       uidl=f"u-{fetch_id}", size=len(raw), sha256="", fetched_at=T, raw=raw)


BOB = Recipient(
    address="bob@example.com", reason="delivered-to",
    evidence=(Evidence(source="delivered-to", field="Delivered-To", field_index=0, value="bob@example.com"),),
)
ALICE_SUPPRESSED = Recipient(
    address="alice@example.com", reason="duplicate", evidence=(Evidence(source="duplicate", value="f0"),)
)


def routed(fetch_id: str, message_id: str | None = "m1@sender.example") -> RecipientsResolved:
    return RecipientsResolved(
        fetch_id=fetch_id, mailbox_id="catchall", pop3_host="pop.isp.example", message_id=message_id,
        envelope_sender="s@sender.example", recipients=(BOB,), reason="delivered-to", rules_version="abc123",
        routed_at=T + timedelta(seconds=1), raw=RAW, suppressed=(ALICE_SUPPRESSED,),
    )


def attempt(fetch_id: str, n: int, outcome: Outcome = "deferred") -> DeliveryAttempted:
    return DeliveryAttempted(
        fetch_id=fetch_id, recipient="bob@example.com", outcome=outcome,
        smtp_code=451 if outcome == "deferred" else 250, enhanced_code="4.3.0", smtp_text="try later",
        attempt=n, attempted_at=T + timedelta(minutes=n), server="mx",
    )


def record(offset: int, topic: str = "t") -> Record:
    return Record(topic, 0, offset, None, b"", 0)


def test_the_message_id_comes_from_the_header_section_only() -> None:
    assert header_message_id(RAW) == "m1@sender.example"
    assert header_message_id(b"Subject: x\r\n\r\nMessage-ID: <body@x>\r\n") is None


def test_a_message_id_finds_every_copy_and_then_their_deliveries() -> None:
    query = TraceQuery("<m1@sender.example>")
    assert query.matches(fetched("f1"))
    assert query.matches(fetched("f2"))
    assert not query.matches(fetched("f3", raw=b"Message-ID: <other@x>\r\n\r\n"))
    assert query.matches(routed("f1"))
    assert query.matches(attempt("f2", 1))
    assert not query.matches(attempt("f3", 1))
    assert query.fetch_ids == {"f1", "f2"}


def test_a_fetch_id_finds_its_routing_even_without_a_message_id() -> None:
    query = TraceQuery("f9")
    assert query.matches(routed("f9", message_id=None))
    assert query.matches(attempt("f9", 1))
    assert not query.matches(routed("f8", message_id=None))


def test_a_dead_letter_is_matched_by_the_fetch_id_of_its_routed_message() -> None:
    query = TraceQuery("f1")
    dead = DeliveryDeadLettered(routed=routed("f1"), recipient="bob@example.com", reason="rejected",
                                smtp_code=550, smtp_text="no such user", attempts=1, dead_lettered_at=T)
    assert query.matches(dead)


def steps() -> dict[str, list[Step]]:
    return timelines([
        step_of(record(3), attempt("f1", 2, "delivered")),
        step_of(record(1), routed("f1")),
        step_of(record(0), fetched("f1")),
        step_of(record(2), attempt("f1", 1)),
    ])


def test_the_timeline_is_in_time_order_and_drops_the_message_bytes() -> None:
    found = steps()
    assert [s.kind for s in found["f1"]] == ["fetched", "routed", "attempt", "attempt"]
    assert all(getattr(s.event, "raw", b"") == b"" for s in found["f1"])


def test_the_text_tells_where_it_came_from_who_got_it_and_what_the_server_said() -> None:
    text = "\n".join(trace_text("f1", steps()))
    assert "message f1 (Message-ID <m1@sender.example>)" in text
    assert "fetched      mailbox catchall (pop.isp.example) UIDL u-f1" in text
    assert "reason delivered-to, rules abc123, 1 recipient(s)" in text
    assert "to bob@example.com (delivered-to: delivered-to Delivered-To[0]=bob@example.com)" in text
    assert "suppressed alice@example.com (duplicate: duplicate=f0)" in text
    assert "#1 bob@example.com: deferred 451 4.3.0 'try later' from mx" in text
    assert "#2 bob@example.com: delivered 250" in text


def test_the_json_has_every_step_without_message_bytes() -> None:
    document = trace_json("f1", steps())
    kinds = [s["kind"] for s in document["messages"][0]["steps"]]
    assert kinds == ["fetched", "routed", "attempt", "attempt"]
    assert all("raw" not in s for s in document["messages"][0]["steps"])
    assert document["messages"][0]["steps"][1]["recipients"][0]["address"] == "bob@example.com"


def test_nothing_found_says_so() -> None:
    assert trace_text("nope", {})[0].startswith("nothing found for 'nope'")


def test_the_message_id_may_be_folded_lowercase_or_without_brackets() -> None:
    assert header_message_id(b"message-id: \r\n\t<a@b>  (comment)\r\n\r\n") == "a@b"
    assert header_message_id(b"Subject: x\nMessage-Id: plain@id\n\nbody") == "plain@id"
    assert header_message_id(b"X-Message-ID: <no@x>\r\n\r\n") is None
