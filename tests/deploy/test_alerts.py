"""The PrometheusRule (deploy/k8s/base/monitoring/prometheusrule.yaml): valid, unit-tested with
`promtool test rules` (tests/deploy/alerts_test.yaml: fires, stays quiet, resolves), documented.

Needs promtool (deploy/tools/install_prometheus.sh). Without it these tests skip, except under CI, where
they fail.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from services.runtime.metrics import Metrics
from tests.deploy.monitoring import (
    ALERT_TESTS,
    RULES_FILE,
    RUNBOOK,
    alerts,
    metric_names,
    promtool,
    rule_groups,
    write_rules,
)


def exported_metric_names() -> set[str]:
    """Every sample name a popbridge process can export (counters with _total, histograms' series)."""
    names: set[str] = set()
    for family in Metrics(process=False).registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(write_rules(tmp_path, rule_groups())))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass(tmp_path: Path) -> None:
    write_rules(tmp_path, rule_groups())
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The promtool tests are not vacuous: a lag threshold raised tenfold makes them fail."""
    groups = rule_groups()
    rules = [r for g in groups["groups"] for r in g["rules"]]
    lag = next(r for r in rules if r.get("alert") == "PopbridgeConsumerLagHigh")
    assert lag["expr"].endswith("> 1000")
    lag["expr"] = lag["expr"].replace("> 1000", "> 10000")
    write_rules(tmp_path, groups)
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "PopbridgeConsumerLagHigh" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    cases = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
    checks = [check for case in cases for check in case.get("alert_rule_test", [])]
    for name in {a["alert"] for a in alerts()}:
        outcomes = [bool(c["exp_alerts"]) for c in checks if c["alertname"] == name]
        assert True in outcomes, f"{name}: no test where it fires"
        assert False in outcomes, f"{name}: no test where it stays quiet"


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    headings = {_anchor(line) for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
                if line.startswith("#")}
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert alert["annotations"]["summary"], name
        url = alert["annotations"]["runbook_url"]
        assert url.startswith("deploy/README.md#"), name
        assert url.split("#", 1)[1] in headings, f"{name}: no section {url} in {RUNBOOK}"


def test_alerts_read_only_metrics_popbridge_exports() -> None:
    exported = exported_metric_names()
    for alert in alerts():
        unknown = metric_names(alert["expr"]) - exported
        assert not unknown, f"{alert['alert']} reads {unknown}, not exported by services/runtime/metrics.py"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^a-z0-9 _-]", "", text).replace(" ", "-")


def test_the_prometheus_rule_has_the_shape_prometheus_operator_reads() -> None:
    """No CRD for PrometheusRule in shared/k8s/crds: the fields the operator reads are checked here."""
    resource = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    assert (resource["apiVersion"], resource["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert set(resource["spec"]) == {"groups"}
    for group in resource["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule
            assert all(isinstance(v, str) for v in {**rule["labels"], **rule["annotations"]}.values()), rule
