"""services/deliverer/outcome.py: what each reply means for each recipient."""

from __future__ import annotations

import pytest

from services.deliverer.outcome import Conversation, Reply, Verdict, classify, enhanced_code, outcomes

OK = Reply(250, "2.1.5 OK")
GO = Reply(354, "go ahead")


@pytest.mark.parametrize(
    ("reply", "outcome", "enhanced"),
    [
        (Reply(250, "2.0.0 queued as 4711"), "delivered", "2.0.0"),
        (Reply(251, "will forward"), "delivered", None),
        (Reply(450, "4.2.0 mailbox busy"), "deferred", "4.2.0"),
        (Reply(421, "4.3.2 shutting down"), "deferred", "4.3.2"),
        (Reply(550, "5.1.1 no such user"), "failed", "5.1.1"),
        (Reply(552, "5.3.4 too big"), "failed", "5.3.4"),
        (Reply(354, "go ahead"), "deferred", None),
    ],
)
def test_classify_by_reply_class_keeping_the_enhanced_code(
    reply: Reply, outcome: str, enhanced: str | None
) -> None:
    verdict = classify(reply)
    assert (verdict.outcome, verdict.smtp_code, verdict.enhanced_code) == (outcome, reply.code, enhanced)


def test_enhanced_code_only_at_the_start_of_the_text() -> None:
    assert enhanced_code("5.7.1 relaying denied") == "5.7.1"
    assert enhanced_code("user unknown 5.1.1") is None
    assert enhanced_code("5.1.1") == "5.1.1"
    assert enhanced_code("3.1.1 odd") is None


def test_each_rcpt_reply_counts_for_its_own_recipient() -> None:
    conversation = Conversation(
        recipients=("a@x", "b@x", "c@x"),
        mail=OK,
        rcpts=(OK, Reply(550, "5.1.1 unknown"), Reply(452, "4.2.2 over quota")),
        data=GO,
        finals=(Reply(250, "2.0.0 queued"),),
    )
    verdicts = outcomes(conversation)
    assert {r: v.outcome for r, v in verdicts.items()} == {
        "a@x": "delivered",
        "b@x": "failed",
        "c@x": "deferred",
    }
    assert verdicts["b@x"].enhanced_code == "5.1.1"


def test_success_only_from_the_final_reply_after_data() -> None:
    base = Conversation(recipients=("a@x",), mail=OK, rcpts=(OK,), data=GO)
    assert outcomes(base)["a@x"].outcome == "deferred"  # no final reply: cut short
    assert (
        outcomes(
            Conversation(
                recipients=("a@x",),
                mail=OK,
                rcpts=(OK,),
                data=GO,
                finals=(Reply(554, "5.6.0 rejected content"),),
            )
        )["a@x"].outcome
        == "failed"
    )
    assert (
        outcomes(
            Conversation(
                recipients=("a@x",), mail=OK, rcpts=(OK,), data=GO, finals=(Reply(451, "4.3.0 try later"),)
            )
        )["a@x"].outcome
        == "deferred"
    )


def test_a_refused_mail_from_decides_for_everyone() -> None:
    verdicts = outcomes(
        Conversation(
            recipients=("a@x", "b@x"),
            mail=Reply(553, "5.1.8 bad sender"),
            rcpts=(Reply(503, "need MAIL"), Reply(503, "need MAIL")),
        )
    )
    assert {v.outcome for v in verdicts.values()} == {"failed"}
    assert verdicts["a@x"].enhanced_code == "5.1.8"


def test_a_refused_data_command_decides_for_the_accepted_recipients() -> None:
    verdicts = outcomes(
        Conversation(
            recipients=("a@x", "b@x"), mail=OK, rcpts=(OK, Reply(550, "no")), data=Reply(451, "4.3.0 later")
        )
    )
    assert (verdicts["a@x"].outcome, verdicts["b@x"].outcome) == ("deferred", "failed")


def test_lmtp_has_one_final_reply_per_accepted_recipient_in_order() -> None:
    conversation = Conversation(
        recipients=("a@x", "b@x", "c@x"),
        lmtp=True,
        mail=OK,
        rcpts=(OK, Reply(550, "5.1.1 unknown"), OK),
        data=GO,
        finals=(Reply(250, "2.0.0 saved"), Reply(552, "5.2.2 over quota")),
    )
    verdicts = outcomes(conversation)
    assert verdicts["a@x"].outcome == "delivered"
    assert verdicts["b@x"].outcome == "failed"
    assert (verdicts["c@x"].outcome, verdicts["c@x"].enhanced_code) == ("failed", "5.2.2")


def test_lmtp_replies_missing_after_a_cut_defer_their_recipients() -> None:
    conversation = Conversation(
        recipients=("a@x", "b@x"),
        lmtp=True,
        mail=OK,
        rcpts=(OK, OK),
        data=GO,
        finals=(Reply(250, "saved"),),
        broken="the connection was lost",
    )
    verdicts = outcomes(conversation)
    assert verdicts["a@x"].outcome == "delivered"
    assert verdicts["b@x"] == Verdict("deferred", None, None, "the connection was lost")


def test_a_conversation_that_never_started_defers_everyone() -> None:
    verdicts = outcomes(Conversation(recipients=("a@x", "b@x"), broken="no reply within 2 s"))
    assert {v.outcome for v in verdicts.values()} == {"deferred"}
