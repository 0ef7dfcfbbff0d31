"""services/ops/commands.py: usage mistakes are refused before anything is read or changed."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from services.cli import cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "router", "--from", "2026-11-27T09:00", "--to", "2026-11-27T08:00"],
         "--to must be later than --from"),
        (["replay", "deliverer-retry-1", "--from", "2026-11-27"], "unknown stage 'deliverer-retry-1'"),
        (["replay", "deliverer", "--from", "2026-11-27", "--shadow", "--config", "x.toml"],
         "--shadow replays the router only"),
        (["replay", "router", "--from", "2026-11-27", "--shadow"], "needs the mail configuration file"),
        (["replay", "router", "--from", "2026-11-27", "--shadow", "--execute", "--config", "x.toml"],
         "--shadow changes nothing: drop --execute"),
        (["replay", "router", "--from", "27.11.2026"], "not an ISO 8601 time: '27.11.2026'"),
        (["lag", "--stage", "fetcher"], "unknown stage 'fetcher'"),
    ],
)
def test_a_usage_mistake_is_exit_code_2_with_a_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, args, env={"POPBRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert result.exit_code == 2
    assert message in result.output


def test_the_shadow_diff_is_an_option_of_replay_not_a_command_of_its_own() -> None:
    assert "replay-shadow" not in CliRunner().invoke(cli, ["--help"]).output
    assert CliRunner().invoke(cli, ["replay-shadow", "--from", "2026-11-27"]).exit_code == 2
    assert "--shadow" in CliRunner().invoke(cli, ["replay", "--help"]).output
