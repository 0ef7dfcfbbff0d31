"""What every part of deploy/local/kafka_broker.py shares: BrokerError, the one expected failure, and the
progress log on stderr."""

from __future__ import annotations

import sys


class BrokerError(Exception):
    """An expected failure: `message` is the one line for stderr, `details` optional context below it."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def log(message: str) -> None:
    print(f"kafka_broker: {message}", file=sys.stderr, flush=True)
