"""The embedded log's files and their permissions: the data directory (0700) and the database (0600),
created private, and one warning for each that other local users may read.

The database holds raw mail: the directory is the owner's only, the files too. SQLite gives the -wal and
-shm files the database's mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

DB_NAME = "log.sqlite3"
DATA_DIR_MODE = 0o700
DB_FILE_MODE = 0o600
DB_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm")

_logger = logging.getLogger(__name__)


def create_private(path: Path) -> None:
    """The data directory (0700) and the database file (0600), when they do not exist yet."""
    path.parent.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, DB_FILE_MODE))


def readable_by_others(data_dir: Path) -> list[tuple[Path, int]]:
    """The data directory and database files that users other than the owner may access, with their modes."""
    found = []
    for path in (data_dir, *(data_dir / name for name in DB_FILES)):
        with contextlib.suppress(FileNotFoundError):
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                found.append((path, mode))
    return found


_WARNED: set[Path] = set()


def warn_if_readable_by_others(data_dir: Path) -> None:
    """One warning per path and process for each file holding mail that is not private to its owner."""
    for path, mode in readable_by_others(data_dir):
        if path not in _WARNED:
            _WARNED.add(path)
            wanted = DATA_DIR_MODE if path == data_dir else DB_FILE_MODE
            _logger.warning("%s is mode %04o: other local users may read the mail it holds; "
                           "chmod %04o %s", path, mode, wanted, path)
