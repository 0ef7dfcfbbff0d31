"""Logging set-up: JSON lines when stderr is not a terminal (containers), readable lines on a terminal."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from services.runtime.outage import install as install_kafka_throttle

# What a server reply or a message header must not smuggle into a log line: C0 and C1 controls (ESC and
# CSI start terminal escapes; CR and LF forge lines), DEL, the Unicode line separators and the bidi
# overrides that reorder what a terminal shows. Text logs write them as `\xNN` / `\uNNNN`.
_UNSAFE_IN_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# JSON escapes C0 itself; these it leaves raw, so they become `\uNNNN` (the decoded value is unchanged).
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str, *, keep: str = "") -> str:
    """`text` with every control and terminal-affecting character written as an escape; `keep` lists
    characters left as they are (a traceback keeps its line breaks)."""
    return _UNSAFE_IN_TEXT.sub(lambda m: m.group() if m.group() in keep else _escaped(m.group()), text)


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


class TextLines(logging.Formatter):
    """Readable lines for a terminal, one per record: nothing from outside can end the line or drive the
    terminal. A traceback keeps its own line breaks (it is ours), with the rest escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return escape_controls(super().formatMessage(record), keep="\t")

    def formatException(self, ei: logging._SysExcInfoType) -> str:  # noqa: N802 - logging's name
        return escape_controls(super().formatException(ei), keep="\t\n")

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return escape_controls(super().formatStack(stack_info), keep="\t\n")


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the exception text, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False)
        return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def setup_logging(level: str, *, json_lines: bool | None = None) -> None:
    """Configure the root logger once; `json_lines=None` chooses by whether stderr is a terminal."""
    use_json = (not sys.stderr.isatty()) if json_lines is None else json_lines
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLines() if use_json else TextLines("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    install_kafka_throttle(handler)  # a broker outage: a few lines a minute, not thousands a second
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO")
    # Library chatter (faust's service start/stop lines, aiokafka's group joins) stays out of INFO.
    for noisy in ("faust", "mode", "aiokafka", "aiosmtplib"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
