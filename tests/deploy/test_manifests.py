"""The Kubernetes manifests (deploy/k8s): both overlays render, validate offline, and keep their promises.

Over 500 lines on purpose: every promise of the manifests, on one rendering per overlay (module fixtures).

Rendering needs kustomize (deploy/tools/install_kustomize.sh). Without it these tests skip, except under
CI (env CI set), where they fail: a machine without kustomize must not turn the checks into a green skip.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas import topics
from services.runtime.settings import DeploymentSettings, load_config
from services.runtime.stages import stage_named
from tests.deploy.kube import (
    KUBERNETES_VERSIONS,
    Crd,
    Resource,
    crd_errors,
    describe,
    is_core,
    load_crds,
    render_or_skip,
    validate_core,
)
from tests.deploy.test_gen_kafkatopics import generator

OVERLAYS = ("dev", "prod")
STAGES = ("fetcher", "router", "deliverer")
# The topic each scaled stage consumes: its replicas beyond that topic's partition count would sit idle.
INPUT_TOPIC = {"router": topics.FETCHED, "deliverer": topics.ROUTED}
CONFIG_FILE = "/etc/popbridge/popbridge.toml"
POP3_PORTS = {995, 110}
SMTP_PORTS = {25, 587, 465, 24}
KAFKA_PORTS = {"dev": {9092}, "prod": {9093}}  # prod reaches the brokers over TLS only
DNS_PORT = 53
METRICS_PORT = 8080
SECRET_WORD = re.compile(r"pass(word|wd)?|secret|token|credential|api[-_]?key|private[-_]?key", re.IGNORECASE)
SETTINGS = DeploymentSettings()


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Resource]]:
    name = str(request.param)
    return name, render_or_skip(f"overlays/{name}")


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], Crd]:
    return load_crds()


def of_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def named(resources: list[Resource], kind: str, name: str) -> Resource:
    matches = [r for r in of_kind(resources, kind) if r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def deployment(resources: list[Resource], stage: str) -> Resource:
    return named(resources, "Deployment", f"popbridge-{stage}")


def container(resource: Resource) -> Resource:
    containers: list[Resource] = resource["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["popbridge"], describe(resource)
    return containers[0]


def environment(resources: list[Resource], stage: str) -> dict[str, str]:
    """The POPBRIDGE_* variables a stage's container gets: its env ConfigMap, then its own `env`."""
    main = container(deployment(resources, stage))
    values: dict[str, str] = {}
    for source in main.get("envFrom", []):
        config_map = named(resources, "ConfigMap", source["configMapRef"]["name"])
        values.update(config_map.get("data", {}))
    values.update({e["name"]: e["value"] for e in main.get("env", []) if "value" in e})
    return values


def secret_mounts(resource: Resource) -> dict[str, str]:
    """mount path -> Secret name, for the Secret volumes mounted into the popbridge container."""
    volumes = {
        v["name"]: v["secret"]["secretName"]
        for v in resource["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    return {
        m["mountPath"]: volumes[m["name"]]
        for m in container(resource)["volumeMounts"]
        if m["name"] in volumes
    }


def under(path: str, directory: str) -> bool:
    return Path(path).is_relative_to(directory)


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (`250m`, `2`, `512Mi`, `1Gi`) as a number."""
    text = str(value)
    factors = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in factors.items():
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


# --- rendering and schema validation ------------------------------------------------------------------


def test_base_renders_every_kind_it_promises() -> None:
    kinds = {r["kind"] for r in render_or_skip("base")}
    assert kinds >= {
        "Deployment",
        "ConfigMap",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "PodMonitor",
        "KafkaTopic",
        "KafkaUser",
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceAccount",
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_resources_are_valid_kubernetes(overlay: tuple[str, list[Resource]], version: str) -> None:
    core = [r for r in overlay[1] if is_core(r)]
    assert core
    for resource in core:
        validate_core(resource, version)


def test_custom_resources_match_the_installed_crds(
    overlay: tuple[str, list[Resource]], crds: dict[tuple[str, str], Crd]
) -> None:
    errors = [error for r in overlay[1] if not is_core(r) for error in crd_errors(r, crds)]
    assert errors == []


def test_crd_validation_rejects_a_misspelt_field(crds: dict[tuple[str, str], Crd]) -> None:
    """The strict CRD check is what catches a typo the API server would silently drop."""
    topic: Resource = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaTopic",
        "metadata": {"name": "t", "labels": {"strimzi.io/cluster": "c"}},
        "spec": {"partitions": 1, "config": {}},
    }
    assert list(crd_errors(topic, crds)) == []
    misspelt = copy.deepcopy(topic)
    misspelt["spec"]["partitons"] = misspelt["spec"].pop("partitions")
    assert any("partitons" in error for error in crd_errors(misspelt, crds))
    old_version = {**topic, "apiVersion": "kafka.strimzi.io/v1beta2"}
    assert any("serves ['v1']" in error for error in crd_errors(old_version, crds))


# --- pods: security, probes, resources ----------------------------------------------------------------


def test_every_container_runs_unprivileged_on_a_read_only_root(overlay: tuple[str, list[Resource]]) -> None:
    for resource in of_kind(overlay[1], "Deployment"):
        pod = resource["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, describe(resource)
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, describe(resource)
        assert pod["automountServiceAccountToken"] is False, describe(resource)
        assert not pod.get("initContainers"), describe(resource)
        for c in pod["containers"]:
            security = c["securityContext"]
            assert security["runAsNonRoot"] is True, describe(resource)
            assert security["runAsUser"] != 0, describe(resource)
            assert security["readOnlyRootFilesystem"] is True, describe(resource)
            assert security["allowPrivilegeEscalation"] is False, describe(resource)
            assert security["capabilities"] == {"drop": ["ALL"]}, describe(resource)
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}, describe(resource)
            empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
            assert {"/tmp"} <= {m["mountPath"] for m in c["volumeMounts"] if m["name"] in empty_dirs}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_probes_health_and_readiness_on_the_metrics_port(
    overlay: tuple[str, list[Resource]], stage: str
) -> None:
    main = container(deployment(overlay[1], stage))
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"http": METRICS_PORT}
    assert environment(overlay[1], stage)["POPBRIDGE_HTTP_PORT"] == str(METRICS_PORT)
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_runs_its_command_with_the_mounted_config(
    overlay: tuple[str, list[Resource]], stage: str
) -> None:
    resource = deployment(overlay[1], stage)
    main = container(resource)
    assert "command" not in main  # the image's ENTRYPOINT is `popbridge`
    assert main["args"] == [stage, "--config", CONFIG_FILE]
    config_volumes = {v["name"] for v in resource["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
    mounts = [m["mountPath"] for m in main["volumeMounts"] if m["name"] in config_volumes]
    assert any(under(CONFIG_FILE, mount) for mount in mounts)


def test_every_container_has_bounded_resources(overlay: tuple[str, list[Resource]]) -> None:
    for resource in of_kind(overlay[1], "Deployment"):
        for c in resource["spec"]["template"]["spec"]["containers"]:
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            for name in ("cpu", "memory", "ephemeral-storage"):
                assert quantity(requests[name]) <= quantity(limits[name]), f"{describe(resource)} {name}"


def test_prod_is_bigger_than_dev() -> None:
    dev, prod = render_or_skip("overlays/dev"), render_or_skip("overlays/prod")
    for stage in STAGES:
        dev_limits = container(deployment(dev, stage))["resources"]["limits"]
        prod_limits = container(deployment(prod, stage))["resources"]["limits"]
        assert quantity(prod_limits["memory"]) > quantity(dev_limits["memory"]), stage
    for stage in INPUT_TOPIC:
        assert deployment(prod, stage)["spec"]["replicas"] > deployment(dev, stage)["spec"]["replicas"]


def test_images_are_pinned_by_digest_in_prod() -> None:
    for resource in of_kind(render_or_skip("overlays/prod"), "Deployment"):
        image = container(resource)["image"]
        name, _, digest = image.partition("@")
        assert "/" in name, f"{describe(resource)}: {image} names no registry"
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{describe(resource)}: {image} is not pinned"


PSS_LEVELS = ("enforce", "audit", "warn")
RESTRICTED_VOLUMES = {"configMap", "secret", "emptyDir", "projected", "downwardAPI", "persistentVolumeClaim",
                      "csi", "ephemeral"}


def test_the_namespace_enforces_the_restricted_pod_security_standard(
    overlay: tuple[str, list[Resource]],
) -> None:
    [namespace] = of_kind(overlay[1], "Namespace")
    labels = namespace["metadata"]["labels"]
    for level in PSS_LEVELS:
        assert labels[f"pod-security.kubernetes.io/{level}"] == "restricted", level
    namespaced = [r for r in overlay[1] if r["kind"] != "Namespace"]
    assert {r["metadata"]["namespace"] for r in namespaced} == {namespace["metadata"]["name"]}


def test_every_pod_meets_the_restricted_pod_security_standard(overlay: tuple[str, list[Resource]]) -> None:
    """The "restricted" profile's checks (kubernetes.io/docs/concepts/security/pod-security-standards)."""
    for resource in of_kind(overlay[1], "Deployment"):
        pod = resource["spec"]["template"]["spec"]
        for host_namespace in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(host_namespace), describe(resource)
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, f"{describe(resource)}: {volume}"
        for box in pod["containers"] + pod.get("initContainers", []):
            context = box["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, describe(resource)
            assert context["capabilities"]["drop"] == ["ALL"], describe(resource)
            assert not context["capabilities"].get("add"), describe(resource)
            assert context.get("runAsNonRoot", pod["securityContext"].get("runAsNonRoot")) is True
            assert context.get("runAsUser", pod["securityContext"].get("runAsUser")) != 0
            seccomp = context.get("seccompProfile", pod["securityContext"].get("seccompProfile"))
            assert seccomp["type"] in {"RuntimeDefault", "Localhost"}, describe(resource)
            assert not any("hostPort" in port for port in box.get("ports", [])), describe(resource)


# --- configuration and secrets ------------------------------------------------------------------------


def secret_looking_entries(mapping: Any, where: str) -> Iterator[str]:
    """Entries named like a secret that hold a value rather than a reference (`*_file`, `*_env`)."""
    if isinstance(mapping, list):
        for index, item in enumerate(mapping):
            yield from secret_looking_entries(item, f"{where}[{index}]")
        return
    if not isinstance(mapping, dict):
        return
    for key, value in mapping.items():
        path = f"{where}.{key}"
        if isinstance(value, dict | list):
            yield from secret_looking_entries(value, path)
        elif SECRET_WORD.search(str(key)):
            reference = str(key).lower()
            if reference.endswith("_file") and str(value).startswith("/run/secrets/"):
                continue
            if reference.endswith("_env") and re.fullmatch(r"[A-Z_][A-Z0-9_]*", str(value)):
                continue
            yield f"{path} = {value!r}"


def test_config_maps_hold_no_secret(overlay: tuple[str, list[Resource]]) -> None:
    found: list[str] = []
    for config_map in of_kind(overlay[1], "ConfigMap"):
        data = dict(config_map.get("data", {}))
        for key, text in data.items():
            if key.endswith(".toml"):
                found += secret_looking_entries(tomllib.loads(text), f"{describe(config_map)}:{key}")
        found += secret_looking_entries(data, describe(config_map))
        assert "binaryData" not in config_map, describe(config_map)
    assert found == []


def test_the_secret_check_notices_an_inlined_password() -> None:
    document = {"delivery": {"password_file": "/run/secrets/popbridge/smtp/password", "password": "hunter2"}}
    assert list(secret_looking_entries(document, "cfg")) == ["cfg.delivery.password = 'hunter2'"]


def test_example_config_loads_and_its_passwords_are_mounted_files(
    overlay: tuple[str, list[Resource]], tmp_path: Path
) -> None:
    resources = overlay[1]
    mounted = [c for c in of_kind(resources, "ConfigMap") if "popbridge.toml" in c.get("data", {})]
    assert len(mounted) == 1
    path = tmp_path / "popbridge.toml"
    path.write_text(mounted[0]["data"]["popbridge.toml"], encoding="utf-8")
    config = load_config(path)

    fetcher_secrets = secret_mounts(deployment(resources, "fetcher"))
    for mailbox in config.mailboxes:
        assert mailbox.password_env is None, f"{mailbox.id}: use password_file"
        assert mailbox.password_file is not None
        assert any(under(mailbox.password_file, mount) for mount in fetcher_secrets), mailbox.id
    deliverer_secrets = secret_mounts(deployment(resources, "deliverer"))
    if config.delivery.username is not None:
        assert config.delivery.password_file is not None
        assert any(under(config.delivery.password_file, mount) for mount in deliverer_secrets)
    assert not any("pop3" in mount for mount in deliverer_secrets)
    assert not any("smtp" in mount for mount in fetcher_secrets)
    assert not any(
        m.startswith("/run/secrets/popbridge/") and "kafka" not in m
        for m in secret_mounts(deployment(resources, "router"))
    )


# --- Kafka: topics, users, connection -----------------------------------------------------------------


def topic_settings(resources: list[Resource]) -> dict[str, tuple[int, dict[str, str]]]:
    found: dict[str, tuple[int, dict[str, str]]] = {}
    for topic in of_kind(resources, "KafkaTopic"):
        name = topic["spec"].get("topicName", topic["metadata"]["name"])
        assert name not in found, f"two KafkaTopics for {name}"
        config = {key: str(value) for key, value in topic["spec"].get("config", {}).items()}
        found[name] = (topic["spec"]["partitions"], config)
    return found


def test_kafka_topics_are_exactly_those_of_schemas_topics_and_the_router(
    overlay: tuple[str, list[Resource]],
) -> None:
    expected = {spec.name: (spec.partitions, dict(spec.config)) for spec in generator().declared_topics()}
    assert topic_settings(overlay[1]) == expected


def test_kafka_resources_belong_to_one_strimzi_cluster(overlay: tuple[str, list[Resource]]) -> None:
    strimzi = [r for r in overlay[1] if r["apiVersion"].startswith("kafka.strimzi.io/")]
    clusters = {r["metadata"]["labels"]["strimzi.io/cluster"] for r in strimzi}
    assert clusters == {"popbridge-kafka"}


def acl_rights(user: Resource) -> dict[tuple[str, str, str], set[str]]:
    """(resource type, name, pattern) -> allowed operations."""
    rights: dict[tuple[str, str, str], set[str]] = {}
    for acl in user["spec"]["authorization"]["acls"]:
        assert acl.get("type", "allow") == "allow", describe(user)
        target = acl["resource"]
        key = (target["type"], target.get("name", ""), target.get("patternType", "literal"))
        rights.setdefault(key, set()).update(acl["operations"])
    return rights


def test_kafka_users_may_do_what_their_stage_does_and_no_more() -> None:
    resources = render_or_skip("overlays/prod")
    rights = {stage: acl_rights(named(resources, "KafkaUser", f"popbridge-{stage}")) for stage in STAGES}
    names = {spec.name for spec in topics.TOPICS}
    for stage, granted in rights.items():
        user = named(resources, "KafkaUser", f"popbridge-{stage}")
        assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
        assert environment(resources, stage)["POPBRIDGE_KAFKA_SASL_USERNAME"] == user["metadata"]["name"]
        for (kind, name, pattern), operations in granted.items():
            assert kind in {"topic", "group"}, f"{stage}: {kind}"
            assert "All" not in operations, f"{stage}: {name}"
            if kind == "topic" and pattern == "literal":
                assert name in names, f"{stage}: ACL for unknown topic {name}"
            if kind == "group":
                assert name == SETTINGS.group(stage), f"{stage}: group {name}"
    assert rights["fetcher"][("topic", topics.FETCHED, "literal")] >= {"Write"}
    assert rights["router"][("topic", topics.FETCHED, "literal")] >= {"Read"}
    assert rights["router"][("topic", topics.ROUTED, "literal")] >= {"Write"}
    assert rights["router"][("topic", SETTINGS.group("router"), "prefix")] >= {"Create", "Read", "Write"}
    assert rights["deliverer"][("topic", topics.ROUTED, "literal")] >= {"Read"}
    assert "Write" not in rights["deliverer"].get(("topic", topics.ROUTED, "literal"), set())
    assert "Write" not in rights["router"].get(("topic", topics.FETCHED, "literal"), set())
    written = {
        name for granted in rights.values() for (kind, name, _), ops in granted.items() if "Write" in ops
    }
    # The assignment topic carries no records: fetcher replicas only join its group to share mailboxes.
    assert rights["fetcher"][("topic", topics.FETCH_ASSIGNMENT, "literal")] == {"Read", "Describe"}
    assert topics.FETCH_ASSIGNMENT not in written
    recorded = names - {topics.FETCH_ASSIGNMENT}
    assert recorded <= written, f"topics no stage may write: {sorted(recorded - written)}"


def test_prod_connects_with_tls_and_the_stage_scram_user() -> None:
    resources = render_or_skip("overlays/prod")
    for stage in (*STAGES, "ops"):
        env = environment(resources, stage)
        assert env["POPBRIDGE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert env["POPBRIDGE_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        assert env["POPBRIDGE_KAFKA_BOOTSTRAP"].endswith(":9093")
        assert "POPBRIDGE_TOPIC_PREFIX" not in env  # the KafkaTopics and ACLs use the bare names
        mounts = secret_mounts(deployment(resources, stage))
        password_dir = str(Path(env["POPBRIDGE_KAFKA_SASL_PASSWORD_FILE"]).parent)
        assert mounts[password_dir] == env["POPBRIDGE_KAFKA_SASL_USERNAME"] == f"popbridge-{stage}"
        assert mounts[str(Path(env["POPBRIDGE_KAFKA_CA_FILE"]).parent)] == "popbridge-kafka-cluster-ca-cert"


def test_dev_connects_in_plaintext_without_credentials() -> None:
    resources = render_or_skip("overlays/dev")
    assert of_kind(resources, "KafkaUser") == []
    for stage in (*STAGES, "ops"):
        env = environment(resources, stage)
        assert env["POPBRIDGE_KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"
        assert env["POPBRIDGE_KAFKA_BOOTSTRAP"].endswith(":9092")
        assert not any(key.startswith("POPBRIDGE_KAFKA_SASL") for key in env), stage
        assert not any("kafka" in mount for mount in secret_mounts(deployment(resources, stage))), stage


# --- scaling and availability -------------------------------------------------------------------------


def test_replicas_never_exceed_the_input_partitions(overlay: tuple[str, list[Resource]]) -> None:
    resources = overlay[1]
    # Fetcher replicas share the mailboxes through the assignment topic's partitions: at most one each.
    fetcher = deployment(resources, "fetcher")["spec"]
    assert 1 <= fetcher["replicas"] <= topics.topic_spec(topics.FETCH_ASSIGNMENT).partitions
    # A rolling update never leaves the mailboxes unpolled: the new pod joins before an old one leaves.
    assert fetcher["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert not [
        s
        for s in of_kind(resources, "ScaledObject")
        if s["spec"]["scaleTargetRef"]["name"].endswith("fetcher")
    ]
    for stage, topic in INPUT_TOPIC.items():
        assert 1 <= deployment(resources, stage)["spec"]["replicas"] <= topics.topic_spec(topic).partitions


def test_keda_scales_on_the_lag_of_every_topic_the_stage_consumes() -> None:
    resources = render_or_skip("overlays/prod")
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in of_kind(resources, "ScaledObject")}
    assert set(scaled) == {f"popbridge-{stage}" for stage in INPUT_TOPIC}
    for stage, topic in INPUT_TOPIC.items():
        spec = scaled[f"popbridge-{stage}"]["spec"]
        replicas = deployment(resources, stage)["spec"]["replicas"]
        assert (
            spec["minReplicaCount"]
            <= replicas
            <= spec["maxReplicaCount"]
            <= topics.topic_spec(topic).partitions
        )
        # Every topic the stage's group consumes (the lag watch's view, services.runtime.stages), so
        # the router also scales on faust's repartition topic.
        consumed = stage_named(SETTINGS, stage).topics
        assert consumed[0] == topic
        assert [t["metadata"]["topic"] for t in spec["triggers"]] == list(consumed)
        for trigger in spec["triggers"]:
            assert trigger["type"] == "kafka"
            assert trigger["metadata"]["consumerGroup"] == SETTINGS.group(stage)
            assert (
                trigger["metadata"]["bootstrapServers"]
                == environment(resources, stage)["POPBRIDGE_KAFKA_BOOTSTRAP"]
            )
            auth = named(resources, "TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]
            assert {ref["name"] for ref in auth["secretTargetRef"] if ref["parameter"] == "password"} == {
                f"popbridge-{stage}"
            }


def test_every_stage_has_a_disruption_budget(overlay: tuple[str, list[Resource]]) -> None:
    budgets = of_kind(overlay[1], "PodDisruptionBudget")
    for stage in STAGES:
        labels = deployment(overlay[1], stage)["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, stage


# --- network and monitoring ---------------------------------------------------------------------------


def selects(policy: Resource, labels: dict[str, str]) -> bool:
    return bool(policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items())


def egress_ports(policies: list[Resource]) -> set[int]:
    return {
        port["port"]
        for p in policies
        for rule in p["spec"].get("egress", [])
        for port in rule.get("ports", [])
    }


@pytest.mark.parametrize("stage", STAGES)
def test_network_policy_confines_each_stage(overlay: tuple[str, list[Resource]], stage: str) -> None:
    labels = deployment(overlay[1], stage)["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in of_kind(overlay[1], "NetworkPolicy") if selects(p, labels)]
    assert any(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in policies)
    expected = {DNS_PORT} | KAFKA_PORTS[overlay[0]]
    expected |= POP3_PORTS if stage == "fetcher" else set()
    expected |= SMTP_PORTS if stage == "deliverer" else set()
    assert egress_ports(policies) == expected
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            assert rule.get("to"), f"{describe(policy)}: an egress rule without peers allows every address"
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), describe(policy)
            assert [p["port"] for p in rule["ports"]] == [METRICS_PORT], describe(policy)


def test_prometheus_scrapes_every_stage(overlay: tuple[str, list[Resource]]) -> None:
    [monitor] = of_kind(overlay[1], "PodMonitor")
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    [expression] = monitor["spec"]["selector"]["matchExpressions"]
    assert expression["values"] == list(STAGES)
    for stage in STAGES:
        labels = deployment(overlay[1], stage)["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_ops_user_writes_only_where_an_ops_command_writes() -> None:
    resources = render_or_skip("overlays/prod")
    rights = acl_rights(named(resources, "KafkaUser", "popbridge-ops"))
    written = {(kind, name, pattern) for (kind, name, pattern), ops in rights.items() if "Write" in ops}
    gen = generator()
    expected = {("topic", name, "literal") for name in (*gen.OPS_WRITES, gen.shadow_spec(gen.SETTINGS).name)}
    assert written == expected
    assert {topics.FETCHED, topics.ROUTED, topics.RETRY_TOPICS[0]} <= {name for _, name, _ in written}
    assert not any(ops & {"Create", "Delete", "Alter", "All"} for ops in rights.values())
