"""deploy/local/kafka_broker.py picks free ports and then starts the JVM, which binds them seconds later: a
port taken in between (another test session's pick, or an outgoing connection's ephemeral port) must cost a
second pick, not a failed start. The real broker, with the first pick forced onto a port that is taken."""

from __future__ import annotations

import importlib
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.integration

LOCAL = Path(__file__).resolve().parents[2] / "deploy" / "local"


@pytest.fixture
def broker_script() -> Iterator[ModuleType]:
    if shutil.which("java") is None:
        pytest.fail("no java on PATH: the local broker needs Java 17 (tests/run.sh checks it)")
    sys.path.insert(0, str(LOCAL))
    try:
        yield importlib.import_module("kafka_broker")
    finally:
        sys.path.remove(str(LOCAL))


def test_lost_port_race_is_read_from_kafkas_bind_failure(broker_script: ModuleType) -> None:
    config = importlib.import_module("broker_config")
    line = (
        "org.apache.kafka.common.KafkaException: Socket server failed to bind to 127.0.0.1:40123: "
        "Address already in use."
    )
    assert config.lost_port_race(
        f"[2026-12-07 18:40:00,000] ERROR Exiting Kafka due to fatal exception\n{line}"
    )
    assert not config.lost_port_race("java exited with code 1: Invalid cluster.id in meta.properties")


def test_a_port_taken_between_pick_and_bind_is_picked_again(
    broker_script: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        real_pick = broker_script.pick_ports
        picks: list[tuple[int, int]] = []

        def pick_taken_first(wanted: Any, before: Any) -> tuple[int, int]:
            chosen: tuple[int, int] = real_pick(wanted, before)
            if not picks:
                chosen = (busy, chosen[1])  # as if `taken` had bound it just after the pick found it free
            picks.append(chosen)
            return chosen

        real_launch = broker_script.launch
        launched: list[subprocess.Popen[bytes]] = []

        def launch_kept(command: list[str], directory: Path) -> subprocess.Popen[bytes]:
            launched.append(real_launch(command, directory))
            return launched[-1]

        monkeypatch.setattr(broker_script, "pick_ports", pick_taken_first)
        monkeypatch.setattr(broker_script, "launch", launch_kept)
        directory = tmp_path / "broker"
        try:
            bootstrap = broker_script.start(directory, (None, None), "256m", 120.0)
        finally:
            broker_script.stop(directory, grace=20.0)
            for process in launched:  # the script's own process exits instead; here they are reaped
                process.wait(timeout=30)
    assert len(picks) == 2
    assert bootstrap == f"127.0.0.1:{picks[1][0]}"
    assert picks[1][0] != busy
    assert "taken before it bound it; picking again" in capsys.readouterr().err
