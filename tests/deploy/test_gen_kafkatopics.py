"""deploy/tools/gen_kafkatopics.py: the committed Strimzi topics and users are what schemas.topics makes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any

import yaml

from services.router.app import create_app
from services.runtime.settings import DeploymentSettings, load_config
from tests.deploy.kube import K8S, REPO

GENERATOR = REPO / "deploy" / "tools" / "gen_kafkatopics.py"


def test_committed_topics_and_users_equal_the_generator_output() -> None:
    # The generator imports schemas.topics: from the checkout under test, installed or not.
    python_path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": python_path},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_committed_topics_have_the_partitions_and_configs_of_schemas_topics() -> None:
    documents = yaml.safe_load_all((K8S / "base" / "kafkatopics.yaml").read_text(encoding="utf-8"))
    committed = {
        d["spec"]["topicName"]: (d["spec"]["partitions"], d["spec"].get("config", {})) for d in documents if d
    }
    expected = {spec.name: (spec.partitions, dict(spec.config)) for spec in generator().declared_topics()}
    assert committed == expected


def generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_kafkatopics", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def faust_topics() -> set[str]:
    """The internal topics a real router app uses: its tables' changelogs, its internal agent channels,
    and the leader topic faust's LeaderAssignor declares on start."""
    settings = DeploymentSettings(kafka_bootstrap="127.0.0.1:9")  # never contacted: the app is not started
    app = create_app(settings, load_config(K8S / "base" / "config" / "popbridge.toml"))
    names = {table.changelog_topic.get_topic_name() for table in app.tables.values()}
    for agent in app.agents.values():
        channel = agent.channel
        if getattr(channel, "internal", False):
            names.add(channel.get_topic_name())
    if not app.conf.topic_disable_leader:
        assignor: Any = app._leader_assignor  # the name is on the implementation, not the faust type
        names.add(assignor._leader_topic_name)
    return names


def test_every_topic_the_faust_router_uses_is_declared_as_a_kafka_topic() -> None:
    documents = yaml.safe_load_all((K8S / "base" / "kafkatopics.yaml").read_text(encoding="utf-8"))
    declared = {d["spec"]["topicName"] for d in documents if d}
    used = faust_topics()
    assert len(used) >= 3  # repartition, changelog, leader
    assert used <= declared
    assert {spec.name for spec in generator().router_internal_topics()} == used
