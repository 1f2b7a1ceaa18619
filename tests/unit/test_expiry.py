"""State that expires (issue 20, item 1): a done ledger entry older than the retention is
removed with a tombstone, a bounded number per wake step; a swap older than the retention is
answered SWAP_TOO_OLD without a call; the expired device's next fresh swap runs as a new one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from service.config import LedgerSettings
from service.pipeline import partition_core as partition_module
from service.pipeline.dedupe import DedupeIndex
from service.pipeline.expiry import EXPIRY_MARGIN_MS, Retention
from service.pipeline.ledger import DeviceLedger, State
from service.pipeline.packed import PackedEntries
from service.pipeline.partition_core import PartitionCore
from service.pipeline.progress import PartitionProgress
from service.pipeline.records import OutcomeKind, Output
from service.pipeline.work import Outcome, Work
from service.platform.errors import SERVICE_CODES, SWAP_TOO_OLD, Category, classify
from tests.support.events import swap_event
from tests.support.records import FakeRecord

T0 = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)
DAY_MS = 86_400_000
RETENTION = Retention(14 * DAY_MS, scan=64, limit=8)


def _record(offset: int, device: str, at: timedelta, *, event_id: str | None = None) -> FakeRecord:
    when = (T0 + at).strftime("%Y-%m-%dT%H:%M:%SZ")
    value = swap_event(device, f"node-{offset}", ce_time=when, event_id=event_id)
    return FakeRecord(offset, device.encode(), value, T0_MS + int(at.total_seconds() * 1000))


class _Answers:
    def __init__(self) -> None:
        self.failed: list[tuple[str, str]] = []

    def superseded(self, work: Work, newer_event_id: str) -> Outcome:
        return self.bind_failed(work, "SUPERSEDED", newer_event_id)

    def rebound(self, *args: object) -> Output:  # pragma: no cover
        raise AssertionError

    def bind_failed(self, work: Work, code: str, desc: str) -> Outcome:
        self.failed.append((work.device, code))
        record = Output("failed", work.device.encode(), code.encode())
        return Outcome(OutcomeKind.REBIND_FAILED, record)


class _Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def time(self) -> float:
        return self.now_ms / 1000


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock(T0_MS)
    monkeypatch.setattr(partition_module, "time", fake)
    return fake


def _core(answers: _Answers, ledger: DeviceLedger | None = None) -> PartitionCore:
    return PartitionCore(
        topic="in",
        partition=0,
        dead_letter_topic="dlq",
        progress=PartitionProgress(None, None),
        ledger=ledger or DeviceLedger("ledger", 0),
        dedupe=DedupeIndex("dedupe", 0, 100),
        answers=answers,
        retention=RETENTION,
    )


def _done(core: PartitionCore, offset: int, device: str, at: timedelta) -> None:
    work = core.intake(_record(offset, device, at))
    assert isinstance(work, Work)
    assert core.claim(work)
    core.decide(work, Outcome(OutcomeKind.CREDENTIAL_UPDATED, Output("ok", None, b"")))


def _ledger_outputs(core: PartitionCore) -> list[Output]:
    """The ledger records of the next transaction, which commits."""
    commit = core.take_commit()
    if commit is None:
        return []
    core.committed(commit, list(range(len(commit.outputs))))
    return [o for o in commit.outputs if o.topic == "ledger"]


def test_the_default_retention_is_14_days_and_bounded() -> None:
    assert LedgerSettings().retention_days == 14
    assert LedgerSettings().retention_ms == 14 * DAY_MS
    with pytest.raises(ValueError, match="retention_days"):
        LedgerSettings(retention_days=0.5)


def test_swap_too_old_is_a_service_code_of_its_own() -> None:
    assert SWAP_TOO_OLD in SERVICE_CODES
    spec = classify("refresh_device_key", None, SWAP_TOO_OLD)
    assert spec.category is Category.SWAP_TOO_OLD
    assert "replay" in spec.recommended_handling


def test_packed_sweep_finds_old_entries_a_bounded_number_at_a_time() -> None:
    packed = PackedEntries()
    for i in range(100):
        packed.put(f"d{i}", (f"e{i}", "/s", (i, i), "n", "ok"))
    seen: set[str] = set()
    rounds = 0
    while len(seen) < 50:
        found = packed.older_than(50, scan=16, limit=4)
        assert len(found) <= 4
        for device in found:
            packed.discard(device)
        seen.update(found)
        rounds += 1
        assert rounds < 1_000
    assert seen == {f"d{i}" for i in range(50)}
    assert len(packed) == 50
    assert packed.older_than(50, scan=10_000, limit=10_000) == []


def test_a_done_entry_past_the_retention_is_tombstoned_and_forgotten(clock: _Clock) -> None:
    answers = _Answers()
    core = _core(answers)
    _done(core, 0, "old", timedelta(0))
    _done(core, 1, "young", timedelta(days=10))
    _ledger_outputs(core)
    # Past the retention, not yet past its margin: nothing expires.
    clock.now_ms = T0_MS + RETENTION.retention_ms + EXPIRY_MARGIN_MS - 1
    for _ in range(10):
        core.wake(clock.now_ms, 10)
    assert _ledger_outputs(core) == []
    clock.now_ms += 2
    for _ in range(10):  # the sweep goes round the table
        core.wake(clock.now_ms, 10)
    tombstones = _ledger_outputs(core)
    assert [(o.key, o.value) for o in tombstones] == [(b"old", None)]
    assert core.ledger.get("old") is None
    assert core.ledger.get("young") is not None
    assert core.expired == 1


def test_waiting_and_pending_entries_never_expire(clock: _Clock) -> None:
    core = _core(_Answers())
    work = core.intake(_record(0, "pending", timedelta(0)))
    assert isinstance(work, Work)
    _ledger_outputs(core)
    clock.now_ms = T0_MS + 100 * DAY_MS
    for _ in range(10):
        core.wake(clock.now_ms, 0)
    assert _ledger_outputs(core) == []
    entry = core.ledger.get("pending")
    assert entry is not None
    assert entry.state is State.PENDING


def test_a_swap_older_than_the_retention_is_answered_without_a_call(clock: _Clock) -> None:
    answers = _Answers()
    core = _core(answers)
    clock.now_ms = T0_MS + 15 * DAY_MS
    assert core.intake(_record(0, "dev", timedelta(0))) is None
    assert answers.failed == [("dev", SWAP_TOO_OLD)]
    commit = core.take_commit()
    assert commit is not None
    assert commit.counts == [OutcomeKind.REBIND_FAILED]
    assert commit.offset == 1
    assert not [o for o in commit.outputs if o.topic == "ledger"]  # the ledger is untouched
    assert core.ledger.get("dev") is None
    assert core.too_old == 1


def test_an_expired_devices_next_fresh_swap_is_applied(clock: _Clock) -> None:
    answers = _Answers()
    core = _core(answers)
    _done(core, 0, "dev", timedelta(0))
    _ledger_outputs(core)
    clock.now_ms = T0_MS + 20 * DAY_MS
    for _ in range(10):
        core.wake(clock.now_ms, 10)
    assert [(o.key, o.value) for o in _ledger_outputs(core)] == [(b"dev", None)]
    assert core.ledger.get("dev") is None
    # The old swap read again (a replay): too old, answered SWAP_TOO_OLD, never applied.
    assert core.intake(_record(1, "dev", timedelta(0))) is None
    assert answers.failed == [("dev", SWAP_TOO_OLD)]
    fresh = core.intake(_record(2, "dev", timedelta(days=19)))
    assert isinstance(fresh, Work)
    assert core.claim(fresh)


def test_an_old_swap_of_a_device_with_a_newer_entry_is_still_superseded(clock: _Clock) -> None:
    answers = _Answers()
    core = _core(answers)
    _done(core, 0, "dev", timedelta(days=10))
    clock.now_ms = T0_MS + 15 * DAY_MS
    assert core.intake(_record(1, "dev", timedelta(0))) is None
    assert answers.failed == [("dev", "SUPERSEDED")]


def test_a_repeat_of_a_swap_accepted_while_young_is_still_run(clock: _Clock) -> None:
    """Accepted (pending) before a crash, read again by the next owner after the horizon
    passed: the ledger knows it, so it is worked on as the repeat it is."""
    core = _core(_Answers())
    record = _record(0, "dev", timedelta(0), event_id="e-1")
    assert isinstance(core.intake(record), Work)
    ledger = DeviceLedger("ledger", 0)
    output = core.ledger.record("dev")  # what the claim writes (note_claim)
    ledger.load(output.key, output.value)
    clock.now_ms = T0_MS + 15 * DAY_MS
    again = _core(_Answers(), ledger).intake(record)
    assert isinstance(again, Work)
    assert again.repeat


def test_the_sweep_finds_every_old_entry_while_the_table_is_rebuilt_under_it() -> None:
    """Entries added between steps grow the table (rebuilds reorder it): an old entry moved
    behind the cursor is found on a later round, never lost."""
    packed = PackedEntries()
    old = {f"old-{i}" for i in range(200)}
    for device in old:
        packed.put(device, ("e", "/s", (1, 0), "n", None))
    found: set[str] = set()
    for step in range(2_000):
        packed.put(f"new-{step}", ("e", "/s", (10**6, step), "n", None))  # young: kept
        for device in packed.older_than(1_000, scan=32, limit=8):
            packed.discard(device)
            found.add(device)
        if found == old:
            break
    assert found == old
    assert all(packed.get(f"new-{i}") is not None for i in range(step + 1))
