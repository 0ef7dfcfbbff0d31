"""`popbridge oauth status` and `login`: what a person sees, never a token; mistakes are one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from services.cli import cli
from services.runtime.oauth2 import TokenState
from services.runtime.oauth2_tokens import TokenStore, oauth2_directory
from services.runtime.settings import ConfigError

CONFIG = """\
[delivery]
host = "127.0.0.1"
tls = "none"

[routing]
local_domains = ["example.com"]

[[mailboxes]]
id = "signed-in"
host = "127.0.0.1"
username = "a@contoso.com"
recipients = ["a@example.com"]
oauth2 = { provider = "microsoft", client_id = "app" }

[[mailboxes]]
id = "revoked"
host = "127.0.0.1"
username = "b@contoso.com"
recipients = ["b@example.com"]
oauth2 = { provider = "microsoft", client_id = "app" }

[[mailboxes]]
id = "app-only"
host = "127.0.0.1"
username = "c@contoso.com"
recipients = ["c@example.com"]
oauth2 = { provider = "microsoft", tenant = "contoso.com", client_id = "app", \
grant = "client_credentials", client_secret_env = "S" }
"""


def invoke(tmp_path: Path, *args: str) -> tuple[int, str]:
    """Exit code and output; a ConfigError (which `main` turns into one line and exit 2) as code 2."""
    config = tmp_path / "popbridge.toml"
    config.write_text(CONFIG)
    env = {"POPBRIDGE_DATA_DIR": str(tmp_path / "data")}
    result = CliRunner().invoke(cli, ["oauth", *args, "--config", str(config)], env=env)
    if isinstance(result.exception, ConfigError):
        return 2, str(result.exception)
    return result.exit_code, result.output


def test_status_shows_each_logins_state_and_the_command_to_run_but_no_token(tmp_path: Path) -> None:
    store = TokenStore(oauth2_directory(str(tmp_path / "data")))
    store.save("signed-in", TokenState(access_token="AT-SECRET", expires_at=4e9, refresh_token="RT-SECRET",
                                       last_refresh=1.8e9))
    store.save("revoked", TokenState(login_required=True, last_error="revoked: invalid_grant",
                                     last_error_at=1.8e9))

    code, output = invoke(tmp_path, "status")

    assert code == 1  # a login is required
    lines = output.splitlines()
    assert lines[0].startswith("signed-in: valid (refresh_token); expires 2096-")
    assert "run `popbridge oauth login revoked`" in lines[1]
    assert "revoked: invalid_grant" in lines[1]
    assert lines[2].startswith("app-only: renews-on-next-use (client_credentials)")
    assert "SECRET" not in output
    code, output = invoke(tmp_path, "status", "--json")
    assert [json.loads(line)["state"] for line in output.splitlines()] == [
        "valid", "login-required", "renews-on-next-use"]
    assert "SECRET" not in output


def test_login_of_an_unknown_or_app_only_mailbox_is_a_one_line_config_error(tmp_path: Path) -> None:
    code, output = invoke(tmp_path, "login", "nobody")
    assert code == 2
    assert "'nobody' has no [oauth2] table (logins with one: signed-in, revoked, app-only)" in output
    code, output = invoke(tmp_path, "login", "app-only")
    assert code == 2
    assert "is app-only: no sign-in needed" in output
