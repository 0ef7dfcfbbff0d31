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


# One row per rule: (what is wrong, the text replaced in GOOD, its replacement, what the error must say).
# Every error names the file and the key, and loading never gets as far as a mailbox or a server.
BAD_CONFIGS = [
    ("delivery port too high", "port = 2525", "port = 70000", r"delivery: port: 70000 is not a TCP port"),
    ("delivery port zero", "port = 2525", "port = 0", r"delivery: port: 0 is not a TCP port"),
    ("mailbox port too high", 'username = "alice"\n', 'username = "alice"\nport = 70000\n',
     r"mailboxes\[0\]: port: 70000 is not a TCP port"),
    ("mailbox port negative", 'username = "alice"\n', 'username = "alice"\nport = -1\n',
     r"mailboxes\[0\]: port: -1 is not a TCP port"),
    ("negative mailbox timeout", 'username = "alice"\n', 'username = "alice"\ntimeout = -5\n',
     r"mailboxes\[0\]: timeout: -5.0 must be a finite number above 0"),
    ("NaN mailbox timeout", 'username = "alice"\n', 'username = "alice"\ntimeout = nan\n',
     r"mailboxes\[0\]: timeout: nan must be a finite number"),
    ("zero delivery timeout", "port = 2525", "port = 2525\ntimeout = 0",
     r"delivery: timeout: 0.0 must be a finite number above 0"),
    ("infinite max_age_days", "port = 2525", "port = 2525\nmax_age_days = inf",
     r"delivery: max_age_days: inf must be a finite number"),
    ("zero poll interval", 'username = "alice"\n', 'username = "alice"\npoll_interval = 0\n',
     r"mailboxes\[0\]: poll_interval: 0.0 must be a finite number at least 1"),
    ("sub-second poll interval", 'username = "alice"\n', 'username = "alice"\npoll_interval = 0.5\n',
     r"mailboxes\[0\]: poll_interval: 0.5 must be a finite number at least 1"),
    ("negative size limit", 'username = "alice"\n', 'username = "alice"\nmax_message_size = -1\n',
     r"mailboxes\[0\]: max_message_size: -1 must be above 0"),
    ("size limit beyond the records", 'username = "alice"\n',
     'username = "alice"\nmax_message_size = 104857600\n',
     r"mailboxes\[0\]: max_message_size: 104857600 must be above 0 and at most 66060288 bytes"),
    ("recipient cap zero", "port = 2525", "port = 2525\nmax_recipients_per_transaction = 0",
     r"delivery: max_recipients_per_transaction: must be at least 1"),
    ("primary domain not local", 'local_domains = ["example.com"]', 'local_domains = ["example.org"]',
     r"mailboxes\[1\]\.routing: primary_domain: 'example.com' is not one of local_domains"),
    ("fixed recipient outside", 'recipients = ["alice@example.com"]', 'recipients = ["alice@gmail.example"]',
     r"mailboxes\[0\]\.recipients: 'alice@gmail\.example' is outside routing\.local_domains"),
    ("fixed recipient in a subdomain", 'recipients = ["alice@example.com"]',
     'recipients = ["alice@mail.example.com"]', r"mailboxes\[0\]\.recipients: .* is outside"),
    ("fixed recipient with a percent hack", 'recipients = ["alice@example.com"]',
     'recipients = ["evil%outside.test@example.com"]', r"mailboxes\[0\]: recipients: .*could route mail"),
    ("fixed recipient quoted", 'recipients = ["alice@example.com"]',
     """recipients = ['"evil@outside.test"@example.com']""", r"mailboxes\[0\]: recipients: .*could route"),
    ("fixed recipient with a bang path", 'recipients = ["alice@example.com"]',
     'recipients = ["outside.test!evil@example.com"]', r"mailboxes\[0\]: recipients: .*could route mail"),
    ("fixed recipient not an address", 'recipients = ["alice@example.com"]', 'recipients = ["alice"]',
     r"mailboxes\[0\]: recipients: 'alice' is not an address"),
    ("alias target with a route", '[routing]\n',
     '[routing]\naliases = { sales = ["@outside.test:evil@example.com"] }\n',
     r"mailboxes\[1\]\.routing: aliases\.sales: .*could route mail"),
    ("user name with a percent", '"alice", "bob", "postmaster"', '"alice", "evil%outside.test"',
     r"mailboxes\[1\]\.routing: users: 'evil%outside\.test' is not a plain local part"),
    ("unknown_local_user outside", '[routing]\n', '[routing]\nunknown_local_user = "catch@outside.test"\n',
     r"mailboxes\[1\]\.routing: unknown_local_user: .* is not an address at primary_domain"),
    ("inline mailbox password", 'password_env = "ALICE_PASSWORD"', 'password = "hunter2"',
     r"mailboxes\[0\]\.password: secrets are never written in the file; use password_env .* password_file"),
    ("inline delivery password", "port = 2525", 'port = 2525\nusername = "u"\npassword = "hunter2"',
     r"delivery\.password: secrets are never written in the file; use password_env"),
    ("inline token", 'password_env = "ALICE_PASSWORD"', 'auth = "xoauth2"\ntoken = "ya29.secret"',
     r"mailboxes\[0\]\.token: .*token_env .*token_file .*token_command"),
]


@pytest.mark.parametrize(("old", "new", "error"), [row[1:] for row in BAD_CONFIGS],
                         ids=[row[0] for row in BAD_CONFIGS])
def test_a_bad_value_is_refused_at_load_naming_the_file_and_the_key(
    tmp_path: Path, old: str, new: str, error: str
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError, match=r"popbridge\.toml: " + error) as caught:
        load_config(path)
    assert "hunter2" not in str(caught.value)
    assert "ya29" not in str(caught.value)


SINGLE_ONLY = """
[delivery]
host = "127.0.0.1"
tls = "none"
{routing}
[[mailboxes]]
id = "alice"
host = "pop.isp.example.net"
username = "alice"
password_env = "ALICE_PASSWORD"
recipients = ["alice@example.com"]
"""


def test_single_user_mailboxes_need_the_local_domains_their_recipients_must_be_in(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"routing\.local_domains: set the domains popbridge delivers to"):
        load_config(write(tmp_path, SINGLE_ONLY.format(routing="")))
    fixed = SINGLE_ONLY.format(routing='[routing]\nlocal_domains = ["example.com"]\n')
    assert load_config(write(tmp_path, fixed)).mailboxes[0].recipients == ("alice@example.com",)
    notices = '[routing]\nlocal_domains = ["example.com"]\npostmaster = "pm@gmail.example"\n'
    outside = SINGLE_ONLY.format(routing=notices)
    with pytest.raises(ConfigError, match=r"routing\.postmaster: 'pm@gmail\.example' is outside"):
        load_config(write(tmp_path, outside))


def test_the_edges_of_each_range_are_accepted(tmp_path: Path) -> None:
    text = GOOD.replace("port = 2525", "port = 65535\ntimeout = 0.001\nmax_recipients_per_transaction = 1")
    text = text.replace('username = "alice"\n', 'username = "alice"\nport = 1\npoll_interval = 1\n'
                        "max_message_size = 66060288\n")
    config = load_config(write(tmp_path, text))
    assert (config.delivery.port, config.mailboxes[0].port) == (65535, 1)
    assert config.mailboxes[0].max_message_size == 66060288
    assert config.delivery.max_recipients_per_transaction == 1
