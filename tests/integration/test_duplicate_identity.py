"""An event is identified by its CloudEvent ``source`` and ``id`` together (issue 11, item 7):
the same id from two sources is two swaps; the same source and id again is a duplicate."""

from __future__ import annotations

import pytest

from tests.fixtures.service import Harness
from tests.support.events import swap_event

pytestmark = pytest.mark.integration


async def test_the_same_id_from_two_sources_is_two_swaps_and_the_same_source_and_id_one(
    harness: Harness,
) -> None:
    control = harness.sim.control
    await control.seed_device("dev-src", "node-orig")
    await harness.start_service()
    from_a = swap_event(
        "dev-src",
        "node-a",
        event_id="evt-same",
        source="/inventory/a",
        ce_time="2026-11-25T09:00:00Z",
    )
    from_b = swap_event(
        "dev-src",
        "node-b",
        event_id="evt-same",
        source="/inventory/b",
        ce_time="2026-11-25T10:00:00Z",
    )

    await harness.produce([(b"dev-src", from_a)])
    [first] = await harness.read(1)
    await harness.produce([(b"dev-src", from_b)])
    outs = await harness.read(2)
    assert len(outs) == 2
    # one device, so one partition of the output topic: offsets give the order
    second = max(outs, key=lambda o: o.offset)

    # two events: two calls, two outcomes, told apart by their ids
    assert {first.topic, second.topic} == {harness.topics.credential_updated}
    assert (first.data["nodeId"], second.data["nodeId"]) == ("node-a", "node-b")
    assert first.json()["id"] != second.json()["id"]
    puts = await control.calls(operation="refresh_key", device_id="dev-src")
    assert [p["body"]["nodeId"] for p in puts] == ["node-a", "node-b"]

    # the first event again (same source and id): no call, its outcome re-published unchanged
    await harness.produce([(b"dev-src", from_a)])
    outs = await harness.read(3)

    assert len(outs) == 3
    again = max(outs, key=lambda o: o.offset)
    assert again.value == first.value
    assert again.json()["id"] == first.json()["id"]
    assert len(await control.calls(operation="refresh_key", device_id="dev-src")) == 2
    assert (await control.device("dev-src"))["node_id"] == "node-b"
