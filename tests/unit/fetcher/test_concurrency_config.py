"""max_parallel_mailboxes: the fetcher's bound on concurrent POP3 sessions is checked at load, and a bad
value stops `popbridge fetcher` with one line naming the key and the file (exit 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime.settings import ConfigError, load_config

POPBRIDGE = str(Path(sys.executable).with_name("popbridge"))
CONFIG = """max_parallel_mailboxes = {value}

[delivery]
host = "127.0.0.1"
tls = "none"

[routing]
local_domains = ["example.com"]

[[mailboxes]]
id = "alice"
host = "pop.isp.example.net"
username = "alice"
password_env = "ALICE_PASSWORD"
recipients = ["alice@example.com"]
"""


def write(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "popbridge.toml"
    path.write_text(CONFIG.format(value=value))
    return path


def test_the_default_bounds_the_sessions_and_a_chosen_value_is_kept(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "64")).max_parallel_mailboxes == 64
    text = CONFIG.replace("max_parallel_mailboxes = {value}\n", "")
    (tmp_path / "default.toml").write_text(text)
    assert load_config(tmp_path / "default.toml").max_parallel_mailboxes == 16


@pytest.mark.parametrize("value", ["0", "-3", "100000"])
def test_a_value_out_of_range_names_the_key_and_the_file(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"popbridge\.toml: max_parallel_mailboxes: must be from 1 to 512"):
        load_config(write(tmp_path, value))


def test_a_value_of_the_wrong_type_names_the_key_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"popbridge\.toml: max_parallel_mailboxes: Expected `int`"):
        load_config(write(tmp_path, '"many"'))


def test_the_fetcher_command_stops_with_one_line_and_exit_code_2(tmp_path: Path) -> None:
    path = write(tmp_path, "0")
    done = subprocess.run(
        [POPBRIDGE, "fetcher", "--config", str(path), "--once"], capture_output=True, text=True, check=False,
        env={"PATH": "/usr/bin:/bin", "POPBRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:9"}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"popbridge: config error: {path}: max_parallel_mailboxes: must be from 1 to 512"
    ]
