"""Work of a revoked partition must not outlive the revocation.

While the platform fails, the first instance keeps retrying the first swap of each device. A
second instance joins; the partitions that move are redone there, and each device's second swap
follows. When the platform recovers, a retry still running on the old owner must not apply an
older key after the newer one: every device ends with the key of its latest swap.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.faults.conftest import FaultKit
from tests.support.accounting import produce_inputs
from tests.support.events import swap_event
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DEVICES = 30
RETRYING: dict[str, Any] = {"max_attempts": 100, "retry_backoff_max_seconds": 0.5}


@pytest.mark.timeout(240)
async def test_an_old_owner_does_not_apply_an_older_swap_after_a_rebalance(
    fault_kit: FaultKit, process_logs: None
) -> None:
    control = fault_kit.control
    devices = await fault_kit.seed(DEVICES, prefix="rv")
    await control.inject_error(500, "50252", operation="refresh_key", times=-1)
    first = fault_kit.process(instance="z0", max_concurrency=64, **RETRYING)
    second = fault_kit.process(instance="z1", max_concurrency=64, **RETRYING)
    reader = await fault_kit.start_reader()
    await first.start_ready()
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]], Any]] = []
    for n in (1, 2):
        for d in devices:
            event_id = str(uuid.uuid4())
            records.append(
                (d.encode(), swap_event(d, f"{d}-n{n}", event_id=event_id), [], (event_id, d, None))
            )
    inputs = await produce_inputs(
        fault_kit.harness.bootstrap, fault_kit.harness.topics.device_swapped, records
    )

    async def puts_at_least(count: int) -> bool:
        return len(await control.calls(operation="refresh_key")) >= count

    await wait_until(lambda: puts_at_least(2 * DEVICES), 30, "the first owner retrying")
    await second.start_ready()  # a rebalance: partitions move while their work is retrying
    seen = len(await control.calls(operation="refresh_key"))
    await wait_until(lambda: puts_at_least(seen + 2 * DEVICES), 30, "both instances retrying")
    await control.clear_faults()

    await reader.wait_for(len(inputs), timeout=120)
    accounting = await fault_kit.finish("revoked-work", inputs, check_devices=False)
    accounting.assert_clean()
    late = []
    for d in devices:
        history = [h["node_id"] for h in (await control.device(d))["history"]]
        if history[-1] != f"{d}-n2" or f"{d}-n1" in history[history.index(f"{d}-n2") :]:
            late.append((d, history))
    print(f"\nrevoked-work: {len(late)} of {DEVICES} devices got an older key after a newer one")
    assert not late, f"older swaps applied after newer ones: {late[:5]}"
