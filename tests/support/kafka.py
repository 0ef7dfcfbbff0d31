"""The Kafka broker of a test session: an external one, a testcontainer, or the local jar broker.

`kafka_bootstrap` tries, in order:
1. POPBRIDGE_TEST_KAFKA ("host:port"), a broker someone else runs;
2. a cp-kafka KRaft testcontainer, when a Docker daemon answers /_ping;
3. deploy/local/kafka_broker.py (jars from Maven Central, needs java, and mvn until the cache is complete),
   started in a session temp dir and stopped when the session ends.
When none works, the Kafka tests skip, or fail when CI is set: a CI that skips them would test nothing.
Tests share the session's broker, so each names its topics and groups with `kafka_topic_prefix`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.support.parts import missing_part

BROKER_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "kafka_broker.py"
CONTAINER_IMAGE = "confluentinc/cp-kafka:7.6.0"  # testcontainers' default, KRaft from 7.0 on
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # as deploy/local/kafka_broker.py configures its broker
START_TIMEOUT_SECONDS = 600  # a cold start downloads ~45 MB of jars first


def no_kafka(reason: str) -> NoReturn:
    """Skip the test, or fail it under CI, saying what is missing."""
    missing_part(reason)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The "host:port" of a broker that allows 64 MiB records on topics that ask for them."""
    external = os.environ.get("POPBRIDGE_TEST_KAFKA")
    if external:
        yield external
        return
    docker_problem = docker_unavailable()
    if docker_problem is None:
        yield from _container_broker()
        return
    directory = tmp_path_factory.mktemp("kafka")
    bootstrap, broker_problem = start_local_broker(directory)
    if bootstrap is None:
        no_kafka(f"no Kafka: POPBRIDGE_TEST_KAFKA unset, {docker_problem}, "
                 f"local broker failed: {broker_problem}")
    try:
        yield bootstrap
    finally:
        stop_local_broker(directory)


@pytest.fixture
def kafka_topic_prefix() -> str:
    """A prefix unique to one test, for its topic and group names on the shared broker."""
    return f"t-{uuid.uuid4().hex[:8]}-"


@dataclass
class RestartableBroker:
    """The session's broker for tests that stop and start it: started once, and running again (on the same
    address) before each test that asks for it, whatever the previous one left."""

    directory: Path
    bootstrap: str | None = None

    def running(self) -> str:
        """The bootstrap, once the broker serves (started again when a test left it stopped)."""
        status = subprocess.run([sys.executable, str(BROKER_SCRIPT), "status", "--dir", str(self.directory)],
                                capture_output=True, text=True, timeout=60, check=False)
        if self.bootstrap is not None and status.returncode == 0:
            return self.bootstrap
        bootstrap, problem = start_local_broker(self.directory)
        if bootstrap is None:
            no_kafka(f"no local Kafka broker: {problem}")
        self.bootstrap = bootstrap
        return bootstrap


@pytest.fixture(scope="session")
def restartable_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableBroker]:
    """One local broker for every test that stops and starts its broker (`own_broker`): each start of a
    JVM broker costs 15-30 s, so the tests share it; their topics and groups are apart by prefix, and
    nothing else uses it."""
    broker = RestartableBroker(tmp_path_factory.mktemp("own-kafka") / "kafka")
    try:
        yield broker
    finally:
        if broker.bootstrap is not None:
            stop_local_broker(broker.directory)


@pytest.fixture
def own_broker(restartable_broker: RestartableBroker) -> tuple[str, Path]:
    """A broker this test may stop and start (the session's restartable one, running when the test
    starts): (bootstrap, its dir for `stop_local_broker` / `start_local_broker`, which keeps the address).
    A test that stops it need not start it again; the next one that asks for it does."""
    return restartable_broker.running(), restartable_broker.directory


def docker_unavailable() -> str | None:
    """None when the Docker daemon of DOCKER_HOST answers /_ping, otherwise why not.

    Asked with a plain socket: docker-py leaks an unclosed socket when no daemon answers, and the
    ResourceWarning would fail whichever test is running when it is collected.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        with _docker_socket(host) as sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(256).split(b"\r\n", 1)[0].decode(errors="replace")
    except OSError as error:
        return f"no Docker daemon at {host} ({error.strerror or error})"
    return None if " 200 " in f"{status_line} " else f"no Docker daemon at {host} ({status_line!r})"


def _docker_socket(host: str) -> socket.socket:
    if host.startswith("unix://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        try:
            sock.connect(host.removeprefix("unix://"))
        except OSError:
            sock.close()
            raise
        return sock
    if host.startswith("tcp://"):
        name, _, port = host.removeprefix("tcp://").rstrip("/").rpartition(":")
        return socket.create_connection((name, int(port)), timeout=2.0)
    raise OSError(f"unsupported scheme in DOCKER_HOST={host}")


def _container_broker() -> Iterator[str]:
    # Imported here: only machines with Docker need testcontainers, and docker-py is slow to import.
    from docker.errors import DockerException  # noqa: PLC0415
    from testcontainers.community.kafka import KafkaContainer  # noqa: PLC0415

    container = KafkaContainer(CONTAINER_IMAGE).with_kraft()
    container.with_env("KAFKA_MESSAGE_MAX_BYTES", str(MAX_MESSAGE_BYTES))
    container.with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
    try:
        container.start()
    except (DockerException, OSError, TimeoutError) as error:
        no_kafka(f"no Kafka: POPBRIDGE_TEST_KAFKA unset, Docker answers but {CONTAINER_IMAGE} "
                 f"failed to start: {error}")
    try:
        yield container.get_bootstrap_server()
    finally:
        container.stop()


def start_local_broker(directory: Path) -> tuple[str | None, str]:
    """(bootstrap, "") once the local broker serves in `directory`, else (None, why not)."""
    # The script's own readiness bound (90 s by default) is too short for a JVM on a loaded 2-core machine:
    # a broker that needed 90+ s to start is slow, not broken, and failed the test of something else.
    command = [sys.executable, str(BROKER_SCRIPT), "start", "--dir", str(directory), "--timeout", "300"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_SECONDS,
                                check=False)
    except subprocess.TimeoutExpired:
        stop_local_broker(directory)
        return None, f"{BROKER_SCRIPT.name} start took over {START_TIMEOUT_SECONDS} s"
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return None, _error_line(result.stderr) or f"{BROKER_SCRIPT.name} start exited {result.returncode}"
    return lines[-1], ""


def stop_local_broker(directory: Path) -> None:
    command = [sys.executable, str(BROKER_SCRIPT), "stop", "--dir", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        pytest.fail(f"could not stop the local Kafka broker in {directory}: {result.stderr.strip()}")


def _error_line(stderr: str) -> str:
    """The script's "error:" line plus what follows it (the tail of broker.log), kept short."""
    lines = stderr.strip().splitlines()
    first = next((i for i, line in enumerate(lines) if "error:" in line), len(lines) - 1)
    return " | ".join(line.strip() for line in lines[first : first + 6]).replace("kafka_broker: error: ", "")
