"""A real Prometheus scrapes real expositions; the dashboard's queries and the rules run on it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from service.metrics import Metrics
from tests.observability.conftest import OBSERVABILITY
from tests.observability.promql import alert_rules, dashboard_exprs, load_dashboard
from tests.support.prometheus import PrometheusServer
from tests.support.waiting import wait_until_sync

SCRAPE_DEADLINE = 30.0


@dataclass
class Exporter:
    """A ``/metrics`` endpoint on a free loopback port, served from a private registry."""

    registry: CollectorRegistry
    server: WSGIServer
    thread: threading.Thread

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _serve(registry: CollectorRegistry) -> Exporter:
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    return Exporter(registry, server, thread)


@pytest.fixture(scope="module")
def probe_counter() -> Iterator[tuple[Counter, Exporter]]:
    registry = CollectorRegistry()
    counter = Counter("probe_events", "Test-local counter.", registry=registry)
    exporter = _serve(registry)
    yield counter, exporter
    exporter.close()


@pytest.fixture(scope="module")
def service_exporter() -> Iterator[Exporter]:
    exporter = _serve(Metrics().registry)
    yield exporter
    exporter.close()


@pytest.fixture(scope="module")
def prom(
    prometheus_installed: None,
    tmp_path_factory: pytest.TempPathFactory,
    probe_counter: tuple[Counter, Exporter],
    service_exporter: Exporter,
) -> Iterator[PrometheusServer]:
    server = PrometheusServer(
        tmp_path_factory.mktemp("prometheus"),
        targets=[probe_counter[1].target, service_exporter.target],
        rule_files=[OBSERVABILITY / "alerts.yaml"],
    )
    with server:
        yield server


def test_counter_value_round_trips(
    prom: PrometheusServer, probe_counter: tuple[Counter, Exporter]
) -> None:
    counter, exporter = probe_counter
    expr = f'probe_events_total{{instance="{exporter.target}"}}'
    counter.inc(3)
    wait_until_sync(lambda: prom.query_value(expr) == 3.0, SCRAPE_DEADLINE, f"{expr} == 3")
    counter.inc(2)
    wait_until_sync(lambda: prom.query_value(expr) == 5.0, SCRAPE_DEADLINE, f"{expr} == 5")
    [series] = prom.query(expr)
    assert series["metric"]["job"] == "device-rebind"


def test_dashboard_queries_evaluate(prom: PrometheusServer, service_exporter: Exporter) -> None:
    up = f'up{{instance="{service_exporter.target}"}}'
    wait_until_sync(lambda: prom.query_value(up) == 1.0, SCRAPE_DEADLINE, f"{up} == 1")
    for where, expr in dashboard_exprs(load_dashboard(OBSERVABILITY / "grafana-dashboard.json")):
        if expr.startswith("label_values("):  # a Grafana function, not PromQL
            continue
        promql = expr.replace("$__rate_interval", "1m").replace("$job", ".+")
        prom.query(promql)  # raises PrometheusError on a parse or evaluation error
        assert where


def test_alert_rules_load_and_evaluate(prom: PrometheusServer) -> None:
    expected = sorted(rule["alert"] for rule in alert_rules(OBSERVABILITY / "alerts.yaml"))

    def healthy_rules() -> list[str]:
        rules = [rule for group in prom.rule_groups() for rule in group["rules"]]
        if not rules or any(rule.get("health") != "ok" for rule in rules):
            return []
        return sorted(rule["name"] for rule in rules)

    names = wait_until_sync(healthy_rules, SCRAPE_DEADLINE, "every rule evaluated with health ok")
    assert names == expected

    def active_alerts() -> set[str]:
        return {
            alert["labels"]["alertname"]
            for alert in prom.alerts()
            if alert["labels"].get("job") == "device-rebind"
        }

    # A fresh Metrics() reports no token and not ready: both alerts start pending.
    wanted = {"RebindNoPlatformToken", "RebindNotReady"}
    wait_until_sync(lambda: wanted <= active_alerts(), SCRAPE_DEADLINE, f"{sorted(wanted)} pending")
