"""services/fetcher/credentials.py: passwords and tokens per session, token_command, never the secret."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import pytest

from services.fetcher.credentials import session_secret
from services.fetcher.service import classify
from services.runtime.secrets import CredentialError
from services.runtime.settings import ConfigError, Mailbox

TOKEN = "ya29.secret-token-value"


def xoauth2_box(**fields: Any) -> Mailbox:
    return Mailbox(
        id="m365",
        host="outlook.office365.com",
        username="u@example.com",
        auth="xoauth2",
        recipients=("u@example.com",),
        **fields,
    )


async def test_the_token_command_runs_each_session_and_its_stdout_is_the_token(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    script = (
        f"import pathlib; p = pathlib.Path({str(counter)!r}); n = len(p.read_text()) if p.exists() else 0; "
        f"p.write_text('x' * (n + 1)); print('{TOKEN}-' + str(n + 1))"
    )
    box = xoauth2_box(token_command=(sys.executable, "-c", script))
    assert await session_secret(box, {}) == TOKEN + "-1"
    assert await session_secret(box, {}) == TOKEN + "-2"  # refreshed: run again


async def test_a_failing_token_command_is_a_clear_error_without_its_output() -> None:
    hidden = TOKEN[::-1]  # the command line itself must not hold the token for this test
    script = f"import sys; t = {hidden!r}[::-1]; print(t); print('refresh', t, file=sys.stderr); sys.exit(3)"
    box = xoauth2_box(token_command=(sys.executable, "-c", script))
    with pytest.raises(CredentialError, match="exit status 3") as caught:
        await session_secret(box, {})
    assert "m365" in str(caught.value)
    assert TOKEN not in "".join(traceback.format_exception(caught.value))
    assert classify(caught.value).state == "credentials-unavailable"


async def test_a_token_command_that_cannot_run_or_hangs_is_an_error() -> None:
    with pytest.raises(CredentialError, match="cannot run"):
        await session_secret(xoauth2_box(token_command=("/nonexistent/refresher",)), {})
    hang = xoauth2_box(token_command=(sys.executable, "-c", "import time; time.sleep(30)"), timeout=0.3)
    with pytest.raises(CredentialError, match="did not finish"):
        await session_secret(hang, {})


async def test_tokens_and_passwords_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert await session_secret(xoauth2_box(token_env="TOKEN"), {"TOKEN": TOKEN}) == TOKEN
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert await session_secret(xoauth2_box(token_file=str(tmp_path / "token")), {}) == TOKEN
    box = Mailbox(id="b", host="h", username="u", password_env="PW", auth="apop", recipients=("a@b",))
    assert await session_secret(box, {"PW": "pw"}) == "pw"
    with pytest.raises(ConfigError, match="PW is not set"):
        await session_secret(box, {})


def test_xoauth2_needs_a_token_source_and_no_password() -> None:
    with pytest.raises(ValueError, match="token_env, token_file or token_command"):
        xoauth2_box()
    assert not xoauth2_box(token_env="T").needs_password
