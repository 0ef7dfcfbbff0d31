"""services/runtime/kafka_security.py: POPBRIDGE_KAFKA_* -> aiokafka options, and their use by KafkaLog
and the faust router."""

from __future__ import annotations

import datetime as dt
import re
import ssl
from pathlib import Path
from typing import Any

import faust
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.router.app import faust_credentials
from services.runtime.connect import kafka_log, open_log
from services.runtime.kafka import KafkaLog
from services.runtime.kafka_security import PLAINTEXT, KafkaSecurity, kafka_security
from services.runtime.settings import ConfigError, DeploymentSettings

SECRET = "pa55-w0rd-never-shown"

@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    """A real CA certificate, made with the cryptography package."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "popbridge unit CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def settings(**kafka: Any) -> DeploymentSettings:
    fields = {f"kafka_{key}": value for key, value in kafka.items()}
    return DeploymentSettings(kafka_bootstrap="127.0.0.1:9093", **fields)


def scram(password_file: Path, protocol: str = "SASL_PLAINTEXT", **extra: Any) -> DeploymentSettings:
    return settings(
        security_protocol=protocol,
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="popbridge-router",
        sasl_password_file=str(password_file),
        **extra,
    )


def test_plaintext_is_the_default() -> None:
    security = kafka_security(DeploymentSettings())
    assert security == PLAINTEXT
    assert security.client_options() == {"security_protocol": "PLAINTEXT"}


def test_sasl_plaintext_reads_the_password_file_without_its_newline(password_file: Path) -> None:
    options = kafka_security(scram(password_file)).client_options()
    assert options == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "popbridge-router",
        "sasl_plain_password": SECRET,
    }


def test_sasl_ssl_verifies_the_broker_with_the_ca_file_on_tls_1_2_or_newer(
    password_file: Path, ca_file: Path
) -> None:
    options = kafka_security(scram(password_file, "SASL_SSL", ca_file=str(ca_file))).client_options()
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert len(context.get_ca_certs()) == 1
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_plain_password"] == SECRET


def test_ssl_without_a_ca_file_trusts_the_system_cas() -> None:
    options = kafka_security(settings(security_protocol="ssl")).client_options()
    assert options["security_protocol"] == "SSL"
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert "sasl_mechanism" not in options


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "scram-sha-512"])
def test_every_supported_mechanism(password_file: Path, mechanism: str) -> None:
    security = kafka_security(
        settings(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism=mechanism,
            sasl_username="u",
            sasl_password_file=str(password_file),
        )
    )
    assert security.mechanism == mechanism.upper()


@pytest.mark.parametrize(
    ("kafka", "variable", "says"),
    [
        ({"security_protocol": "TLS"}, "POPBRIDGE_KAFKA_SECURITY_PROTOCOL", "is not one of"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "u"},
         "POPBRIDGE_KAFKA_SASL_MECHANISM", "is not one of"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u"},
         "POPBRIDGE_KAFKA_SASL_MECHANISM", "required"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"},
         "POPBRIDGE_KAFKA_SASL_USERNAME", "required"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
         "POPBRIDGE_KAFKA_SASL_PASSWORD_FILE", "required"),
        ({"sasl_mechanism": "PLAIN"}, "POPBRIDGE_KAFKA_SASL_MECHANISM", "uses no SASL"),
        ({"security_protocol": "SSL", "sasl_username": "u"}, "POPBRIDGE_KAFKA_SASL_USERNAME", "uses no SASL"),
        ({"sasl_password_file": "/x"}, "POPBRIDGE_KAFKA_SASL_PASSWORD_FILE", "uses no SASL"),
        ({"ca_file": "/x"}, "POPBRIDGE_KAFKA_CA_FILE", "uses no TLS"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
          "sasl_password_file": "/nonexistent/kafka-password"},
         "POPBRIDGE_KAFKA_SASL_PASSWORD_FILE: /nonexistent/kafka-password", "cannot read"),
        ({"security_protocol": "SSL", "ca_file": "/nonexistent/ca.crt"},
         "POPBRIDGE_KAFKA_CA_FILE: /nonexistent/ca.crt", "no such file"),
    ],
)
def test_invalid_settings_name_the_variable(kafka: dict[str, str], variable: str, says: str) -> None:
    with pytest.raises(ConfigError, match=f"^environment: {variable}: .*{says}"):
        kafka_security(settings(**kafka))


def test_an_empty_password_file_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=f"POPBRIDGE_KAFKA_SASL_PASSWORD_FILE: {empty}: the file is empty"):
        kafka_security(scram(empty))


def test_a_ca_file_that_is_no_certificate_is_an_error(tmp_path: Path, password_file: Path) -> None:
    bogus = tmp_path / "ca.crt"
    bogus.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=f"POPBRIDGE_KAFKA_CA_FILE: {bogus}: "):
        kafka_security(scram(password_file, "SASL_SSL", ca_file=str(bogus)))


def test_the_password_is_never_shown(password_file: Path) -> None:
    security = kafka_security(scram(password_file))
    log = KafkaLog("127.0.0.1:9093", security=security)
    assert SECRET not in repr(security)
    assert SECRET not in repr(log)
    assert SECRET not in security.describe()
    assert security.describe() == "SASL_PLAINTEXT SCRAM-SHA-512 as 'popbridge-router'"


def test_kafka_log_applies_the_security_to_every_client(password_file: Path) -> None:
    log = kafka_log(scram(password_file, compression="zstd"))
    options = log._client_options()
    assert log.compression == "zstd"
    assert options["bootstrap_servers"] == "127.0.0.1:9093"
    assert options["sasl_plain_password"] == SECRET
    assert options["security_protocol"] == "SASL_PLAINTEXT"


def test_every_kafka_client_in_the_log_takes_the_shared_options() -> None:
    source = (Path(__file__).resolve().parents[3] / "services" / "runtime" / "kafka.py").read_text()
    calls = re.findall(r"= AIOKafka\w+\(([^)]*)", source)
    assert len(calls) >= 7  # producer, group consumer, admin, offsets, scan, plain consumer, set_committed
    for arguments in calls:
        assert "**self._client_options(" in arguments, f"a client without the security options: {arguments!r}"


def test_services_build_kafka_logs_only_through_kafka_log() -> None:
    services = Path(__file__).resolve().parents[3] / "services"
    offenders = [
        str(path.relative_to(services))
        for path in services.rglob("*.py")
        if "KafkaLog(" in path.read_text() and path.name != "kafka.py"
    ]
    assert offenders == []


def test_open_log_uses_the_security_settings(password_file: Path) -> None:
    log = open_log(scram(password_file))
    assert isinstance(log, KafkaLog)
    assert log.security.username == "popbridge-router"


def test_a_missing_bootstrap_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="POPBRIDGE_KAFKA_BOOTSTRAP"):
        kafka_log(DeploymentSettings())


def test_faust_gets_the_same_credentials(password_file: Path, ca_file: Path) -> None:
    assert faust_credentials(PLAINTEXT) is None
    sasl = faust_credentials(kafka_security(scram(password_file)))
    assert isinstance(sasl, faust.SASLCredentials)
    assert (sasl.protocol.value, sasl.mechanism.value) == ("SASL_PLAINTEXT", "SCRAM-SHA-512")
    assert (sasl.username, sasl.password, sasl.ssl_context) == ("popbridge-router", SECRET, None)
    assert SECRET not in repr(sasl)
    tls = kafka_security(scram(password_file, "SASL_SSL", ca_file=str(ca_file)))
    sasl_ssl = faust_credentials(tls)
    assert isinstance(sasl_ssl, faust.SASLCredentials)
    assert sasl_ssl.protocol.value == "SASL_SSL"
    assert sasl_ssl.ssl_context is tls.ssl_context
    plain_tls = faust_credentials(KafkaSecurity("SSL", ssl_context=tls.ssl_context))
    assert isinstance(plain_tls, faust.SSLCredentials)
    assert plain_tls.context is tls.ssl_context
