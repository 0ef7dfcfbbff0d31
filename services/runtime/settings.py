"""The mail configuration (one TOML file: mailboxes, routing, delivery target) and the deployment settings.

Both are msgspec Structs. The mail configuration rejects unknown keys, so a typo is an error that names
the key and the file (`ConfigError`); secrets are referenced by environment variable or file name, never
inlined. Deployment knobs (`DeploymentSettings`) are built by `services.cli` from `POPBRIDGE_*` variables.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec

from schemas.topics import MAX_MESSAGE_BYTES, MIB
from services.runtime.local_parts import is_safe_local_part, unsafe_address_problem

DEFAULT_ENVELOPE_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "X-RCPT-TO")


# A fetched message travels inside events (MailFetched, RecipientsResolved, retries, dead letters) whose
# framing, recipients and evidence need room beside the raw bytes in a record of MAX_MESSAGE_BYTES.
EVENT_OVERHEAD_BYTES = MIB
LARGEST_MESSAGE_SIZE = MAX_MESSAGE_BYTES - EVENT_OVERHEAD_BYTES
MIN_POLL_INTERVAL = 1.0
# Inline secret keys people write, and where the secret belongs instead.
_INLINE_SECRETS = {
    "password": "password_env = \"VARIABLE\" or password_file = \"/run/secrets/...\"",
    "pass": "password_env = \"VARIABLE\" or password_file = \"/run/secrets/...\"",
    "token": "token_env = \"VARIABLE\", token_file = \"/run/secrets/...\" or token_command = [\"...\"]",
}


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key. Exit code 2."""


def _port(key: str, value: int | None) -> None:
    if value is not None and not 1 <= value <= 65535:
        raise ValueError(f"{key}: {value} is not a TCP port (1-65535)")


def _positive(key: str, value: float, *, at_least: float = 0.0) -> None:
    """A finite number above zero (or at least `at_least`); NaN and infinity, which TOML allows, are not."""
    if not math.isfinite(value) or value <= 0 or value < at_least:
        floor = f"at least {at_least:g}" if at_least else "above 0"
        raise ValueError(f"{key}: {value!r} must be a finite number {floor}")


class _Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of configuration Structs: unknown keys are errors."""


class FallbackHeaders(_Config, frozen=True):
    primary: tuple[str, ...] = ("Resent-To", "Resent-Cc")
    otherwise: tuple[str, ...] = ("To", "Cc")


class ListRule(_Config, frozen=True):
    list_id: str
    deliver_to: str


class Pop3MailboxInfo(_Config, frozen=True):
    """Informational only (ROUTING.md section 1): the ISP catch-all mailbox; its address is not local."""

    host: str = ""
    user: str = ""
    address: str = ""


class RoutingRules(_Config, frozen=True):
    """The routing settings of one catch-all mailbox, exactly the keys of ROUTING.md section 1.

    `users = None` (absent) accepts every local part at a local domain (ROUTING.md section 6).
    """

    primary_domain: str
    local_domains: tuple[str, ...]
    postmaster: str
    alias_domains: dict[str, str] = {}
    users: tuple[str, ...] | None = None
    aliases: dict[str, tuple[str, ...]] = {}
    recipient_delimiter: str = "+"
    unknown_local_user: str = "postmaster"
    trusted_received_hosts: tuple[str, ...] = ()
    envelope_headers: tuple[str, ...] = DEFAULT_ENVELOPE_HEADERS
    delivered_to_strip_prefix: str = ""
    fallback_headers: FallbackHeaders = FallbackHeaders()
    list_rules: tuple[ListRule, ...] = ()
    max_received: int = 50
    pop3_mailbox: Pop3MailboxInfo | None = None

    def __post_init__(self) -> None:
        if self.primary_domain.lower() not in {domain.lower() for domain in self.local_domains}:
            raise ValueError(f"primary_domain: {self.primary_domain!r} is not one of local_domains")
        # The router only ever outputs these configured addresses; keeping them inside the primary
        # domain, with local parts no server reads as a route, is what makes "never relay outside" hold
        # whatever a message claims.
        for key, address in self._destinations():
            if not address.lower().endswith("@" + self.primary_domain.lower()):
                domain = self.primary_domain
                raise ValueError(f"{key}: {address!r} is not an address at primary_domain {domain!r}")
            if (problem := unsafe_address_problem(address)) is not None:
                raise ValueError(f"{key}: {problem}")
        for user in self.users or ():
            if not is_safe_local_part(user):
                raise ValueError(f"users: {user!r} is not a plain local part (no %, !, /, quotes or spaces)")
        if self.max_received < 1:
            raise ValueError("max_received: must be at least 1")

    def _destinations(self) -> list[tuple[str, str]]:
        found = [("postmaster", self.postmaster)]
        found += [(f"aliases.{name}", target) for name, targets in self.aliases.items() for target in targets]
        found += [(f"list_rules[{i}].deliver_to", rule.deliver_to) for i, rule in enumerate(self.list_rules)]
        unknown = self.unknown_local_user
        if unknown.lower() not in ("", "postmaster"):
            address = unknown if "@" in unknown else f"{unknown}@{self.primary_domain}"
            found.append(("unknown_local_user", address))
        return found


def rules_version(rules: RoutingRules) -> str:
    """A short hash of the routing rules, carried in every routed event so a rule change is visible."""
    canonical = json.dumps(msgspec.to_builtins(rules), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class SecretRef(_Config, frozen=True):
    """Where a secret comes from: an environment variable or a file (e.g. a mounted Kubernetes Secret)."""

    env: str | None = None
    file: str | None = None


class OAuth2(_Config, frozen=True):
    """How popbridge gets XOAUTH2 access tokens itself (services.runtime.oauth2): a provider preset
    (`microsoft`, `google`) or a generic `token_url`, the app's `client_id`, its secret by reference only,
    and the grant: `refresh_token` (delegated; `popbridge oauth login` stores the first refresh token) or
    `client_credentials` (app-only, e.g. Microsoft 365's POP.AccessAsApp)."""

    client_id: str
    provider: Literal["microsoft", "google"] | None = None
    tenant: str = "organizations"  # microsoft: the directory (tenant id or domain); app-only needs one
    token_url: str | None = None
    device_authorization_url: str | None = None
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    scopes: tuple[str, ...] = ()  # empty: the preset's scopes for the grant
    grant: Literal["refresh_token", "client_credentials"] = "refresh_token"
    refresh_margin: float = 300.0  # seconds before expiry at which a token is renewed
    timeout: float = 30.0  # seconds one token endpoint request may take

    def __post_init__(self) -> None:
        if self.provider is None and not self.token_url:
            raise ValueError("oauth2: set provider (\"microsoft\" or \"google\") or token_url")
        if self.grant == "client_credentials" and not (self.client_secret_env or self.client_secret_file):
            raise ValueError("oauth2: grant = \"client_credentials\" needs client_secret_env or "
                             "client_secret_file")
        if self.grant == "client_credentials" and self.provider == "microsoft" and self.tenant in (
                "organizations", "common", "consumers"):
            raise ValueError(f"oauth2.tenant: app-only access needs your tenant id or domain, not "
                             f"{self.tenant!r}")
        _positive("oauth2.refresh_margin", self.refresh_margin)
        _positive("oauth2.timeout", self.timeout)


def _check_token_source(auth: str, oauth2: OAuth2 | None, *references: object) -> None:
    """XOAUTH2 takes its token from exactly one kind of source: popbridge's own `oauth2`, or a reference."""
    if auth == "xoauth2" and oauth2 is None and not any(references):
        raise ValueError("auth = \"xoauth2\" needs an [oauth2] table, token_env, token_file or token_command")
    if oauth2 is not None and auth != "xoauth2":
        raise ValueError(f"oauth2: XOAUTH2 is the only login with a token, not auth = {auth!r}")
    if oauth2 is not None and any(references):
        raise ValueError("oauth2: use either [oauth2] or token_env/token_file/token_command, not both")


class Mailbox(_Config, frozen=True):
    """One POP3 mailbox to drain. `recipients` set: a single-user mailbox; otherwise a catch-all one."""

    id: str
    host: str
    username: str
    port: int | None = None
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    ca_file: str | None = None
    verify_tls: bool = True
    password_env: str | None = None
    password_file: str | None = None
    mode: Literal["delete", "keep"] = "delete"
    recipients: tuple[str, ...] = ()
    routing: RoutingRules | None = None
    poll_interval: float = 60.0
    max_message_size: int = 50 * 1024 * 1024
    timeout: float = 60.0  # seconds without progress (connect, TLS, any reply) before a session fails
    command_deadline: float = 300.0  # seconds one reply may take in all, however slowly its bytes come
    pass_deadline: float = 3600.0  # seconds one pass may take in all; what is left waits for the next pass
    # How to log in: USER/PASS, APOP, SASL PLAIN (all with the password) or XOAUTH2 with a bearer token
    # from token_env, token_file or token_command (an argv run before each session; its stdout is the
    # token, so an external refresher can supply it).
    auth: Literal["user", "apop", "plain", "xoauth2"] = "user"
    token_env: str | None = None
    token_file: str | None = None
    token_command: tuple[str, ...] = ()
    oauth2: OAuth2 | None = None  # popbridge gets the token itself (implies auth = "xoauth2")
    # Limits: messages retrieved per poll (None: all), QUIT and reconnect after this many deletions so a
    # dropped line loses little, and POP3 connections to one host at a time (the smallest value of the
    # mailboxes on that host applies).
    max_messages_per_session: int | None = None
    quit_every: int = 500
    max_connections_per_host: int = 2
    # Keep mode: delete a message once it was published more than this many days ago (None: never).
    keep_days: float | None = None

    def __post_init__(self) -> None:
        _port("port", self.port)
        _positive("timeout", self.timeout)
        _positive("poll_interval", self.poll_interval, at_least=MIN_POLL_INTERVAL)
        if not 0 < self.max_message_size <= LARGEST_MESSAGE_SIZE:
            raise ValueError(f"max_message_size: {self.max_message_size} must be above 0 and at most "
                             f"{LARGEST_MESSAGE_SIZE} bytes (records hold at most {MAX_MESSAGE_BYTES})")
        for recipient in self.recipients:
            if (problem := unsafe_address_problem(recipient)) is not None:
                raise ValueError(f"recipients: {problem}")
        _positive("command_deadline", self.command_deadline)
        _positive("pass_deadline", self.pass_deadline)
        if self.quit_every < 1:
            raise ValueError("quit_every: must be at least 1")
        if self.max_connections_per_host < 1:
            raise ValueError("max_connections_per_host: must be at least 1")
        if self.max_messages_per_session is not None and self.max_messages_per_session < 1:
            raise ValueError("max_messages_per_session: must be at least 1")
        if self.keep_days is not None and (self.mode != "keep" or not 0 <= self.keep_days < math.inf):
            raise ValueError("keep_days: a number of days >= 0, only with mode = \"keep\"")
        if self.oauth2 is not None and self.auth == "user":  # the default: an [oauth2] table means XOAUTH2
            msgspec.structs.force_setattr(self, "auth", "xoauth2")
        _check_token_source(self.auth, self.oauth2, self.token_env, self.token_file, self.token_command)

    @property
    def needs_password(self) -> bool:
        """Every method but XOAUTH2 logs in with the password."""
        return self.auth != "xoauth2"

    @property
    def catch_all(self) -> bool:
        return not self.recipients

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else (995 if self.tls == "implicit" else 110)

    @property
    def password(self) -> SecretRef:
        return SecretRef(env=self.password_env, file=self.password_file)


class SmtpTarget(_Config, frozen=True):
    """The organisation's own mail server that receives every delivered copy."""

    host: str
    port: int = 25
    protocol: Literal["smtp", "lmtp"] = "smtp"
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    ca_file: str | None = None
    verify_tls: bool = True
    helo_name: str | None = None
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    # How to log in when `username` is set: SASL PLAIN or LOGIN with the password ("login-plain"), or
    # XOAUTH2 (Exchange Online) with a bearer token from token_env, token_file or token_command (an argv run
    # before each session; its stdout is the token), as for the mailboxes.
    auth: Literal["login-plain", "xoauth2"] = "login-plain"
    token_env: str | None = None
    token_file: str | None = None
    token_command: tuple[str, ...] = ()
    oauth2: OAuth2 | None = None  # popbridge gets the token itself (with auth = "xoauth2")
    timeout: float = 60.0
    # Send the postmaster (MailConfig.postmaster) one short notice per dead-lettered copy; never a bounce
    # to the outside sender.
    notify_postmaster: bool = False
    # The deliverer: connections used in parallel, the delays of its retry tiers (seconds; the last one
    # repeats) and how long a deferred copy is retried before it goes to the dead letters.
    connections: int = 2
    retry_delays: tuple[float, ...] = (60.0, 300.0, 1800.0, 7200.0, 21600.0)
    max_age_days: float = 5.0
    # RCPTs per mail transaction: a message for more recipients goes out in several transactions, so one
    # storm of recipients never meets a server's limit (Postfix: smtpd_recipient_limit) all at once.
    max_recipients_per_transaction: int = 100

    def __post_init__(self) -> None:
        _port("port", self.port)
        _positive("timeout", self.timeout)
        _positive("max_age_days", self.max_age_days)
        if self.connections < 1:
            raise ValueError("connections: must be at least 1")
        if self.max_recipients_per_transaction < 1:
            raise ValueError("max_recipients_per_transaction: must be at least 1")
        if not 1 <= len(self.retry_delays) <= 5 or not all(0 < d < math.inf for d in self.retry_delays):
            raise ValueError("retry_delays: one to five positive numbers of seconds")
        if self.oauth2 is not None and self.auth == "login-plain":  # the default: [oauth2] means XOAUTH2
            msgspec.structs.force_setattr(self, "auth", "xoauth2")
        if self.auth == "xoauth2" and not self.username:
            raise ValueError("auth = \"xoauth2\" needs username")
        _check_token_source(self.auth, self.oauth2, self.token_env, self.token_file, self.token_command)


class MailConfig(_Config, frozen=True):
    """The whole mail configuration file."""

    delivery: SmtpTarget
    mailboxes: tuple[Mailbox, ...]
    routing: dict[str, Any] = {}
    # POP3 sessions of different mailboxes at a time (a hung one holds its slot only until its deadlines).
    # 16 polls 1,000 idle mailboxes in a few seconds (bench/scale_fetcher.py); at most 512 sockets, half
    # the usual 1,024 open files a process may have.
    max_parallel_mailboxes: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.max_parallel_mailboxes <= 512:
            raise ValueError("max_parallel_mailboxes: must be from 1 to 512")

    def mailbox(self, mailbox_id: str) -> Mailbox | None:
        return next((m for m in self.mailboxes if m.id == mailbox_id), None)

    @property
    def postmaster(self) -> str:
        """Where mail goes that no rule can place: [routing] postmaster, else the first one configured."""
        shared = self.routing.get("postmaster")
        if isinstance(shared, str) and shared:
            return shared
        for mailbox in self.mailboxes:
            if mailbox.routing is not None:
                return mailbox.routing.postmaster
        return self.mailboxes[0].recipients[0]


class DeploymentSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Deployment knobs from `POPBRIDGE_*` environment variables (see services.cli)."""

    kafka_bootstrap: str | None = None
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password_file: str | None = None
    kafka_ca_file: str | None = None
    kafka_compression: str | None = None
    topic_prefix: str = ""
    group_prefix: str = "popbridge"
    log_level: str = "INFO"
    data_dir: str = ""
    http_port: int = 0

    def group(self, stage: str) -> str:
        """The consumer group id of a stage, e.g. `popbridge-deliverer`."""
        return f"{self.group_prefix}-{stage}"

    def topic(self, name: str) -> str:
        """The full name of one of schemas.topics' topics in this deployment."""
        return f"{self.topic_prefix}{name}"


def _read_document(path: Path) -> Any:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return tomllib.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}"
        ) from None


def _convert(document: Any, cls: type[Any], path: Path) -> Any:
    try:
        return msgspec.convert(document, cls)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        key = where.rstrip("`").lstrip(".") if where else ""
        raise ConfigError(f"{path}: {key + ': ' if key else ''}{message}") from None


def _with_shared_routing(document: Any) -> Any:
    """Each catch-all mailbox gets the global [routing] keys, overridden by its own [mailboxes.routing]."""
    if not isinstance(document, dict):
        return document
    shared = document.get("routing", {})
    for mailbox in document.get("mailboxes", []):
        if isinstance(mailbox, dict) and not mailbox.get("recipients") and isinstance(shared, dict):
            own = mailbox.get("routing", {})
            mailbox["routing"] = {**shared, **own} if isinstance(own, dict) else own
    return document


def _inline_secrets(document: Any) -> Iterator[tuple[str, str]]:
    """(key, where the secret belongs instead) for each secret written into the file itself."""
    if not isinstance(document, dict):
        return
    tables = [("delivery", document.get("delivery"))]
    mailboxes = document.get("mailboxes")
    if isinstance(mailboxes, list):
        tables += [(f"mailboxes[{index}]", mailbox) for index, mailbox in enumerate(mailboxes)]
    for where, table in tables:
        if isinstance(table, dict):
            yield from ((f"{where}.{key}", _INLINE_SECRETS[key]) for key in table if key in _INLINE_SECRETS)


def _shared_local_domains(config: MailConfig, path: Path) -> frozenset[str]:
    """[routing] local_domains and alias_domains: where single-user mailboxes may deliver."""
    local, aliases = config.routing.get("local_domains", ()), config.routing.get("alias_domains", {})
    if not (isinstance(local, list | tuple) and all(isinstance(d, str) for d in local)
            and isinstance(aliases, dict)):
        raise ConfigError(f"{path}: routing.local_domains: expected a list of domain names")
    return frozenset(domain.lower() for domain in [*local, *aliases])


def _check_fixed_recipients(config: MailConfig, path: Path) -> None:
    """A single-user mailbox delivers to its configured recipients: each must be inside a local domain."""
    single = [(index, box) for index, box in enumerate(config.mailboxes) if not box.catch_all]
    if not single:
        return
    domains = _shared_local_domains(config, path)
    for index, mailbox in single:
        if not domains:
            raise ConfigError(f"{path}: routing.local_domains: set the domains popbridge delivers to "
                              f"(mailboxes[{index}] has fixed recipients, which must be inside them)")
        for recipient in mailbox.recipients:
            if recipient.rpartition("@")[2].lower() not in domains:
                raise ConfigError(f"{path}: mailboxes[{index}].recipients: {recipient!r} is outside "
                                  f"routing.local_domains {sorted(domains)}; popbridge never relays outside")
    _check_shared_postmaster(config, path, domains)


def _check_shared_postmaster(config: MailConfig, path: Path, domains: frozenset[str]) -> None:
    """[routing] postmaster gets the dead-letter notices even with no catch-all mailbox to check it."""
    postmaster = config.routing.get("postmaster")
    if postmaster is None:
        return
    if not isinstance(postmaster, str):
        problem: str | None = "expected an address"
    elif postmaster.rpartition("@")[2].lower() not in domains:
        problem = f"{postmaster!r} is outside routing.local_domains {sorted(domains)}"
    else:
        problem = unsafe_address_problem(postmaster)
    if problem is not None:
        raise ConfigError(f"{path}: routing.postmaster: {problem}")


def load_config(path: str | Path) -> MailConfig:
    """Read and check the mail configuration; ConfigError names the file and the key."""
    path = Path(path)
    document = _read_document(path)
    for key, instead in _inline_secrets(document):
        raise ConfigError(f"{path}: {key}: secrets are never written in the file; use {instead}")
    config: MailConfig = _convert(_with_shared_routing(document), MailConfig, path)
    if not config.mailboxes:
        raise ConfigError(f"{path}: mailboxes: configure at least one [[mailboxes]] entry")
    seen: set[str] = set()
    for index, mailbox in enumerate(config.mailboxes):
        where = f"{path}: mailboxes[{index}]"
        if mailbox.id in seen:
            raise ConfigError(f"{where}.id: duplicate mailbox id {mailbox.id!r}")
        seen.add(mailbox.id)
        if mailbox.catch_all and mailbox.routing is None:
            raise ConfigError(f"{where}: a catch-all mailbox (no `recipients`) needs [routing] settings")
        if not mailbox.catch_all and mailbox.routing is not None:
            raise ConfigError(
                f"{where}: a single-user mailbox (with `recipients`) takes no [routing] settings"
            )
        if mailbox.needs_password and not (mailbox.password_env or mailbox.password_file):
            raise ConfigError(f"{where}: set password_env or password_file (passwords are never inlined)")
    _check_fixed_recipients(config, path)
    return config


def load_routing_rules(path: str | Path) -> RoutingRules:
    """Read a file holding only the routing keys (ROUTING.md section 1), as JSON or TOML."""
    path = Path(path)
    rules: RoutingRules = _convert(_read_document(path), RoutingRules, path)
    return rules
