"""The alerting rules are valid, unit-tested alert by alert, and documented in the runbook."""

from __future__ import annotations

import re
import subprocess
from typing import Any

from tests.observability.conftest import OBSERVABILITY
from tests.observability.promql import alert_rules, load_yaml

ALERTS = OBSERVABILITY / "alerts.yaml"
ALERT_TESTS = OBSERVABILITY / "alerts.test.yaml"
README = OBSERVABILITY / "README.md"
SEVERITIES = {"critical", "warning"}


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_check_rules(promtool: str) -> None:
    result = _promtool(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests(promtool: str) -> None:
    result = _promtool(promtool, "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_example_prometheus_config_is_valid(promtool: str) -> None:
    result = _promtool(promtool, "check", "config", str(OBSERVABILITY / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_for_severity_and_annotations() -> None:
    rules = alert_rules(ALERTS)
    assert rules, "no alerts in alerts.yaml"
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for rule in rules:
        name = rule["alert"]
        assert rule.get("for"), f"{name}: no `for:`"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        annotations: dict[str, str] = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key), f"{name}: no {key} annotation"
        assert annotations["runbook"] == f"deploy/observability/README.md#alert-{name.lower()}"
        for key, text in annotations.items():
            assert not re.search(r"https?://", text), f"{name}: {key} links to a host"


def _unit_tested(tests: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Alert names with a firing expectation, and with a not-firing expectation."""
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    return firing, silent


def test_every_alert_has_firing_and_not_firing_unit_tests() -> None:
    names = {rule["alert"] for rule in alert_rules(ALERTS)}
    tests = load_yaml(ALERT_TESTS)
    assert tests["rule_files"] == ["alerts.yaml"]
    firing, silent = _unit_tested(tests)
    assert names - firing == set(), "alerts never expected to fire in alerts.test.yaml"
    assert names - silent == set(), "alerts never expected to stay silent in alerts.test.yaml"
    assert (firing | silent) - names == set(), "alerts.test.yaml tests alerts that do not exist"


def test_every_alert_has_a_runbook_section() -> None:
    readme = README.read_text(encoding="utf-8")
    for rule in alert_rules(ALERTS):
        name = rule["alert"]
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert f'<a id="{anchor}"></a>' in readme, f"README has no anchor {anchor}"
        assert re.search(rf"^### {name}\b", readme, re.MULTILINE), f"README has no section {name}"
