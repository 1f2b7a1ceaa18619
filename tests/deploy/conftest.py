"""Fixtures of the deployment tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.helpers import helm_binary


@pytest.fixture(scope="session")
def helm() -> Path:
    """helm from <repo>/.cache/bin (or $TOOLS_BIN), built by scripts/install-helm.sh if missing."""
    return helm_binary()
