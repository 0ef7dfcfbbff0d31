"""Fixtures for the real parts: the Kafka broker, Dovecot and the SMTP sink live in tests/support."""

pytest_plugins = [
    "tests.support.kafka", "tests.support.dovecot", "tests.support.smtp", "tests.support.postfix",
]
