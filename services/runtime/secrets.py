"""Reading referenced secrets (environment variable or file). Values never enter a message or a log line."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from services.runtime.settings import ConfigError


def read_secret(*, env: str | None, file: str | None, environ: Mapping[str, str], what: str) -> str:
    """The secret named by `env` or `file`; ConfigError names the reference, never the value."""
    if env:
        value = environ.get(env)
        if value is None:
            raise ConfigError(f"{what}: environment variable {env} is not set")
        return value
    if file:
        try:
            return Path(file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read secret file {file}: {exc.strerror}") from None
    raise ConfigError(f"{what}: no secret reference (set *_env or *_file)")
