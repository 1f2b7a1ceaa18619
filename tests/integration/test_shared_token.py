"""One token holder for several replicas: real broker, simulator, three in-process services.

The simulator issues short-lived tokens (8 s, renewed 3 s ahead), so a 30 s run spans several
token lifetimes. Only the holder (the owner of input partition 0) logs in or refreshes; the
others read the token from the (test-only) token topic.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from service.app import Service
from tests.fixtures.service import Harness
from tests.support.events import swap_event
from tests.support.token_topic import start_service, token_topic
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

TTL = 8
MARGIN = 3
REPLICAS = 3


async def _stop(harness: Harness, service: Service) -> None:
    for svc, task in harness._services:
        if svc is service:
            svc.stop()
            await asyncio.wait_for(task, 60)


async def _seed(harness: Harness, count: int, prefix: str) -> list[str]:
    devices = [f"{prefix}-{n:04d}" for n in range(count)]
    await harness.sim.control.seed_devices(
        [{"device_id": d, "node_id": f"old-{d}", "status": "OFFLINE"} for d in devices]
    )
    return devices


def _holders(services: list[Service]) -> list[str]:
    return [s.settings.kafka.instance_id for s in services if s.tokens.elected]


async def _one_holder(services: list[Service]) -> Service:
    await wait_until(
        lambda: len(_holders(services)) == 1, timeout=60, what="exactly one token holder"
    )
    return next(s for s in services if s.tokens.elected)


async def _swaps(harness: Harness, devices: list[str], batches: int, spacing: float) -> None:
    """Produce one swap per device, in ``batches`` spread ``spacing`` seconds apart."""
    size = -(-len(devices) // batches)
    for start in range(0, len(devices), size):
        chunk = devices[start : start + size]
        await harness.produce(
            [(d.encode(), swap_event(d, f"new-{d}", event_id=f"evt-{d}")) for d in chunk]
        )
        if start + size < len(devices):
            await asyncio.sleep(spacing)  # pacing the load, not synchronising


async def _all_updated(harness: Harness, devices: list[str], timeout: float) -> None:
    outs = await harness.read(len(devices), timeout=timeout)
    assert len(outs) == len(devices)
    assert {o.topic for o in outs} == {harness.topics.credential_updated}
    assert sorted(o.data["deviceId"] for o in outs) == sorted(devices)


def _figures(stats: dict[str, Any]) -> tuple[int, int, int]:
    return (
        int(stats["logins"]),
        int(stats["token_refreshes"]),
        int(stats["calls_by_result"].get("1010005", 0)),
    )


@pytest.mark.slow
async def test_three_replicas_share_one_token_over_several_lifetimes(harness: Harness) -> None:
    control = harness.sim.control
    await control.configure(token_ttl=TTL, rate_limit_per_minute=100_000)
    topic = await token_topic(harness)
    devices = await _seed(harness, 300, "dev")
    services = await asyncio.gather(
        *(
            start_service(harness, f"i{n}", topic, token_refresh_margin_seconds=MARGIN)
            for n in range(REPLICAS)
        )
    )
    await _one_holder(services)
    await wait_until(
        lambda: all(s.pipeline.assigned() for s in services), timeout=60, what="all assigned"
    )

    started = time.monotonic()
    await _swaps(harness, devices, batches=10, spacing=3.0)
    await _all_updated(harness, devices, timeout=90)
    elapsed = time.monotonic() - started

    stats = await control.stats()
    logins, refreshes, refused = _figures(stats)
    elections = sum(s.tokens.elections for s in services)
    takeovers = sum(s.tokens.takeovers for s in services)
    renewals_expected = elapsed / (TTL - MARGIN)
    puts = stats["calls_by_operation"].get("refresh_key", 0)
    print(
        f"\nshared token, {REPLICAS} replicas, ttl {TTL}s margin {MARGIN}s, {elapsed:.1f}s: "
        f"swaps={len(devices)} credential-updated={len(devices)} puts={puts} "
        f"logins={logins} refreshes={refreshes} 1010005={refused} "
        f"elections={elections} takeovers={takeovers} "
        f"expected renewals~{renewals_expected:.1f}"
    )
    holder_changes = elections - 1
    assert takeovers == 0
    assert 1 <= logins <= 1 + holder_changes
    # one renewal per (ttl - margin), give or take the start and the end of the run
    renewals = logins + refreshes
    assert renewals_expected - 2 <= renewals <= renewals_expected + 3
    # no storm: a refused token can only meet calls in flight at a renewal
    assert refused <= 3 * REPLICAS * renewals


async def test_holder_handover_reuses_the_token_without_a_login_storm(
    harness: Harness, capfd: pytest.CaptureFixture[str]
) -> None:
    control = harness.sim.control
    await control.configure(token_ttl=TTL, rate_limit_per_minute=100_000)
    topic = await token_topic(harness)
    first = await _seed(harness, 60, "first")
    services = list(
        await asyncio.gather(
            *(
                start_service(harness, f"i{n}", topic, token_refresh_margin_seconds=MARGIN)
                for n in range(REPLICAS)
            )
        )
    )
    holder = await _one_holder(services)
    await _swaps(harness, first, batches=1, spacing=0)
    await _all_updated(harness, first, timeout=60)
    before = _figures(await control.stats())

    await _stop(harness, holder)
    rest = [s for s in services if s is not holder]
    successor = await _one_holder(rest)
    second = await _seed(harness, 60, "second")
    await _swaps(harness, second, batches=2, spacing=2.0)
    outs = await harness.read(len(first) + len(second), timeout=60)
    assert {o.topic for o in outs} == {harness.topics.credential_updated}
    assert sorted(o.data["deviceId"] for o in outs) == sorted(first + second)
    # a whole token lifetime after the handover: the successor renews on its own
    await wait_until(
        lambda: successor.tokens.manager.refreshes + successor.tokens.manager.logins >= 1,
        timeout=3 * TTL,
        what="the new holder's first renewal",
    )

    logged = capfd.readouterr()
    assert "shared_token_published" in logged.out + logged.err  # the logs were captured
    for secret in (harness.sim.secret, "accessToken", "refreshToken", "Bearer"):
        assert secret not in logged.out + logged.err
    logins, refreshes, refused = _figures(await control.stats())
    with capfd.disabled():
        print(
            f"\nhandover: {holder.settings.kafka.instance_id} -> "
            f"{successor.settings.kafka.instance_id}: before logins={before[0]} "
            f"refreshes={before[1]} 1010005={before[2]}; after logins={logins} "
            f"refreshes={refreshes} 1010005={refused}; "
            f"successor logins={successor.tokens.manager.logins} "
            f"refreshes={successor.tokens.manager.refreshes}"
        )
    assert sum(s.tokens.takeovers for s in services) == 0
    assert successor.tokens.manager.logins == 0  # it adopted the token (and its refresh token)
    assert logins == before[0] == 1
    assert refused <= 3 * REPLICAS * (logins + refreshes)
