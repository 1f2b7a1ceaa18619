"""Logs of a real run, captured as JSON: every line about an event says which event it is."""

from __future__ import annotations

import pytest

from tests.fixtures.service import Harness
from tests.support.events import swap_event
from tests.support.logcapture import captured_logs

pytestmark = pytest.mark.integration

EVENT_KEYS = ("topic", "partition", "offset", "device_id", "event_id")
OUTCOME_LINES = {"credential_updated", "rebind_failed", "deferred_device_online"}


async def test_each_event_has_one_outcome_line_carrying_its_context(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-log-1", "old-log-1")
    with captured_logs(level="DEBUG", fmt="json") as cap:
        await harness.start_service()
        await harness.produce(
            [
                (b"dev-log-1", swap_event("dev-log-1", "new-log-1", event_id="evt-log-1")),
                (b"dev-log-2", swap_event("dev-log-2", "new-log-2", event_id="evt-log-2")),
                (b"dev-log-3", b"{broken"),
            ]
        )
        outs = await harness.read(3)
        await harness.stop_all()

    lines = cap.lines()  # each line is one JSON object
    assert all({"timestamp", "level", "event"} <= line.keys() for line in lines)
    assert len(outs) == 3

    [updated] = [line for line in lines if line["event"] == "credential_updated"]
    assert {k: updated[k] for k in ("topic", "device_id", "event_id")} == {
        "topic": harness.topics.device_swapped,
        "device_id": "dev-log-1",
        "event_id": "evt-log-1",
    }
    assert isinstance(updated["partition"], int)
    assert isinstance(updated["offset"], int)
    assert updated["level"] == "info"

    for event_id in ("evt-log-1", "evt-log-2"):
        about = [line for line in lines if line.get("event_id") == event_id]
        outcome = [line for line in about if line["event"] in OUTCOME_LINES]
        assert len(outcome) == 1, outcome
        assert outcome[0]["level"] == "info"
        for line in about:  # every line about the event carries all five
            assert all(k in line for k in EVENT_KEYS), line
    [failed] = [line for line in lines if line["event"] == "rebind_failed"]
    assert failed["event_id"] == "evt-log-2"
    assert failed["error_code"] == "100403"
    # an unreadable record has no device or event id; it still says where it came from
    [dead] = [line for line in lines if line["event"] == "dead_lettered"]
    assert dead["topic"] == harness.topics.device_swapped
    assert isinstance(dead["offset"], int)
    assert dead["reason"] == "not_json"
    # lines with a device id are lines about an event: they carry all five
    for line in lines:
        if "device_id" in line:
            assert all(k in line for k in EVENT_KEYS), line
