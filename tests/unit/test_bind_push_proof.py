"""A bind push settles a watch only when it names the watched swap's nodeId (issue 19, item 1).

The platform's pushes are not signed and may come late or twice: a push about an older swap's
hardware, or one that names no nodeId, must never settle a newer swap's watch. Driven through the
real :class:`PartitionCore` and :class:`DeviceLedger`, as the pipeline drives them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import SecretStr

from service.bind.watch import WatchPolicy
from service.config import PlatformSettings, Settings
from service.handler import RebindHandler
from service.metrics import Metrics
from service.pipeline.dedupe import DedupeIndex
from service.pipeline.ledger import DeviceLedger, State
from service.pipeline.partition_core import PartitionCore
from service.pipeline.progress import PartitionProgress
from service.pipeline.records import OutcomeKind, Output
from service.pipeline.work import Outcome, PollResult, Waiting, WaitState, Work
from tests.support.events import swap_event
from tests.support.records import FakeRecord

SETTINGS = Settings(
    platform=PlatformSettings(
        base_url="https://iot.example.test:8743", app_id="app-1", secret=SecretStr("s")
    )
)
T0 = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
NOW_MS = int(datetime.now(UTC).timestamp() * 1000)
DEVICE = "dev-1"


def make_core(*, poll: bool = False) -> PartitionCore:
    handler = RebindHandler(SETTINGS, client=Any, metrics=Metrics())  # type: ignore[arg-type]
    policy = WatchPolicy.from_settings(SETTINGS.bind)
    return PartitionCore(
        topic=SETTINGS.topics.device_swapped,
        partition=0,
        dead_letter_topic=SETTINGS.topics.dead_letter,
        progress=PartitionProgress(None, None),
        ledger=DeviceLedger(SETTINGS.topics.ledger, 0),
        dedupe=DedupeIndex(SETTINGS.topics.dedupe, 0, 100),
        answers=handler.outcomes,
        watch=WatchPolicy(
            poll=poll,
            poll_initial_ms=policy.poll_initial_ms,
            poll_max_ms=policy.poll_max_ms,
            watch_deadline_ms=policy.watch_deadline_ms,
            grace_ms=policy.grace_ms,
        ),
    )


def read(core: PartitionCore, offset: int, node: str, seconds: int) -> Work:
    value = swap_event(
        DEVICE,
        node,
        event_id=f"evt-{offset}",
        ce_time=(T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    work = core.intake(FakeRecord(offset, DEVICE.encode(), value, NOW_MS))
    assert isinstance(work, Work)
    return work


def updated(work: Work) -> Outcome:
    record = Output(SETTINGS.topics.credential_updated, DEVICE.encode(), b"{}", [])
    return Outcome(OutcomeKind.CREDENTIAL_UPDATED, record, timeout=0)


def push(core: PartitionCore, offset: int, result: str, node: str | None) -> None:
    doc: dict[str, object] = {"deviceId": DEVICE, "resultCode": result, "receivedAtMs": NOW_MS}
    if node is not None:
        doc["nodeId"] = node
    core.notify(FakeRecord(offset, DEVICE.encode(), orjson.dumps(doc), NOW_MS))


def topics_written(core: PartitionCore) -> list[str]:
    commit = core.take_commit()
    assert commit is not None
    core.committed(commit, list(range(len(commit.outputs))))
    return [o.topic for o in commit.outputs]


def refreshed(core: PartitionCore, work: Work) -> None:
    assert core.claim(work)
    core.decide(work, updated(work))


def test_a_late_push_about_the_old_hardware_does_not_settle_the_newer_swap() -> None:
    """Swap OLD is watched; swap NEW replaces it and waits (the device is online); OLD's
    ``succeeded`` push arrives; when NEW is refreshed its watch must still be open: no
    ``device.rebound`` for hardware that never bound."""
    core = make_core()
    old = read(core, 0, "node-old", 0)
    refreshed(core, old)
    new = read(core, 1, "node-new", 10)  # OLD's watch ends BIND_NOT_CONFIRMED here
    assert core.claim(new)
    wait = WaitState(NOW_MS + 60_000, NOW_MS + 86_400_000, 1, 1, NOW_MS, "100611", "device_online")
    core.decide(new, Waiting(wait))
    topics_written(core)
    push(core, 0, "succeeded", "node-old")
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.early is None, "a push about the old nodeId was kept for the new swap"
    woken = core.wake(NOW_MS + 120_000, 1)
    assert [w.swap.id for w in woken] == ["evt-1"]
    refreshed(core, woken[0])
    written = topics_written(core)
    assert SETTINGS.topics.device_rebound not in written
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.state is State.WATCHING


def test_a_push_about_the_watched_nodeid_settles_it_even_when_it_came_first() -> None:
    core = make_core()
    work = read(core, 0, "node-new", 0)
    push(core, 0, "succeeded", "node-new")  # before the refresh's outcome: kept
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.early is not None
    assert entry.early[2] == "node-new"
    refreshed(core, work)
    assert SETTINGS.topics.device_rebound in topics_written(core)


def test_a_push_about_another_nodeid_leaves_an_open_watch_open() -> None:
    core = make_core()
    work = read(core, 0, "node-new", 0)
    refreshed(core, work)
    topics_written(core)
    push(core, 0, "succeeded", "node-other")
    push(core, 1, "expired", "node-other")
    assert core.watches.duplicate_pushes == 2
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.state is State.WATCHING


def test_a_push_without_a_nodeid_settles_nothing_and_is_counted() -> None:
    core = make_core()
    work = read(core, 0, "node-new", 0)
    push(core, 0, "succeeded", None)  # early: not kept
    refreshed(core, work)
    push(core, 1, "succeeded", None)  # watched: not settled
    push(core, 2, "expired", "")
    assert core.watches.unproven_pushes == 3
    assert SETTINGS.topics.device_rebound not in topics_written(core)
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.state is State.WATCHING


def test_a_poll_answer_for_an_older_watch_changes_nothing() -> None:
    """A poll sent for swap OLD's watch and answered after NEW replaced it (NEW's hardware may
    not have bound) must not settle NEW's watch."""
    core = make_core(poll=True)
    old = read(core, 0, "node-old", 0)
    refreshed(core, old)
    polls = core.wake(NOW_MS + 10**9, 1)
    assert len(polls) == 1
    assert polls[0].watch is not None
    new = read(core, 1, "node-new", 10)
    refreshed(core, new)
    topics_written(core)
    core.polled(polls[0], PollResult(bound=True))
    commit = core.take_commit()
    assert commit is None or SETTINGS.topics.device_rebound not in [o.topic for o in commit.outputs]
    entry = core.ledger.get(DEVICE)
    assert entry is not None
    assert entry.state is State.WATCHING
    assert entry.event_id == "evt-1"
