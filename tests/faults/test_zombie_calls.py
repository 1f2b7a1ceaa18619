"""A member frozen past its session timeout makes no platform call when it wakes (issue 19,
item 6): only the partition's owner calls.

The first replica works swaps that the platform keeps answering with a transient error (50252),
so its jobs sleep between retries. It is frozen (SIGSTOP) while they do; after its session timeout
the group drops it and a second replica takes every partition, the platform recovers, and the
second replica answers every swap. Then the first is woken (SIGCONT): the timers of its retries
have all run out, and before the fix every one of them went to the platform at once, although
another member owned the partitions. Every call is attributed by its User-Agent (it names the
replica). Printed::

    ZOMBIE calls: frozen with N swaps retrying; calls by the woken member: 0 ...
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.faults.conftest import FaultKit
from tests.support.group import stable_with
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SWAPS = 60
RETRYING: dict[str, Any] = {
    "max_attempts": 100,
    "retry_backoff_initial_seconds": 2.0,
    "retry_backoff_max_seconds": 2.0,
    "inline_backoff_max_seconds": 5.0,  # the retries sleep inside their jobs
    "max_concurrency": 8,
}


@pytest.mark.timeout(300)
async def test_a_member_frozen_while_its_swaps_retry_calls_nothing_when_it_wakes(
    fault_kit: FaultKit, process_logs: None
) -> None:
    control = fault_kit.control
    harness = fault_kit.harness
    devices = await fault_kit.seed(SWAPS, prefix="zz")
    await control.inject_error(500, "50252", operation="refresh_key", times=-1)
    zombie = fault_kit.process(instance="zz0", **RETRYING)
    successor = fault_kit.process(instance="zz1", **RETRYING)
    reader = await fault_kit.start_reader()
    await zombie.start_ready()
    inputs = await fault_kit.produce_swaps(devices)

    def by_zombie(call: dict[str, object]) -> bool:
        return str(call.get("user_agent") or "").endswith(f"({zombie.instance_id})")

    async def zombie_retrying() -> bool:
        calls = [c for c in await control.calls(operation="refresh_key") if by_zombie(c)]
        slots = int(RETRYING["max_concurrency"])
        return len({c["device_id"] for c in calls}) >= slots and len(calls) >= 2 * slots

    await wait_until(zombie_retrying, 60, "the first replica retrying its swaps")
    zombie.signal(signal.SIGSTOP)
    frozen_seq = max(c["seq"] for c in await control.calls())
    retrying = len(
        {c["device_id"] for c in await control.calls(operation="refresh_key") if by_zombie(c)}
    )

    await successor.start_ready()

    await wait_until(
        lambda: stable_with(harness.bootstrap, harness.group_id, 1),
        60,
        "the group without the frozen member",
    )
    await control.clear_faults()
    await reader.wait_answered(inputs, timeout=120)  # the successor answered every swap

    woke_seq = max(c["seq"] for c in await control.calls())
    zombie.signal(signal.SIGCONT)

    async def zombie_settled() -> bool:
        if not zombie.running():
            return True
        return await stable_with(harness.bootstrap, harness.group_id, 2)

    await wait_until(zombie_settled, 90, "the woken member to rejoin (or exit)")
    after_wake = [c for c in await control.calls(since=woke_seq) if by_zombie(c)]
    during_freeze = [
        c for c in await control.calls(since=frozen_seq) if by_zombie(c) and c["seq"] <= woke_seq
    ]
    accounting = await fault_kit.finish("zombie-calls", inputs)
    print(
        f"\nZOMBIE calls: frozen with {retrying} swaps retrying; calls by the woken member: "
        f"{len(after_wake)} ({sorted({str(c['operation']) for c in after_wake})}); while "
        f"frozen: {len(during_freeze)}; " + accounting.line(),
        flush=True,
    )
    assert not during_freeze
    assert not after_wake, f"the woken member called the platform {len(after_wake)} times"
    accounting.assert_clean()
