"""The configuration kafka_broker.py writes: server.properties, the ports it picks, the SCRAM arguments.

A restart of the same DIR keeps its ports when they are still free, so its address stays the same.
"""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path
from typing import TypeAlias

from broker_base import BrokerError

Ports: TypeAlias = tuple[int | None, int | None]  # (client port, controller port); None: not chosen
SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
_SCRAM_PART = re.compile(r"[A-Za-z0-9._-]+")  # StorageTool's --add-scram syntax has no escapes
HOST = "127.0.0.1"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 50 MB mail plus headers and batch overhead


def server_properties(data_dir: Path, port: int, controller_port: int,
                      secure: dict[str, int] | None = None, keystore: Path | None = None, *,
                      super_user: str | None = None) -> str:
    """`secure` maps extra listeners (SASL_PLAINTEXT, SASL_SSL) to their ports; SASL_SSL needs `keystore`."""
    secure = secure or {}
    client = [f"PLAINTEXT://{HOST}:{port}", *(f"{name}://{HOST}:{p}" for name, p in secure.items())]
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{controller_port}",  # static quorum: format needs no flag
        "listeners": ",".join([*client, f"CONTROLLER://{HOST}:{controller_port}"]),
        "advertised.listeners": ",".join(client),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": ",".join(
            ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT", *(f"{name}:{name}" for name in secure)]
        ),
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",  # topics come from code, with their configs
        "offsets.topic.replication.factor": "1",  # the default 3 never works on one node
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        "group.initial.rebalance.delay.ms": "0",
        "log.cleaner.dedupe.buffer.size": "1048577",  # the default 128 MiB sits on the heap
        "num.network.threads": "2",  # two cores
        "num.io.threads": "2",
        "background.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
        "message.max.bytes": str(MAX_MESSAGE_BYTES),
        "replica.fetch.max.bytes": str(MAX_MESSAGE_BYTES),
        "fetch.max.bytes": str(MAX_MESSAGE_BYTES),
    }
    if secure:
        settings["sasl.enabled.mechanisms"] = SCRAM_MECHANISM
    for name in secure:
        settings[f"listener.name.{name.lower()}.{SCRAM_MECHANISM.lower()}.sasl.jaas.config"] = SCRAM_LOGIN
    if "SASL_SSL" in secure:
        if keystore is None:
            raise BrokerError("a SASL_SSL listener needs --tls-keystore")
        settings["listener.name.sasl_ssl.ssl.keystore.type"] = "PEM"
        settings["listener.name.sasl_ssl.ssl.keystore.location"] = str(keystore)
    if super_user is not None:
        settings["authorizer.class.name"] = AUTHORIZER
        settings["super.users"] = f"User:{super_user};User:ANONYMOUS"
        settings["allow.everyone.if.no.acl.found"] = "false"
    lines = [f"{key}={value}" for key, value in settings.items()]
    return "# Written by deploy/local/kafka_broker.py; rewritten on every start.\n" + "\n".join(lines) + "\n"


def scram_credentials(value: str) -> tuple[str, str]:
    """USER:PASSWORD for --sasl-scram; both made of letters, digits, '.', '_' and '-'."""
    user, _, password = value.partition(":")
    if not (_SCRAM_PART.fullmatch(user) and _SCRAM_PART.fullmatch(password)):
        raise argparse.ArgumentTypeError(
            "not USER:PASSWORD made of letters, digits, '.', '_' and '-' (the password is not shown)"
        )
    return user, password


def secure_ports(properties: Path, names: list[str], taken: list[int]) -> dict[str, int]:
    """A port for each extra listener: the previous one of DIR if still free, else any free port."""
    text = properties.read_text() if properties.is_file() else ""
    chosen: dict[str, int] = {}
    for name in names:
        match = re.search(rf"(?<![A-Z_]){name}://{re.escape(HOST)}:(\d+)", text)
        previous = int(match.group(1)) if match else None
        avoid = [*taken, *chosen.values()]
        if previous is not None and previous not in avoid and _is_free(previous):
            chosen[name] = previous
        else:
            chosen[name] = _free_port(avoid=avoid)
    return chosen


def previous_ports(properties: Path) -> Ports:
    """The ports of an earlier start in the same DIR, so a restart keeps its address when it can."""
    text = properties.read_text() if properties.is_file() else ""
    found = [re.search(rf"{name}://{re.escape(HOST)}:(\d+)", text) for name in ("PLAINTEXT", "CONTROLLER")]
    broker, controller = (int(match.group(1)) if match else None for match in found)
    return broker, controller


def pick_ports(wanted: Ports, before: Ports) -> tuple[int, int]:
    """A requested port must be free; otherwise the previous port if still free, else any free port."""
    if wanted[0] is not None and wanted[0] == wanted[1]:
        raise BrokerError(f"--port and --controller-port are both {wanted[0]}")
    chosen: list[int] = []
    for want, previous in zip(wanted, before, strict=True):
        if want is not None:
            if not _is_free(want):
                raise BrokerError(f"port {want} on {HOST} is busy")
            chosen.append(want)
        elif previous is not None and previous not in [*chosen, *wanted] and _is_free(previous):
            chosen.append(previous)
        else:
            chosen.append(_free_port(avoid=[*chosen, *(port for port in wanted if port is not None)]))
    return chosen[0], chosen[1]


BIND_TRIES = 3  # starts of the broker when a port picked for it was taken before it bound it


def lost_port_race(log_tail: str) -> bool:
    """Whether a start failed because a port was taken between its pick (free then) and the broker's bind:
    another process bound it, or an outgoing connection got it as its ephemeral port. Picking again helps."""
    return "Address already in use" in log_tail


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM does; TIME_WAIT is free
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port(avoid: list[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in avoid:
            return port
