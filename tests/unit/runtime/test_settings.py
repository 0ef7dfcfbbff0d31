"""services/runtime/settings.py: the mail configuration file and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.runtime.settings import ConfigError, load_config, rules_version

GOOD = """
[delivery]
host = "127.0.0.1"
port = 2525
tls = "none"

[routing]
primary_domain = "example.com"
local_domains = ["example.com"]
postmaster = "postmaster@example.com"
users = ["alice", "bob", "postmaster"]
trusted_received_hosts = ["mx.isp.example.net"]

[[mailboxes]]
id = "alice"
host = "pop.isp.example.net"
username = "alice"
password_env = "ALICE_PASSWORD"
recipients = ["alice@example.com"]

[[mailboxes]]
id = "catchall"
host = "pop.isp.example.net"
username = "mbox4711"
password_file = "/run/secrets/mbox4711"
mode = "keep"

[mailboxes.routing]
delivered_to_strip_prefix = "mbox4711-"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "popbridge.toml"
    path.write_text(text)
    return path


def test_a_good_config_loads_with_shared_routing_per_catch_all(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    single, catch_all = config.mailboxes
    assert single.routing is None
    assert not single.catch_all
    assert catch_all.routing is not None
    assert catch_all.routing.trusted_received_hosts == ("mx.isp.example.net",)
    assert catch_all.routing.delivered_to_strip_prefix == "mbox4711-"
    assert config.postmaster == "postmaster@example.com"
    assert catch_all.effective_port == 995


def test_an_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('mode = "keep"', 'mode = "keep"\npasword = "x"'))
    with pytest.raises(ConfigError, match=r"popbridge\.toml: mailboxes\[1\]: .*unknown field `pasword`"):
        load_config(path)


def test_a_wrong_type_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"delivery\.port"):
        load_config(write(tmp_path, GOOD.replace("port = 2525", 'port = "smtp"')))


def test_a_mailbox_without_password_reference_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password_env or password_file"):
        load_config(write(tmp_path, GOOD.replace('password_env = "ALICE_PASSWORD"\n', "")))


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[delivery\n"))


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_rules_version_changes_with_the_rules(tmp_path: Path) -> None:
    first = load_config(write(tmp_path, GOOD)).mailboxes[1].routing
    second = (
        load_config(write(tmp_path, GOOD.replace('"alice", "bob"', '"alice", "bob", "carol"')))
        .mailboxes[1]
        .routing
    )
    assert first is not None
    assert second is not None
    assert rules_version(first) != rules_version(second)
    assert rules_version(first) == rules_version(first)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("postmaster", '"postmaster@elsewhere.example"'),
        ("aliases", '{ sales = ["alice@example.com", "boss@gmail.example"] }'),
        ("list_rules", '[{ list_id = "l.example.net", deliver_to = "lists@example.com.evil.example" }]'),
    ],
)
def test_a_routing_destination_outside_the_primary_domain_is_refused(
    tmp_path: Path, key: str, value: str
) -> None:
    text = GOOD.replace('postmaster = "postmaster@example.com"\n', "")
    text = text.replace("[routing]\n", f"[routing]\n{key} = {value}\n")
    if key != "postmaster":
        text = text.replace("[routing]\n", '[routing]\npostmaster = "postmaster@example.com"\n')
    with pytest.raises(ConfigError, match=r"not an address at primary_domain"):
        load_config(write(tmp_path, text))
