"""services/deliverer/commands.py: the delivery target's secrets and postmaster notices, from the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.deliverer.commands import notice_address, smtp_password, smtp_token, state_path
from services.runtime.kafka import KafkaLog
from services.runtime.settings import ConfigError, DeploymentSettings, load_config
from tests.unit.runtime.test_settings import GOOD, write


def config_with(tmp_path: Path, delivery: str) -> Path:
    return write(tmp_path, GOOD.replace('tls = "none"\n', f'tls = "none"\n{delivery}\n', 1))


async def test_an_xoauth2_target_reads_its_token_for_each_session_and_needs_no_password(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    delivery = f'username = "relay@example.com"\nauth = "xoauth2"\ntoken_file = "{token_file}"'
    path = config_with(tmp_path, delivery)
    target = load_config(path).delivery
    source = smtp_token(target, {})

    assert smtp_password(target, {}) is None
    assert source is not None
    token_file.write_text("first\n")
    assert await source() == "first"
    token_file.write_text("refreshed\n")
    assert await source() == "refreshed"


def test_xoauth2_without_a_token_reference_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="token_env, token_file or token_command"):
        load_config(config_with(tmp_path, 'username = "relay@example.com"\nauth = "xoauth2"'))


def test_the_default_keeps_the_password_login_and_sends_no_notices(tmp_path: Path) -> None:
    config = load_config(config_with(tmp_path, 'username = "relay"\npassword_env = "SMTP_PW"'))

    assert config.delivery.auth == "login-plain"
    assert smtp_password(config.delivery, {"SMTP_PW": "pw"}) == "pw"
    assert smtp_token(config.delivery, {}) is None
    assert notice_address(config) is None


def test_notify_postmaster_sends_notices_to_the_configured_postmaster(tmp_path: Path) -> None:
    config = load_config(config_with(tmp_path, "notify_postmaster = true"))
    assert notice_address(config) == "postmaster@example.com"


def test_two_topic_prefixes_on_one_data_dir_keep_their_ledger_stores_apart(tmp_path: Path) -> None:
    log = KafkaLog("127.0.0.1:9")  # never connected: only its kind matters here
    first = state_path(log, DeploymentSettings(data_dir=str(tmp_path), topic_prefix="a-"))
    second = state_path(log, DeploymentSettings(data_dir=str(tmp_path), topic_prefix="b-"))

    assert first is not None
    assert second is not None
    assert first.parent == second.parent == tmp_path / "deliverer"
    assert first != second
