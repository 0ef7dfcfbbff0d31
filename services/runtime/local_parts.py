"""Which local parts popbridge may hand to a mail server as a recipient (ROUTING.md section 6).

A destination MTA that trusts popbridge (it sits in `mynetworks`) reads some local parts as a route to
somewhere else: Postfix's `allow_percent_hack` (on by default) turns `evil%outside.test@example.com` into
`evil@outside.test`, Sendmail and Exim read `outside.test!evil` as a UUCP bang path, and a quoted
`"evil@outside.test"` or a source route `@outside.test:evil` can be dequoted into a remote address. So
only a plain dot-atom without `%`, `!` or `/` is ever produced: anything that would need quoting in RCPT
TO (quotes, backslashes, `@`, `:`, spaces, a leading, trailing or doubled dot) is refused with it. Pure.
"""

from __future__ import annotations

import re

UNSAFE_LOCAL_PART = "unsafe-local-part"
"""The routing reason of a recipient sent to the postmaster because its local part could route elsewhere."""

# RFC 5322 atext without the route characters `%`, `!` and `/`, in dot-separated words; with SMTPUTF8
# (RFC 6532) any non-ASCII character is atext too.
_ATEXT = r"A-Za-z0-9#$&'*+=?^_`{|}~\-"
_SAFE = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_SAFE_UTF8 = re.compile(rf"[{_ATEXT}\x80-\U0010ffff]+(?:\.[{_ATEXT}\x80-\U0010ffff]+)*")


def is_safe_local_part(local: str, *, utf8: bool = False) -> bool:
    """True when no mail server can read `local` (unquoted) as a route to another domain; `utf8` also
    admits non-ASCII characters (whether the server takes them is SMTPUTF8's question, not a route's)."""
    return (_SAFE_UTF8 if utf8 else _SAFE).fullmatch(local) is not None


def unsafe_address_problem(address: str) -> str | None:
    """Why a configured recipient address may not be used, or None when it is a plain local@domain."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return f"{address!r} is not an address (local-part@domain)"
    if not is_safe_local_part(local):
        return (f"{address!r}: the local part could route mail elsewhere (no %, !, /, @, quotes, "
                "backslashes, colons, spaces or stray dots)")
    return None
