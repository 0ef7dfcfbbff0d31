"""What the tests need from outside the checkout: where shared/ is, and the one way a test says a real part
is missing (skip on a developer's machine, fail under CI).

CI (the CI environment variable set) runs tests/run.sh, which installs every part the tests need
(Dovecot, Postfix, the Kafka jars, kustomize, promtool and prometheus) and has shared/ beside the
checkout: there a missing part is a broken install step, and a skip would hide it as a pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]
# CI checks out the repository beside a read-only copy of shared/; elsewhere POPBRIDGE_SHARED_DIR says where.
SHARED = Path(os.environ.get("POPBRIDGE_SHARED_DIR") or REPO.parent / "shared")
CORPUS = SHARED / "corpus" / "public" / "messages"


def missing_part(reason: str) -> NoReturn:
    """Skip the test for `reason` (what is missing and how to get it), or fail it under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: a missing part there is a failure, not a skip)",
                    pytrace=False)
    pytest.skip(reason)
