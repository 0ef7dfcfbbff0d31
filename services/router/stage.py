"""The router stage as one pure function: a fetched message and the mail configuration in, a routing
decision out. The faust agent (services.router.app) and the single-process runner both call it.
"""

from __future__ import annotations

from datetime import datetime

from schemas.events import Evidence, MailFetched, Recipient, RecipientsResolved
from services.router.dedupe import SINGLE_USER
from services.router.headers import envelope_sender, message_id
from services.router.rules import recipients_with_evidence, resolve
from services.runtime.settings import Mailbox, MailConfig, rules_version

UNKNOWN_MAILBOX = "unknown-mailbox"
MALFORMED = "malformed"


def route_fetched(event: MailFetched, config: MailConfig, now: datetime) -> RecipientsResolved:
    """Decide who receives `event`: a single-user mailbox's recipients, or ROUTING.md for a catch-all."""
    mailbox = config.mailbox(event.mailbox_id)
    recipients, reason, version = _decide(event, mailbox, config)
    return RecipientsResolved(
        fetch_id=event.fetch_id,
        mailbox_id=event.mailbox_id,
        pop3_host=event.pop3_host,
        message_id=message_id(event.raw),
        envelope_sender=envelope_sender(event.raw),
        recipients=recipients,
        reason=reason,
        rules_version=version,
        routed_at=now,
        raw=event.raw,
    )


def _decide(
    event: MailFetched, mailbox: Mailbox | None, config: MailConfig
) -> tuple[tuple[Recipient, ...], str, str]:
    if mailbox is None:
        # The mailbox left the configuration after the message was fetched: keep the mail, tell a human.
        evidence = (Evidence(source=UNKNOWN_MAILBOX, value=event.mailbox_id),)
        return (
            (Recipient(address=config.postmaster, reason=UNKNOWN_MAILBOX, evidence=evidence),),
            UNKNOWN_MAILBOX,
            "",
        )
    if mailbox.routing is None:
        evidence = (Evidence(source=SINGLE_USER, value=mailbox.id),)
        recipients = tuple(
            Recipient(address=a, reason=SINGLE_USER, evidence=evidence) for a in mailbox.recipients
        )
        return recipients, SINGLE_USER, ""
    decision = resolve(event.raw, mailbox.routing)
    return recipients_with_evidence(decision), decision.reason, rules_version(mailbox.routing)


def to_postmaster(event: MailFetched, config: MailConfig, now: datetime, detail: str) -> RecipientsResolved:
    """The decision when routing itself failed: the message still moves on, to the postmaster."""
    mailbox = config.mailbox(event.mailbox_id)
    postmaster = mailbox.routing.postmaster if mailbox and mailbox.routing else config.postmaster
    evidence = (Evidence(source=MALFORMED, value=detail[:300]),)
    return RecipientsResolved(
        fetch_id=event.fetch_id,
        mailbox_id=event.mailbox_id,
        pop3_host=event.pop3_host,
        message_id=None,
        envelope_sender=None,
        recipients=(Recipient(address=postmaster, reason=MALFORMED, evidence=evidence),),
        reason=MALFORMED,
        rules_version="",
        routed_at=now,
        raw=event.raw,
    )


def route_or_postmaster(event: MailFetched, config: MailConfig, now: datetime) -> RecipientsResolved:
    """What the router would publish now: the decision, or the postmaster when routing fails (as the router
    does). The shadow replay (services.ops.shadow) gets it from services.cli as the context's `reroute`."""
    try:
        return route_fetched(event, config, now)
    except Exception as exc:  # the router's own fallback (services.router.app): never lose the message
        return to_postmaster(event, config, now, f"{type(exc).__name__}: {exc}")
