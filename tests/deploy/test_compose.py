"""deploy/compose/compose.yaml: checked by `docker compose config` when a Compose v2 is here, and
for the things the stack depends on in any case."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import TopicSettings
from tests.deploy.helpers import COMPOSE_FILE, REPO, tools_bin


def compose_command() -> list[str] | None:
    """`docker compose` (the CLI plugin), else a standalone Compose v2 in $TOOLS_BIN or on PATH."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    standalones = (tools_bin() / "docker-compose", shutil.which("docker-compose"))
    candidates += [[str(s)] for s in standalones if s and Path(s).exists()]
    for command in candidates:
        probe = subprocess.run(
            [*command, "version"], capture_output=True, text=True, timeout=30, check=False
        )
        if probe.returncode == 0 and "version 1." not in probe.stdout:
            return command
    return None


def test_compose_config_is_valid() -> None:
    command = compose_command()
    if command is None:  # no compose plugin here: build the standalone one (cached)
        subprocess.run(
            ["bash", str(REPO / "scripts" / "install-compose.sh")], check=True, timeout=1200
        )
        command = compose_command()
    assert command is not None, "scripts/install-compose.sh did not give a Compose v2"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def test_stack_has_kafka_simulator_and_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    kafka_env = services["kafka"]["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft, single node"
    assert kafka_env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    simulator = "\n".join(services["simulator"]["command"])
    assert "python -m tests.simulator --host 0.0.0.0 --port 8081 --seed-demo" in simulator
    app = services["device-rebind"]
    context = (COMPOSE_FILE.parent / app["build"]["context"]).resolve()
    assert context == REPO
    assert (context / app["build"]["dockerfile"]).is_file()
    env = app["environment"]
    for name in ("BOOTSTRAP_SERVERS",):
        assert env[f"REBIND_KAFKA__{name}"] == "kafka:9092"
    assert env["REBIND_PLATFORM__BASE_URL"] == "http://simulator:8081"
    assert {"REBIND_PLATFORM__APP_ID", "REBIND_PLATFORM__SECRET"} <= set(env)
    assert app["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert app["read_only"] is True
    assert app["cap_drop"] == ["ALL"]


# Settings the service still accepts but no longer uses: their topics are not created.
UNUSED_TOPICS = {"retry"}


def init_script(compose: dict[str, Any]) -> str:
    return "\n".join(compose["services"]["kafka-init"]["command"])


def create_line(script: str, topic: str) -> str:
    """The `create <topic> ...` command, continuation lines joined."""
    joined = script.replace("\\\n", " ")
    (line,) = [ln for ln in joined.splitlines() if ln.strip().startswith(f"create {topic} ")]
    return " ".join(line.split())


def test_every_topic_of_the_service_is_created(compose: dict[str, Any]) -> None:
    script = init_script(compose)
    for name, field in TopicSettings.model_fields.items():
        if name in UNUSED_TOPICS:
            assert str(field.default) not in script, f"topic {name} is no longer used"
            continue
        assert str(field.default) in script, f"topic {name} ({field.default}) is not created"


def test_ledger_and_dedupe_are_co_partitioned_with_the_input(compose: dict[str, Any]) -> None:
    script = init_script(compose)
    topics = TopicSettings()
    # the partition count is read back from the input topic, whatever created it
    assert f"input={topics.device_swapped}" in script
    assert 'partitions=$$(kafka_topics --describe --topic "$$input"' in script
    ledger = create_line(script, topics.ledger)
    assert '--partitions "$$partitions"' in ledger
    assert "--config cleanup.policy=compact" in ledger
    assert "delete" not in ledger, "the ledger is compacted, never deleted from"
    assert "retention" not in ledger
    dedupe = create_line(script, topics.dedupe)
    assert '--partitions "$$partitions"' in dedupe
    assert "--config cleanup.policy=compact,delete" in dedupe
    token = create_line(script, topics.token)
    assert "--partitions 1 --config cleanup.policy=compact" in token
