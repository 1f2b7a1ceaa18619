"""Where the suite's time goes: wall time per part and the slowest tests (issue 21, item 5).

As a pytest plugin (``tests/conftest.py``) it groups the tests by their top-level directory
(``unit``, ``integration``, ``faults``, ``deploy``, ``observability``): a part's wall time runs
from the start of its first test's setup to the end of its last test's teardown (pytest runs a
directory's tests together), so session fixtures started for it (the broker) count where they
are paid for. At the end of the run it prints the parts and the ten slowest tests, and with
``TEST_PART_TIMES=<file>`` writes them as JSON there.

``python -m tests.support.parts <timings.tsv> <pytest.json>`` prints the table ``make test``
ends with: the parts timed outside pytest (tools, lint and types: one line
``name<TAB>start<TAB>end`` each, epoch seconds, written by ``scripts/test.sh``), then pytest's
parts, then the slowest ten tests.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SLOWEST = 10
ENV_FILE = "TEST_PART_TIMES"


def part_of(nodeid: str) -> str:
    """``tests/faults/test_x.py::test_y`` -> ``faults``; a test file directly under ``tests``
    (or outside it) is its own part, named after its directory."""
    parts = nodeid.split("::", 1)[0].split("/")
    if len(parts) >= 3 and parts[0] == "tests":
        return parts[1]
    return parts[-2] if len(parts) >= 2 else "(root)"


@dataclass
class Part:
    first: float = float("inf")
    last: float = 0.0
    tests: int = 0
    in_tests: float = 0.0
    """Sum of the tests' own durations (setup + call + teardown)."""

    @property
    def wall(self) -> float:
        return max(0.0, self.last - self.first)


@dataclass(eq=False)  # hashable: pluggy keeps plugins in sets
class Recorder:
    parts: dict[str, Part] = field(default_factory=lambda: defaultdict(Part))
    tests: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        part = self.parts[part_of(report.nodeid)]
        part.first = min(part.first, report.start)
        part.last = max(part.last, report.stop)
        part.in_tests += report.duration
        if report.when == "call" or (report.when == "setup" and report.skipped):
            part.tests += 1
        self.tests[report.nodeid] += report.duration

    def as_json(self) -> dict[str, Any]:
        ordered = sorted(self.parts.items(), key=lambda kv: kv[1].first)
        slowest = sorted(self.tests.items(), key=lambda kv: -kv[1])[:SLOWEST]
        return {
            "parts": [
                {"name": name, "wall": p.wall, "tests": p.tests, "in_tests": p.in_tests}
                for name, p in ordered
            ],
            "slowest": [{"test": test, "seconds": s} for test, s in slowest],
        }

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.parts:
            return
        data = self.as_json()
        terminalreporter.write_sep("=", "wall time per part")
        for line in table(data, []):
            terminalreporter.write_line(line)
        target = os.environ.get(ENV_FILE)
        if target:
            Path(target).write_text(json.dumps(data, indent=1), encoding="utf-8")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes:d}:{secs:02d}"


def table(data: dict[str, Any], outside: list[tuple[str, float]]) -> list[str]:
    """The parts (``outside`` pytest first), their total, and the slowest tests. When
    ``outside`` times the whole pytest run (a part named ``pytest``), pytest's parts are listed
    under it, with what none of them holds (collection, start-up) as ``other``."""
    inner = [(f"{p['name']}", p["wall"], f"{p['tests']} tests") for p in data["parts"]]
    rows: list[tuple[str, float, str]] = []
    total = 0.0
    for name, secs in outside:
        total += secs
        if name == "pytest":
            rows.append((name, secs, "every test, in one run:"))
            rows += [(f"  {n}", s, what) for n, s, what in inner]
            rows.append(
                ("  other", max(0.0, secs - sum(s for _, s, _ in inner)), "collection, start-up")
            )
            inner = []
        else:
            rows.append((name, secs, ""))
    rows += inner
    total += sum(s for _, s, _ in inner)
    lines = [f"  {name:<16} {_clock(secs):>7}  {what}".rstrip() for name, secs, what in rows]
    lines.append(f"  {'total':<16} {_clock(total):>7}")
    if data["slowest"]:
        lines.append(f"slowest {len(data['slowest'])} tests (setup + call + teardown):")
        lines += [f"  {s['seconds']:7.1f}s  {s['test']}" for s in data["slowest"]]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m tests.support.parts <timings.tsv> <pytest.json>\n")
        return 2
    outside: list[tuple[str, float]] = []
    timings = Path(argv[0])
    if timings.exists():
        for line in timings.read_text(encoding="utf-8").splitlines():
            name, start, end = ([*line.split("\t"), "", ""])[:3]
            if start and end:
                outside.append((name, float(end) - float(start)))
    results = Path(argv[1])
    data: dict[str, Any] = {"parts": [], "slowest": []}
    if results.exists():
        data = json.loads(results.read_text(encoding="utf-8"))
    print("==> make test: wall time per part")
    for line in table(data, outside):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
