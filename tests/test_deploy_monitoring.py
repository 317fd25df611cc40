"""The Prometheus config, alerting rules (with promtool's own unit tests) and Grafana dashboard."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import orjson
import pytest
import yaml

from gateway.metrics import GatewayMetrics
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-dashboard.json"
_METRIC = re.compile(r"\b(gateway_[a-z_]+?)(?:_bucket|_sum|_count)?\b")


def contract_metrics() -> set[str]:
    """The names the app really exposes (counters without their `_total` suffix folded)."""
    registry = GatewayMetrics([("m", "simulated")]).registry
    names = set()
    for family in registry.collect():
        if family.name.startswith("gateway_"):
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def promtool(*args: str) -> None:
    binary = require_binary("promtool")
    result = subprocess.run(
        [binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_config_and_the_rules() -> None:
    promtool("check", "config", "prometheus.yml")
    promtool("check", "rules", "alerts.yml")


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    promtool("test", "rules", "alerts_test.yml")


def alerts() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_is_documented_and_unit_tested() -> None:
    tested = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    covered = {case["alertname"] for test in tested for case in test["alert_rule_test"]}
    for rule in alerts():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["for"], rule["alert"]
        assert rule["alert"] in covered, f"{rule['alert']} has no promtool unit test"


def expressions() -> list[str]:
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_only_metrics_the_gateway_exposes(source: str) -> None:
    exprs = expressions() if source == "dashboard" else [rule["expr"] for rule in alerts()]
    known = contract_metrics()
    for expr in exprs:
        for name in _METRIC.findall(expr):
            assert name in known, f"{name!r} in {expr!r} is not exposed by the gateway"


def test_the_dashboard_shows_every_contract_metric() -> None:
    used = {name for expr in expressions() for name in _METRIC.findall(expr)}
    assert contract_metrics() - used == set()


def test_the_kubernetes_scrape_job_keeps_annotated_gateway_pods() -> None:
    config = yaml.safe_load((PROMETHEUS / "kubernetes-scrape.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keeps = {
        tuple(rule["source_labels"]): rule["regex"]
        for rule in job["relabel_configs"]
        if rule.get("action", "replace") == "keep"
    }
    assert keeps[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    # The port annotation replaces the address's port.
    port_rule = next(r for r in job["relabel_configs"] if r.get("target_label") == "__address__")
    source = "10.1.2.3:8080;9090"
    assert re.sub(f"^{port_rule['regex']}$", "\\1:\\2", source) == "10.1.2.3:9090"
