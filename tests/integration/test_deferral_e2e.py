"""Issue 3, part 4: a device that is online (100611) waits without blocking anyone.

End to end: the service, a real broker and the simulator. Short online-retry intervals and
deadlines are set through the platform settings, so every test runs in seconds.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from service.app import Service
from tests.fixtures.service import Harness
from tests.support.events import Received, swap_event
from tests.support.ledger import entry, waits
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

FAST_ONLINE_RETRY: dict[str, Any] = {
    "online_retry_initial_seconds": 0.5,
    "online_retry_max_seconds": 1.0,
}


def _only(outs: list[Received], device: str) -> Received:
    mine = [o for o in outs if o.data["deviceId"] == device]
    assert len(mine) == 1, mine
    return mine[0]


def _online_rejections(service: Service) -> float:
    value: float = service.metrics.device_online_rejections._value.get()
    return value


async def _answers(harness: Harness, device: str) -> list[str | None]:
    return [
        c["error_code"]
        for c in await harness.sim.control.calls(operation="refresh_key", device_id=device)
    ]


async def test_an_online_device_is_deferred_then_updated_when_it_goes_offline(
    harness: Harness,
) -> None:
    control = harness.sim.control
    await control.seed_device("dev-on", "old-on", status="ONLINE")
    service = await harness.start_service(**FAST_ONLINE_RETRY)
    await control.go_offline_after("dev-on", 2.0)
    await harness.produce([(b"dev-on", swap_event("dev-on", "new-on", event_id="evt-on"))])

    [out] = await harness.read(1, timeout=30)

    assert out.topic == harness.topics.credential_updated
    assert out.data["swapEventId"] == "evt-on"
    answers = await _answers(harness, "dev-on")
    assert answers[-1] is None
    assert set(answers[:-1]) == {"100611"}
    assert len(answers) >= 2
    assert out.data["attempts"] == len(answers)
    # The claim, each deferral (durably, with its state), then the swap done: in the ledger.
    records = await harness.read(len(answers) + 1, topics=[harness.topics.ledger])
    assert entry(records[0])["state"] == "pending"  # claimed (committed before the first call)
    assert [w["deferrals"] for w in waits(records)] == list(range(1, len(answers)))
    assert {w["lastCode"] for w in waits(records)} == {"100611"}
    assert all(r.key == b"dev-on" for r in records)
    assert entry(records[-1])["state"] == "done"
    assert entry(records[-1])["outcome"] == "credential_updated"
    # Every 100611 answer was counted, in the registry and on /metrics.
    assert _online_rejections(service) == len(answers) - 1
    assert f"rebind_platform_device_online_rejections_total {len(answers) - 1}.0" in (
        service.metrics.render().decode()
    )
    assert (await control.device("dev-on"))["node_id"] == "new-on"


async def test_a_waiting_device_never_blocks_other_devices(harness: Harness) -> None:
    control = harness.sim.control
    others = [f"dev-free-{i}" for i in range(10)]
    await control.seed_device("dev-busy", "old-busy", status="ONLINE")
    await control.seed_devices([{"device_id": d, "node_id": f"old-{d}"} for d in others])
    service = await harness.start_service(online_retry_initial_seconds=30)
    # The online device first: it sits in front of the others in its partition.
    await harness.produce(
        [(b"dev-busy", swap_event("dev-busy", "new-busy"))]
        + [(d.encode(), swap_event(d, f"new-{d}")) for d in others]
    )

    outs = await harness.read(10, timeout=10)

    assert {o.data["deviceId"] for o in outs} == set(others)
    assert {o.topic for o in outs} == {harness.topics.credential_updated}
    await wait_until(
        lambda: service.metrics.deferred_events._value.get() == 1,
        timeout=10,
        what="the online device waiting",
    )
    assert await _answers(harness, "dev-busy") == ["100611"]


async def test_a_deferred_swap_survives_a_restart(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-rs", "old-rs", status="ONLINE")
    first = await harness.start_service(instance="a", online_retry_initial_seconds=6)
    await harness.produce([(b"dev-rs", swap_event("dev-rs", "new-rs", event_id="evt-rs"))])
    claim, deferral = await harness.read(2, topics=[harness.topics.ledger])
    assert entry(claim)["state"] == "pending"
    assert waits([deferral])[0]["lastCode"] == "100611"
    await wait_until(
        lambda: first.metrics.deferred_events._value.get() == 1,
        timeout=10,
        what="the swap waiting in memory",
    )
    await harness.stop_all()  # while the swap waits for its due time
    await control.set_status("dev-rs", "OFFLINE")

    await harness.start_service(instance="b", online_retry_initial_seconds=6)
    [out] = await harness.read(1, timeout=30)

    assert out.topic == harness.topics.credential_updated
    assert out.data["swapEventId"] == "evt-rs"
    assert out.data["attempts"] == 2
    assert await _answers(harness, "dev-rs") == ["100611", None]
    assert (await control.device("dev-rs"))["node_id"] == "new-rs"


async def test_a_newer_swap_supersedes_a_waiting_older_one(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-sup", "old-sup", status="ONLINE")
    service = await harness.start_service(online_retry_initial_seconds=30)
    await harness.produce([(b"dev-sup", swap_event("dev-sup", "node-older", event_id="older"))])
    await harness.read(2, topics=[harness.topics.ledger])  # claimed, then waiting
    await wait_until(
        lambda: service.metrics.deferred_events._value.get() == 1,
        timeout=10,
        what="the older swap waiting",
    )
    await control.set_status("dev-sup", "OFFLINE")

    await harness.produce([(b"dev-sup", swap_event("dev-sup", "node-newer", event_id="newer"))])
    outs = await harness.read(2)

    assert len(outs) == 2
    by_event = {o.data["swapEventId"]: o for o in outs}
    older, newer = by_event["older"], by_event["newer"]
    assert older.topic == harness.topics.rebind_failed
    assert older.data["errorCode"] == "SUPERSEDED"
    assert older.data["category"] == "superseded"
    assert "newer" in older.data["errorDesc"]
    assert older.data["attempts"] == 1  # the one call that met 100611
    assert newer.topic == harness.topics.credential_updated
    assert newer.data["nodeId"] == "node-newer"
    puts = await control.calls(operation="refresh_key", device_id="dev-sup")
    assert [(p["body"]["nodeId"], p["error_code"]) for p in puts] == [
        ("node-older", "100611"),
        ("node-newer", None),
    ]
    device = await control.device("dev-sup")
    assert device["applied_pairs"] == [["node-newer", "node-newer"]]  # the older never applied
    assert service.metrics.deferred_events._value.get() == 0


async def test_the_deadline_passes_while_the_device_stays_online(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-stay", "old-stay", status="ONLINE")
    service = await harness.start_service(online_retry_deadline_seconds=2.5, **FAST_ONLINE_RETRY)
    await harness.produce([(b"dev-stay", swap_event("dev-stay", "new-stay"))])

    [out] = await harness.read(1, timeout=30)

    assert out.topic == harness.topics.rebind_failed
    data = out.data
    assert data["errorCode"] == "DEADLINE_EXCEEDED"
    assert data["category"] == "deadline_exceeded"
    assert "100611" in data["errorDesc"]  # the last platform code
    answers = await _answers(harness, "dev-stay")
    assert set(answers) == {"100611"}
    assert data["attempts"] == len(answers) > 1
    assert data["recommendedHandling"]
    assert _online_rejections(service) == len(answers)
    assert (await control.device("dev-stay"))["node_id"] == "old-stay"


async def test_a_deadline_that_passes_while_the_service_is_down_carries_the_last_code(
    harness: Harness,
) -> None:
    control = harness.sim.control
    await control.seed_device("dev-down", "old-down", status="ONLINE")
    await harness.start_service(
        instance="a", online_retry_initial_seconds=2, online_retry_deadline_seconds=4
    )
    await harness.produce([(b"dev-down", swap_event("dev-down", "new-down"))])
    _, deferral = await harness.read(2, topics=[harness.topics.ledger])  # claimed, waiting
    await harness.stop_all()  # down while the swap waits, until after its deadline
    deadline = waits([deferral])[0]["deadlineMs"] / 1000
    await wait_until(lambda: time.time() > deadline, timeout=10, what="the deadline passed")

    await harness.start_service(instance="b", online_retry_initial_seconds=2)
    [out] = await harness.read(1, timeout=30)

    assert out.topic == harness.topics.rebind_failed
    assert out.data["errorCode"] == "DEADLINE_EXCEEDED"
    assert out.data["category"] == "deadline_exceeded"
    assert "100611" in out.data["errorDesc"], out.data["errorDesc"]
    assert out.data["attempts"] == 1
    assert await _answers(harness, "dev-down") == ["100611"]  # no call after the deadline
