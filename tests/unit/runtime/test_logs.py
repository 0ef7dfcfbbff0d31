"""services/runtime/logs.py: what a server says cannot forge a log line or drive the operator's terminal."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from services.runtime.logs import JsonLines, TextLines, escape_controls

HOSTILE_REPLIES = {
    "terminal escape": "-ERR \x1b[2J\x1b]0;pwned\x07 bad",
    "8-bit CSI": "-ERR \x9b31m red",
    "forged line": "-ERR no\r\n2026-12-01 09:00:00 INFO    popbridge: all good",
    "bare CR": "-ERR hidden\roverwrite",
    "NUL and DEL": "-ERR a\x00b\x7fc",
    "bidi override": "-ERR \u202egnp.exe",
    "line separator": "-ERR one\u2028two",
}


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("popbridge.fetcher", logging.WARNING, __file__, 1, message, args, None)


@pytest.mark.parametrize("reply", HOSTILE_REPLIES.values(), ids=HOSTILE_REPLIES.keys())
def test_a_text_line_escapes_what_a_server_reply_holds(reply: str) -> None:
    line = TextLines("%(levelname)s %(name)s: %(message)s").format(record("mailbox a: %s", reply))
    assert line.isprintable()
    assert line.startswith("WARNING popbridge.fetcher: mailbox a: -ERR ")


def test_escapes_are_readable_and_ordinary_text_is_unchanged() -> None:
    assert escape_controls("a\x1b[1mb\r\nc\u202ed\tcafé") == "a\\x1b[1mb\\x0d\\x0ac\\u202ed\\x09café"
    assert escape_controls("tab\there", keep="\t") == "tab\there"


def fail_with(message: str) -> None:
    raise ValueError(message)


def test_a_traceback_keeps_its_line_breaks_but_not_an_escape_in_the_error() -> None:
    try:
        fail_with("server said \x1b[2J")
    except ValueError:
        failing = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    text = TextLines("%(message)s").format(failing)
    assert "\n" in text
    assert "\x1b" not in text
    assert "server said \\x1b[2J" in text


@pytest.mark.parametrize("reply", HOSTILE_REPLIES.values(), ids=HOSTILE_REPLIES.keys())
def test_a_json_line_is_one_ascii_safe_line_that_decodes_to_the_reply(reply: str) -> None:
    line = JsonLines().format(record("mailbox a: %s", reply))
    assert line.isprintable()
    assert json.loads(line)["message"] == f"mailbox a: {reply}"
