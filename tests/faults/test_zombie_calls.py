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

A frozen process is usually stopped by its budget lease as well (no publication acknowledged
while frozen: its grants wait when it wakes, until the revocation cancels them), so the first
test passes even without the call guard. The second isolates the guard: a member *cut off from
its group coordinator* (its heartbeats get no answer; everything else, the budget exchange
included, still works) while its swaps retry. Its loop runs, its budget lease stays valid, and
the group gives its partitions to a second member after the session timeout; without the guard
its retries kept reaching the platform meanwhile (a call every retry interval per swap). Printed::

    ZOMBIE cut: N swaps retrying; calls by the cut-off member after the takeover: 0 ...
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from service.app import Service
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


class HeartbeatCut:
    """The member's heartbeats get no answer while the cut lasts: it cannot learn that the group
    dropped it (aiokafka's heartbeat routine is what notices a lost session), while its event
    loop, its fetches and its budget exchange go on. Wraps the coordinator's private
    ``_do_heartbeat`` (as ``service.kafka.on_heartbeat`` does): a heartbeat waits for the end of
    the cut, then is sent (and answered: unknown member, rejoin)."""

    def __init__(self, service: Service) -> None:
        coordinator = getattr(service.pipeline, "_consumer")._coordinator  # noqa: B009
        original = coordinator._do_heartbeat
        self._open = asyncio.Event()
        self._open.set()

        async def heartbeat() -> bool:
            await self._open.wait()
            return bool(await original())

        coordinator._do_heartbeat = heartbeat

    def cut(self) -> None:
        self._open.clear()

    def restore(self) -> None:
        self._open.set()


@pytest.mark.timeout(300)
async def test_a_member_cut_off_from_its_group_calls_nothing_after_the_takeover(
    fault_kit: FaultKit,
) -> None:
    control = fault_kit.control
    harness = fault_kit.harness
    devices = await fault_kit.seed(SWAPS // 4, prefix="zc")
    await control.inject_error(500, "50252", operation="refresh_key", times=-1)
    reader = await fault_kit.start_reader()
    zombie = await fault_kit.start_in_process(instance="zc0", **RETRYING)
    heartbeats = HeartbeatCut(zombie.service)
    inputs = await fault_kit.produce_swaps(devices)
    zombie_id = zombie.service.settings.kafka.instance_id

    def by_zombie(call: dict[str, object]) -> bool:
        return str(call.get("user_agent") or "").endswith(f"({zombie_id})")

    async def zombie_retrying() -> bool:
        calls = [c for c in await control.calls(operation="refresh_key") if by_zombie(c)]
        slots = int(RETRYING["max_concurrency"])
        return len({c["device_id"] for c in calls}) >= slots and len(calls) >= 2 * slots

    await wait_until(zombie_retrying, 60, "the first member retrying its swaps")
    partitions = zombie.service.pipeline.group_assignment()
    retrying = len(
        {c["device_id"] for c in await control.calls(operation="refresh_key") if by_zombie(c)}
    )
    heartbeats.cut()

    successor = await fault_kit.start_in_process(instance="zc1", **RETRYING)

    async def taken_over() -> bool:
        owns = successor.service.pipeline.group_assignment() == partitions
        return owns and await stable_with(harness.bootstrap, harness.group_id, 1)

    await wait_until(taken_over, 60, "the second member owning every partition alone")
    takeover_seq = max(c["seq"] for c in await control.calls())
    lease_valid = not zombie.service.budget.lease_expired()
    # The platform recovers; the zombie's retries are due every 2 s from now on.
    await control.clear_faults()
    await reader.wait_answered(inputs, timeout=120)  # the successor answered every swap
    answered_seq = max(c["seq"] for c in await control.calls())
    cut_calls = [
        c
        for c in await control.calls(since=takeover_seq)
        if by_zombie(c) and c["seq"] <= answered_seq
    ]
    heartbeats.restore()
    await wait_until(
        lambda: stable_with(harness.bootstrap, harness.group_id, 2),
        90,
        "the cut-off member to rejoin",
    )
    after = [c for c in await control.calls(since=takeover_seq) if by_zombie(c)]
    accounting = await fault_kit.finish("zombie-cut", inputs)
    print(
        f"\nZOMBIE cut: {retrying} swaps retrying; calls by the cut-off member after the "
        f"takeover: {len(cut_calls)} (until it rejoined: {len(after)}, "
        f"{sorted({str(c['operation']) for c in after})}); its budget lease valid at the "
        f"takeover: {lease_valid}; " + accounting.line(),
        flush=True,
    )
    assert not cut_calls, f"the cut-off member called the platform {len(cut_calls)} times"
    assert not after
    accounting.assert_clean()
