"""The Grafana dashboard (`deploy/grafana/gateway.json`) names only metrics the gateway defines."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from app.core.metrics import metric_names

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "gateway.json"
# What PromQL spells besides metric names, in the expressions the dashboard uses.
_PROMQL_WORDS = frozenset(
    {"sum", "max", "min", "avg", "by", "without", "rate", "increase", "histogram_quantile"}
)
_QUOTED = re.compile(r'"[^"]*"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\([^)]*\)")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def metrics_named(expr: str) -> set[str]:
    """The metric names of a PromQL expression: what is left once strings, label lists,
    matchers, ranges and functions are taken out."""
    bare = _RANGE.sub(" ", _MATCHERS.sub(" ", _GROUPING.sub(" ", _QUOTED.sub(" ", expr))))
    words = set(_IDENTIFIER.findall(bare)) - _PROMQL_WORDS
    return {w for w in words if not w.isdigit()}


def test_the_dashboard_is_grafana_json_with_a_query_per_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for panel in dashboard["panels"]:
        assert panel["type"] == "timeseries" and panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()


def test_every_expression_names_only_metrics_the_code_defines() -> None:
    defined = metric_names()
    named: set[str] = set()
    for expr in expressions(json.loads(DASHBOARD.read_text())):
        found = metrics_named(expr)
        assert found, expr
        assert found <= defined, (expr, found - defined)
        named |= found
    # The panels the issue asks for: requests, latency, upstream, spend, queues, jobs, webhooks.
    assert {
        "gateway_http_requests_total",
        "gateway_http_request_duration_seconds_bucket",
        "gateway_upstream_request_duration_seconds_bucket",
        "gateway_cost_usd_total",
        "gateway_queue_depth",
        "gateway_queue_oldest_job_age_seconds",
        "gateway_jobs_finished_total",
        "gateway_webhook_deliveries_total",
    } <= named


def test_the_check_would_catch_a_misspelt_metric() -> None:
    found = metrics_named('sum by (route) (rate(gateway_http_request_total{status="200"}[5m]))')
    assert found == {"gateway_http_request_total"}
    assert not found <= metric_names()
