"""RFC 5322 lexical pieces shared by the header, address and Received readers (ROUTING.md sections 2-3).

Values arrive as `str` decoded from UTF-8 with `surrogateescape`, so an 8-bit byte that is not UTF-8
survives as a lone surrogate (U+DC80-U+DCFF): it is tolerated everywhere, and an address holding one is
invalid. Every scanner here is linear in its input: a header is attacker-controlled, so an unterminated
quote or comment ends the scan instead of being retried at every later position.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# ROUTING.md section 3: 0x00-0x1F except HTAB, and 0x7F. A bare CR left in an unfolded value is one.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SURROGATE = re.compile("[\udc80-\udcff]")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def has_control_character(value: str) -> bool:
    """Whether a field value must be ignored as an address source (ROUTING.md section 3)."""
    return _CONTROL.search(value) is not None


def ascii_lower(text: str) -> str:
    """Lowercase A-Z only: `str.lower` would fold the Kelvin sign into `k` and invite homographs."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


def has_surrogate(text: str) -> bool:
    """Whether `text` holds a byte that was not valid UTF-8 (decoded with `surrogateescape`)."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def printable(text: str) -> str:
    """`text` with undecodable bytes shown as U+FFFD, so it can travel in JSON and msgspec events."""
    if not has_surrogate(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# A quoted-pair is skipped whole, so "\)" never closes a comment.
_COMMENT_STEP = re.compile(r"\\.|[()]", re.DOTALL)


def comment_end(text: str, start: int) -> int:
    """The index just after the comment opened at `text[start] == "("`, nested comments included.

    An unterminated comment runs to the end of `text` and the result is `-1`.
    """
    depth = 0
    position = start
    while True:
        match = _COMMENT_STEP.search(text, position)
        if match is None:
            return -1
        position = match.end()
        mark = match.group()
        if mark == "(":
            depth += 1
        elif mark == ")":
            depth -= 1
            if depth == 0:
                return position


# Address-list tokens are plain strings, told apart by their first character: one of `,.:;<>@` is a
# special, `"` a quoted string (quotes kept), `[` a domain literal, anything else an atom (a run of
# atext, UTF-8 and undecodable bytes included; those are checked later). Whitespace separates tokens.
_ADDRESS_TOKEN = re.compile(
    r"""
      [^ \t"(),.:;<>@\[\]\\]+      # atom
    | [,.:;<>@]                     # special
    | "(?:[^"\\]|\\.)*"             # quoted string
    | \[(?:[^\[\]\\]|\\.)*\]        # domain literal
    | [("\[\\)\]][\s\S]*            # unterminated quote, comment or literal, or a stray ) ] \: the rest
    """,
    re.VERBOSE,
)
# Outside comments, quoted strings and literals are opaque: a "(" inside them opens no comment. An
# unterminated quote runs to the end, so the search never rescans the rest of the value.
_QUOTED_OR_COMMENT = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|\[(?:[^\[\]\\]|\\.)*\]|\(')
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_WHOLE_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_WHOLE_LITERAL = re.compile(r"\[(?:[^\[\]\\]|\\.)*\]")


class AddressTokens(NamedTuple):
    tokens: list[str]
    broken: bool  # the last token is an unterminated quote, comment or literal, or a stray ) ] \


def address_tokens(value: str) -> AddressTokens:
    """Tokens of an address list; comments and whitespace are dropped (they separate, nothing more)."""
    tokens = _ADDRESS_TOKEN.findall(_without_comments(value))
    last = tokens[-1] if tokens else ""
    broken = last[:1] in ('"', "(", "[", "\\", ")", "]") and not _complete(last)
    return AddressTokens(tokens, broken)


def _complete(token: str) -> bool:
    """Whether a token starting with a quote or bracket is a whole quoted string or domain literal."""
    whole = _WHOLE_QUOTED if token[:1] == '"' else _WHOLE_LITERAL
    return whole.fullmatch(token) is not None


def _without_comments(value: str) -> str:
    """`value` with each comment replaced by a space; an unterminated comment is left in (broken)."""
    if "(" not in value:
        return value
    kept: list[str] = []
    position = start = 0
    while (match := _QUOTED_OR_COMMENT.search(value, position)) is not None:
        position = match.end()
        if match.group() != "(":
            continue
        end = comment_end(value, match.start())
        if end < 0:
            break
        kept += (value[start : match.start()], " ")
        position = start = end
    kept.append(value[start:])
    return "".join(kept)


def unquote(token: str) -> str:
    """The value of a quoted-string token: no quotes, no quoted-pair backslashes (RFC 5322 3.2.4)."""
    return _QUOTED_PAIR.sub(r"\1", token[1:-1]) if token[:1] == '"' else token
