"""The alert rules and the dashboard of deploy/k8s/base/monitoring, and the promtool that checks them.

promtool and prometheus come from Debian's `prometheus` package (deploy/tools/install_prometheus.sh);
POPBRIDGE_PROMETHEUS_DIR names another directory holding both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.kube import tool_missing

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "k8s" / "base" / "monitoring"
RULES_FILE = MONITORING / "prometheusrule.yaml"
DASHBOARD_FILE = MONITORING / "popbridge-dashboard.json"
ALERT_TESTS = Path(__file__).with_name("alerts_test.yaml")
RUNBOOK = REPO / "deploy" / "README.md"
# Grafana's interval macro, as a window Prometheus accepts (4 scrapes at the PodMonitor's 30 s).
GRAFANA_MACROS = {"$__rate_interval": "2m"}


class PrometheusMissingError(Exception):
    """No promtool/prometheus: run deploy/tools/install_prometheus.sh or set POPBRIDGE_PROMETHEUS_DIR."""


def prometheus_tool(name: str) -> Path:
    """`promtool` or `prometheus`: POPBRIDGE_PROMETHEUS_DIR, else the Debian path, else PATH."""
    configured = os.environ.get("POPBRIDGE_PROMETHEUS_DIR")
    if configured:
        path = Path(configured) / name
        if not path.is_file():
            raise AssertionError(f"POPBRIDGE_PROMETHEUS_DIR={configured}: no {name} there")
        return path
    for candidate in (Path("/usr/bin") / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise PrometheusMissingError(f"{name} not found; run deploy/tools/install_prometheus.sh")


def required_tool(name: str) -> Path:
    """prometheus_tool(name), or skip the test, or fail it under CI (where the tools must be installed)."""
    try:
        return prometheus_tool(name)
    except PrometheusMissingError as exc:
        tool_missing(str(exc))


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(required_tool("promtool")), *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=cwd)


def rule_groups() -> dict[str, Any]:
    """The PrometheusRule's spec: a Prometheus rules file ({"groups": [...]})."""
    resource = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    spec: dict[str, Any] = resource["spec"]
    return spec


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups()["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return loaded


def dashboard_queries(macros: dict[str, str] | None = None) -> dict[str, str]:
    """"<panel title> / <refId>" -> PromQL, with Grafana's macros replaced (default: GRAFANA_MACROS)."""
    replace = GRAFANA_MACROS if macros is None else macros
    queries: dict[str, str] = {}
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = str(target["expr"])
            for macro, value in replace.items():
                expr = expr.replace(macro, value)
            queries[f"{panel['title']} / {target['refId']}"] = expr
    return queries


def metric_names(expr: str) -> set[str]:
    """The popbridge_* metric names a PromQL expression reads."""
    return set(re.findall(r"\bpopbridge_[a-z0-9_]+", expr))


def write_rules(directory: Path, groups: dict[str, Any]) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump(groups, sort_keys=False), encoding="utf-8")
    return path


def as_recording_rules(queries: dict[str, str]) -> dict[str, Any]:
    """Queries as recording rules, so that `promtool check rules` parses each one."""
    exprs = enumerate(queries.values())
    rules = [{"record": f"popbridge:dashboard_query_{i}", "expr": expr} for i, expr in exprs]
    return {"groups": [{"name": "dashboard", "rules": rules}]}
