"""What an SMTP or LMTP conversation means for each recipient: delivered, deferred or failed (pure).

The rules, in the order they apply:
- a 2xx reply is success, 4xx is deferred (try again later), 5xx is failed (dead letter); any other code
  where a final reply was due is deferred as a protocol surprise. Enhanced status codes (RFC 3463,
  `5.1.1`) are kept beside the basic code.
- A conversation that never got going (refused or dropped connection, timeout, a refused greeting, EHLO,
  STARTTLS or AUTH) defers every recipient whatever the code: the message is not at fault.
- A rejected MAIL FROM decides for everyone; each RCPT reply decides for its own recipient.
- Success comes only from the final reply after the message data: one reply for all accepted recipients
  over SMTP, one reply per accepted recipient (in RCPT order) over LMTP.
- A conversation cut short before a recipient's final reply defers that recipient. (A cut after the data
  but before the reply may mean the server did take the message: the retry may then duplicate it, the
  known RFC 1047 window; the ledger cannot help there.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.events import Outcome

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: the basic code and its text (lines joined with newlines)."""

    code: int
    text: str


@dataclass(frozen=True)
class Verdict:
    """The outcome for one recipient and the server's words for it."""

    outcome: Outcome
    smtp_code: int | None
    enhanced_code: str | None
    text: str


@dataclass(frozen=True)
class Conversation:
    """What happened in one mail transaction, as far as it got.

    `rcpts` holds the replies to RCPT in recipient order, `data` the reply to the DATA command itself
    (354 expected), `finals` the replies after the message data. `broken` says why the conversation
    stopped early (a timeout, a lost connection); the replies missing then defer their recipients.
    """

    recipients: tuple[str, ...]
    lmtp: bool = False
    mail: Reply | None = None
    rcpts: tuple[Reply, ...] = ()
    data: Reply | None = None
    finals: tuple[Reply, ...] = ()
    broken: str | None = None


def enhanced_code(text: str) -> str | None:
    """The RFC 3463 status code that starts a reply text, such as `5.1.1`, or None."""
    match = _ENHANCED.match(text)
    return ".".join(match.groups()) if match else None


def classify(reply: Reply) -> Verdict:
    """A final reply: 2xx delivered, 4xx deferred, 5xx failed; anything else is a surprise, deferred."""
    klass = reply.code // 100
    outcome: Outcome = "delivered" if klass == 2 else "failed" if klass == 5 else "deferred"
    text = reply.text if klass in (2, 4, 5) else f"unexpected reply: {reply.text}"
    return Verdict(outcome, reply.code, enhanced_code(reply.text), text)


def unreachable(reason: str, reply: Reply | None = None) -> Verdict:
    """The server could not be reached or would not talk: deferred, keeping its reply if it gave one."""
    if reply is None:
        return Verdict("deferred", None, None, reason)
    return Verdict("deferred", reply.code, enhanced_code(reply.text), f"{reason}: {reply.text}")


def refused_here(enhanced: str, reason: str) -> Verdict:
    """popbridge itself knows the server cannot take this copy (no SMTPUTF8, too big): failed."""
    return Verdict("failed", None, enhanced, reason)


def outcomes(conversation: Conversation) -> dict[str, Verdict]:
    """One verdict per recipient of the conversation."""
    cut = unreachable(conversation.broken or "the conversation ended early")
    if conversation.mail is None:
        return dict.fromkeys(conversation.recipients, cut)
    if conversation.mail.code // 100 != 2:
        return dict.fromkeys(conversation.recipients, classify(conversation.mail))
    verdicts: dict[str, Verdict] = {}
    accepted: list[str] = []
    for index, recipient in enumerate(conversation.recipients):
        reply = conversation.rcpts[index] if index < len(conversation.rcpts) else None
        if reply is None:
            verdicts[recipient] = cut
        elif reply.code // 100 == 2:
            accepted.append(recipient)
        else:
            verdicts[recipient] = classify(reply)
    verdicts.update(_after_data(conversation, accepted, cut))
    return verdicts


def _after_data(conversation: Conversation, accepted: Sequence[str], cut: Verdict) -> dict[str, Verdict]:
    data = conversation.data
    if not accepted:
        return {}
    if data is None:
        return dict.fromkeys(accepted, cut)
    if data.code != 354:
        verdict = classify(data)
        if verdict.outcome == "delivered":  # a 2xx to DATA itself is not a delivery
            verdict = Verdict("deferred", data.code, verdict.enhanced_code, f"unexpected reply: {data.text}")
        return dict.fromkeys(accepted, verdict)
    finals = conversation.finals if conversation.lmtp else conversation.finals[:1] * len(accepted)
    return {
        recipient: classify(finals[index]) if index < len(finals) else cut
        for index, recipient in enumerate(accepted)
    }
