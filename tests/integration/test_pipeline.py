"""The happy path and the obvious failures, end to end: real broker, simulator, the service."""

from __future__ import annotations

import pytest

from service.events import parse_outcome
from tests.fixtures.service import Harness
from tests.support.events import swap_event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


async def test_a_swap_becomes_one_put_and_one_credential_updated(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-1", "old-node-1")
    await harness.start_service()
    value = swap_event("dev-1", "new-node-1", event_id="evt-1", workOrderId="WO-1")
    await harness.produce([(b"dev-1", value)])

    [out] = await harness.read(1)

    assert out.topic == harness.topics.credential_updated
    assert out.key == b"dev-1"
    event = parse_outcome(out.value or b"")
    assert event.type == "com.iot.device.credential-updated.v1"
    assert out.data["deviceId"] == "dev-1"
    assert out.data["nodeId"] == "new-node-1"
    assert out.data["verifyCode"] == "new-node-1"  # derived from the nodeId
    assert out.data["timeout"] == 0
    assert out.data["swapEventId"] == "evt-1"
    assert out.data["context"] == {"workOrderId": "WO-1"}
    puts = await control.calls(operation="refresh_key", device_id="dev-1")
    assert len(puts) == 1
    assert puts[0]["body"] == {"nodeId": "new-node-1", "verifyCode": "new-node-1", "timeout": 0}
    device = await control.device("dev-1")
    assert device["node_id"] == "new-node-1"


async def test_a_platform_rejection_becomes_rebind_failed(harness: Harness) -> None:
    await harness.start_service()
    await harness.produce([(b"ghost", swap_event("ghost", "node-x", event_id="evt-ghost"))])

    [out] = await harness.read(1)

    assert out.topic == harness.topics.rebind_failed
    data = out.data
    assert data["errorCode"] == "100403"
    assert data["httpStatus"] == 404
    assert data["category"] == "not_found"
    assert data["errorDesc"]
    assert data["recommendedHandling"]
    assert data["attempts"] == 1
    assert data["swapEventId"] == "evt-ghost"


async def test_malformed_input_is_dead_lettered_and_the_partition_keeps_flowing(
    harness: Harness,
) -> None:
    control = harness.sim.control
    await control.seed_device("dev-2", "old-2")
    await harness.start_service()
    # Same key, so the same partition: the bad record sits in front of the good one.
    await harness.produce(
        [
            (b"dev-2", b"{not json", [("trace", b"abc")]),
            (b"dev-2", swap_event("dev-2", "new-2")),
        ]
    )

    outs = await harness.read(2)

    by_topic = {o.topic: o for o in outs}
    assert len(outs) == 2
    dead = by_topic[harness.topics.dead_letter]
    assert dead.value == b"{not json"
    assert dead.key == b"dev-2"
    assert dead.header("trace") == "abc"
    assert dead.header("rebind-error-reason") == "not_json"
    assert dead.header("rebind-error-detail")
    assert dead.header("rebind-source-topic") == harness.topics.device_swapped
    assert dead.header("rebind-source-offset") is not None
    assert by_topic[harness.topics.credential_updated].data["nodeId"] == "new-2"
    assert await control.calls(operation="refresh_key", device_id="dev-2") != []


async def test_a_redelivered_event_does_not_call_the_platform_again(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-3", "old-3")
    await harness.start_service()
    value = swap_event("dev-3", "new-3", event_id="evt-dup")
    await harness.produce([(b"dev-3", value)])
    [first] = await harness.read(1)
    # The upstream system sends the same event again, twice, later on.
    await harness.produce([(b"dev-3", value), (b"dev-3", value)])

    outs = await harness.read(3)

    assert len(outs) == 3
    assert {o.topic for o in outs} == {harness.topics.credential_updated}
    assert {o.json()["id"] for o in outs} == {first.json()["id"]}
    assert len(await control.calls(operation="refresh_key", device_id="dev-3")) == 1


async def test_duplicates_are_recognised_after_a_restart(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-4", "old-4")
    await harness.start_service(instance="a")
    value = swap_event("dev-4", "new-4", event_id="evt-restart")
    await harness.produce([(b"dev-4", value)])
    [first] = await harness.read(1)
    await harness.stop_all()

    await harness.start_service(instance="b")  # a new process: only Kafka remembers
    await harness.produce([(b"dev-4", value)])
    outs = await harness.read(2)

    assert [o.json()["id"] for o in outs] == [first.json()["id"]] * 2
    assert outs[1].value == first.value
    assert len(await control.calls(operation="refresh_key", device_id="dev-4")) == 1


async def test_a_newer_swap_supersedes_a_deferral_not_yet_read_back(harness: Harness) -> None:
    """B succeeds while A's re-deferral is on its way through the retry topic: A must end as
    SUPERSEDED when it comes back, never overwrite B's key."""
    control = harness.sim.control
    await control.seed_device("dev-s", "n-orig")
    await control.inject_error(400, "100611", operation="refresh_key", device_id="dev-s")
    # A's retry: held for a while on the platform, then "online" again.
    await control.inject_fault(
        "error", operation="refresh_key", device_id="dev-s", status=400, code="100611", delay=2
    )
    await harness.start_service(online_retry_initial_seconds=0.3)
    await harness.produce([(b"dev-s", swap_event("dev-s", "n-A", event_id="evt-A"))])

    async def retry_in_flight() -> bool:
        return len(await control.calls(operation="refresh_key", device_id="dev-s")) >= 2

    await wait_until(retry_in_flight, timeout=30, what="A's retry reaches the platform")
    await harness.produce([(b"dev-s", swap_event("dev-s", "n-B", event_id="evt-B"))])

    outs = await harness.read(2)

    by_event = {o.data["swapEventId"]: o for o in outs}
    assert by_event["evt-B"].topic == harness.topics.credential_updated
    assert by_event["evt-A"].topic == harness.topics.rebind_failed
    assert by_event["evt-A"].data["errorCode"] == "SUPERSEDED"
    device = await control.device("dev-s")
    assert device["node_id"] == "n-B"
    applied = [h["node_id"] for h in device["history"]]
    assert "n-A" not in applied
