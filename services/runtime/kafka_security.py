"""How popbridge authenticates to Kafka: `POPBRIDGE_KAFKA_*` settings -> aiokafka client keyword arguments.

    POPBRIDGE_KAFKA_SECURITY_PROTOCOL   PLAINTEXT (default), SSL, SASL_PLAINTEXT or SASL_SSL
    POPBRIDGE_KAFKA_SASL_MECHANISM      PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols only)
    POPBRIDGE_KAFKA_SASL_USERNAME       the SASL user (SASL_* protocols only)
    POPBRIDGE_KAFKA_SASL_PASSWORD_FILE  a file holding the SASL password (SASL_* protocols only)
    POPBRIDGE_KAFKA_CA_FILE             PEM CA bundle that signs the brokers' certificates (SSL, SASL_SSL;
                                        unset: the system's CAs)

The password file is read once, when the settings are turned into options, and the password is kept out
of every repr and message. TLS verifies the broker's certificate and host name and needs TLS 1.2 or newer.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.helpers import create_ssl_context

from services.runtime.settings import ConfigError, DeploymentSettings

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

_PROTOCOL_VAR = "POPBRIDGE_KAFKA_SECURITY_PROTOCOL"
_MECHANISM_VAR = "POPBRIDGE_KAFKA_SASL_MECHANISM"
_USERNAME_VAR = "POPBRIDGE_KAFKA_SASL_USERNAME"
_PASSWORD_FILE_VAR = "POPBRIDGE_KAFKA_SASL_PASSWORD_FILE"  # noqa: S105 - a variable name, not a password
_CA_FILE_VAR = "POPBRIDGE_KAFKA_CA_FILE"


@dataclass(frozen=True)
class KafkaSecurity:
    """The security options of every Kafka client popbridge builds (default: PLAINTEXT)."""

    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.tls:
            options["ssl_context"] = self.ssl_context
        if self.sasl:
            options["sasl_mechanism"] = self.mechanism
            options["sasl_plain_username"] = self.username
            options["sasl_plain_password"] = self.password
        return options

    def describe(self) -> str:
        """For messages and logs: the protocol, mechanism and user, never the password."""
        if not self.sasl:
            return self.protocol
        return f"{self.protocol} {self.mechanism} as {self.username!r}"


PLAINTEXT = KafkaSecurity()


def kafka_security(settings: DeploymentSettings) -> KafkaSecurity:
    """Check the `POPBRIDGE_KAFKA_*` security settings and load the password and CA file they name.

    Every mistake is a ConfigError naming the variable (and the file); none contains the password.
    """
    protocol = settings.kafka_security_protocol.strip().upper() or "PLAINTEXT"
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"environment: {_PROTOCOL_VAR}: {settings.kafka_security_protocol!r} is not one of "
            + ", ".join(PROTOCOLS)
        )
    sasl, tls = protocol.startswith("SASL_"), protocol in ("SSL", "SASL_SSL")
    if not sasl:
        for var, value in (
            (_MECHANISM_VAR, settings.kafka_sasl_mechanism),
            (_USERNAME_VAR, settings.kafka_sasl_username),
            (_PASSWORD_FILE_VAR, settings.kafka_sasl_password_file),
        ):
            if value:
                raise ConfigError(
                    f"environment: {var}: set, but {_PROTOCOL_VAR}={protocol} uses no SASL"
                    " (use SASL_PLAINTEXT or SASL_SSL, or unset it)"
                )
    if settings.kafka_ca_file and not tls:
        raise ConfigError(
            f"environment: {_CA_FILE_VAR}: set, but {_PROTOCOL_VAR}={protocol} uses no TLS"
            " (use SSL or SASL_SSL, or unset it)"
        )
    mechanism = username = password = None
    if sasl:
        mechanism = _mechanism(settings.kafka_sasl_mechanism, protocol)
        username = settings.kafka_sasl_username
        if not username:
            raise ConfigError(f"environment: {_USERNAME_VAR}: required with {_PROTOCOL_VAR}={protocol}")
        password = _password(settings.kafka_sasl_password_file, protocol)
    context = _ssl_context(settings.kafka_ca_file) if tls else None
    return KafkaSecurity(protocol, mechanism, username, password, context)


def _mechanism(value: str | None, protocol: str) -> str:
    if not value:
        raise ConfigError(
            f"environment: {_MECHANISM_VAR}: required with {_PROTOCOL_VAR}={protocol}"
            f" (one of {', '.join(MECHANISMS)})"
        )
    mechanism = value.strip().upper()
    if mechanism not in MECHANISMS:
        raise ConfigError(f"environment: {_MECHANISM_VAR}: {value!r} is not one of {', '.join(MECHANISMS)}")
    return mechanism


def _password(path: str | None, protocol: str) -> str:
    if not path:
        raise ConfigError(f"environment: {_PASSWORD_FILE_VAR}: required with {_PROTOCOL_VAR}={protocol}")
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"environment: {_PASSWORD_FILE_VAR}: {path}: cannot read: {exc.strerror}") from None
    try:
        # A mounted Secret or `echo secret > file` may end in a newline; the password never does.
        password = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"environment: {_PASSWORD_FILE_VAR}: {path}: not UTF-8 text") from None
    if not password:
        raise ConfigError(f"environment: {_PASSWORD_FILE_VAR}: {path}: the file is empty")
    return password


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    if ca_file is not None and not Path(ca_file).is_file():
        raise ConfigError(f"environment: {_CA_FILE_VAR}: {ca_file}: no such file")
    try:
        context: ssl.SSLContext = create_ssl_context(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"environment: {_CA_FILE_VAR}: {ca_file}: not a PEM CA bundle: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"environment: {_CA_FILE_VAR}: {ca_file}: cannot read: {exc.strerror}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context
