"""Golden bytes: each event's wire encoding is pinned, so a change to the format is a visible decision.

If one of these fails, the encoding changed. Either that is a mistake, or it is a new field (with a
default) or a new event version: then update the bytes here in the same commit and say why.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas import codec
from schemas.events import (
    DeliveryAttempted,
    DeliveryDeadLettered,
    Event,
    Evidence,
    FetchRecorded,
    MailFetched,
    Recipient,
    RecipientDelivered,
    RecipientsResolved,
    RetryScheduled,
)

T = datetime(2026, 11, 27, 8, 0, 0, tzinfo=UTC)
RAW = b"a\r\n\r\n"

EVENTS: dict[str, Event] = {
    "MailFetched": MailFetched(
        fetch_id="f1",
        mailbox_id="mb",
        pop3_host="pop.isp.example.net",
        uidl="U1",
        size=5,
        sha256="ab",
        fetched_at=T,
        raw=RAW,
    ),
    "RecipientsResolved": RecipientsResolved(
        fetch_id="f1",
        mailbox_id="mb",
        pop3_host="pop.isp.example.net",
        message_id="m@x",
        envelope_sender="s@x",
        recipients=(
            Recipient(
                address="alice@example.com",
                reason="delivered-to",
                evidence=(
                    Evidence(
                        source="delivered-to",
                        field="Delivered-To",
                        field_index=0,
                        value="alice@example.com",
                        received_hop="mx.isp.example.net",
                    ),
                ),
            ),
        ),
        reason="delivered-to",
        rules_version="r1",
        routed_at=T,
        raw=RAW,
    ),
    "DeliveryAttempted": DeliveryAttempted(
        fetch_id="f1",
        recipient="alice@example.com",
        outcome="delivered",
        smtp_code=250,
        enhanced_code="2.0.0",
        smtp_text="ok",
        attempt=1,
        attempted_at=T,
        server="mail.example.com:25",
    ),
    "FetchRecorded": FetchRecorded(
        mailbox_id="mb", uidl="U1", fetch_id="f1", size=5, sha256="ab", published_at=T
    ),
}
ROUTED_SMALL = RecipientsResolved(
    fetch_id="f1",
    mailbox_id="mb",
    pop3_host="pop.isp.example.net",
    message_id=None,
    envelope_sender=None,
    recipients=(Recipient(address="alice@example.com", reason="user"),),
    reason="user",
    rules_version="r1",
    routed_at=T,
    raw=RAW,
)
EVENTS["RetryScheduled"] = RetryScheduled(
    routed=ROUTED_SMALL,
    recipients=("alice@example.com",),
    attempts=1,
    due_at=T,
    age_from=T,
    last_reply="451 later",
)
EVENTS["RecipientDelivered"] = RecipientDelivered(
    fetch_id="f1", recipient="alice@example.com", delivered_at=T
)
EVENTS["DeliveryDeadLettered"] = DeliveryDeadLettered(
    routed=ROUTED_SMALL,
    recipient="alice@example.com",
    reason="rejected by the server",
    smtp_code=550,
    enhanced_code="5.1.1",
    smtp_text="5.1.1 unknown",
    attempts=1,
    dead_lettered_at=T,
    server="mx:25",
    routed_recipients=1,
)

GOLDEN = {
    "MailFetched": (
        "89a474797065b8706f706272696467652e6d61696c2d666574636865642f31a866657463685f6964a26631aa6d61696c626f"
        "785f6964a26d62a9706f70335f686f7374b3706f702e6973702e6578616d706c652e6e6574a47569646ca25531a473697a65"
        "05a6736861323536a26162aa666574636865645f6174d6ff6b093880a3726177c405610d0a0d0a"
    ),
    "RecipientsResolved": (
        "8ca474797065bf706f706272696467652e726563697069656e74732d7265736f6c7665642f31a866657463685f6964a26631"
        "aa6d61696c626f785f6964a26d62a9706f70335f686f7374b3706f702e6973702e6578616d706c652e6e6574aa6d65737361"
        "67655f6964a36d4078af656e76656c6f70655f73656e646572a3734078aa726563697069656e74739183a761646472657373"
        "b1616c696365406578616d706c652e636f6da6726561736f6eac64656c6976657265642d746fa865766964656e6365918"
        "5a6736f75726365ac64656c6976657265642d746fa56669656c64ac44656c6976657265642d546fab6669656c645f696e"
        "64657800a576616c7565b1616c696365406578616d706c652e636f6dac72656365697665645f686f70b26d782e6973702e"
        "6578616d706c652e6e6574a6726561736f6eac64656c6976657265642d746fad72756c65735f76657273696f6ea27231a9"
        "726f757465645f6174d6ff6b093880a3726177c405610d0a0d0aaa7375707072657373656490"
    ),
    "DeliveryAttempted": (
        "8aa474797065be706f706272696467652e64656c69766572792d617474656d707465642f31a866657463685f6964a26631a9"
        "726563697069656e74b1616c696365406578616d706c652e636f6da76f7574636f6d65a964656c697665726564a9736d7470"
        "5f636f6465ccfaad656e68616e6365645f636f6465a5322e302e30a9736d74705f74657874a26f6ba7617474656d707401ac"
        "617474656d707465645f6174d6ff6b093880a6736572766572b36d61696c2e6578616d706c652e636f6d3a3235"
    ),
    "FetchRecorded": (
        "88a474797065ba706f706272696467652e66657463682d7265636f726465642f31aa6d61696c626f785f6964a26d62a47569"
        "646ca25531a866657463685f6964a26631a473697a6505a6736861323536a26162ac7075626c69736865645f6174d6ff6b09"
        "3880a764656c65746564c2"
    ),
    "RetryScheduled": (
        "87a474797065bb706f706272696467652e72657472792d7363686564756c65642f31a6726f757465648ca474797065bf706f"
        "706272696467652e726563697069656e74732d7265736f6c7665642f31a866657463685f6964a26631aa6d61696c626f785f"
        "6964a26d62a9706f70335f686f7374b3706f702e6973702e6578616d706c652e6e6574aa6d6573736167655f6964c0af656e"
        "76656c6f70655f73656e646572c0aa726563697069656e74739183a761646472657373b1616c696365406578616d706c652e"
        "636f6da6726561736f6ea475736572a865766964656e636590a6726561736f6ea475736572ad72756c65735f76657273696f"
        "6ea27231a9726f757465645f6174d6ff6b093880a3726177c405610d0a0d0aaa7375707072657373656490aa726563697069"
        "656e747391b1616c696365406578616d706c652e636f6da8617474656d70747301a66475655f6174d6ff6b093880a8616765"
        "5f66726f6dd6ff6b093880aa6c6173745f7265706c79a9343531206c61746572"
    ),
    "RecipientDelivered": (
        "84a474797065bf706f706272696467652e726563697069656e742d64656c6976657265642f31a866657463685f6964a26631"
        "a9726563697069656e74b1616c696365406578616d706c652e636f6dac64656c6976657265645f6174d6ff6b093880"
    ),
    "DeliveryDeadLettered": (
        "8ba474797065d922706f706272696467652e64656c69766572792d646561642d6c657474657265642f31a6726f757465648c"
        "a474797065bf706f706272696467652e726563697069656e74732d7265736f6c7665642f31a866657463685f6964a26631aa"
        "6d61696c626f785f6964a26d62a9706f70335f686f7374b3706f702e6973702e6578616d706c652e6e6574aa6d6573736167"
        "655f6964c0af656e76656c6f70655f73656e646572c0aa726563697069656e74739183a761646472657373b1616c69636540"
        "6578616d706c652e636f6da6726561736f6ea475736572a865766964656e636590a6726561736f6ea475736572ad72756c65"
        "735f76657273696f6ea27231a9726f757465645f6174d6ff6b093880a3726177c405610d0a0d0aaa73757070726573736564"
        "90a9726563697069656e74b1616c696365406578616d706c652e636f6da6726561736f6eb672656a65637465642062792074"
        "686520736572766572a9736d74705f636f6465cd0226ad656e68616e6365645f636f6465a5352e312e31a9736d74705f7465"
        "7874ad352e312e3120756e6b6e6f776ea8617474656d70747301b0646561645f6c657474657265645f6174d6ff6b093880a6"
        "736572766572a56d783a3235b1726f757465645f726563697069656e747301"
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_event_encoding_is_pinned(name: str) -> None:
    assert codec.encode(EVENTS[name]).hex() == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_pinned_bytes_decode_back_to_the_event(name: str) -> None:
    assert codec.decode_any(bytes.fromhex(GOLDEN[name])) == EVENTS[name]


def test_every_event_type_has_golden_bytes() -> None:
    assert {cls.__name__ for cls in Event.__args__} == set(GOLDEN)


def test_unknown_fields_from_a_newer_writer_are_skipped() -> None:
    newer = bytes.fromhex(GOLDEN["FetchRecorded"])
    # The same map with one more key ("zz": 1) appended and the map length bumped from 8 to 9.
    patched = bytes([newer[0] + 1]) + newer[1:] + bytes.fromhex("a27a7a01")
    assert codec.decode(patched, FetchRecorded) == EVENTS["FetchRecorded"]


def test_a_record_of_another_type_is_a_clear_error() -> None:
    with pytest.raises(codec.EventDecodeError, match="not a MailFetched"):
        codec.decode(bytes.fromhex(GOLDEN["FetchRecorded"]), MailFetched)


# DeliveryDeadLettered as written before `routed_recipients` existed: it still decodes, with the default.
DEAD_LETTER_BEFORE_ROUTED_RECIPIENTS = (
    "8aa474797065d922706f706272696467652e64656c69766572792d646561642d6c657474657265642f31a6726f757465648c"
    "a474797065bf706f706272696467652e726563697069656e74732d7265736f6c7665642f31a866657463685f6964a26631aa"
    "6d61696c626f785f6964a26d62a9706f70335f686f7374b3706f702e6973702e6578616d706c652e6e6574aa6d6573736167"
    "655f6964c0af656e76656c6f70655f73656e646572c0aa726563697069656e74739183a761646472657373b1616c69636540"
    "6578616d706c652e636f6da6726561736f6ea475736572a865766964656e636590a6726561736f6ea475736572ad72756c65"
    "735f76657273696f6ea27231a9726f757465645f6174d6ff6b093880a3726177c405610d0a0d0aaa73757070726573736564"
    "90a9726563697069656e74b1616c696365406578616d706c652e636f6da6726561736f6eb672656a65637465642062792074"
    "686520736572766572a9736d74705f636f6465cd0226ad656e68616e6365645f636f6465a5352e312e31a9736d74705f7465"
    "7874ad352e312e3120756e6b6e6f776ea8617474656d70747301b0646561645f6c657474657265645f6174d6ff6b093880a6"
    "736572766572a56d783a3235"
)


def test_a_dead_letter_written_before_routed_recipients_decodes_with_zero() -> None:
    decoded = codec.decode(bytes.fromhex(DEAD_LETTER_BEFORE_ROUTED_RECIPIENTS), DeliveryDeadLettered)
    assert decoded.routed_recipients == 0
    assert decoded.recipient == "alice@example.com"
