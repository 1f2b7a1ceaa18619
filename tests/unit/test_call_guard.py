"""Only the owner calls (issue 19, item 6): the pipeline's call guard lets a job's platform call
leave only while the member has fresh proof that the group counts it (an accepted heartbeat or
an assignment), makes it wait while that proof is stale, and abandons it once the partition is
being handed over."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace
from typing import Any

import pytest

from service.config import KafkaSettings, TopicSettings
from service.kafka import on_heartbeat
from service.metrics import Metrics
from service.pipeline.pipeline import Pipeline

NO_HANDLER: Any = None


def pipeline() -> tuple[Pipeline, Any]:
    p = Pipeline(
        KafkaSettings(bootstrap_servers="127.0.0.1:9", session_timeout_ms=6_000),
        TopicSettings(),
        handler=NO_HANDLER,  # never called here
        outcomes=NO_HANDLER,
        metrics=Metrics(),
        concurrency=1,
    )
    core = SimpleNamespace(partition=3, closed=False, closing=False)
    p._cores[3] = core  # type: ignore[assignment]
    return p, core


async def _spin() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_call_waits_while_membership_is_unproven_and_leaves_after_a_heartbeat() -> None:
    p, core = pipeline()
    p._membership.at = -math.inf  # frozen or cut off: no accepted heartbeat for a session
    assert not p.owner_fresh()
    waiting = asyncio.create_task(p._wait_owner(core))
    await _spin()
    assert not waiting.done(), "a call left without proof that the member owns the partition"
    p._proved()  # the coordinator accepted a heartbeat
    await asyncio.wait_for(waiting, 1)


async def test_a_call_is_abandoned_once_its_partition_is_handed_over() -> None:
    p, core = pipeline()
    p._membership.at = -math.inf
    waiting = asyncio.create_task(p._wait_owner(core))
    await _spin()
    core.closing = True  # revoked: the next owner does the swap
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 2)


async def test_with_fresh_proof_the_call_leaves_at_once() -> None:
    p, core = pipeline()
    p._proved()
    await asyncio.wait_for(p._wait_owner(core), 0.1)


async def test_a_heartbeat_answered_while_frozen_proves_membership_only_as_of_its_sending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A heartbeat sent just before the process froze is answered while it is stopped and read
    when it wakes, possibly after the group dropped it: it proves membership as of its sending.
    Dated at its reading, a woken zombie looked freshly proven and one retry reached the platform
    (seen once in tests/faults/test_zombie_calls.py)."""
    clock = {"now": 1_000.0}
    fake_time = SimpleNamespace(monotonic=lambda: clock["now"])
    monkeypatch.setattr("service.kafka.time", fake_time)  # the service's reading only
    answered = asyncio.Event()

    async def do_heartbeat() -> bool:
        await answered.wait()  # on the wire while the process is frozen
        return True

    consumer: Any = SimpleNamespace(_coordinator=SimpleNamespace(_do_heartbeat=do_heartbeat))
    p, _core = pipeline()
    assert on_heartbeat(consumer, p._proved)
    p._membership.at = -math.inf
    heartbeat = asyncio.create_task(consumer._coordinator._do_heartbeat())
    await _spin()  # sent at 1000 s
    clock["now"] = 1_000.0 + 60.0  # frozen for a minute (session timeout 6 s), then woken
    answered.set()
    assert await heartbeat
    assert p._membership.at == 1_000.0
    monkeypatch.setattr("service.pipeline.membership.time", fake_time)
    assert not p.owner_fresh()  # the guard keeps the woken member's calls waiting
