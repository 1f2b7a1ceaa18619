"""Where the suite's time goes: wall time per part and the slowest tests (issue 21, item 5).

As a pytest plugin (``tests/conftest.py``) it groups the tests by their top-level directory
(``unit``, ``integration``, ``faults``, ``deploy``, ``observability``): a part's wall time runs
from the start of its first test's setup to the end of its last test's teardown (pytest runs a
directory's tests together), so session fixtures started for it (the broker) count where they
are paid for. At the end of the run it prints the parts and the ten slowest tests, and with
``TEST_PART_TIMES=<file>`` writes them as JSON there.

``python -m tests.support.parts <timings.tsv>`` prints the table ``make test`` ends with: the
parts ``scripts/test.sh`` timed (kafka, tools, lint and types, the pytest runs: one line
``name<TAB>start<TAB>end[<TAB>pytest.json]`` each, epoch seconds), each pytest run's own parts
under it, which parts overlapped (the tools install in the background), the wall time of the
whole, and the slowest ten tests of all the runs.
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


@dataclass(frozen=True)
class Outside:
    """A part timed outside pytest by ``scripts/test.sh``: one line of its timings file."""

    name: str
    start: float
    end: float
    results: dict[str, Any] | None = None
    """For a pytest run: its own parts and slowest tests (what ``TEST_PART_TIMES`` wrote)."""

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)

    def overlaps(self, other: Outside) -> bool:
        return self is not other and self.start < other.end and other.start < self.end


def table(data: dict[str, Any], outside: list[Outside]) -> list[str]:
    """The parts, the run's wall time and the slowest tests.

    ``outside`` (the parts ``scripts/test.sh`` timed, by start) come first; a part that ran at
    the same time as others says so (``alongside ...``), and the total is the wall time from
    the first start to the last end, not a sum. A pytest run among them lists its own parts
    under it, with what none of them holds (collection, start-up) as ``other``. ``data`` (one
    pytest run's parts) is listed when ``outside`` is empty (pytest's own summary)."""
    rows: list[tuple[str, float, str]] = []
    slowest: list[dict[str, Any]] = list(data["slowest"])
    ordered = sorted(outside, key=lambda o: o.start)
    for o in ordered:
        along = [other.name for other in ordered if o.overlaps(other)]
        what = f"alongside {', '.join(dict.fromkeys(along))}" if along else ""
        if o.results is None:
            rows.append((o.name, o.seconds, what))
            continue
        inner = [(p["name"], float(p["wall"]), f"{p['tests']} tests") for p in o.results["parts"]]
        runs = ", ".join(n for n, _, _ in inner)
        rows.append((o.name, o.seconds, f"{runs}, in one run" + (f"; {what}" if what else "")))
        rows += [(f"  {n}", secs, tests) for n, secs, tests in inner]
        rows.append(
            ("  other", max(0.0, o.seconds - sum(s for _, s, _ in inner)), "collection, start-up")
        )
        slowest += o.results["slowest"]
    if ordered:
        total = max(o.end for o in ordered) - ordered[0].start
        note = "wall time, first start to last end"
    else:
        rows += [(p["name"], float(p["wall"]), f"{p['tests']} tests") for p in data["parts"]]
        total, note = sum(float(p["wall"]) for p in data["parts"]), ""
    lines = [f"  {name:<16} {_clock(secs):>7}  {what}".rstrip() for name, secs, what in rows]
    lines.append(f"  {'total':<16} {_clock(total):>7}  {note}".rstrip())
    slowest = sorted(slowest, key=lambda s: -float(s["seconds"]))[:SLOWEST]
    if slowest:
        lines.append(f"slowest {len(slowest)} tests (setup + call + teardown):")
        lines += [f"  {s['seconds']:7.1f}s  {s['test']}" for s in slowest]
    return lines


def read_timings(path: Path) -> list[Outside]:
    """The timings file of ``scripts/test.sh``: ``name<TAB>start<TAB>end[<TAB>results]`` per
    line (epoch seconds; results: the JSON file a pytest run wrote, if it wrote one)."""
    parts: list[Outside] = []
    if not path.exists():
        return parts
    for line in path.read_text(encoding="utf-8").splitlines():
        name, start, end, results = ([*line.split("\t"), "", "", ""])[:4]
        if not (start and end):
            continue
        data = None
        if results:
            file = Path(results)
            data = (
                json.loads(file.read_text(encoding="utf-8"))
                if file.exists()
                else {"parts": [], "slowest": []}
            )
        parts.append(Outside(name, float(start), float(end), data))
    return parts


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m tests.support.parts <timings.tsv>\n")
        return 2
    print("==> make test: wall time per part")
    for line in table({"parts": [], "slowest": []}, read_timings(Path(argv[0]))):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
