"""The header section of a raw message, read exactly as ROUTING.md section 2 says, and lookups on it.

The stdlib `email` package is not used on purpose: it ends a line at a bare CR, and ROUTING.md forbids
that (a bare CR is a character inside the line, which makes the field ignored as an address source).
Nothing here raises on arbitrary bytes.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from services.router.addresses import format_address, parse_address_list
from services.router.lexical import ascii_lower, has_control_character, printable

# The first empty line ends the header section: LF LF, or LF CR LF (that CR belongs to the line ending).
_EMPTY_LINE = re.compile(rb"\n\r?\n")


class Field(NamedTuple):
    """One header field. Values are decoded from UTF-8 with `surrogateescape`, so no byte is lost."""

    name: str  # as written before the colon
    key: str  # the name for comparisons: ASCII-lowercased, obsolete whitespace before the colon removed
    value: str  # unfolded: everything after the colon with only the line endings removed


class Header(NamedTuple):
    fields: tuple[Field, ...]  # index 0 is the topmost, most recent field
    has_nul: bool  # a NUL byte anywhere in the header section (ROUTING.md step 1)


def header_section(raw: bytes) -> bytes:
    """The bytes from the start up to the first empty line (the LF ending the last field included)."""
    if raw.startswith((b"\n", b"\r\n")):
        return b""
    empty = _EMPTY_LINE.search(raw)
    return raw if empty is None else raw[: empty.start() + 1]


def read_header(raw: bytes) -> Header:
    """The fields of the header section, in order, and whether it holds a NUL byte."""
    section = header_section(raw)
    # A CR right before LF belongs to the line ending; every other CR stays inside its line.
    text = section.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
    fields = tuple(_field(name, folded) for name, folded in _FIELD.findall(text))
    return Header(fields, b"\x00" in section)


# One field: a line holding a colon, not starting with SP or HTAB, and the continuation lines after
# it. A line without a colon matches nothing, and neither do its continuation lines.
_FIELD = re.compile(r"^([^ \t\n:][^\n:]*)?:([^\n]*(?:\n[ \t][^\n]*)*)", re.MULTILINE)


def _field(name: str, folded: str) -> Field:
    # Unfolding removes only the line endings. RFC 5322 section 4.5 (obs-optional) allows whitespace
    # between the name and the colon.
    return Field(name, ascii_lower(name.rstrip(" \t")), folded.replace("\n", ""))


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) of every field, topmost first; undecodable bytes shown as U+FFFD."""
    return [(printable(field.name), printable(field.value)) for field in read_header(raw).fields]


def _first(raw: bytes, name: str) -> str | None:
    key = ascii_lower(name)
    return next((field.value for field in read_header(raw).fields if field.key == key), None)


def first_value(raw: bytes, name: str) -> str | None:
    """The topmost field `name` (case-insensitive), unfolded and trimmed; None when there is none."""
    value = _first(raw, name)
    return None if value is None else printable(value.strip(" \t"))


def message_id(raw: bytes) -> str | None:
    """The topmost Message-ID without its angle brackets; None when absent, empty or holding a control."""
    value = _first(raw, "Message-ID")
    if value is None or has_control_character(value):
        return None
    start = value.find("<")
    end = value.find(">", start + 1) if start >= 0 else -1
    identifier = value[start + 1 : end] if end >= 0 else value
    return printable(identifier.strip(" \t")) or None


def envelope_sender(raw: bytes) -> str | None:
    """The SMTP envelope sender from the topmost Return-Path; "" is the null sender `<>`.

    None when there is no Return-Path. A Return-Path that holds no usable address also gives "": a
    bounce is then not sent at all rather than to an address nobody wrote.
    """
    value = _first(raw, "Return-Path")
    if value is None:
        return None
    addresses = parse_address_list(value)
    return format_address(addresses[0]) if len(addresses) == 1 else ""
