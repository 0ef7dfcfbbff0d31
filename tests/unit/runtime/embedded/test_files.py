"""services/runtime/embedded/files.py: the database holds raw mail, so its files are private."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.topics import TopicSpec
from services.runtime.embedded import DB_NAME, EmbeddedLog
from services.runtime.log import Outgoing
from tests.support.embedded_log import TOPIC


@contextlib.contextmanager
def permissive_umask() -> Iterator[None]:
    """umask 000, so the modes checked come from popbridge, not from a strict umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


async def test_the_data_directory_is_0700_and_every_database_file_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    with permissive_umask():
        log = EmbeddedLog(data_dir)
        await log.ensure_topics([TopicSpec(TOPIC, 1)])
        async with log.producer() as producer:
            await producer.send_all([Outgoing(TOPIC, b"Subject: private\r\n\r\nmail", b"k")])
        modes = {p.name: p.stat().st_mode & 0o777 for p in data_dir.iterdir()}
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert modes[DB_NAME] == 0o600
    assert set(modes.values()) == {0o600}, modes  # the -wal and -shm files too


async def test_a_wider_data_directory_or_database_is_reported_once_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await EmbeddedLog(tmp_path / "data").ensure_topics([TopicSpec(TOPIC, 1)])
    (tmp_path / "data").chmod(0o755)
    (tmp_path / "data" / DB_NAME).chmod(0o644)
    EmbeddedLog(tmp_path / "data")
    EmbeddedLog(tmp_path / "data")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"{tmp_path / 'data'} is mode 0755: other local users may read the mail it holds; "
        f"chmod 0700 {tmp_path / 'data'}",
        f"{tmp_path / 'data' / DB_NAME} is mode 0644: other local users may read the mail it holds; "
        f"chmod 0600 {tmp_path / 'data' / DB_NAME}",
    ]
