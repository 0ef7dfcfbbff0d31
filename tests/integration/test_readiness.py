"""/readyz of every long-running stage follows the broker: not ready while it is away, ready again after
(issue 13: the deliverer said "ready" through a whole outage, as long as it had started before it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from services.ops.topics import deployed_specs
from services.runtime.kafka import KafkaLog
from services.runtime.settings import DeploymentSettings
from tests.support.kafka import start_local_broker, stop_local_broker
from tests.support.mail_config import delivery_to, mailbox, write_mail_config
from tests.support.smtp import SmtpSink, unused_port
from tests.support.stages import stage_environ, stage_process

pytestmark = pytest.mark.integration

STAGES = ("fetcher", "router", "deliverer")
WAIT = 120.0  # seconds a stage may take to notice the broker left or came back (a bound, not a timing)


@asynccontextmanager
async def stage(name: str, config: Path, environ: Mapping[str, str]) -> AsyncIterator[int]:
    """`popbridge NAME` with its health port; yields the port."""
    port = unused_port()
    async with stage_process(name, config, {**environ, "POPBRIDGE_HTTP_PORT": str(port)}):
        yield port


async def readiness(session: aiohttp.ClientSession, port: int) -> int | None:
    """/readyz's status, None while nothing answers on the port yet."""
    try:
        async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
            return response.status
    except aiohttp.ClientConnectionError:
        return None


async def until_all(session: aiohttp.ClientSession, ports: Mapping[str, int], status: int) -> None:
    """Return once every stage's /readyz answers `status` (probed twice a second, as a kubelet would)."""
    async def one(port: int) -> None:
        while await readiness(session, port) != status:  # noqa: ASYNC110 - a probe has no event to await
            await asyncio.sleep(0.5)

    try:
        await asyncio.wait_for(asyncio.gather(*(one(p) for p in ports.values())), WAIT)
    except TimeoutError:
        found = {name: await readiness(session, port) for name, port in ports.items()}
        pytest.fail(f"not every stage's /readyz answered {status} within {WAIT:.0f} s: {found}")


async def test_every_stage_is_not_ready_while_the_broker_is_away_and_ready_again_when_it_is_back(
    own_broker: tuple[str, Path], kafka_topic_prefix: str, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    bootstrap, directory = own_broker
    settings = DeploymentSettings(kafka_bootstrap=bootstrap, topic_prefix=kafka_topic_prefix,
                                  group_prefix=kafka_topic_prefix + "g")
    await KafkaLog(bootstrap).ensure_topics(deployed_specs(settings))
    # A mailbox on a port nobody listens on: its passes fail, which the fetcher lives with.
    config = write_mail_config(tmp_path / "popbridge.toml", delivery=delivery_to(smtp_sink.port),
                               mailboxes=[mailbox("alice", "127.0.0.1", 9, "alice")])
    environ = stage_environ(bootstrap, settings, POP3_PASSWORD="pw")
    async with AsyncExitStack() as stages, aiohttp.ClientSession() as session:
        ports = {name: await stages.enter_async_context(stage(name, config, environ)) for name in STAGES}
        await until_all(session, ports, 200)
        await asyncio.to_thread(stop_local_broker, directory)
        await until_all(session, ports, 503)
        restarted, problem = await asyncio.to_thread(start_local_broker, directory)
        assert restarted == bootstrap, problem
        await until_all(session, ports, 200)
