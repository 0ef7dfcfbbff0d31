"""The Grafana dashboard (deploy/k8s/base/monitoring/popbridge-dashboard.json): every panel's PromQL parses
(promtool), reads metrics popbridge exports, and the dashboard ships as a ConfigMap the Grafana sidecar
loads. That each query returns series from a running pipeline is tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.deploy.kube import render_or_skip
from tests.deploy.monitoring import (
    as_recording_rules,
    dashboard,
    dashboard_queries,
    metric_names,
    promtool,
    write_rules,
)
from tests.deploy.test_alerts import exported_metric_names


def test_every_panel_query_parses(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, as_recording_rules(dashboard_queries()))
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_query_is_caught(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, as_recording_rules({"x": "sum(rate(x[5m])"}))
    result = promtool("check", "rules", str(rules))
    assert result.returncode != 0


def test_panels_read_only_metrics_popbridge_exports() -> None:
    exported = exported_metric_names()
    for title, expr in dashboard_queries().items():
        assert metric_names(expr) <= exported, f"{title}: {metric_names(expr) - exported} not exported"


def test_panels_cover_what_an_operator_watches() -> None:
    read = set().union(*(metric_names(e) for e in dashboard_queries().values()))
    watched = ("messages_fetched_total", "consumer_lag", "oldest_unprocessed_seconds", "deliveries_total",
               "dead_letter_records", "retry_depth", "pop3_command_seconds_bucket",
               "smtp_transaction_seconds_bucket", "mailbox_failing",
               "mailbox_last_successful_poll_timestamp_seconds")
    for name in watched:
        assert f"popbridge_{name}" in read, name


def test_panel_ids_are_unique_and_every_panel_has_a_query_and_a_description() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]


def test_dashboard_ships_as_a_config_map_for_the_grafana_sidecar() -> None:
    resources = render_or_skip("overlays/prod")
    name = "popbridge-grafana-dashboard"
    maps = [r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == name]
    assert len(maps) == 1
    assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(maps[0]["data"]["popbridge-dashboard.json"]) == dashboard()
