"""A real Prometheus scrapes the running service and sees the platform's flow control (1010009)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.fixtures.prometheus import PrometheusFactory
from tests.fixtures.service import Harness
from tests.support.events import swap_event
from tests.support.prometheus import PrometheusServer, Result
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SIMULATOR_LIMIT = 3  # the platform allows 3 calls a minute; the service believes 100 000
SCRAPE_DEADLINE = 60.0


async def test_prometheus_sees_throttle_rejections(
    harness: Harness,
    prometheus_for: PrometheusFactory,
) -> None:
    control = harness.sim.control
    devices = [f"dev-prom-{i}" for i in range(6)]
    for device in devices:
        await control.seed_device(device, f"old-{device}")
    service = await harness.start_service()
    await control.configure(rate_limit_per_minute=SIMULATOR_LIMIT)
    # PrometheusServer is synchronous: keep the service's event loop free while it starts.
    prom: PrometheusServer = await asyncio.to_thread(
        prometheus_for, [f"127.0.0.1:{service.ops.port}"]
    )
    await wait_until(
        lambda: asyncio.to_thread(prom.query_value, 'up{job="device-rebind"}'),
        SCRAPE_DEADLINE,
        "prometheus scraping the service",
    )

    await harness.produce(
        [(d.encode(), swap_event(d, f"new-{d}", event_id=f"evt-prom-{d}")) for d in devices]
    )

    expr = "rebind_platform_throttle_rejections_total > 0"

    async def throttled() -> list[Result]:
        return await asyncio.to_thread(prom.query, expr)

    result = await wait_until(throttled, SCRAPE_DEADLINE, f"prometheus: {expr}")
    print(f"\nquery {expr!r} ->\n{json.dumps(result, indent=2)}")
    assert {r["metric"]["operation"] for r in result} <= {"refresh_device_key", "login"}
    assert all(float(r["value"][1]) > 0 for r in result)
    assert all(r["metric"]["job"] == "device-rebind" for r in result)
    assert (await control.flow())["rejected"]  # the simulator really did reject calls

    # let the rest through so the service drains quickly at teardown
    await control.configure(rate_limit_per_minute=100_000)
