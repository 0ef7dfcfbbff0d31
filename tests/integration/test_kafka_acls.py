"""The KafkaUsers of deploy/k8s hold on a broker that enforces ACLs: each stage and the ops commands work
with exactly the ACLs of their rendered KafkaUser, and a user without ACLs fails with one clear line.

The broker is this module's own (deploy/local/kafka_broker.py --acls: StandardAuthorizer, SCRAM users,
the super user `admin` creates topics and ACLs), in a temp dir: the shared broker is never touched. ACLs
come from the prod overlay's KafkaUser specs and are created with aiokafka's CreateAcls request (aiokafka
is already a dependency; kafka-python would add one, and Kafka 4's jars here hold no AclCommand). Topics
come from the generated KafkaTopics, as Strimzi's Topic Operator would create them. The stages run as the
real `popbridge` commands, with the deployment's own names (no topic prefix, group prefix "popbridge").
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import CreateAclsRequest

from schemas.topics import TopicSpec
from services.runtime.kafka import KafkaLog
from services.runtime.kafka_security import kafka_security
from services.runtime.settings import DeploymentSettings
from tests.deploy.kube import render_or_skip
from tests.deploy.test_gen_kafkatopics import generator
from tests.support.dovecot import DovecotMailboxes, MailUser
from tests.support.kafka import BROKER_SCRIPT
from tests.support.mail_config import delivery_to, mailbox, write_mail_config
from tests.support.pipeline import sample_message
from tests.support.smtp import SmtpSink

pytestmark = pytest.mark.integration

STAGES = ("fetcher", "router", "deliverer")
USERS = (*(f"popbridge-{s}" for s in STAGES), "popbridge-ops", "popbridge-nobody")
SUPER_USER = "admin"
# The Kafka protocol's codes (org.apache.kafka.common.acl / resource), for CreateAcls.
RESOURCE = {"topic": 2, "group": 3}
PATTERN = {"literal": 3, "prefix": 4}
OPERATION = {"Read": 3, "Write": 4, "Create": 5, "Delete": 6, "Alter": 7, "Describe": 8,
             "DescribeConfigs": 10, "AlterConfigs": 11}
ALLOW = 3


@dataclass(frozen=True)
class AclBroker:
    directory: Path
    sasl_bootstrap: str
    passwords: dict[str, str]

    def password_file(self, user: str) -> Path:
        path = self.directory / f"{user}.password"
        path.write_text(self.passwords[user], encoding="utf-8")
        return path

    def settings(self, user: str) -> DeploymentSettings:
        return DeploymentSettings(
            kafka_bootstrap=self.sasl_bootstrap, kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username=user,
            kafka_sasl_password_file=str(self.password_file(user)))

    def environment(self, user: str) -> dict[str, str]:
        """The POPBRIDGE_* variables a pod of `user` gets (as in the prod overlay, on SASL_PLAINTEXT)."""
        return {
            "POPBRIDGE_KAFKA_BOOTSTRAP": self.sasl_bootstrap,
            "POPBRIDGE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "POPBRIDGE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "POPBRIDGE_KAFKA_SASL_USERNAME": user,
            "POPBRIDGE_KAFKA_SASL_PASSWORD_FILE": str(self.password_file(user)),
            "POPBRIDGE_GROUP_PREFIX": "popbridge", "POPBRIDGE_LOG_FORMAT": "text",
            "POPBRIDGE_DATA_DIR": str(self.directory),
        }


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclBroker]:
    directory = tmp_path_factory.mktemp("acl-broker")
    passwords = {user: secrets.token_urlsafe(12) for user in (SUPER_USER, *USERS)}
    command = [sys.executable, str(BROKER_SCRIPT), "start", "--dir", str(directory), "--heap", "512m",
               "--acls", "--sasl-scram", f"{SUPER_USER}:{passwords[SUPER_USER]}",
               *(a for user in USERS for a in ("--scram-user", f"{user}:{passwords[user]}"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        pytest.fail(f"the ACL broker did not start: {result.stderr.strip()[-2000:]}")
    sasl = next(line.split("=", 1)[1] for line in result.stdout.splitlines()
                if line.startswith("SASL_PLAINTEXT="))
    try:
        broker = AclBroker(directory, sasl, passwords)
        asyncio.run(_prepare(broker))
        yield broker
    finally:
        subprocess.run([sys.executable, str(BROKER_SCRIPT), "stop", "--dir", str(directory)],
                       capture_output=True, timeout=60, check=True)


def rendered_acls() -> dict[str, list[dict[str, Any]]]:
    """KafkaUser name -> its ACLs, from the prod overlay as kustomize renders it."""
    users = [r for r in render_or_skip("overlays/prod") if r["kind"] == "KafkaUser"]
    return {u["metadata"]["name"]: u["spec"]["authorization"]["acls"] for u in users}


def create_acl_entries(user: str, acls: list[dict[str, Any]]) -> list[CreateAclsRequest]:
    requests = []
    for acl in acls:
        assert acl["type"] == "allow"
        target = acl["resource"]
        for operation in acl["operations"]:
            requests.append(CreateAclsRequest(
                RESOURCE[target["type"]], target["name"], PATTERN[target["patternType"]], f"User:{user}", "*",
                OPERATION[operation], ALLOW))
    return requests


async def _prepare(broker: AclBroker) -> None:
    """As Strimzi would: the topics of the KafkaTopics, the ACLs of the KafkaUsers (as the super user)."""
    admin_log = KafkaLog(broker.sasl_bootstrap, security=kafka_security(broker.settings(SUPER_USER)))
    specs = generator().declared_topics()
    await admin_log.ensure_topics([TopicSpec(s.name, s.partitions, dict(s.config)) for s in specs])
    admin = AIOKafkaAdminClient(**admin_log._client_options())
    await admin.start()
    try:
        for user, acls in rendered_acls().items():
            for request in create_acl_entries(user, acls):
                response = await admin._send_request(request)
                assert [code for code, _ in response.creation_responses] == [0], (user, response)
    finally:
        await admin.close()


def popbridge(broker: AclBroker, user: str, *args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **broker.environment(user), **(env or {})}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          env=environ, timeout=timeout, check=False)


def _in_a_minute() -> str:
    return (datetime.now(UTC) + timedelta(minutes=1)).isoformat(timespec="seconds")


def message(n: int) -> bytes:
    return sample_message(n, tag="acl")


def alice_config(tmp_path: Path, dovecot: DovecotMailboxes, smtp_sink: SmtpSink, user: MailUser) -> str:
    box = mailbox("alice-box", dovecot.server.host, dovecot.server.pop3_port, user.login,
                  ("alice@example.com", "gone@example.com"))
    return str(write_mail_config(tmp_path / "popbridge.toml", delivery=delivery_to(smtp_sink.port),
                                 mailboxes=[box]))


def test_each_stage_and_the_ops_commands_work_with_exactly_their_acls(
    acl_broker: AclBroker, dovecot: DovecotMailboxes, smtp_sink: SmtpSink, tmp_path: Path,
) -> None:
    user = dovecot.new_user("alice")
    dovecot.deliver_many(user, [message(1), message(2)])
    config = alice_config(tmp_path, dovecot, smtp_sink, user)
    smtp_sink.rcpt_reply = {"gone@example.com": "550 5.1.1 no such user"}.get  # one dead letter each
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat(timespec="seconds")
    fetched = popbridge(acl_broker, "popbridge-fetcher", "fetcher", "--once", "--config", config,
                        env={"POP3_PASSWORD": user.password})
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    routed = popbridge(acl_broker, "popbridge-router", "router", "--until-idle", "--config", config)
    assert routed.returncode == 0, routed.stderr[-3000:]
    delivered = popbridge(acl_broker, "popbridge-deliverer", "deliverer", "--until-idle", "--config", config)
    assert delivered.returncode == 0, delivered.stderr[-3000:]
    assert len(smtp_sink.wait_for(2, 30)) == 2
    for command in (("lag", "--json"), ("dlq", "list"), ("dlq", "retry", "--all"),
                    ("replay", "router", "--from", since, "--shadow", "--config", config),
                    ("replay", "router", "--from", since, "--to", _in_a_minute(), "--execute"),
                    ("replay", "router", "--from", since, "--execute")):
        result = popbridge(acl_broker, "popbridge-ops", *command)
        assert result.returncode == 0, (command, result.stderr[-3000:])


WITHOUT_ACLS = {
    "fetcher": ("fetcher", "--once"),
    "router": ("router", "--until-idle"),
    "deliverer": ("deliverer", "--until-idle"),
    "lag": ("lag",),
    "dlq list": ("dlq", "list"),
    "replay": ("replay", "router", "--from", "2026-01-01T00:00"),
}
@pytest.mark.parametrize("name", list(WITHOUT_ACLS))
def test_a_user_without_acls_fails_with_one_clear_line(
    acl_broker: AclBroker, dovecot: DovecotMailboxes, smtp_sink: SmtpSink, tmp_path: Path, name: str,
) -> None:
    user = dovecot.new_user("bob")
    dovecot.deliver(user, message(9))
    config = alice_config(tmp_path, dovecot, smtp_sink, user)
    command = WITHOUT_ACLS[name]
    needs_config = command[0] in STAGES
    options = ("--config", config) if needs_config else ()
    result = popbridge(acl_broker, "popbridge-nobody", *command, *options, timeout=90,
                       env={"POP3_PASSWORD": user.password})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr[-3000:]
    assert "authoriz" in lines[0].lower(), lines[0]
