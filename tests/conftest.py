"""Fixtures for the real parts: the Kafka broker, Dovecot and the SMTP sink live in tests/support."""

import logging
import os
import random
from collections.abc import Iterator

import pytest

from services.runtime.outage import BROKER, Outage

pytest_plugins = [
    "tests.support.kafka", "tests.support.dovecot", "tests.support.smtp", "tests.support.postfix",
    "tests.support.oauth2_server",
]

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


@pytest.fixture(autouse=True)
def broker_account_as_it_was() -> Iterator[None]:
    """services.runtime.outage.BROKER is the process's account of the broker (its outage lines, the stages'
    readiness): a test that stopped a broker may leave it "down"; every test starts with none going on."""
    BROKER.outage = Outage()
    yield
    BROKER.outage = Outage()


@pytest.fixture
def seed() -> int:
    """The seed of a randomised test: POPBRIDGE_TEST_SEED to replay a run, else a fresh one. Printed, so a
    failing run's output says how to replay it."""
    chosen = int(os.environ.get("POPBRIDGE_TEST_SEED") or random.randrange(2**32))
    print(f"seed: {chosen} (replay with POPBRIDGE_TEST_SEED={chosen})")
    return chosen
