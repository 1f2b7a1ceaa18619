"""The consumer group grows from one to three instances and shrinks back, during a run.

Every change is a rebalance: revoked partitions must settle their work (finish and commit, or
leave it uncommitted for the next owner), so the accounting shows nothing lost or doubled.
"""

from __future__ import annotations

import random

import pytest

from tests.faults.conftest import FaultKit

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SWAPS = 1200


@pytest.mark.timeout(300)
async def test_group_grows_to_three_and_shrinks_back(
    fault_kit: FaultKit, process_logs: None
) -> None:
    rng = random.Random()
    devices = await fault_kit.seed(SWAPS)
    await fault_kit.control.inject_latency(0.15, operation="refresh_key", times=-1)
    reader = await fault_kit.start_reader()
    members = [fault_kit.process(instance=f"g{i}", max_concurrency=8) for i in range(3)]
    first, second, third = members
    await first.start_ready()
    inputs = await fault_kit.produce_swaps(devices)

    steps: list[int] = []
    # The moments of the four changes: random shares of the run, in order.
    moments = iter(int(SWAPS * (s + rng.uniform(-0.04, 0.04))) for s in (0.1, 0.3, 0.5, 0.7))

    async def next_moment() -> None:
        await reader.wait_for(next(moments), timeout=120)
        steps.append(reader.count)

    await next_moment()
    await second.start_ready()
    await next_moment()
    await third.start_ready()
    await next_moment()
    code3, took3 = await third.terminate()
    await next_moment()
    code2, took2 = await second.terminate()
    print(
        f"\ngroup: changes after {steps} committed outcomes; "
        f"members left in {took3:.1f}s and {took2:.1f}s"
    )
    assert (code3, code2) == (0, 0)
    assigned = [m.log_text().count('"partitions_assigned"') for m in members]
    assert all(assigned), f"every member took part: {assigned}"

    await reader.wait_for(len(inputs), timeout=180)
    accounting = await fault_kit.finish("group-1-3-1", inputs)
    assert steps[-1] < len(inputs), "the group changed only after all the work was done"
    accounting.assert_clean()
