"""The one writer of mail configs (popbridge.toml) in the tests: values in, valid TOML out (tomli-w).

    write_mail_config(tmp_path / "popbridge.toml",
                      delivery=delivery_to(smtp_sink.port),
                      mailboxes=[mailbox("alice", host, port, login, ("alice@example.com",))])

A test that checks how a broken file is reported writes its text by hand: this writer only makes valid TOML.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

# The [routing] of a config with single-user mailboxes only: their recipients must be inside it.
LOCAL_ROUTING: Mapping[str, Any] = {"local_domains": ["example.com"]}
PASSWORD_ENV = "POP3_PASSWORD"  # the variable a `mailbox` reads its password from, unless told otherwise


def delivery_to(port: int, host: str = "127.0.0.1", **extra: Any) -> dict[str, Any]:
    """A [delivery] table for a test SMTP server on loopback: plain SMTP, no TLS."""
    return {"host": host, "port": port, "tls": "none", **extra}


def mailbox(
    box_id: str, host: str, port: int, username: str, recipients: Sequence[str] = ("alice@example.com",),
    **extra: Any,
) -> dict[str, Any]:
    """A [[mailboxes]] entry on a test POP3 server: plain POP3, password in $POP3_PASSWORD (`extra` adds or
    replaces keys: password_env, poll_interval, mode, ...)."""
    return {"id": box_id, "host": host, "port": port, "tls": "none", "username": username,
            "password_env": PASSWORD_ENV, "recipients": list(recipients), **extra}


def mail_config_text(
    *, delivery: Mapping[str, Any], routing: Mapping[str, Any] = LOCAL_ROUTING,
    mailboxes: Sequence[Mapping[str, Any]] = (), **top: Any,
) -> str:
    """The TOML of a mail config; `top` holds top-level keys (max_parallel_mailboxes, ...)."""
    document: dict[str, Any] = {**top, "delivery": dict(delivery), "routing": dict(routing)}
    if mailboxes:
        document["mailboxes"] = [dict(box) for box in mailboxes]
    return tomli_w.dumps(document)


def write_mail_config(
    path: Path, *, delivery: Mapping[str, Any], routing: Mapping[str, Any] = LOCAL_ROUTING,
    mailboxes: Sequence[Mapping[str, Any]] = (), **top: Any,
) -> Path:
    """Write a mail config to `path` (see `mail_config_text`) and return `path`."""
    path.write_text(mail_config_text(delivery=delivery, routing=routing, mailboxes=mailboxes, **top))
    return path
