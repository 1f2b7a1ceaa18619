"""A waiting or watched swap's body leaves memory once its ledger record is committed, and what
needs it waits for it to be read back (issue 20, item 2): driven through the real
:class:`PartitionCore` and :class:`DeviceLedger`, the read back done by hand."""

from __future__ import annotations

import orjson

from service.metrics import Metrics
from service.pipeline.bodies import BodyFetches, BodyReader
from service.pipeline.body_holds import Body
from service.pipeline.ledger import DeviceLedger, State
from service.pipeline.partition_core import PartitionCore
from service.pipeline.records import Output
from service.pipeline.work import Waiting, WaitState, Work
from tests.support.records import FakeRecord
from tests.unit.test_bind_push_proof import (
    DEVICE,
    NOW_MS,
    SETTINGS,
    make_core,
    push,
    read,
    refreshed,
)

LEDGER = SETTINGS.topics.ledger


def core_with_bodies_out(*, poll: bool = False) -> PartitionCore:
    core = make_core(poll=poll)
    core.ledger.bodies_out = True
    return core


def committed(core: PartitionCore) -> list[Output]:
    """The next transaction, committed: its outputs (written at offsets 0, 1, ...)."""
    commit = core.take_commit()
    assert commit is not None
    core.committed(commit, list(range(len(commit.outputs))))
    return commit.outputs


def ledger_offset(outputs: list[Output]) -> int:
    return max(i for i, o in enumerate(outputs) if o.topic == LEDGER)


def waiting(core: PartitionCore, offset: int, node: str, seconds: int) -> dict[int, Output]:
    """A swap read, called, and left waiting (the device online); committed: the ledger
    topic's record of it, by offset."""
    work = read(core, offset, node, seconds)
    assert core.claim(work)
    state = WaitState(NOW_MS + 60_000, NOW_MS + 86_400_000, 1, 1, NOW_MS, "100611", "online")
    core.decide(work, Waiting(state))
    outputs = committed(core)
    at = ledger_offset(outputs)
    return {at: outputs[at]}


def read_back(core: PartitionCore, kept: dict[int, Output]) -> list[object]:
    """Serve what the partition wants from ``kept`` (ledger offset -> record)."""
    found = {}
    for device, at in core.bodies.take().items():
        entry = DeviceLedger(LEDGER, 0)
        assert entry.load(kept[at].key, kept[at].value)
        body = entry.get(device)
        assert body is not None
        assert body.value is not None
        found[device] = (body.value, list(body.headers))
    return list(core.bodies.arrived(found, set()))


def test_a_waiting_swaps_body_leaves_memory_once_committed_and_is_read_back_when_due() -> None:
    core = core_with_bodies_out()
    work = read(core, 0, "node-a", 0)
    assert core.claim(work)
    state = WaitState(NOW_MS + 60_000, NOW_MS + 86_400_000, 1, 1, NOW_MS, "100611", "online")
    core.decide(work, Waiting(state))
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.value == work.raw_value  # in a pending transaction: still in memory
    outputs = committed(core)
    at = ledger_offset(outputs)
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.body_out
    assert entry.body_at == at

    assert core.wake(NOW_MS + 120_000, 4) == []  # due, but its body is in the topic
    assert core.woken == 1  # counted as woken while it is read back
    [job] = read_back(core, {at: outputs[at]})
    assert isinstance(job, Work)
    assert job.swap == work.swap
    assert job.raw_value == work.raw_value
    assert job.offset is None
    assert job.wait == state
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.body_out  # the job has the body; the entry keeps only its offset
    assert not core.bodies.busy


def test_a_newer_swap_is_held_until_the_kept_swaps_body_is_read_back_and_answers_it() -> None:
    core = core_with_bodies_out()
    kept = waiting(core, 0, "node-old", 0)
    newer = core.intake(FakeRecord(1, DEVICE.encode(), _swap("node-new", 1), NOW_MS))
    assert newer is None  # held: the waiting swap must be answered from its body
    assert core.bodies.held == 1
    assert core.outbox.unfinished == 1
    [job] = read_back(core, kept)
    assert isinstance(job, Work)
    assert job.swap.id == "evt-1"
    outputs = committed(core)
    superseded = [o for o in outputs if o.topic == SETTINGS.topics.rebind_failed]
    assert len(superseded) == 1
    assert orjson.loads(superseded[0].value or b"")["data"]["errorCode"] == "SUPERSEDED"


def test_a_push_for_a_watch_whose_body_left_memory_is_held_before_the_offset() -> None:
    core = core_with_bodies_out()
    work = read(core, 0, "node-a", 0)
    refreshed(core, work)
    outputs = committed(core)
    at = ledger_offset(outputs)
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.state is State.WATCHING
    assert entry.body_out
    push(core, 5, "succeeded", "node-a")
    commit = core.take_commit()
    assert commit is not None
    assert commit.notify_offset == 5  # not past the held push: a crash reads it again
    core.committed(commit, list(range(len(commit.outputs))))
    assert read_back(core, {at: outputs[at]}) == []
    outputs = committed(core)
    assert [o.topic for o in outputs].count(SETTINGS.topics.device_rebound) == 1
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.state is State.DONE


def test_a_body_that_cannot_be_read_back_is_answered_not_lost() -> None:
    core = core_with_bodies_out()
    waiting(core, 0, "node-a", 0)
    assert core.wake(NOW_MS + 120_000, 4) == []
    asked = core.bodies.take()
    assert list(asked) == [DEVICE]
    assert core.bodies.arrived({}, {DEVICE}) == []  # gone from the ledger topic
    assert core.woken == 0
    outputs = committed(core)
    [failed] = [o for o in outputs if o.topic == SETTINGS.topics.rebind_failed]
    data = orjson.loads(failed.value or b"")["data"]
    assert data["errorCode"] == "INTERNAL_ERROR"
    assert data["swapEventId"] == "evt-0"
    assert data["contextTruncated"] is True
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.state is State.DONE


def _swap(node: str, seconds: int) -> bytes:
    from tests.support.events import swap_event  # noqa: PLC0415

    return swap_event(DEVICE, node, event_id="evt-1", ce_time=f"2026-11-25T09:30:{seconds:02d}Z")


class _GoneReader(BodyReader):
    """A ledger partition where every asked record is gone (compacted away, or truncated)."""

    async def read(self, partition: int, asked: dict[str, int]) -> tuple[dict[str, Body], set[str]]:
        return {}, set(asked)


async def test_a_lost_body_is_counted_and_its_swap_answered() -> None:
    core = core_with_bodies_out()
    waiting(core, 0, "node-a", 0)
    assert core.wake(NOW_MS + 120_000, 4) == []
    metrics = Metrics()
    started: list[object] = []
    fetches = BodyFetches(
        _GoneReader(SETTINGS.kafka, LEDGER),
        lambda: [core],
        lambda _core, jobs: started.extend(jobs),
        metrics,
    )
    assert await fetches._read_all()
    registry = metrics.registry
    assert registry.get_sample_value("rebind_ledger_body_reads_total", {"result": "lost"}) == 1
    assert registry.get_sample_value("rebind_ledger_body_reads_total", {"result": "found"}) == 0
    assert started == []
    [failed] = [o for o in committed(core) if o.topic == SETTINGS.topics.rebind_failed]
    assert orjson.loads(failed.value or b"")["data"]["errorCode"] == "INTERNAL_ERROR"
