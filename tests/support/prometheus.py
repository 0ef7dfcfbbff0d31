"""A real Prometheus for integration tests: Debian's binary with its own config and data dir, on loopback.

It listens on 127.0.0.1 port 0; the port it got is read back from the kernel's socket table of the
process (/proc/<pid>/fd and /proc/net/tcp), so nothing picks a port before binding it. Targets come from a
file_sd file the test rewrites as stages start and stop; rules from the test's own rules file.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.deploy.monitoring import prometheus_tool

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    port: int
    targets_file: Path

    def set_targets(self, targets: Mapping[str, int]) -> None:
        """Scrape these components (label app_kubernetes_io_component) at 127.0.0.1:<port>."""
        groups = [{"targets": [f"127.0.0.1:{port}"], "labels": {"app_kubernetes_io_component": name}}
                  for name, port in targets.items()]
        staged = self.targets_file.with_suffix(".tmp")
        staged.write_text(json.dumps(groups), encoding="utf-8")
        staged.replace(self.targets_file)  # atomic: Prometheus never reads half a file

    async def api(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{self.port}/api/v1/{path}", params=params
        ) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self.api("query", query=expr))["result"]
        return result

    async def firing(self, alert: str) -> list[dict[str, str]]:
        alerts = (await self.api("alerts"))["alerts"]
        return [a["labels"] for a in alerts if a["labels"]["alertname"] == alert and a["state"] == "firing"]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (IPv4 and IPv6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def write_config(directory: Path, rules: dict[str, Any], interval: str) -> tuple[Path, Path]:
    rules_file, targets_file = directory / "rules.yaml", directory / "targets.json"
    rules_file.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    targets_file.write_text("[]", encoding="utf-8")
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [str(rules_file)],
        "scrape_configs": [{
            "job_name": "popbridge",
            "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": interval}],
        }],
    }
    config_file = directory / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return config_file, targets_file


@contextmanager
def running_prometheus(
    directory: Path, rules: dict[str, Any], *, interval: str = "1s"
) -> Iterator[Prometheus]:
    """Prometheus scraping and evaluating every `interval`, stopped (and waited for) at the end."""
    directory.mkdir(parents=True, exist_ok=True)
    config_file, targets_file = write_config(directory, rules, interval)
    log = (directory / "prometheus.log").open("wb")
    command = [str(prometheus_tool("prometheus")), f"--config.file={config_file}",
               f"--storage.tsdb.path={directory / 'data'}", "--web.listen-address=127.0.0.1:0"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield Prometheus(process, _bound_port(process, directory / "prometheus.log"), targets_file)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _bound_port(process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> int:
    """The port Prometheus listens on, once it does (it serves the API as soon as it listens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        ports = listening_ports(process.pid)
        if ports:
            return min(ports)
        time.sleep(0.05)  # the kernel's table is not an event to wait on; bounded by the deadline
    raise AssertionError(f"prometheus did not listen within {timeout} s:\n{log.read_text()[-3000:]}")


async def eventually(check: Any, what: str, timeout: float = 60.0, every: float = 0.5) -> Any:
    """Ask `check()` (async) until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / every) + 1):
        last = await check()
        if last or time.monotonic() > deadline:
            break
        await asyncio.sleep(every)  # Prometheus is polled: it has no change notification
    assert last, f"not within {timeout} s: {what} (last answer {last!r})"
    return last
