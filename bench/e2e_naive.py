"""The yardstick: the bridge anyone writes in an afternoon. poplib RETR -> smtplib, one message at a time.

    .venv/bin/python -m bench.e2e_naive POP3_PORT USER PASSWORD SMTP_PORT [--catch-all]

Single-drop: every message goes to alice@example.com. Catch-all: to the Delivered-To address when there is
one, else to the To and Cc addresses at example.com (no Received, no list rules: naive). A message is
deleted right after the SMTP server accepted it. Nothing survives a crash in between, nothing is retried.
"""

from __future__ import annotations

import poplib
import smtplib
import sys
from email.parser import BytesHeaderParser
from email.utils import getaddresses

HOST = "127.0.0.1"
DOMAIN = "example.com"


def recipients(raw: bytes, catch_all: bool) -> list[str]:
    if not catch_all:
        return [f"alice@{DOMAIN}"]
    headers = BytesHeaderParser().parsebytes(raw, headersonly=True)
    if headers["Delivered-To"]:
        return [str(headers["Delivered-To"]).strip()]
    named = getaddresses([str(v) for v in headers.get_all("To", []) + headers.get_all("Cc", [])])
    local = [address for _, address in named if address.lower().endswith("@" + DOMAIN)]
    return local or [f"postmaster@{DOMAIN}"]


def main() -> None:
    pop3_port, user, password, smtp_port = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    catch_all = "--catch-all" in sys.argv[5:]
    pop = poplib.POP3(HOST, int(pop3_port))
    pop.user(user)
    pop.pass_(password)
    smtp = smtplib.SMTP(HOST, int(smtp_port))
    count, _ = pop.stat()
    for number in range(1, count + 1):
        _, lines, _ = pop.retr(number)
        raw = b"\r\n".join(lines) + b"\r\n"
        smtp.sendmail("sender@remote.example", recipients(raw, catch_all), raw)
        pop.dele(number)
    smtp.quit()
    pop.quit()


if __name__ == "__main__":
    main()
