"""A duplicate whose stored outcome cannot be read back at once is answered once the read
succeeds (issue 19, item 7): a failed read of the dedupe topic is tried again with a growing
pause, instead of leaving the duplicate unanswered and the partition's offset pinned until the
next rebalance. Real broker, simulator, the service in process."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from tests.fixtures.service import Harness
from tests.support.events import swap_event

pytestmark = pytest.mark.integration


async def test_a_duplicate_is_answered_after_its_stored_outcome_failed_to_read(
    harness: Harness,
) -> None:
    await harness.sim.control.seed_device("dev-reread", "node-orig")
    service = await harness.start_service()
    event = swap_event("dev-reread", "node-new", event_id="evt-reread")
    await harness.produce([(b"dev-reread", event)])
    [first] = await harness.read(1)

    dedupe = service.pipeline._dedupe
    real_fetch = dedupe.fetch
    attempts: list[int] = []

    async def flaky_fetch(partition: int, offset: int) -> Any:
        attempts.append(offset)
        if len(attempts) <= 2:
            raise KafkaConnectionError("the broker went away for a moment")
        return await real_fetch(partition, offset)

    dedupe.fetch = flaky_fetch  # type: ignore[method-assign]
    await harness.produce([(b"dev-reread", event)])  # the same event again
    outs = await harness.read(2, timeout=30)

    again = max(outs, key=lambda o: o.offset)
    assert again.value == first.value, "the stored outcome is re-published unchanged"
    assert len(attempts) == 3
    assert len(await harness.sim.control.calls(operation="refresh_key")) == 1
