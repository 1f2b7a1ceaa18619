"""The platform is unreachable (connection refused), then answers 500s, then comes back.

Retry settings make events wait rather than fail: ``max_attempts`` is high and the backoff is
capped at 0.5 s, so an outage of several seconds stays well inside the attempts. Every input must
end in ``credential-updated``; none is ``rebind-failed``.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from tests.faults.conftest import FaultKit
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SWAPS = 1000
FAULTED_CALLS = 150  # calls the service makes into each phase of the outage before it ends


async def _faulted_calls(fault_kit: FaultKit, action: str, since: int) -> int:
    calls: list[dict[str, Any]] = await fault_kit.control.calls(since=since)
    return sum(1 for c in calls if c["fault"] == action)


async def _wait_faulted(fault_kit: FaultKit, action: str, since: int) -> None:
    async def enough() -> bool:
        return await _faulted_calls(fault_kit, action, since) >= FAULTED_CALLS

    await wait_until(enough, 60, f"{FAULTED_CALLS} calls answered with {action!r}")


@pytest.mark.timeout(300)
async def test_platform_outage_events_wait_and_all_succeed(
    fault_kit: FaultKit, process_logs: None
) -> None:
    rng = random.Random()
    control = fault_kit.control
    devices = await fault_kit.seed(SWAPS)
    await control.inject_latency(0.05, operation="refresh_key", times=-1)
    service = fault_kit.process(
        instance="d0",
        max_concurrency=16,
        max_attempts=100,
        retry_backoff_initial_seconds=0.05,
        retry_backoff_max_seconds=0.5,
    )
    reader = await fault_kit.start_reader()
    await service.start_ready()
    inputs = await fault_kit.produce_swaps(devices)

    await reader.wait_for(rng.randint(SWAPS // 10, SWAPS // 4), timeout=120)
    before = reader.count
    started = time.monotonic()
    # Phase 1: connection refused for every operation (login included).
    await control.clear_faults()
    since = len(await control.calls())
    await control.inject_refuse(times=-1)
    await _wait_faulted(fault_kit, "refuse", since)
    # Phase 2: the platform answers, with 500 / 50252 to everything.
    await control.clear_faults()
    since = len(await control.calls())
    await control.inject_error(500, "50252", times=-1)
    await _wait_faulted(fault_kit, "error", since)
    during = reader.count
    await control.clear_faults()
    outage = time.monotonic() - started
    print(
        f"\nplatform-down: outage of {outage:.1f}s began after {before} outcomes; "
        f"{during - before} outcomes committed during it"
    )

    await reader.wait_for(len(inputs), timeout=180)
    accounting = await fault_kit.finish("platform-down", inputs)
    accounting.assert_clean()
    # Events waited rather than failed: every outcome is a success.
    assert accounting.details["by_topic"] == {"iot.credential-updated.v1": SWAPS}
