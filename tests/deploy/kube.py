"""Rendering and validating the Kubernetes manifests of deploy/k8s, offline.

`render` runs the pinned kustomize (deploy/tools/install_kustomize.sh puts it in a per-user cache).
`CrdValidators` checks custom resources against the openAPIV3Schema of the real CRDs in
shared/k8s/crds, strictly: an unknown field is an error, as with `kubectl apply --validate=strict`.
Core resources are checked with kubernetes-validate (`validate_core`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import jsonschema

# kubernetes-validate ships no type information; it is used through `validate_core` only.
import kubernetes_validate  # type: ignore[import-untyped]
import yaml

from tests.support.parts import SHARED, missing_part

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
CRD_DIR = SHARED / "k8s" / "crds"

# The oldest Kubernetes the manifests promise to work on, and the newest schema kubernetes-validate has.
KUBERNETES_VERSIONS = ("1.30", str(kubernetes_validate.latest_version()))
CORE_GROUPS = frozenset({"", "apps", "policy", "networking.k8s.io", "batch", "autoscaling"})
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

Resource = dict[str, Any]


def tool_missing(reason: str) -> NoReturn:
    """Skip the test for want of a tool, or fail it under CI (env CI set), where a skip would hide it."""
    missing_part(reason)


def render_or_skip(kustomization: str) -> list[Resource]:
    try:
        return render(kustomization)
    except KustomizeMissingError as exc:
        tool_missing(str(exc))


class KustomizeMissingError(Exception):
    """No kustomize binary: run deploy/tools/install_kustomize.sh or set POPBRIDGE_KUSTOMIZE."""


def tools_dir() -> Path:
    """Where deploy/tools/install_kustomize.sh installs (same rules as the script)."""
    configured = os.environ.get("POPBRIDGE_TOOLS_DIR")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "popbridge"


def kustomize_binary() -> Path:
    """POPBRIDGE_KUSTOMIZE, else the installer's cache, else `kustomize` on PATH."""
    configured = os.environ.get("POPBRIDGE_KUSTOMIZE")
    if configured:
        # Named explicitly: a wrong path is an error (never a skip), not a reason to look elsewhere.
        if not Path(configured).is_file():
            raise AssertionError(f"POPBRIDGE_KUSTOMIZE={configured}: no such file")
        return Path(configured)
    cached = tools_dir() / "bin" / "kustomize"
    if cached.is_file():
        return cached
    on_path = shutil.which("kustomize")
    if on_path:
        return Path(on_path)
    raise KustomizeMissingError(
        f"kustomize not found (POPBRIDGE_KUSTOMIZE unset, nothing at {cached}, none on PATH); "
        "run deploy/tools/install_kustomize.sh"
    )


def render(kustomization: str) -> list[Resource]:
    """The resources of `deploy/k8s/<kustomization>` as `kustomize build` prints them."""
    result = subprocess.run(
        [str(kustomize_binary()), "build", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kustomize build {kustomization} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def group_of(resource: Mapping[str, Any]) -> str:
    api_version = str(resource["apiVersion"])
    return api_version.split("/", maxsplit=1)[0] if "/" in api_version else ""


def is_core(resource: Mapping[str, Any]) -> bool:
    return group_of(resource) in CORE_GROUPS


def validate_core(resource: Resource, version: str) -> None:
    """kubernetes-validate in strict mode (unknown fields are errors); AssertionError names the path."""
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        raise AssertionError(
            f"{describe(resource)} against Kubernetes {version}: {where}: {exc.message}"
        ) from None


def describe(resource: Mapping[str, Any]) -> str:
    return f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"


def strict_schema(schema: Any) -> Any:
    """A copy of an openAPIV3Schema in which objects with declared properties reject unknown ones.

    Only the structural skeleton (properties, items, additionalProperties) is tightened: branches of
    anyOf/oneOf/allOf may list a subset of the properties, so they are left as they are.
    """
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tightened = dict(schema)
    if "properties" in schema:
        tightened["properties"] = {key: strict_schema(value) for key, value in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            tightened["additionalProperties"] = False
    if isinstance(schema.get("items"), dict):
        tightened["items"] = strict_schema(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        tightened["additionalProperties"] = strict_schema(schema["additionalProperties"])
    return tightened


@dataclass(frozen=True)
class Crd:
    group: str
    kind: str
    versions: dict[str, jsonschema.protocols.Validator]  # served version -> strict validator of it


def load_crds(directory: Path = CRD_DIR) -> dict[tuple[str, str], Crd]:
    """Every CRD in `directory`, keyed by (group, kind)."""
    crds: dict[tuple[str, str], Crd] = {}
    for path in sorted(directory.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not document or document.get("kind") != "CustomResourceDefinition":
                continue
            spec = document["spec"]
            versions = {
                version["name"]: _validator(version["schema"]["openAPIV3Schema"])
                for version in spec["versions"]
                if version.get("served")
            }
            crds[(spec["group"], spec["names"]["kind"])] = Crd(spec["group"], spec["names"]["kind"], versions)
    return crds


def _validator(schema: Any) -> jsonschema.protocols.Validator:
    strict = strict_schema(schema)
    jsonschema.Draft4Validator.check_schema(strict)
    return jsonschema.Draft4Validator(strict)


# Custom resources without a CRD in shared/k8s/crds, and the test that checks them instead.
CHECKED_ELSEWHERE = {("monitoring.coreos.com", "PrometheusRule"): "tests/deploy/test_alerts.py (promtool)"}


def crd_errors(resource: Resource, crds: Mapping[tuple[str, str], Crd]) -> Iterator[str]:
    """Why `resource` would be refused by the cluster's CRD (nothing when it would be accepted)."""
    if (group_of(resource), str(resource.get("kind"))) in CHECKED_ELSEWHERE:
        yield from _metadata_errors(resource)
        return
    crd = crds.get((group_of(resource), str(resource.get("kind"))))
    if crd is None:
        kind = f"{resource.get('apiVersion')} {resource.get('kind')}"
        yield f"{describe(resource)}: no CRD for {kind} in {CRD_DIR}"
        return
    version = str(resource["apiVersion"]).split("/")[-1]
    validator = crd.versions.get(version)
    if validator is None:
        yield f"{describe(resource)}: {crd.group} serves {sorted(crd.versions)}, not {version}"
        return
    yield from _metadata_errors(resource)
    for error in sorted(validator.iter_errors(resource), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(part) for part in error.absolute_path)
        yield f"{describe(resource)}: {where}: {error.message}"


def _metadata_errors(resource: Resource) -> Iterator[str]:
    metadata = resource.get("metadata", {})
    name = metadata.get("name", "")
    if not (isinstance(name, str) and len(name) <= 253 and _DNS_SUBDOMAIN.match(name)):
        yield f"{describe(resource)}: metadata.name {name!r} is not a DNS subdomain name"
    for key, value in {**metadata.get("labels", {}), **metadata.get("annotations", {})}.items():
        if not isinstance(value, str):
            yield f"{describe(resource)}: metadata label/annotation {key} is not a string: {value!r}"
