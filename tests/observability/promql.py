"""What the service exposes, and which metric names PromQL expressions use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from service.metrics import Metrics

_SUFFIXES = {
    "counter": ("",),  # the text format's TYPE line already carries the _total suffix
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_REBIND_NAME = re.compile(r"\brebind_[a-z_]+\b")
_SELECTOR_NAME = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
ALWAYS_ALLOWED = frozenset({"up"})


def exposed_names(exposition: str) -> set[str]:
    """Every sample name a scrape of ``exposition`` can contain.

    Sample lines give the names present now; ``# TYPE`` lines add the names of families that have
    no child yet (labelled metrics not used so far), with the suffixes their type implies.
    """
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.update(name + suffix for suffix in _SUFFIXES[kind.strip()])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def service_metric_names() -> set[str]:
    return exposed_names(Metrics().render().decode())


def referenced_names(expr: str) -> set[str]:
    """Metric names an expression reads: ``rebind_*`` identifiers and ``name{`` selectors.

    String literals are removed first, so label values such as ``outcome="rebind_failed"`` are
    not taken for metric names.
    """
    code = _STRING.sub('""', expr)
    names = set(_REBIND_NAME.findall(code))
    names.update(_SELECTOR_NAME.findall(code))
    return names


def unknown_names(expr: str, known: set[str]) -> set[str]:
    return referenced_names(expr) - known - ALWAYS_ALLOWED


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def alert_rules(path: Path) -> list[dict[str, Any]]:
    return [
        rule for group in load_yaml(path)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def load_dashboard(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels, including those nested in collapsed rows."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, expr)`` for every panel target and every query variable."""
    exprs = [
        (f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query") if isinstance(query, dict) else query
            exprs.append((f"variable {variable['name']!r}", str(text)))
    return exprs
