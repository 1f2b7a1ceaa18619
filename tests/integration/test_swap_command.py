"""Issue 23: ``device-rebind swap`` on a real broker, with the service running against the
simulator: the command prints the event id, and with ``--wait`` the outcome when it arrives."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import uuid
from pathlib import Path

import pytest

from tests.fixtures.service import Harness
from tests.integration.test_lanes_e2e import with_urgent_lane

pytestmark = [pytest.mark.integration]

CLI = Path(sys.executable).with_name("device-rebind")


def _env(harness: Harness) -> dict[str, str]:
    """The command's environment: this test's broker and topics, nothing else of REBIND_."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBIND_")}
    env["REBIND_KAFKA__BOOTSTRAP_SERVERS"] = harness.bootstrap
    for name, value in harness.topic_settings().model_dump().items():
        env[f"REBIND_TOPICS__{name.upper()}"] = value
    return env


async def _swap(harness: Harness, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(CLI),
        "swap",
        *args,
        env=_env(harness),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_swap_raised_by_hand_is_answered_and_its_outcome_printed(harness: Harness) -> None:
    urgent_topic = await with_urgent_lane(harness)
    control = harness.sim.control
    await control.seed_devices([{"device_id": "dev-cli", "node_id": "old-cli"}])
    await harness.start_service()

    code, out, err = await _swap(
        harness, "dev-cli", "node-cli", "--verify-code", "vc-1", "--urgent", "--wait", "60"
    )
    print(out, err)
    assert code == 0, err
    first, second = out.splitlines()[:2]
    event_id = first.split("\t")[0]
    assert uuid.UUID(event_id)
    assert f"urgent swap of dev-cli sent to {urgent_topic} partition" in first
    assert second == "credential-updated: device dev-cli re-keyed to nodeId node-cli"
    device = await control.device("dev-cli")
    assert device["node_id"] == "node-cli"

    # an unknown device: the outcome is rebind-failed, exit 3; on the bulk lane this time
    code, out, err = await _swap(harness, "dev-unknown", "node-x", "--wait", "60")
    print(out, err)
    assert code == 3, err
    assert f"sent to {harness.topics.device_swapped} partition" in out
    assert re.search(r"^rebind-failed: 100403 ", out, re.M), out


async def test_an_invalid_swap_is_refused_before_anything_is_sent(harness: Harness) -> None:
    code, out, err = await _swap(harness, "dev/1", "node-1")
    assert code == 2
    assert out == ""
    assert "invalid event (invalid_device_id)" in err
    code, out, err = await _swap(harness, "dev-1", "node-1", "--timeout", "-5")
    assert (code, out) == (2, "")
    assert "data.timeout" in err
