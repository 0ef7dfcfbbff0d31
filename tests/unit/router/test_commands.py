"""`popbridge route --config FILE MESSAGE...`: output, exit codes and config errors (ROUTING.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from services.cli import main
from services.router.commands import route
from services.runtime.settings import ConfigError, load_routing_rules
from tests.support.parts import SHARED, missing_part
from tests.unit.router.messages import ISP_HOP, SPEC_EXAMPLE, SPEC_EXAMPLE_TOML, message

BCC = message("Delivered-To: mbox4711-alice@example.com", ISP_HOP, "To: bob@example.com")
NOBODY = message("To: someone@elsewhere.example")
CONFIGS = pytest.mark.parametrize("config", [SPEC_EXAMPLE, SPEC_EXAMPLE_TOML], ids=["json", "toml"])


def invoke(*args: str | Path, stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(route, [str(arg) for arg in args], input=stdin)


def outputs(result: Result) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def bcc_file(tmp_path: Path) -> Path:
    path = tmp_path / "bcc.eml"
    path.write_bytes(BCC)
    return path


def test_the_spec_json_example_is_the_one_in_routing_md() -> None:
    spec = SHARED / "ROUTING.md"
    if not spec.is_file():
        missing_part(f"ROUTING.md is not beside this checkout ({spec})")
    block = re.search(r"```json\n(.*?)```", spec.read_text(), re.DOTALL)
    assert block is not None
    assert json.loads(block.group(1)) == json.loads(SPEC_EXAMPLE.read_text())


def test_the_toml_copy_holds_the_same_rules() -> None:
    assert load_routing_rules(SPEC_EXAMPLE_TOML) == load_routing_rules(SPEC_EXAMPLE)


@CONFIGS
def test_route_prints_the_decision_as_one_json_line(config: Path, bcc_file: Path) -> None:
    result = invoke("--config", config, bcc_file)
    assert result.exit_code == 0, result.output
    assert outputs(result) == [
        {
            "recipients": ["alice@example.com"],
            "reason": "delivered-to",
            "evidence": [
                {
                    "source": "delivered-to",
                    "field": "Delivered-To",
                    "field_index": 0,
                    "value": "mbox4711-alice@example.com",
                    "received_hop": "mx.isp.example.net",
                }
            ],
            "message": str(bcc_file),
        }
    ]


def test_route_prints_one_line_per_message_in_order(bcc_file: Path, tmp_path: Path) -> None:
    nobody = tmp_path / "nobody.eml"
    nobody.write_bytes(NOBODY)
    result = invoke("--config", SPEC_EXAMPLE, nobody, bcc_file, nobody)
    assert result.exit_code == 0
    assert [(o["message"], o["reason"]) for o in outputs(result)] == [
        (str(nobody), "postmaster-fallback"),
        (str(bcc_file), "delivered-to"),
        (str(nobody), "postmaster-fallback"),
    ]


def test_a_postmaster_decision_is_still_a_decision_and_exits_0(tmp_path: Path) -> None:
    looped = tmp_path / "loop.eml"
    looped.write_bytes(message(*[ISP_HOP] * 51))
    result = invoke("--config", SPEC_EXAMPLE, looped)
    assert result.exit_code == 0
    assert outputs(result)[0]["recipients"] == ["postmaster@example.com"]
    assert outputs(result)[0]["reason"] == "loop"


def test_dash_reads_the_message_from_standard_input() -> None:
    result = invoke("--config", SPEC_EXAMPLE, "-", stdin=BCC)
    assert result.exit_code == 0
    assert outputs(result)[0]["recipients"] == ["alice@example.com"]
    assert outputs(result)[0]["message"] == "-"


def test_standard_input_is_read_as_bytes_with_bare_crs_kept() -> None:
    raw = b"X-Injected: x\rDelivered-To: alice@example.com\r\n" + ISP_HOP.encode() + b"\r\n\r\n"
    result = invoke("--config", SPEC_EXAMPLE, "-", stdin=raw)
    assert outputs(result)[0]["reason"] == "postmaster-fallback"


@pytest.mark.parametrize("name", ["missing.eml", ""], ids=["missing-file", "directory"])
def test_an_unreadable_message_is_one_line_and_exit_2(tmp_path: Path, name: str) -> None:
    result = invoke("--config", SPEC_EXAMPLE, tmp_path / name)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: cannot read message ")
    assert "Traceback" not in result.output


def test_a_bad_key_in_the_config_is_a_config_error_naming_the_key_and_the_file(
    tmp_path: Path, bcc_file: Path
) -> None:
    document = json.loads(SPEC_EXAMPLE.read_text())
    document["trusted_recieved_hosts"] = document.pop("trusted_received_hosts")
    bad = tmp_path / "routing.json"
    bad.write_text(json.dumps(document))
    result = invoke("--config", bad, bcc_file)
    assert isinstance(result.exception, ConfigError)
    assert "trusted_recieved_hosts" in str(result.exception)
    assert str(bad) in str(result.exception)


def test_a_bad_value_in_a_toml_config_names_the_key_and_the_file(tmp_path: Path, bcc_file: Path) -> None:
    bad = tmp_path / "routing.toml"
    bad.write_text(SPEC_EXAMPLE_TOML.read_text().replace("max_received = 50", 'max_received = "fifty"'))
    result = invoke("--config", bad, bcc_file)
    assert isinstance(result.exception, ConfigError)
    assert "max_received" in str(result.exception)
    assert str(bad) in str(result.exception)


def test_through_popbridge_a_config_error_is_one_line_and_exit_2(
    tmp_path: Path, bcc_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "routing.json"
    bad.write_text('{"primary_domain": "example.com"}')
    with pytest.raises(SystemExit) as exited:
        main(["route", "--config", str(bad), str(bcc_file)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert str(bad) in error
    assert "local_domains" in error


def test_a_missing_config_file_is_a_config_error(bcc_file: Path, tmp_path: Path) -> None:
    result = invoke("--config", tmp_path / "nope.toml", bcc_file)
    assert isinstance(result.exception, ConfigError)
    assert "nope.toml" in str(result.exception)


@pytest.mark.parametrize(
    "args", [["--config", str(SPEC_EXAMPLE)], ["message.eml"]], ids=["no-message", "no-config"]
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(route, args)
    assert result.exit_code == 2
