"""The container image, really built from the Dockerfile and run (no Docker engine needed).

``scripts/build-image.sh`` (``make image``) builds the real Dockerfile with ``buildah bud
--isolation chroot`` on a local Debian bookworm + Python 3.11 base (``scripts/build-base-image.sh``,
mmdebstrap) from a hash-checked wheelhouse; layers are cached, so a rebuild after a code change
takes seconds. Commands run in the image with ``buildah run --isolation chroot --user 10001``,
on the host's network: the service from the image meets the test broker and the simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.helpers import APP_UID, REPO
from tests.fixtures.service import Harness
from tests.support.events import fresh_swap_event

pytestmark = [pytest.mark.image, pytest.mark.integration]

BUILD = REPO / "scripts" / "build-image.sh"


@pytest.fixture(scope="module")
def image() -> str:
    """The image built from the Dockerfile (cached layers make a rebuild quick)."""
    if os.geteuid() != 0 and shutil.which("buildah") is None:
        pytest.fail("building the image needs buildah (apt-get install buildah mmdebstrap)")
    result = subprocess.run(
        ["bash", str(BUILD)], capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    name, _size = result.stdout.strip().splitlines()[-2:]
    return name


@contextlib.contextmanager
def container(image: str) -> Iterator[str]:
    ctr = subprocess.run(
        ["buildah", "from", "--quiet", image], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield ctr
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False)


def run_in(ctr: str, *command: str, env: dict[str, str] | None = None) -> list[str]:
    """``buildah run`` as the image's user (UID 10001) on the host network."""
    pairs = [f"{k}={v}" for k, v in (env or {}).items()]
    return [
        "buildah", "run", "--isolation", "chroot", "--user", str(APP_UID), ctr, "--",
        "env", *pairs, *command,
    ]  # fmt: skip


def test_the_image_size_is_reported(image: str, capsys: pytest.CaptureFixture[str]) -> None:
    size = subprocess.run(
        ["buildah", "images", "--format", "{{.Size}}", image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")[0]
    with capsys.disabled():
        print(f"\n[image] {image}: {size}")
    number, unit = re.fullmatch(r"([\d.]+) ([kMG]B)", size.strip()).groups()  # type: ignore[union-attr]
    megabytes = float(number) * {"kB": 1e-3, "MB": 1, "GB": 1e3}[unit]
    assert megabytes < 400, f"the image grew to {size}"


def test_version_and_check_config_run_as_uid_10001(image: str) -> None:
    with container(image) as ctr:
        version = subprocess.run(
            run_in(ctr, "device-rebind", "--version"), capture_output=True, text=True, check=False
        )
        assert version.returncode == 0, version.stderr
        assert re.fullmatch(r"device-rebind \d+\.\d+\.\d+", version.stdout.strip())
        whoami = subprocess.run(run_in(ctr, "id", "-u"), capture_output=True, text=True, check=True)
        assert whoami.stdout.strip() == str(APP_UID)
        env = {
            "REBIND_PLATFORM__BASE_URL": "https://iot.example.com:8743",
            "REBIND_PLATFORM__APP_ID": "app-in-image",
            "REBIND_PLATFORM__SECRET": "s3cret-in-image\n",
            "REBIND_HTTP__PORT": "0",
        }
        check = subprocess.run(
            run_in(ctr, "device-rebind", "check-config", env=env),
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, check.stderr
        assert "REBIND_PLATFORM__APP_ID=app-in-image" in check.stdout
        assert "REBIND_PLATFORM__SECRET=**********" in check.stdout
        assert "s3cret" not in check.stdout
        # A file the image's user cannot read is one line naming the variable.
        bad = subprocess.run(
            run_in(
                ctr,
                "device-rebind",
                "check-config",
                env={**env, "REBIND_PLATFORM__CA_BUNDLE": "/etc/shadow"},
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        assert bad.returncode == 2
        # (buildah adds its own "subprocess exited with status 2" lines)
        ours = [line for line in bad.stderr.splitlines() if not _buildah_says(line)]
        assert ours == [
            "device-rebind: invalid configuration: REBIND_PLATFORM__CA_BUNDLE: cannot read "
            "/etc/shadow: Permission denied"
        ]


def _buildah_says(line: str) -> bool:
    return line.startswith(("subprocess exited", "Error: exit status"))


async def test_the_service_from_the_image_processes_a_swap(
    image: str, harness: Harness, tmp_path: Path
) -> None:
    await harness.sim.control.seed_device("dev-image", "old-image")
    topics = harness.topics
    env = {
        "REBIND_KAFKA__BOOTSTRAP_SERVERS": harness.bootstrap,
        "REBIND_KAFKA__GROUP_ID": harness.group_id,
        "REBIND_KAFKA__SESSION_TIMEOUT_MS": "10000",
        "REBIND_KAFKA__CONNECT_BACKOFF_MAX_SECONDS": "2",
        "REBIND_TOPICS__DEVICE_SWAPPED": topics.device_swapped,
        "REBIND_TOPICS__CREDENTIAL_UPDATED": topics.credential_updated,
        "REBIND_TOPICS__REBIND_FAILED": topics.rebind_failed,
        "REBIND_TOPICS__DEAD_LETTER": topics.dead_letter,
        "REBIND_TOPICS__LEDGER": topics.ledger,
        "REBIND_TOPICS__DEDUPE": topics.dedupe,
        "REBIND_PLATFORM__BASE_URL": harness.sim.url,
        "REBIND_PLATFORM__APP_ID": harness.sim.app_id,
        "REBIND_PLATFORM__SECRET": harness.sim.secret,
        "REBIND_HTTP__HOST": "127.0.0.1",
        "REBIND_HTTP__PORT": "0",
    }
    log_path = tmp_path / "service-in-image.log"
    with container(image) as ctr, log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *run_in(ctr, "device-rebind", "run", env=env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await harness.produce([(b"dev-image", fresh_swap_event("dev-image", "new-image"))])
            [out] = await harness.read(1, timeout=120)
        finally:
            if process.returncode is None:
                process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 30)
            if process.returncode is None:
                process.kill()
                await process.wait()
    logs = log_path.read_text(errors="replace")
    assert out.topic == topics.credential_updated, logs[-3000:]
    assert out.data["deviceId"] == "dev-image"
    assert out.data["nodeId"] == "new-image"
    assert (await harness.sim.control.device("dev-image"))["node_id"] == "new-image"
    assert '"event":"credential_updated"' in logs
    assert '"event":"ops_port_listening"' in logs
