"""The reworked core end to end (real broker, simulator, the service in-process): nothing
wedges, outcomes are published when decided, the latest swap wins, redoing is free."""

from __future__ import annotations

import pytest

from tests.fixtures.service import Harness
from tests.support.events import swap_event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


async def test_an_unexpected_failure_ends_the_swap_and_the_partition_moves_on(
    harness: Harness,
) -> None:
    """A 200 whose body cannot be decoded (a corrupt gzip) raises inside the client: the swap is
    settled by querying the device, the partition's offset moves past it, and later swaps of the
    same partition flow."""
    control = harness.sim.control
    await control.seed_devices(
        [{"device_id": d, "node_id": f"old-{d}"} for d in ("dev-applied", "dev-not", "dev-next")]
    )
    await control.inject_fault(
        "corrupt_after_apply", operation="refresh_key", device_id="dev-applied"
    )
    await control.inject_fault("corrupt", operation="refresh_key", device_id="dev-not")
    service = await harness.start_service()
    records = [
        (d.encode(), swap_event(d, f"new-{d}", event_id=f"evt-{d}"))
        for d in ("dev-applied", "dev-not", "dev-next")
    ]
    await harness.produce(records)

    outs = await harness.read(3)

    by_device = {o.data["deviceId"]: o for o in outs}
    # applied before the failure: the query finds the new nodeId, so it is a success
    assert by_device["dev-applied"].topic == harness.topics.credential_updated
    # not applied: an internal error, with the contract's code and category
    failed = by_device["dev-not"]
    assert failed.topic == harness.topics.rebind_failed
    assert failed.data["errorCode"] == "INTERNAL_ERROR"
    assert failed.data["category"] == "internal"
    assert failed.data["recommendedHandling"]
    assert by_device["dev-next"].topic == harness.topics.credential_updated
    assert (await control.device("dev-not"))["node_id"] == "old-dev-not"
    # nothing stays unfinished: the partitions' offsets moved past every record
    await wait_until(
        lambda: service.pipeline.buffered() == 0, timeout=10, what="every record finished"
    )
    assert service.pipeline.stuck_partitions() == []


async def test_a_record_keyed_by_another_device_is_a_dead_letter(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-k", "old-k")
    await harness.start_service()
    await harness.produce(
        [
            (b"someone-else", swap_event("dev-k", "new-k", event_id="evt-wrong-key")),
            (None, swap_event("dev-k", "new-k2", event_id="evt-no-key")),
        ]
    )

    outs = await harness.read(2)

    assert {o.topic for o in outs} == {harness.topics.dead_letter}
    assert {o.header("rebind-error-reason") for o in outs} == {"key_mismatch"}
    assert await control.calls(operation="refresh_key", device_id="dev-k") == []


async def test_an_older_swap_arriving_after_a_newer_one_is_superseded_without_a_call(
    harness: Harness,
) -> None:
    control = harness.sim.control
    await control.seed_device("dev-o", "old-o")
    await harness.start_service()
    newer = swap_event("dev-o", "node-new", event_id="evt-new", ce_time="2026-11-25T10:00:00Z")
    older = swap_event("dev-o", "node-old", event_id="evt-old", ce_time="2026-11-25T09:00:00Z")
    await harness.produce([(b"dev-o", newer)])
    [first] = await harness.read(1)
    assert first.topic == harness.topics.credential_updated
    await harness.produce([(b"dev-o", older)])

    outs = await harness.read(2)

    late = next(o for o in outs if o.data["swapEventId"] == "evt-old")
    assert late.topic == harness.topics.rebind_failed
    assert late.data["errorCode"] == "SUPERSEDED"
    assert "evt-new" in late.data["errorDesc"]
    puts = await control.calls(operation="refresh_key", device_id="dev-o")
    assert [p["body"]["nodeId"] for p in puts] == ["node-new"]
    assert (await control.device("dev-o"))["node_id"] == "node-new"


async def test_an_older_swap_is_superseded_after_a_restart_too(harness: Harness) -> None:
    """The ledger is on Kafka: a new process knows the device's latest swap."""
    control = harness.sim.control
    await control.seed_device("dev-r", "old-r")
    await harness.start_service(instance="a")
    newer = swap_event("dev-r", "node-new", event_id="evt-new", ce_time="2026-11-25T10:00:00Z")
    await harness.produce([(b"dev-r", newer)])
    await harness.read(1)
    await harness.stop_all()

    await harness.start_service(instance="b")
    older = swap_event("dev-r", "node-old", event_id="evt-old", ce_time="2026-11-25T09:00:00Z")
    await harness.produce([(b"dev-r", older)])
    outs = await harness.read(2)

    late = next(o for o in outs if o.data["swapEventId"] == "evt-old")
    assert late.data["errorCode"] == "SUPERSEDED"
    assert len(await control.calls(operation="refresh_key", device_id="dev-r")) == 1


async def test_an_outcome_does_not_wait_for_a_slow_record_before_it(harness: Harness) -> None:
    """One record hangs on the platform; the records after it still get their outcomes at once,
    while its partition's committed offset stays before the slow one."""
    control = harness.sim.control
    devices = [f"dev-slow-{i}" for i in range(12)]
    await control.seed_devices([{"device_id": d, "node_id": f"old-{d}"} for d in devices])
    await control.inject_latency(6, operation="refresh_key", device_id=devices[0])
    service = await harness.start_service()
    await harness.produce([(d.encode(), swap_event(d, f"new-{d}")) for d in devices])

    early = await harness.read(len(devices) - 1, timeout=5)  # before the slow one returns

    assert devices[0] not in {o.data["deviceId"] for o in early}
    assert service.pipeline.buffered() >= 1  # the slow record is still unfinished
    final = await harness.read(len(devices), timeout=30)
    assert {o.data["deviceId"] for o in final} == set(devices)
    assert {o.topic for o in final} == {harness.topics.credential_updated}
