"""Which log a deployment uses: Kafka when bootstrap servers are configured, else the embedded log."""

from __future__ import annotations

from pathlib import Path

from services.runtime.embedded import EmbeddedLog
from services.runtime.kafka import KafkaLog
from services.runtime.settings import DeploymentSettings

DEFAULT_DATA_DIR = Path("~/.local/share/popbridge")  # the CLI resolves XDG_DATA_HOME and passes data_dir


def kafka_log(settings: DeploymentSettings) -> KafkaLog:
    """The KafkaLog of a deployment (bootstrap, compression, TLS and SASL from `POPBRIDGE_KAFKA_*`).

    Every place that talks to Kafka builds its log here, so none forgets the security settings."""
    return KafkaLog.from_settings(settings)


def open_log(settings: DeploymentSettings) -> KafkaLog | EmbeddedLog:
    """KafkaLog on `kafka_bootstrap` when it is set, otherwise EmbeddedLog in `data_dir` (or the default)."""
    if settings.kafka_bootstrap:
        return kafka_log(settings)
    return EmbeddedLog(
        Path(settings.data_dir).expanduser() if settings.data_dir else DEFAULT_DATA_DIR.expanduser()
    )
