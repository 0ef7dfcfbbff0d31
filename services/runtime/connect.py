"""Which log a deployment uses: Kafka when bootstrap servers are configured, else the embedded log."""

from __future__ import annotations

from pathlib import Path

from services.runtime.embedded import EmbeddedLog
from services.runtime.kafka import KafkaLog
from services.runtime.settings import DeploymentSettings

DEFAULT_DATA_DIR = Path("~/.local/share/popbridge")  # the CLI resolves XDG_DATA_HOME and passes data_dir


def open_log(settings: DeploymentSettings) -> KafkaLog | EmbeddedLog:
    """KafkaLog on `kafka_bootstrap` when it is set, otherwise EmbeddedLog in `data_dir` (or the default)."""
    if settings.kafka_bootstrap:
        return KafkaLog(settings.kafka_bootstrap, compression=settings.kafka_compression)
    return EmbeddedLog(
        Path(settings.data_dir).expanduser() if settings.data_dir else DEFAULT_DATA_DIR.expanduser()
    )
