"""What mail bytes become on the wire: Dovecot's POP3 form of a stored message, and SMTP transparency.

Measured against Dovecot 2.3.19.1 (Debian 12) with every file of the public corpus and the edge
cases in tests/integration/test_fixtures_real_parts.py:

- POP3 RETR sends a stored message with every LF that is not preceded by CR turned into CRLF, and
  one CRLF added when the message does not end with LF (so an empty message comes back as one empty
  line, and a trailing bare CR stays, followed by the added CRLF). Nothing else changes: bare CR,
  CRCRLF, NUL and 8-bit bytes arrive as stored. A client that removes the stuffed dots and joins the
  lines with CRLF gets `canonical_pop3_form(stored)`.
- Defect: Dovecot 2.3.19.1 does not dot-stuff the FIRST line of a message (every later line is
  stuffed). A message that starts with "." therefore loses that dot in a conforming client, and a
  first line of just "." ends the response early. Real mail starts with a header field, never ".".
- LIST and "+OK n octets" count the message with line ends made CRLF but without the added final
  CRLF: `pop3_octets(stored)`.
"""

from __future__ import annotations

import re

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_LF_BEFORE_DOT = re.compile(rb"(?<!\r)\n\.")


def _with_crlf_line_ends(data: bytes) -> bytes:
    return _BARE_LF.sub(b"\r\n", data)


def canonical_pop3_form(original: bytes) -> bytes:
    """The bytes a POP3 client reads for a message Dovecot stored as `original` (dots unstuffed)."""
    converted = _with_crlf_line_ends(original)
    return converted if converted.endswith(b"\n") else converted + b"\r\n"


def pop3_octets(original: bytes) -> int:
    """The size Dovecot reports in LIST and RETR for a stored message."""
    return len(_with_crlf_line_ends(original))


def smtp_transparent(data: bytes) -> bool:
    """Whether smtplib's `sendmail(data)` reaches an RFC 5321 server (the sink) byte for byte.

    smtplib stuffs a dot after every LF and adds CRLF when `data` does not end with it; the server
    splits DATA at CRLF only and unstuffs there. So the bytes survive exactly when they end with
    CRLF and no bare LF is followed by a dot. `canonical_pop3_form()` output always qualifies.
    """
    return data.endswith(b"\r\n") and not _BARE_LF_BEFORE_DOT.search(data)
