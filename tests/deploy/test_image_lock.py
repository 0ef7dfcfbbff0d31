"""The image's dependency lock (deploy/image/requirements.lock) matches pyproject.toml: the CI check.

After editing [project.dependencies], regenerate the lock with `deploy/image/lock.sh`.
"""

from __future__ import annotations

from pathlib import Path

from tests.deploy.image_lock import FIX, lock_mismatches, parse_lock

REPO = Path(__file__).resolve().parents[2]
H = "    --hash=sha256:" + "0" * 64
PYPROJECT = """
[project]
dependencies = ["aiokafka[zstd]==0.14.0", "click>=8.1,<8.4"]
"""


def test_the_committed_lock_matches_pyproject() -> None:
    lock = (REPO / "deploy" / "image" / "requirements.lock").read_text()
    problems = lock_mismatches((REPO / "pyproject.toml").read_text(), lock)
    assert problems == [], f"{FIX}: " + "; ".join(problems)


def test_a_lock_with_every_dependency_pinned_in_range_and_hashed_holds() -> None:
    lock = "\n".join([
        "aiokafka==0.14.0 \\", H, "    # via faust-streaming, popbridge (pyproject.toml)",
        "click==8.3.3 \\", H, H, "    # via popbridge (pyproject.toml)",
        "cramjam==2.14.0 \\", H, "    # via aiokafka",
    ])
    assert lock_mismatches(PYPROJECT, lock) == []
    assert parse_lock(lock)["click"].hashes == 2


def test_each_disagreement_is_named() -> None:
    lock = "\n".join([
        "click==8.4.0 \\", H, "    # via popbridge (pyproject.toml)",
        "Rocks_Dict==0.3 \\", H, "    # via popbridge (pyproject.toml)",
        "six==1.17.0 ; python_version < '3.12'",
        "    # via faust-streaming",
    ])
    assert lock_mismatches(PYPROJECT, lock) == [
        "aiokafka is in pyproject.toml but not in the lock",
        "click: the lock pins 8.4.0, pyproject.toml wants <8.4,>=8.1",
        "rocks-dict is locked as a direct dependency but pyproject.toml no longer names it",
        "six==1.17.0 has no --hash in the lock",
    ]
