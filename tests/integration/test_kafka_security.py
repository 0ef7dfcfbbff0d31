"""popbridge on a broker that wants SCRAM-SHA-512, over SASL_PLAINTEXT and over SASL_SSL (a test CA).

The module starts its own broker (deploy/local/kafka_broker.py --sasl-scram --tls-keystore) and talks
to its SASL listeners only: KafkaLog built from DeploymentSettings creates topics, produces, consumes
and reads group offsets; a wrong password is a clear error that never shows the password; and the faust
router routes a MailFetched with the same credentials.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from schemas import codec
from schemas.events import MailFetched, RecipientsResolved, fetch_id_for
from schemas.topics import FETCHED, ROUTED, TOPICS, TopicSpec
from services.router.worker import RouterCannotRun, Supervisor, run_router
from services.runtime.connect import kafka_log
from services.runtime.health import ProgressTracker
from services.runtime.kafka import KafkaLogError
from services.runtime.log import Outgoing, Record, TopicPartition
from services.runtime.metrics import Metrics
from services.runtime.settings import DeploymentSettings, load_config
from tests.support.kafka import BROKER_SCRIPT, no_kafka, stop_local_broker
from tests.support.mail_config import mail_config_text

pytestmark = pytest.mark.integration

USER, PASSWORD = "popbridge-router", "Scram-Test-Pw-4711"
WRONG_PASSWORD = "Not-The-Password-0815"

CONFIG = mail_config_text(
    delivery={"host": "127.0.0.1", "tls": "none"},
    routing={"primary_domain": "example.com", "local_domains": ["example.com"],
             "users": ["alice", "postmaster"],
             "postmaster": "postmaster@example.com"},
    mailboxes=[{"id": "catchall", "host": "pop.isp.example.net", "username": "mbox4711",
                "password_env": "UNUSED_IN_THIS_TEST"}],
)  # fmt: skip


@dataclass(frozen=True)
class SecureBroker:
    sasl_plaintext: str
    sasl_ssl: str
    ca_file: Path
    password_file: Path
    directory: Path

    def settings(
        self, protocol: str, *, password_file: Path | None = None, prefix: str = ""
    ) -> DeploymentSettings:
        tls = protocol == "SASL_SSL"
        return DeploymentSettings(
            kafka_bootstrap=self.sasl_ssl if tls else self.sasl_plaintext,
            kafka_security_protocol=protocol,
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username=USER,
            kafka_sasl_password_file=str(password_file or self.password_file),
            kafka_ca_file=str(self.ca_file) if tls else None,
            topic_prefix=prefix,
            group_prefix=prefix + "g",
        )


def write_test_pki(directory: Path) -> tuple[Path, Path]:
    """A throw-away CA and a broker certificate for IP 127.0.0.1: (CA file, PEM keystore for Kafka)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "popbridge test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file, keystore = directory / "ca.pem", directory / "broker-keystore.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    keystore.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(pem)
        + ca.public_bytes(pem)
    )
    return ca_file, keystore


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    if shutil.which("java") is None:
        no_kafka("no java on PATH for the SCRAM broker (deploy/local/kafka_broker.py)")
    directory = tmp_path_factory.mktemp("kafka-scram")
    ca_file, keystore = write_test_pki(directory)
    password_file = directory / "sasl-password"
    password_file.write_text(PASSWORD + "\n")  # as `kubectl create secret --from-file` of an echoed file
    command = [sys.executable, str(BROKER_SCRIPT), "start", "--dir", str(directory / "broker"),
               "--heap", "512m", "--sasl-scram", f"{USER}:{PASSWORD}", "--tls-keystore", str(keystore)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    found = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if result.returncode != 0 or set(found) != {"SASL_PLAINTEXT", "SASL_SSL"}:
        stop_local_broker(directory / "broker")
        no_kafka(f"the SCRAM broker did not start: {result.stderr.strip()[-2000:]}")
    try:
        yield SecureBroker(found["SASL_PLAINTEXT"], found["SASL_SSL"], ca_file, password_file,
                           directory / "broker")
    finally:
        stop_local_broker(directory / "broker")


def prefix() -> str:
    return f"s-{uuid.uuid4().hex[:8]}-"


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
async def test_kafka_log_creates_produces_and_consumes_with_scram(
    secure_broker: SecureBroker, protocol: str
) -> None:
    settings = secure_broker.settings(protocol, prefix=prefix())
    log = kafka_log(settings)
    topic, group = settings.topic("mail"), settings.group("reader")

    assert await log.ensure_topics([TopicSpec(topic, 2, {})]) == [topic]
    async with log.producer() as producer:
        outgoing = [Outgoing(topic, f"v{i}".encode(), f"k{i}".encode()) for i in range(4)]
        written = await producer.send_all(outgoing)
    async with log.consumer(group, [topic]) as consumer:
        records: list[Record] = []
        for _ in range(40):
            records += await consumer.fetch(timeout=0.5)
            if len(records) == 4:
                break
        await consumer.commit({tp: o + 1 for tp, o in _last_offsets(records).items()})

    assert len(written) == 4
    assert sorted(r.value for r in records) == [b"v0", b"v1", b"v2", b"v3"]
    assert sum((await log.end_offsets(topic)).values()) == 4
    assert sum((await log.committed(group, topic)).values()) == 4
    assert sorted([r.value async for r in log.scan(topic)]) == [b"v0", b"v1", b"v2", b"v3"]


def _last_offsets(records: list[Record]) -> dict[TopicPartition, int]:
    last: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        last[tp] = max(last.get(tp, -1), r.offset)
    return last


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
async def test_a_wrong_password_is_a_clear_error_without_the_password(
    secure_broker: SecureBroker, protocol: str, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text(WRONG_PASSWORD)
    log = kafka_log(secure_broker.settings(protocol, password_file=wrong))

    with pytest.raises(KafkaLogError) as caught:
        await log.ensure_topics([TopicSpec(prefix() + "never", 1, {})])

    message = str(caught.value)
    assert f"login as {USER!r} refused" in message
    assert "POPBRIDGE_KAFKA_SASL_PASSWORD_FILE" in message
    assert WRONG_PASSWORD not in message
    assert PASSWORD not in message
    assert WRONG_PASSWORD not in repr(log)
    assert not caught.value.retriable


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
async def test_the_faust_router_routes_over_scram(
    secure_broker: SecureBroker, protocol: str, tmp_path: Path
) -> None:
    settings = secure_broker.settings(protocol, prefix=prefix())
    log = kafka_log(settings)
    await log.ensure_topics([TopicSpec(settings.topic(s.name), s.partitions, s.config) for s in TOPICS])
    config_path = tmp_path / "popbridge.toml"
    config_path.write_text(CONFIG)
    raw = b"From: a@outside.example\r\nTo: alice@example.com\r\nMessage-ID: <sasl@x>\r\n\r\nhi\r\n"
    event = MailFetched(
        fetch_id=fetch_id_for("catchall", "u1"),
        mailbox_id="catchall",
        pop3_host="pop.isp.example.net",
        uidl="u1",
        size=len(raw),
        sha256="",
        fetched_at=dt.datetime.now(dt.UTC),
        raw=raw,
    )
    async with log.producer() as producer:
        await producer.send(Outgoing(settings.topic(FETCHED), codec.encode(event), event.fetch_id.encode()))

    await run_router(settings, load_config(config_path), until_idle=True)

    routed = [codec.decode(r.value, RecipientsResolved) async for r in log.scan(settings.topic(ROUTED))]
    assert [(r.fetch_id, [x.address for x in r.recipients]) for r in routed] == [
        (event.fetch_id, ["alice@example.com"])
    ]


async def test_the_router_with_a_wrong_password_ends_at_once_in_one_line(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text(WRONG_PASSWORD)
    settings = secure_broker.settings("SASL_PLAINTEXT", prefix=prefix(), password_file=wrong)
    config_path = tmp_path / "popbridge.toml"
    config_path.write_text(CONFIG)
    supervisor = Supervisor(
        settings, load_config(config_path), kafka_log(settings), ProgressTracker(), Metrics(), asyncio.Event()
    )

    with pytest.raises(RouterCannotRun) as caught:  # not retried: starting again cannot help
        await asyncio.wait_for(supervisor.run(), 60)

    message = caught.value.format_message()
    assert f"login as {USER!r} refused" in message
    assert "\n" not in message
    assert WRONG_PASSWORD not in message
