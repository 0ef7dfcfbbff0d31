"""Logging set-up: JSON lines when stderr is not a terminal (containers), readable lines on a terminal."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from services.runtime.outage import install as install_kafka_throttle


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
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, *, json_lines: bool | None = None) -> None:
    """Configure the root logger once; `json_lines=None` chooses by whether stderr is a terminal."""
    use_json = (not sys.stderr.isatty()) if json_lines is None else json_lines
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLines() if use_json else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    install_kafka_throttle(handler)  # a broker outage: a few lines a minute, not thousands a second
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO")
    # Library chatter (faust's service start/stop lines, aiokafka's group joins) stays out of INFO.
    for noisy in ("faust", "mode", "aiokafka", "aiosmtplib"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
