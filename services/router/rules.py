"""Who receives a message from a catch-all mailbox: the eight steps of ROUTING.md section 4.

`resolve(raw, rules)` is pure and total: any bytes give a `Decision` with at least one local recipient.
The evidence says which field (and which trusted Received hop) chose each recipient, so an operator can
answer "why did X (not) get this message?" from the routed event (ROUTING.md section 6).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from schemas.events import Evidence, Recipient
from services.router.addresses import LocalPolicy, Route
from services.router.headers import Field, Header, read_header
from services.router.lexical import ascii_lower, has_control_character, printable
from services.router.received import TrustedHop, normalize_host, trusted_hop
from services.runtime.local_parts import UNSAFE_LOCAL_PART
from services.runtime.settings import RoutingRules

REASONS = frozenset(
    {
        "delivered-to",
        "x-original-to",
        "envelope-to",
        "x-envelope-to",
        "x-rcpt-to",
        "received-for",
        "list-id",
        "to-cc-fallback",
        "postmaster-fallback",
        "loop",
        "malformed",
        UNSAFE_LOCAL_PART,
    }
)
EVIDENCE_VALUE_LIMIT = 300


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """The recipients (sorted, lowercase, never empty), the reason, and the evidence behind them.

    `recipient_evidence[i]` lists the indices in `evidence` of the fields that named `recipients[i]`;
    it is empty for the single-evidence decisions (list, loop, malformed, postmaster fallback).
    `recipient_reasons[i]` is the reason of `recipients[i]` where it differs from `reason`: the postmaster
    reached only through unsafe local parts has `unsafe-local-part` (empty: every recipient has `reason`).
    """

    recipients: tuple[str, ...]
    reason: str
    evidence: tuple[Evidence, ...] = ()
    recipient_evidence: tuple[tuple[int, ...], ...] = ()
    recipient_reasons: tuple[str, ...] = ()

    def to_json_dict(self) -> dict[str, Any]:
        """The `popbridge route` output: `{"recipients": [...], "reason": "...", "evidence": [...]}`."""
        return {
            "recipients": list(self.recipients),
            "reason": self.reason,
            "evidence": [msgspec.to_builtins(entry) for entry in self.evidence],
        }


def recipients_with_evidence(decision: Decision) -> tuple[Recipient, ...]:
    """One `Recipient` per address, carrying the reason and the evidence that led to that address."""
    reasons = decision.recipient_reasons or (decision.reason,) * len(decision.recipients)
    return tuple(
        Recipient(address=address, reason=reasons[position], evidence=_evidence_of(decision, position))
        for position, address in enumerate(decision.recipients)
    )


def _evidence_of(decision: Decision, position: int) -> tuple[Evidence, ...]:
    if not decision.recipient_evidence:
        return decision.evidence
    return tuple(decision.evidence[index] for index in decision.recipient_evidence[position])


class _Plan(NamedTuple):
    """The routing rules in the form the steps compare against, built once per rules object."""

    rules: RoutingRules
    policy: LocalPolicy
    trusted_hosts: frozenset[str]
    list_rules: tuple[tuple[str, str], ...]  # (lowercased list id, deliver_to)
    envelope_keys: tuple[tuple[str, str], ...]  # (field key, reason)
    fallback_primary: frozenset[str]
    fallback_otherwise: frozenset[str]


def _plan_for(rules: RoutingRules) -> _Plan:
    return _Plan(
        rules=rules,
        policy=LocalPolicy(rules),
        trusted_hosts=frozenset(normalize_host(host) for host in rules.trusted_received_hosts),
        list_rules=tuple((ascii_lower(r.list_id), r.deliver_to.lower()) for r in rules.list_rules),
        envelope_keys=tuple((ascii_lower(name), name.lower()) for name in rules.envelope_headers),
        fallback_primary=frozenset(ascii_lower(name) for name in rules.fallback_headers.primary),
        fallback_otherwise=frozenset(ascii_lower(name) for name in rules.fallback_headers.otherwise),
    )


_PLANS: dict[int, _Plan] = {}


def _plan(rules: RoutingRules) -> _Plan:
    """A memo of `_plan_for`, keyed by identity: the rules of a running router do not change."""
    plan = _PLANS.get(id(rules))
    if plan is None or plan.rules is not rules:
        if len(_PLANS) >= 16:
            _PLANS.clear()
        plan = _PLANS[id(rules)] = _plan_for(rules)
    return plan


def resolve(raw: bytes, rules: RoutingRules) -> Decision:
    """The routing decision for one raw message (ROUTING.md section 4). Never raises."""
    try:
        return _decide(read_header(raw), _plan(rules))
    except Exception as exc:  # a bug must not stop the stream: quarantine, and say so in the evidence
        detail = f"the router failed on this message: {type(exc).__name__}"
        return _single(rules.postmaster.lower(), Evidence(source="malformed", value=detail))


def _decide(header: Header, plan: _Plan) -> Decision:
    fields = header.fields
    early = _malformed(header, plan) or _loop(fields, plan) or _listed(fields, plan)
    if early is not None:
        return early
    hop = trusted_hop(fields, plan.trusted_hosts)
    trusted = None
    if hop is not None:  # no trusted hop: no envelope data at all (ROUTING.md section 5)
        block = fields[: hop.field_index]
        trusted = _from_envelope(block, hop, plan) or _from_received_for(fields, hop, plan)
    return trusted or _from_fallback(fields, plan) or _postmaster_fallback(hop, plan)


def _single(recipient: str, evidence: Evidence) -> Decision:
    return Decision(recipients=(recipient,), reason=evidence.source, evidence=(evidence,))


def _excerpt(value: str) -> str:
    return printable(value.strip(" \t"))[:EVIDENCE_VALUE_LIMIT]


def _field_evidence(reason: str, index: int, field: Field, hop: TrustedHop | None) -> Evidence:
    return Evidence(
        source=reason,
        field=printable(field.name),
        field_index=index,
        value=_excerpt(field.value),
        received_hop=None if hop is None else hop.by_host,
    )


def _malformed(header: Header, plan: _Plan) -> Decision | None:
    """Step 1: a NUL byte anywhere in the header section."""
    if not header.has_nul:
        return None
    where = next((i for i, f in enumerate(header.fields) if "\x00" in f.name + f.value), None)
    evidence = Evidence(source="malformed", field_index=where, value="NUL byte in the header section")
    if where is not None:
        evidence = _field_evidence("malformed", where, header.fields[where], None)
    return _single(plan.policy.postmaster, evidence)


def _loop(fields: tuple[Field, ...], plan: _Plan) -> Decision | None:
    """Step 2: more than `max_received` Received fields."""
    count = sum(1 for field in fields if field.key == "received")
    if count <= plan.rules.max_received:
        return None
    detail = f"{count} Received fields, more than max_received = {plan.rules.max_received}"
    return _single(plan.policy.postmaster, Evidence(source="loop", field="Received", value=detail))


def list_identifier(value: str) -> str:
    """The text between the first `<` and the next `>`; without them, the whole trimmed value."""
    start = value.find("<")
    end = value.find(">", start + 1) if start >= 0 else -1
    return value[start + 1 : end] if end >= 0 else value.strip(" \t")


def _listed(fields: tuple[Field, ...], plan: _Plan) -> Decision | None:
    """Step 3: the topmost List-Id field that equals a rule's list id, case-insensitively."""
    for index, field in enumerate(fields):
        if field.key != "list-id" or not plan.list_rules:
            continue
        identifier = ascii_lower(list_identifier(field.value))
        for list_id, deliver_to in plan.list_rules:
            if identifier == list_id:
                return _single(deliver_to, _field_evidence("list-id", index, field, None))
    return None


def _from_source(
    candidates: list[tuple[int, Field]],
    reason: str,
    plan: _Plan,
    hop: TrustedHop | None,
    *,
    delivered_to: bool = False,
) -> Decision | None:
    """The decision of one source, or None when none of its fields holds a valid local address."""
    evidence: list[Evidence] = []
    named: dict[str, list[int]] = {}
    routes: list[Route] = []
    for index, field in candidates:
        found = plan.policy.local_routes(field.value, delivered_to=delivered_to)
        if found:
            for route in found:
                named.setdefault(route.destination, []).append(len(evidence))
            routes += found
            evidence.append(_field_evidence(reason, index, field, hop))
    if not named:
        return None
    recipients = tuple(sorted(named))
    return Decision(
        recipients=recipients,
        evidence=tuple(evidence),
        recipient_evidence=tuple(tuple(dict.fromkeys(named[r])) for r in recipients),
        **_reasons(recipients, routes, reason),
    )


def _reasons(recipients: tuple[str, ...], routes: list[Route], reason: str) -> dict[str, Any]:
    """`reason` and `recipient_reasons`: a recipient named only by unsafe local parts is `unsafe-local-part`;
    when every recipient is, that is the decision's reason too."""
    safe = {route.destination for route in routes if not route.unsafe}
    if len(safe) == len(recipients):
        return {"reason": reason}
    per_recipient = tuple(reason if r in safe else UNSAFE_LOCAL_PART for r in recipients)
    overall = UNSAFE_LOCAL_PART if not safe else reason
    return {"reason": overall, "recipient_reasons": per_recipient}


def _from_envelope(block: tuple[Field, ...], hop: TrustedHop, plan: _Plan) -> Decision | None:
    """Step 5: envelope headers above the trusted Received, in the configured order."""
    for key, reason in plan.envelope_keys:
        candidates = [(index, field) for index, field in enumerate(block) if field.key == key]
        decision = _from_source(candidates, reason, plan, hop, delivered_to=key == "delivered-to")
        if decision is not None:
            return decision
    return None


def _from_received_for(fields: tuple[Field, ...], hop: TrustedHop, plan: _Plan) -> Decision | None:
    """Step 6: the `for` clause of the trusted Received only; a control character anywhere voids it."""
    received = fields[hop.field_index]
    if hop.for_clause is None or has_control_character(received.value):
        return None
    routes = plan.policy.local_routes(hop.for_clause)
    if not routes:
        return None
    evidence = _field_evidence("received-for", hop.field_index, received, hop)
    recipients = tuple(sorted({route.destination for route in routes}))
    reasons = _reasons(recipients, routes, "received-for")
    return Decision(recipients=recipients, evidence=(evidence,), **reasons)


def _from_fallback(fields: tuple[Field, ...], plan: _Plan) -> Decision | None:
    """Step 7: Resent-To/Resent-Cc when any exists anywhere, otherwise To/Cc."""
    keys = plan.fallback_primary
    if not any(field.key in keys for field in fields):
        keys = plan.fallback_otherwise
    candidates = [(index, field) for index, field in enumerate(fields) if field.key in keys]
    return _from_source(candidates, "to-cc-fallback", plan, None)


def _postmaster_fallback(hop: TrustedHop | None, plan: _Plan) -> Decision:
    """Step 8: nothing named a local address."""
    if hop is None:
        detail = "no Received field by a trusted host, and no fallback header named a local address"
    else:
        detail = "no trusted envelope header, Received for clause or fallback header named a local address"
    hop_host = None if hop is None else hop.by_host
    evidence = Evidence(source="postmaster-fallback", value=detail, received_hop=hop_host)
    return _single(plan.policy.postmaster, evidence)
