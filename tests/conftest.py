"""Fixtures for the real parts: the Kafka broker, Dovecot and the SMTP sink live in tests/support."""

import logging
from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.support.kafka", "tests.support.dovecot", "tests.support.smtp"]

_LOGGERS_SET_UP = ("", "faust", "mode", "aiokafka", "aiosmtplib", "popbridge")


@pytest.fixture(autouse=True)
def logging_as_it_was() -> Iterator[None]:
    """A command run in-process configures logging (services.runtime.logs.setup_logging replaces the
    root handlers); restore it after each test so no test sees another's handlers or levels."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level, list(logging.getLogger(name).handlers),
              list(logging.getLogger(name).filters)) for name in _LOGGERS_SET_UP]
    yield
    for logger, level, handlers, filters in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.filters[:] = filters
