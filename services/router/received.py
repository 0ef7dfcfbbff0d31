"""The trusted Received hop and its `for` clause (ROUTING.md section 4, steps 4 and 6).

A Received value is read as words outside comments: a quoted string and an `<...>` are one word, a
comment separates words and is otherwise ignored, and `;` stands alone. The word after `from` is the
sending host and never a keyword, so a HELO name such as `by` or `for` cannot shift the clauses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from services.router.headers import Field
from services.router.lexical import ascii_lower, comment_end

_RECEIVED_TOKEN = re.compile(
    r"""
      (?P<space>[ \t]+)
    | (?P<comment>\()
    | (?P<semicolon>;)
    | (?P<word>
          "(?:[^"\\]|\\.)*(?:"|\\?\Z)   # a quoted string; an unterminated one runs to the end
        | <[^<>]*>
        | [^ \t();"<]+
        | <
      )
    """,
    re.VERBOSE | re.DOTALL,
)


class Word(NamedTuple):
    text: str
    start: int
    end: int


class ReceivedClauses(NamedTuple):
    by_host: str | None  # normalised: ASCII-lowercased, one trailing dot removed
    for_clause: str | None  # the raw text after the word `for`, up to the first `;` outside <>, quotes


class TrustedHop(NamedTuple):
    field_index: int  # position of the trusted Received field in the header section
    by_host: str
    for_clause: str | None


def normalize_host(host: str) -> str:
    """How `by` hosts and `trusted_received_hosts` compare: case-insensitive, a trailing dot ignored."""
    return ascii_lower(host[:-1] if host.endswith(".") else host)


def _words(value: str) -> Iterator[Word]:
    """Words and `;` outside comments, with their offsets; an unterminated comment ends the value."""
    position, end = 0, len(value)
    while position < end:
        match = _RECEIVED_TOKEN.match(value, position)
        if match is None:  # unreachable: every character starts some alternative; stop rather than loop
            return
        if match.lastgroup == "comment":
            position = comment_end(value, position)
            if position < 0:
                return
            continue
        position = match.end()
        if match.lastgroup != "space":
            yield Word(match.group(), match.start(), position)


def received_clauses(value: str) -> ReceivedClauses:
    """The `by` host and the `for` clause of one Received value."""
    by_host: str | None = None
    for_start: int | None = None
    owner: str | None = None  # the keyword whose value the next word is
    for word in _words(value):
        if word.text == ";":
            if for_start is not None:
                return ReceivedClauses(by_host, value[for_start : word.start])
            owner = None
            continue
        keyword = ascii_lower(word.text)
        if owner == "by" and by_host is None:
            by_host = normalize_host(word.text)
        if owner is not None:
            owner = None
        elif keyword in ("from", "by"):
            owner = keyword
        elif keyword == "for" and for_start is None:
            for_start = word.end
    return ReceivedClauses(by_host, None if for_start is None else value[for_start:])


def trusted_hop(fields: Iterable[Field], trusted_hosts: frozenset[str]) -> TrustedHop | None:
    """The topmost Received field whose `by` host is trusted; None when no field qualifies."""
    for index, field in enumerate(fields):
        if field.key != "received" or not _names_any(field.value, trusted_hosts):
            continue
        clauses = received_clauses(field.value)
        if clauses.by_host is not None and clauses.by_host in trusted_hosts:
            return TrustedHop(index, clauses.by_host, clauses.for_clause)
    return None


def _names_any(value: str, hosts: frozenset[str]) -> bool:
    """A cheap test before tokenizing: a trusted `by` host appears in the value as a substring."""
    lowered = ascii_lower(value)
    return any(host in lowered for host in hosts)
