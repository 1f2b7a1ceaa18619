"""Fixtures for the observability tests: promtool/prometheus on PATH, installed if missing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO_ROOT / "deploy" / "observability"
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-prometheus.sh"
INSTALL_TIMEOUT = 600.0


@pytest.fixture(scope="session")
def prometheus_installed() -> None:
    """Ensure ``promtool`` and ``prometheus`` are on PATH; run the install script otherwise.

    On a fresh CI machine this installs Debian's ``prometheus`` package (needs root or sudo).
    """
    if shutil.which("promtool") and shutil.which("prometheus"):
        return
    completed = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    sys.stderr.write(completed.stdout + completed.stderr)
    if completed.returncode != 0 or not (shutil.which("promtool") and shutil.which("prometheus")):
        pytest.fail(
            f"{INSTALL_SCRIPT.name} exited with {completed.returncode} and promtool/prometheus "
            f"are still missing:\n{completed.stdout}\n{completed.stderr}"
        )


@pytest.fixture(scope="session")
def promtool(prometheus_installed: None) -> str:
    """Absolute path of ``promtool``."""
    path = shutil.which("promtool")
    assert path is not None
    return path
