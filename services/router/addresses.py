"""RFC 5322 address lists and the resolution of local addresses to mailboxes (ROUTING.md section 3).

`parse_address_list` keeps every valid address of a field, local or not; `LocalPolicy` decides which
of them are local and which configured mailboxes they reach. Both are pure and never raise on input.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from typing import NamedTuple

import idna

from services.router.lexical import AddressTokens, address_tokens, ascii_lower, has_control_character, unquote
from services.runtime.local_parts import is_safe_local_part
from services.runtime.settings import RoutingRules

_NOT_WORD = frozenset(",.:;<>@[")  # first characters of specials and domain literals
_NOT_ATOM = _NOT_WORD | {'"'}
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


class Route(NamedTuple):
    """One destination of a local address; `unsafe` when it is the postmaster because the local part could
    have routed the copy elsewhere (ROUTING.md section 6, `unsafe-local-part`)."""

    destination: str
    unsafe: bool = False


class Address(NamedTuple):
    local: str  # unquoted (RFC 5322 section 3.2.4), printable ASCII, case kept
    domain: str  # lowercase A-label form, or a domain literal with its brackets


def format_address(address: Address) -> str:
    """The address as SMTP writes it: the local part quoted only when it is not a dot-atom."""
    local = address.local
    if _DOT_ATOM.fullmatch(local) is None:
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{address.domain}"


def parse_address_list(value: str) -> tuple[Address, ...]:
    """The valid addresses of one field value, in order. Invalid entries and `<>` are skipped.

    A value holding a control character gives nothing at all (ROUTING.md section 3).
    """
    if has_control_character(value):
        return ()
    found = (_mailbox(entry) for entry in _entries(address_tokens(value)))
    return tuple(address for address in found if address is not None)


def _entries(lexed: AddressTokens) -> Iterator[list[str]]:
    """Split at `,` and `;` outside `<>`; a `:` there ends a group's display name, which is dropped.

    The entry holding a broken lexeme (it runs to the end of the value) is not yielded.
    """
    entry: list[str] = []
    in_angle = False
    for lexeme in lexed.tokens:
        if lexeme == "<":
            in_angle = True
        elif lexeme == ">":
            in_angle = False
        elif not in_angle and lexeme in (",", ";", ":"):
            if lexeme != ":":
                yield entry
            entry = []
            continue
        entry.append(lexeme)
    if not lexed.broken:
        yield entry


def _mailbox(entry: list[str]) -> Address | None:
    """name-addr or addr-spec; anything else in the entry makes it invalid."""
    if "<" not in entry:
        return _addr_spec(entry)
    start = entry.index("<")
    inner = entry[start + 1 : -1]
    if entry[-1] != ">" or "<" in inner or ">" in inner or not _is_phrase(entry[:start]):
        return None
    return _addr_spec(_without_route(inner))


def _is_phrase(tokens: list[str]) -> bool:
    """A display name: words and (obsolete) dots. Encoded words are atoms and stay undecoded."""
    return all(lexeme[0] not in _NOT_WORD or lexeme == "." for lexeme in tokens)


def _without_route(inner: list[str]) -> list[str]:
    """Drop an obsolete source route `@a,@b:` from an angle-addr; a route with no `:` is invalid."""
    if inner[:1] != ["@"]:
        return inner
    return inner[inner.index(":") + 1 :] if ":" in inner else []


def _addr_spec(tokens: list[str]) -> Address | None:
    if tokens.count("@") != 1:
        return None
    at = tokens.index("@")
    local, domain = _local_part(tokens[:at]), _domain(tokens[at + 1 :])
    return None if local is None or domain is None else Address(local, domain)


def _dotted(tokens: list[str], not_word: frozenset[str]) -> list[str] | None:
    """The words of `word *("." word)`, or None when the tokens are not that shape."""
    words = tokens[0::2]
    if not tokens or len(tokens) % 2 == 0 or any(lexeme != "." for lexeme in tokens[1::2]):
        return None
    return None if any(word[0] in not_word for word in words) else words


def _local_part(tokens: list[str]) -> str | None:
    """Dot-atom or quoted string (or the obsolete mix); must be non-empty printable ASCII once unquoted."""
    words = _dotted(tokens, _NOT_WORD)
    local = ".".join(unquote(word) for word in words) if words is not None else ""
    return local if local and local.isascii() and local.isprintable() else None


def _domain(tokens: list[str]) -> str | None:
    if len(tokens) == 1 and tokens[0][0] == "[":
        literal = tokens[0]
        return ascii_lower(literal) if literal.isascii() and literal.isprintable() else None
    labels = _dotted(tokens, _NOT_ATOM)
    return None if labels is None else normalize_domain(".".join(labels))


@lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str | None:
    """ASCII-lowercased; a U-label becomes its A-label (strict IDNA 2008). None when invalid.

    Invalid covers undecodable bytes (surrogates fail to encode) and labels IDNA rejects: mixed-script
    homographs become a different A-label, and uppercase or fullwidth non-ASCII is not a U-label.
    """
    lowered = ascii_lower(domain)
    if lowered.isascii():
        return lowered
    try:
        return idna.encode(lowered).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None


class LocalPolicy:
    """Which addresses are local and which mailboxes they reach, compiled once from the routing rules."""

    def __init__(self, rules: RoutingRules) -> None:
        self.primary_domain = _config_domain(rules.primary_domain)
        self.postmaster = rules.postmaster.lower()
        self._local_domains = frozenset(_config_domain(domain) for domain in rules.local_domains)
        self._alias_domains = frozenset(_config_domain(domain) for domain in rules.alias_domains)
        self._users = None if rules.users is None else frozenset(user.lower() for user in rules.users)
        self._aliases = {
            name.lower(): tuple(target.lower() for target in targets) or (self.postmaster,)
            for name, targets in rules.aliases.items()
        }
        self._delimiters = rules.recipient_delimiter
        self._strip_prefix = rules.delivered_to_strip_prefix.lower()
        self._unknown = self._unknown_destination(rules.unknown_local_user)

    def _unknown_destination(self, unknown_local_user: str) -> str:
        """`postmaster` means the configured postmaster; another name is a mailbox at the primary domain."""
        name = unknown_local_user.lower()
        if name in ("", "postmaster"):
            return self.postmaster
        return name if "@" in name else f"{name}@{self.primary_domain}"

    def is_local(self, address: Address) -> bool:
        """The domain equals a local or alias domain; subdomains, suffixes and literals never do."""
        return address.domain in self._local_domains or address.domain in self._alias_domains

    def destinations(self, address: Address, *, delivered_to: bool = False) -> tuple[str, ...]:
        """The mailboxes a local address reaches (ROUTING.md section 3, Resolution), never empty."""
        return tuple(route.destination for route in self.routes(address, delivered_to=delivered_to))

    def routes(self, address: Address, *, delivered_to: bool = False) -> tuple[Route, ...]:
        """`destinations`, each saying whether an unsafe local part sent it to the postmaster."""
        local = address.local.lower()
        if delivered_to and self._strip_prefix and local.startswith(self._strip_prefix):
            local = local[len(self._strip_prefix) :]
        local = self._without_extension(local)
        if local in self._aliases:
            return tuple(Route(target) for target in self._aliases[local])
        if local and not is_safe_local_part(local):
            # Never handed to the MTA, which might read `%`, `!`, quotes or a route as a relay (section 6).
            return (Route(self.postmaster, unsafe=True),)
        return (Route(self._mailbox(local)),)

    def _mailbox(self, local: str) -> str:
        if self._users is None and local:
            # No user list (ROUTING.md section 6): the destination server decides.
            return f"{local}@{self.primary_domain}"
        if self._users is not None and local in self._users:
            return f"{local}@{self.primary_domain}"
        return self._unknown

    def _without_extension(self, local: str) -> str:
        """Cut at the first delimiter; like Postfix, each character of the setting is a delimiter."""
        cut = min((local.find(d) for d in self._delimiters if d in local), default=len(local))
        return local[:cut]

    def local_destinations(self, value: str, *, delivered_to: bool = False) -> list[str]:
        """Every destination of the local addresses in one field; empty when it names none."""
        return [route.destination for route in self.local_routes(value, delivered_to=delivered_to)]

    def local_routes(self, value: str, *, delivered_to: bool = False) -> list[Route]:
        """`local_destinations` as routes, which say when an unsafe local part chose the postmaster."""
        return [
            route
            for address in parse_address_list(value)
            if self.is_local(address)
            for route in self.routes(address, delivered_to=delivered_to)
        ]


def _config_domain(domain: str) -> str:
    """A configured domain in the form addresses are compared in; kept as written if it is invalid."""
    return normalize_domain(domain) or ascii_lower(domain)
