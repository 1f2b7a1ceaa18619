"""``scripts/test.sh`` (``make test``, what CI runs): the tools install alongside the tests that
do not need them, and the closing table says so.

The script runs here with stand-ins for ``make`` and ``pytest`` (``MAKE`` and ``BIN``). The
stand-in tools wait until the first pytest run has started, and that run waits until the tools
have started: both return only if the script runs them at the same time (run one after the
other, the first to start times out and fails). The run needing the tools checks that they
finished before it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.deploy.helpers import REPO

SCRIPT = REPO / "scripts" / "test.sh"
DEADLINE = 20
"""How long a stand-in waits for the other (seconds): a condition, polled."""

WAIT_FOR = f"""
wait_for() {{
    local end=$((SECONDS + {DEADLINE}))
    until [ -e "$STUB/$1" ]; do
        [ "$SECONDS" -lt "$end" ] || {{ echo "stub: no $1 within {DEADLINE}s" >&2; exit 9; }}
        sleep 0.05
    done
}}
"""

MAKE = """#!/usr/bin/env bash
{wait_for}
shift  # --no-print-directory
case "$*" in
    kafka | tools-apt) exit 0 ;;
    tools-go)
        echo $$ >"$STUB/tools.pid"
        touch "$STUB/tools.started"
        wait_for first.started
        touch "$STUB/tools.done"
        echo "built the tools" ;;
    "lint typecheck")
        [ -z "${{STUB_LINT_RC:-}}" ] || wait_for tools.pid  # a failure once the tools run
        exit "${{STUB_LINT_RC:-0}}" ;;
    *) echo "stub make: unexpected $*" >&2; exit 2 ;;
esac
"""

PYTEST = """#!/usr/bin/env bash
{wait_for}
echo "$*" >>"$STUB/pytest.args"
case " $* " in
    *" tests/integration "*)
        touch "$STUB/first.started"
        wait_for tools.started
        part=integration ;;
    *" tests/deploy "*)
        [ -e "$STUB/tools.done" ] || {{ echo "stub: deploy tests before the tools" >&2; exit 8; }}
        part=deploy ;;
    *) echo "stub pytest: unexpected $*" >&2; exit 2 ;;
esac
cat >"$TEST_PART_TIMES" <<EOF
{{"parts": [{{"name": "$part", "wall": 1.0, "tests": 3, "in_tests": 1.0}}],
 "slowest": [{{"test": "tests/$part/test_x.py::test_y", "seconds": 0.5}}]}}
EOF
"""


def _stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("make", MAKE), ("pytest", PYTEST)):
        path = bin_dir / name
        path.write_text(textwrap.dedent(text.format(wait_for=WAIT_FOR)), encoding="utf-8")
        path.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = dict(os.environ)
    env.update(MAKE=str(bin_dir / "make"), BIN=str(bin_dir), STUB=str(tmp_path), PYTEST_ARGS="-q")
    return env


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_tools_install_alongside_the_first_run_and_the_table_says_so(
    tmp_path: Path,
) -> None:
    result = _run(_stubs(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    runs = (tmp_path / "pytest.args").read_text(encoding="utf-8").splitlines()
    assert [run.split()[-3:] for run in runs] == [
        ["tests/integration", "tests/faults", "tests/unit"],
        ["-q", "tests/deploy", "tests/observability"],
    ]
    table = result.stdout[result.stdout.index("==> make test: wall time per part") :]
    lines = table.splitlines()
    tools = next(line for line in lines if line.lstrip().startswith("go tools "))
    assert "alongside lint+types, pytest" in tools, table
    first = next(line for line in lines if line.lstrip().startswith("pytest "))
    assert "integration, in one run; alongside go tools" in first, table
    assert any(line.strip().startswith("deploy ") for line in lines), table
    assert any("wall time, first start to last end" in line for line in lines), table
    assert "built the tools" in result.stdout  # their output, once they are done


def test_a_failed_lint_stops_the_tools_and_the_run(tmp_path: Path) -> None:
    env = _stubs(tmp_path)
    env["STUB_LINT_RC"] = "3"
    result = _run(env)
    assert result.returncode == 3, result.stdout + result.stderr
    assert not (tmp_path / "pytest.args").exists(), "no test runs after a failed lint"
    pid = int((tmp_path / "tools.pid").read_text(encoding="utf-8"))
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, f"the tools (pid {pid}) still run after the exit"
        time.sleep(0.05)  # polling the condition above, with its deadline


def _alive(pid: int) -> bool:
    """Running (a killed process not yet reaped by whoever adopted it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
