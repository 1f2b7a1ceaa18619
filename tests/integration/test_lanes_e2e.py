"""Issue 23: the urgent lane on a real broker, against the simulator's flow control.

A bulk backlog saturates the budget (the simulator enforces the same limit and window as the
service, on the suite's compressed clock); an urgent swap published in the middle of it is called
within seconds, not at the next window. Two devices are swapped in both lanes: whichever swap has
the later ``time`` wins, whatever lane it came by. Without the lane's headroom in the budget the
urgent call waits for the saturated window to free (most of a window); without its own pause the
urgent partition would wait behind the bulk buffer.
"""

from __future__ import annotations

import dataclasses
import time

import orjson
import pytest

from tests.fixtures.kafka import INPUT_PARTITIONS
from tests.fixtures.service import Harness
from tests.support import clock
from tests.support.events import swap_event
from tests.support.kafka_broker import create_topics
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 60
"""Calls per window, for the simulator and the service alike (4 calls/s on the 15 s window)."""
BULK = 150
"""Bulk swaps: two windows' budget and a half (the urgent swap is published in the second)."""
URGENT_WITHIN_SECONDS = 3.0
"""From the urgent swap's publication to its platform call: a few seconds (measured: < 1 s)."""


async def with_urgent_lane(harness: Harness) -> str:
    """Create this test's urgent lane, co-partitioned with its input, and name it in the
    harness's settings."""
    name = f"asset.device-swapped.urgent.v1.{harness.topics.device_swapped.rsplit('.', 1)[-1]}"
    await create_topics(harness.bootstrap, [name], {name: INPUT_PARTITIONS})
    harness.topics = dataclasses.replace(harness.topics, device_swapped_urgent=name)
    return name


async def test_an_urgent_swap_overtakes_a_saturating_bulk_backlog(harness: Harness) -> None:
    urgent_topic = await with_urgent_lane(harness)
    await clock.apply(harness)
    control = harness.sim.control
    await control.configure(rate_limit_per_minute=LIMIT)
    bulk = [f"dev-bulk-{i:04d}" for i in range(BULK)]
    both = ["dev-both-urgent-newer", "dev-both-bulk-newer"]
    await control.seed_devices(
        [{"device_id": d, "node_id": f"old-{d}"} for d in [*bulk, *both, "dev-urgent"]]
    )
    service = await harness.start_service(rate_limit_per_minute=LIMIT)
    assert service.pipeline.urgent_lane == urgent_topic

    early, late = "2026-11-25T09:30:00Z", "2026-11-25T09:31:00Z"
    await harness.produce(
        [(d.encode(), swap_event(d, f"bulk-{d}")) for d in bulk]
        + [
            (both[0].encode(), swap_event(both[0], f"bulk-{both[0]}", ce_time=early)),
            (both[1].encode(), swap_event(both[1], f"bulk-{both[1]}", ce_time=late)),
        ]
    )

    # The second window, saturated: the bulk lane leaves one call of each window free, but in
    # the first window after the start the login may take it (bulk grants taken while the token
    # was awaited are given back and taken anew after it).
    async def saturated() -> bool:
        return len(await control.calls(operation="refresh_key")) >= 2 * (LIMIT - 1) - 1

    await wait_until(
        saturated, timeout=clock.scaled(240), what="a second window's budget spent by bulk calls"
    )
    published = time.time()
    await harness.produce(
        [(b"dev-urgent", swap_event("dev-urgent", "urgent-dev-urgent"))], topic=urgent_topic
    )

    async def urgent_called() -> float:
        calls = await control.calls(operation="refresh_key", device_id="dev-urgent")
        return float(calls[0]["time"]) if calls else 0.0

    called_at = await wait_until(urgent_called, timeout=clock.scaled(120), what="the urgent call")
    calls = await control.calls(operation="refresh_key")
    bulk_calls = sum(1 for c in calls if c["time"] < called_at)
    waited = called_at - published
    # Then a device swapped in both lanes each way (the free call of the window is spent: these
    # wait for the next one; one urgent swap at a time is what the headroom is for).
    await harness.produce(
        [
            (both[0].encode(), swap_event(both[0], f"urgent-{both[0]}", ce_time=late)),
            (both[1].encode(), swap_event(both[1], f"urgent-{both[1]}", ce_time=early)),
        ],
        topic=urgent_topic,
    )
    outs = await harness.read(BULK + 5, timeout=clock.scaled(360) + 30)
    stats = (await control.stats())["apps"][harness.sim.app_id]
    failed = [orjson.loads(o.value or b"") for o in outs if o.topic == harness.topics.rebind_failed]
    print(
        f"\n[lanes] limit {LIMIT}/{clock.WINDOW_SECONDS:g}s, {BULK + 2} bulk swaps: the urgent "
        f"swap was called {waited:.2f} s after its publication ({bulk_calls} bulk calls made "
        f"by then); {len(outs)} outcomes, {len(failed)} rebind-failed "
        f"({sorted((f['data']['errorCode'], f['data']['nodeId']) for f in failed)}); busiest "
        f"window "
        f"{stats['max_calls_in_any_window']}/{LIMIT}, 1010009 answers {stats['throttled_calls']}"
    )
    assert waited <= URGENT_WITHIN_SECONDS, f"the urgent swap waited {waited:.1f} s"
    assert bulk_calls < BULK, "the urgent swap was called after the bulk backlog"
    assert len(outs) == BULK + 5
    # The older swap of each device in both lanes is either answered SUPERSEDED (the newer one
    # was read first) or called before the newer one (it was claimed before the newer one was
    # read: the bulk one of both[0] may be among the first calls, and the urgent one of both[1]
    # may overtake its bulk swap still waiting in the paused backlog). Never the newer first.
    superseded = {f["data"]["deviceId"]: f["data"]["nodeId"] for f in failed}
    assert all(f["data"]["errorCode"] == "SUPERSEDED" for f in failed)
    assert set(superseded) <= set(both)
    orders = {both[0]: ("bulk", "urgent"), both[1]: ("urgent", "bulk")}
    for device, (older_lane, newer_lane) in orders.items():
        older, newer = f"{older_lane}-{device}", f"{newer_lane}-{device}"
        sent = [
            c["body"].get("nodeId")
            for c in await control.calls(operation="refresh_key", device_id=device)
            if c["error_code"] is None and c["status"] == 200
        ]
        expected = [newer] if superseded.get(device) == older else [older, newer]
        assert sent == expected, f"{device}: refreshed {sent}, superseded {superseded.get(device)}"
    assert stats["throttled_calls"] == 0
    assert (await control.device("dev-urgent"))["node_id"] == "urgent-dev-urgent"
    # Visible per lane: answered records, and the time from record to call.
    metrics = service.metrics
    assert metrics.lane_answered.labels(lane="urgent")._value.get() == 3
    assert metrics.lane_answered.labels(lane="bulk")._value.get() == BULK + 2
    to_call = metrics.record_to_call.labels(lane="urgent")
    assert sum(b.get() for b in to_call._buckets) >= 1  # the overtaking swap's call, at least
    # The latest swap wins across lanes: by its time, whatever lane it came by.
    assert (await control.device(both[0]))["node_id"] == f"urgent-{both[0]}"
    assert (await control.device(both[1]))["node_id"] == f"bulk-{both[1]}"


async def test_an_upstream_without_the_urgent_topic_works_unchanged(harness: Harness) -> None:
    """The lane's topic is named but does not exist: the service reads the bulk input alone."""
    missing = f"asset.device-swapped.urgent.v1.missing-{harness.group_id}"
    harness.topics = dataclasses.replace(harness.topics, device_swapped_urgent=missing)
    await harness.sim.control.seed_devices([{"device_id": "dev-1", "node_id": "old-1"}])
    service = await harness.start_service()
    assert service.pipeline.urgent_lane is None
    await harness.produce([(b"dev-1", swap_event("dev-1", "new-1"))])
    outs = await harness.read(1)
    assert [o.topic for o in outs] == [harness.topics.credential_updated]
