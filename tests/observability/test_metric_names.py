"""Every metric a rule or a panel names is one the service exports; the dashboard is sound."""

from __future__ import annotations

from typing import Any

import pytest

from tests.observability.conftest import OBSERVABILITY
from tests.observability.promql import (
    alert_rules,
    dashboard_exprs,
    dashboard_panels,
    exposed_names,
    load_dashboard,
    service_metric_names,
    unknown_names,
)

DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
ALERTS = OBSERVABILITY / "alerts.yaml"


@pytest.fixture(scope="module")
def known() -> set[str]:
    return service_metric_names()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard(DASHBOARD)


def test_exposition_names_include_suffixes(known: set[str]) -> None:
    assert {
        "rebind_outcomes_total",
        "rebind_platform_requests_total",  # labelled, no child yet: known from its TYPE line
        "rebind_platform_request_duration_seconds_bucket",
        "rebind_platform_request_duration_seconds_sum",
        "rebind_platform_request_duration_seconds_count",
        "rebind_deferred_events",
        "rebind_consumer_lag",
    } <= known
    assert "rebind_outcomes" not in known
    assert "rebind_platform_request_duration_seconds" not in known


def test_checker_rejects_unknown_names(known: set[str]) -> None:
    assert unknown_names('rate(rebind_outcome_total{outcome="x"}[5m])', known) == {
        "rebind_outcome_total"
    }
    assert unknown_names("sum(rebind_platform_request_duration_seconds)", known) == {
        "rebind_platform_request_duration_seconds"
    }
    assert unknown_names('node_load1{job="x"} + up{job="y"}', known) == {"node_load1"}
    # label values are not metric names
    assert unknown_names('rebind_outcomes_total{outcome="rebind_failed"}', known) == set()
    assert exposed_names("# TYPE x_seconds histogram\n") == {
        "x_seconds_bucket",
        "x_seconds_sum",
        "x_seconds_count",
    }


def test_alert_expressions_use_exported_metrics(known: set[str]) -> None:
    problems = {
        rule["alert"]: unknown_names(rule["expr"], known)
        for rule in alert_rules(ALERTS)
        if unknown_names(rule["expr"], known)
    }
    assert problems == {}


def test_dashboard_expressions_use_exported_metrics(
    known: set[str], dashboard: dict[str, Any]
) -> None:
    exprs = dashboard_exprs(dashboard)
    assert exprs
    problems = {
        where: unknown_names(expr, known) for where, expr in exprs if unknown_names(expr, known)
    }
    assert problems == {}


def test_dashboard_shows_every_metric_family(known: set[str], dashboard: dict[str, Any]) -> None:
    used = " ".join(expr for _, expr in dashboard_exprs(dashboard))
    families = {
        name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for name in known
    }
    assert {family for family in families if family not in used} == set()


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"]
    assert dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        title = panel.get("title")
        assert title, f"panel {panel['id']} has no title"
        assert panel["type"] in {"timeseries", "stat"}, title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, title
        targets = panel.get("targets")
        assert targets, f"panel {title!r} has no targets"
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {title!r}: empty expr"
            assert target.get("refId"), f"panel {title!r}: target without refId"
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"


@pytest.mark.parametrize(
    "needle",
    [
        "rebind_outcomes_total",
        "rebind_platform_throttle_rejections_total",
        "rebind_platform_device_online_rejections_total",
        "rebind_deferred_events",
        "rebind_rate_limit_per_minute",
        "rebind_platform_request_duration_seconds_bucket",
        "rebind_event_latency_seconds_bucket",
        "rebind_consumer_lag",
        "rebind_inflight_events",
        "rebind_rate_limiter_wait_seconds_bucket",
        "rebind_kafka_transactions_total",
        "rebind_build_info",
    ],
)
def test_dashboard_has_required_panels(dashboard: dict[str, Any], needle: str) -> None:
    assert any(needle in expr for _, expr in dashboard_exprs(dashboard))
