"""The consumer groups of the pipeline's stages and the topics each reads: what `popbridge lag`, `replay`
and the liveness watch look at. Pure: names are derived from the deployment settings only.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.topics import FETCHED, MAX_MESSAGE_BYTES, RETRY_TOPICS, ROUTED, TopicSpec, topic_spec
from services.runtime.settings import DeploymentSettings


@dataclass(frozen=True)
class Stage:
    """One consuming stage: its name on the command line, its consumer group and the topics it reads.

    `topics[0]` is the stage's input from the stage before it, the one `popbridge replay` rewinds; the
    others are internal (a replay re-sends through them, so rewinding them too would do the work twice).
    A stage whose records wait on purpose (a retry tier) is `waits=True`: its lag is shown, but the
    `--max-lag`/`--max-age` alerts and `replay` leave it out.
    """

    name: str
    group: str
    topics: tuple[str, ...]
    waits: bool = False
    service: str = ""  # the service that runs the stage, when its name is not the stage's

    @property
    def run_by(self) -> str:
        return self.service or self.name

    @property
    def replay_topic(self) -> str:
        return self.topics[0]


def router_repartition_topic(settings: DeploymentSettings) -> str:
    """The faust router's internal topic (services.router.app.repartition_topic; a unit test keeps the two
    equal, since the runtime may not import a service)."""
    return f"{settings.group('router')}-by-message-id"


ROUTER_SEEN_TABLE = "seen-copies"  # the faust router's dedupe table; faust names its changelog after it
ROUTER_REPARTITION_CONFIG = {
    "cleanup.policy": "delete",
    "max.message.bytes": str(MAX_MESSAGE_BYTES),
    "retention.ms": str(7 * 24 * 3600 * 1000),
}


def router_internal_topics(settings: DeploymentSettings) -> list[TopicSpec]:
    """The faust router's own topics (the repartition topic and its table's changelog), to create before
    any router starts: faust's assignor skips a topic that does not exist yet at the first rebalance,
    and the agent reading it then never gets a partition (a silent stall, seen in CI and in a cold
    start of two routers at once). `popbridge topics create` and the router itself create them."""
    partitions = topic_spec(FETCHED).partitions
    changelog = f"{settings.group('router')}-{ROUTER_SEEN_TABLE}-changelog"
    return [
        TopicSpec(router_repartition_topic(settings), partitions, dict(ROUTER_REPARTITION_CONFIG)),
        TopicSpec(changelog, partitions, {"cleanup.policy": "compact"}),
    ]


def declared_stages(settings: DeploymentSettings) -> tuple[Stage, ...]:
    """Every consuming stage of this deployment. A new consumer group is declared here, once."""
    router_topics = (settings.topic(FETCHED), router_repartition_topic(settings))
    return (
        Stage("router", settings.group("router"), router_topics),
        Stage("deliverer", settings.group("deliverer"), (settings.topic(ROUTED),)),
        # services.deliverer.service: the retry tiers are read by the deliverer's one group, with the routed
        # topic (co-partitioned); a tier's lag is the copies waiting to be retried.
        *(_retry_tier(settings, tier, topic) for tier, topic in enumerate(RETRY_TOPICS, start=1)),
    )


def _retry_tier(settings: DeploymentSettings, tier: int, topic: str) -> Stage:
    name = f"deliverer-retry-{tier}"
    return Stage(name, settings.group("deliverer"), (settings.topic(topic),), waits=True, service="deliverer")


def stages_run_by(settings: DeploymentSettings, service: str) -> tuple[Stage, ...]:
    """The stages one service runs (the deliverer: its input and its retry tiers)."""
    return tuple(s for s in declared_stages(settings) if s.run_by == service)


def stage_named(settings: DeploymentSettings, name: str) -> Stage:
    """The declared stage called `name`; KeyError when there is none."""
    for stage in declared_stages(settings):
        if stage.name == name:
            return stage
    raise KeyError(name)
