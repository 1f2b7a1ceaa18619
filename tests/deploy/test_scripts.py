"""The project's install scripts."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy.helpers import REPO

SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_is_clean(script: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


@pytest.mark.helm
def test_install_helm_is_idempotent(helm: Path) -> None:
    """Once built (by the helm fixture), a second run is a no-op that says so."""
    start = time.monotonic()
    result = subprocess.run(
        [str(REPO / "scripts" / "install-helm.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "already at" in result.stderr
    assert time.monotonic() - start < 10
    version = subprocess.run(
        [str(helm), "version", "--template", "{{.Version}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.startswith("v3.")
