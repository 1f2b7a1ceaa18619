"""Issue 20, item 2: a waiting swap keeps its body in the ledger topic, not in memory.

Once the ledger record of a waiting swap is committed, the entry in memory keeps only that
record's offset; when the swap is due, its body is read back from the ledger partition and the
call is made exactly as it would have been with the body in memory (the same verifyCode and
timeout, the context passed through). A real broker and the simulator; short retry intervals.
"""

from __future__ import annotations

import pytest

from service.app import Service
from service.pipeline.ledger import Entry, State
from tests.fixtures.service import Harness
from tests.support.events import swap_event
from tests.support.ledger import waits
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

DEVICE = "dev-body"


def _entry(service: Service, device: str) -> Entry | None:
    for core in service.pipeline._cores.values():
        entry = core.ledger.get(device)
        if entry is not None:
            return entry
    return None


def _bodies_read(service: Service) -> int:
    return service.pipeline._bodies._reader.records_read


def _body_reads(service: Service, result: str) -> float:
    """``rebind_ledger_body_reads_total{result}`` as the service exposes it."""
    registry = service.metrics.registry
    return registry.get_sample_value("rebind_ledger_body_reads_total", {"result": result}) or 0.0


def _swap() -> bytes:
    # verifyCode, timeout and an unknown field (passed through as the outcome's context): all
    # three come only from the swap's body
    return swap_event(
        DEVICE, "new-body", event_id="evt-body", verifyCode="vc-body-7", timeout=3600, site="p7"
    )


async def _check_answer(harness: Harness) -> None:
    [out] = await harness.read(1, timeout=30)
    assert out.topic == harness.topics.credential_updated, out.data
    assert out.data["swapEventId"] == "evt-body"
    assert out.data["context"] == {"site": "p7"}
    assert not out.data.get("contextTruncated")
    puts = await harness.sim.control.calls(operation="refresh_key", device_id=DEVICE)
    assert [p["error_code"] for p in puts] == ["100611", None]
    first, woken = (p["body"] for p in puts)
    assert woken == first  # the same request, rebuilt from the body read back
    assert woken["verifyCode"] == "vc-body-7"
    assert woken["timeout"] == 3600
    assert (await harness.sim.control.device(DEVICE))["node_id"] == "new-body"


async def test_a_waiting_swap_whose_body_left_memory_is_read_back_when_due(
    harness: Harness,
) -> None:
    control = harness.sim.control
    await control.seed_device(DEVICE, "old-body", status="ONLINE")
    service = await harness.start_service(
        online_retry_initial_seconds=4, online_retry_max_seconds=4
    )
    await harness.produce([(DEVICE.encode(), _swap())])
    _, deferral = await harness.read(2, topics=[harness.topics.ledger])  # claimed, waiting
    assert waits([deferral])[0]["lastCode"] == "100611"

    # committed: the entry keeps the record's offset, not the body
    def body_out() -> bool:
        entry = _entry(service, DEVICE)
        return entry is not None and entry.state is State.WAITING and entry.body_out

    await wait_until(body_out, timeout=10, what="the waiting swap's body out of memory")
    entry = _entry(service, DEVICE)
    assert entry is not None
    assert entry.value is None
    assert entry.body_at == deferral.offset
    assert _bodies_read(service) == 0
    assert _body_reads(service, "found") == 0
    await control.set_status(DEVICE, "OFFLINE")

    await _check_answer(harness)
    assert _bodies_read(service) >= 1  # woken: read back from the ledger partition
    assert _body_reads(service, "found") == 1
    assert _body_reads(service, "lost") == 0
    registry = service.metrics.registry
    assert registry.get_sample_value("rebind_ledger_body_read_seconds_count") == 1


async def test_a_waiting_swap_loaded_by_a_new_member_is_read_back_from_the_ledger(
    harness: Harness,
) -> None:
    control = harness.sim.control
    await control.seed_device(DEVICE, "old-body", status="ONLINE")
    await harness.start_service(
        instance="a", online_retry_initial_seconds=6, online_retry_max_seconds=6
    )
    await harness.produce([(DEVICE.encode(), _swap())])
    await harness.read(2, topics=[harness.topics.ledger])  # claimed, waiting
    await harness.stop_all()  # while the swap waits for its due time
    await control.set_status(DEVICE, "OFFLINE")

    # The new member loads the waiting entry with its record's offset only (no body in
    # memory): the swap it calls when due is the one read back from the ledger partition.
    second = await harness.start_service(
        instance="b", online_retry_initial_seconds=6, online_retry_max_seconds=6
    )
    await _check_answer(harness)
    assert _bodies_read(second) >= 1
