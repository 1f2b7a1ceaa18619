"""SIGKILL at random moments: the restarted process (same instance id) loses nothing."""

from __future__ import annotations

import asyncio
import random
import signal

import pytest

from tests.faults.conftest import FaultKit
from tests.fixtures.service import Harness
from tests.support import clock
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SWAPS = 1200
KILLS = 3


@pytest.fixture(autouse=True)
async def platform_clock(harness: Harness) -> float:
    """Each restart after a SIGKILL (and the frozen zombie's replacement) waits one window for
    the killed process's share to age out; nothing here measures the window, so in CI it is the
    short one (``clock.WAIT_WINDOW_SECONDS``), 60 s under soak."""
    return await clock.apply(harness, clock.window(clock.WAIT_WINDOW_SECONDS))


@pytest.mark.timeout(300)
async def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    fault_kit: FaultKit, process_logs: None
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"\nsigkill: random seed {seed}")
    devices = await fault_kit.seed(SWAPS)
    # Some platform latency so the run is long enough to be interrupted in the middle.
    await fault_kit.control.inject_latency(0.05, operation="refresh_key", times=-1)
    service = fault_kit.process(instance="k0", max_concurrency=32)
    reader = await fault_kit.start_reader()
    await service.start_ready()
    inputs = await fault_kit.produce_swaps(devices)

    killed_at: list[int] = []
    for k in range(KILLS):
        # The kill moment: after a random share of the outcomes is committed, plus a random
        # short delay (it picks the moment; nothing waits on it).
        share = (k + 1) / (KILLS + 1) + rng.uniform(-0.08, 0.08)
        await reader.wait_for(int(SWAPS * share * 0.8), timeout=120)
        await asyncio.sleep(rng.uniform(0.0, 0.4))
        await service.kill()
        killed_at.append(reader.count)
        print(f"sigkill: kill #{k + 1} after {reader.count} committed outcomes")
        await service.start_ready()

    await reader.wait_for(len(inputs), timeout=180)
    accounting = await fault_kit.finish("sigkill", inputs)
    print(f"sigkill: kills at committed={killed_at}, starts={service.starts}")
    assert killed_at[0] < len(inputs), "the first kill came after all the work was done"
    accounting.assert_clean()


@pytest.mark.timeout(300)
async def test_a_frozen_zombie_is_fenced_by_its_replacement(
    fault_kit: FaultKit, process_logs: None
) -> None:
    """SIGSTOP freezes the process mid-run (a zombie: alive, with work and a transaction open);
    a replacement with the same instance id takes its partitions and, by initialising their
    transactional ids, fences it. Woken up, the zombie's transactions fail ("fenced"): it drops
    those partitions and commits nothing; it may rejoin the group as an ordinary member."""
    devices = await fault_kit.seed(SWAPS // 2)
    await fault_kit.control.inject_latency(0.05, operation="refresh_key", times=-1)
    zombie = fault_kit.process(instance="f0", max_concurrency=32)
    replacement = fault_kit.process(instance="f0", max_concurrency=32)
    reader = await fault_kit.start_reader()
    await zombie.start_ready()
    inputs = await fault_kit.produce_swaps(devices)
    await reader.wait_for(len(inputs) // 4, timeout=120)
    zombie.signal(signal.SIGSTOP)
    frozen_at = reader.count
    await replacement.start_ready()
    # The replacement waits for the group to drop the frozen member (its session timeout), and
    # its budget counts what the frozen one may have spent in the last minute.
    await reader.wait_for(frozen_at + 50, timeout=150)
    zombie.signal(signal.SIGCONT)

    async def fenced() -> bool:
        return "fenced" in zombie.log_text()

    await wait_until(fenced, timeout=60, what="the woken zombie finds itself fenced")
    print(f"\nzombie: frozen after {frozen_at} outcomes; woken, its transactions were fenced")

    await reader.wait_for(len(inputs), timeout=120)
    accounting = await fault_kit.finish("zombie-fenced", inputs)
    accounting.assert_clean()
