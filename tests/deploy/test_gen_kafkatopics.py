"""deploy/tools/gen_kafkatopics.py: the committed Strimzi topics and users are what schemas.topics makes."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from schemas import topics
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
        d["spec"]["topicName"]: (d["spec"]["partitions"], d["spec"]["config"]) for d in documents if d
    }
    assert committed == {spec.name: (spec.partitions, dict(spec.config)) for spec in topics.TOPICS}
