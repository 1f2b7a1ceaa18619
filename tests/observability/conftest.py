"""Fixtures for the observability tests: ``promtool`` next to the ``prometheus`` binary that
``tests.fixtures.prometheus`` installs when it is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO_ROOT / "deploy" / "observability"


@pytest.fixture(scope="session")
def prometheus_installed(prometheus_binary: str) -> None:
    """``promtool`` and ``prometheus`` are on PATH (installed by the project's script if not)."""


@pytest.fixture(scope="session")
def promtool(prometheus_installed: None) -> str:
    """Absolute path of ``promtool``."""
    path = shutil.which("promtool")
    assert path is not None
    return path
