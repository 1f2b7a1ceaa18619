"""DeviceLedger: the latest swap of each device, and what becomes of a swap read or woken."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from service.pipeline.intake import read_record
from service.pipeline.ledger import (
    Claim,
    DeviceLedger,
    Entry,
    State,
    Verdict,
    decode_entry,
    encode_entry,
    rebuild_work,
)
from service.pipeline.work import WaitState, Work
from tests.support.events import swap_event
from tests.support.records import FakeRecord

TOPIC = "asset.device-swapped.v1"
LEDGER_TOPIC = "device-rebind.ledger.v1"
T0 = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)


def swap(offset: int, *, event_id: str, seconds: int = 0, device: str = "dev-1") -> Work:
    """The work of a swap read at ``offset`` whose CloudEvent ``time`` is T0 + ``seconds``."""
    value = swap_event(
        device,
        f"node-{event_id}",
        event_id=event_id,
        ce_time=(T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    work = read_record(FakeRecord(offset, device.encode(), value, 0), TOPIC, 0, "dlq")
    assert isinstance(work, Work)
    return work


def wait_state(due_ms: int, *, attempts: int = 1) -> WaitState:
    return WaitState(
        due_ms=due_ms,
        deadline_ms=due_ms + 86_400_000,
        deferrals=1,
        attempts=attempts,
        first_attempt_ms=due_ms - 30_000,
        last_code="100611",
        reason="device_online",
    )


def woken(ledger: DeviceLedger, device: str = "dev-1") -> Work:
    """The work a wake-up rebuilds from a waiting entry (what PartitionCore._rebuild does)."""
    entry = ledger.get(device)
    assert entry is not None
    assert entry.state is State.WAITING
    fresh = swap(entry.order[1], event_id=entry.event_id, device=device)
    return replace(fresh, offset=None, order=entry.order, wait=entry.wait)


def reloaded(ledger: DeviceLedger, *devices: str) -> DeviceLedger:
    """A new owner's ledger, loaded from the records ``ledger`` would have written."""
    again = DeviceLedger(LEDGER_TOPIC, 0)
    for device in devices:
        record = ledger.record(device)
        again.load(record.key, record.value)
    return again


# ---- admit -----------------------------------------------------------------------------------


def test_the_first_swap_of_a_device_runs() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    admission = ledger.admit(swap(0, event_id="a"))
    assert admission.verdict is Verdict.RUN
    assert not admission.repeat
    assert admission.replaced is None
    entry = ledger.get("dev-1")
    assert entry is not None
    assert (entry.event_id, entry.state, entry.order[1]) == ("a", State.PENDING, 0)


def test_a_newer_swap_runs_and_an_older_one_is_superseded() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    ledger.admit(swap(0, event_id="a", seconds=10))
    assert ledger.admit(swap(1, event_id="b", seconds=20)).verdict is Verdict.RUN
    older = ledger.admit(swap(2, event_id="c", seconds=15))  # arrives late, happened earlier
    assert older.verdict is Verdict.OLDER
    assert older.newer_event_id == "b"
    entry = ledger.get("dev-1")
    assert entry is not None
    assert entry.event_id == "b"


def test_of_two_swaps_at_the_same_time_the_one_read_later_wins() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    ledger.admit(swap(0, event_id="a", seconds=10))
    assert ledger.admit(swap(1, event_id="b", seconds=10)).verdict is Verdict.RUN


def test_devices_do_not_compete() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    ledger.admit(swap(0, event_id="a", seconds=10, device="dev-1"))
    assert ledger.admit(swap(1, event_id="b", seconds=5, device="dev-2")).verdict is Verdict.RUN
    assert len(ledger) == 2


def test_a_newer_swap_replaces_a_waiting_one() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    first = swap(0, event_id="a")
    ledger.admit(first)
    assert ledger.claim(first) == (Claim.CLAIMED, None)
    assert ledger.wait(first, wait_state(5_000))
    assert ledger.waiting == 1
    admission = ledger.admit(swap(1, event_id="b", seconds=1))
    assert admission.verdict is Verdict.RUN
    assert admission.replaced is not None
    assert admission.replaced.event_id == "a"
    assert admission.replaced.state is State.WAITING
    assert ledger.waiting == 0
    assert ledger.pop_due(10**15, 10) == []


def test_the_same_event_at_another_offset_is_a_duplicate() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    ledger.admit(swap(0, event_id="a"))
    assert ledger.admit(swap(5, event_id="a")).verdict is Verdict.DUPLICATE


def test_a_pending_swap_read_again_by_the_next_owner_runs_as_a_repeat() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    ledger.admit(swap(3, event_id="a"))
    again = reloaded(ledger, "dev-1")
    admission = again.admit(swap(3, event_id="a"))
    assert admission.verdict is Verdict.RUN
    assert admission.repeat


@pytest.mark.parametrize("state", [State.WAITING, State.DONE])
def test_a_decided_swap_read_again_is_skipped(state: State) -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    work = swap(3, event_id="a")
    ledger.admit(work)
    ledger.claim(work)
    if state is State.WAITING:
        assert ledger.wait(work, wait_state(5_000))
    else:
        assert ledger.done(work, "credential_updated")
    again = reloaded(ledger, "dev-1")
    assert again.admit(swap(3, event_id="a")).verdict is Verdict.SKIP


# ---- claim, done, wait -----------------------------------------------------------------------


def test_a_job_whose_swap_was_overtaken_is_superseded_at_claim() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    first = swap(0, event_id="a")
    ledger.admit(first)
    ledger.admit(swap(1, event_id="b"))
    assert ledger.claim(first) == (Claim.SUPERSEDED, "b")


def test_done_and_wait_apply_only_to_the_latest_swap() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    first, second = swap(0, event_id="a"), swap(1, event_id="b")
    ledger.admit(first)
    assert ledger.claim(first) == (Claim.CLAIMED, None)
    ledger.admit(second)  # arrives while the first one's call is in flight
    assert not ledger.done(first, "credential_updated")
    assert not ledger.wait(first, wait_state(5_000))
    assert ledger.waiting == 0
    assert ledger.done(second, "rebind_failed")
    entry = ledger.get("dev-1")
    assert entry is not None
    assert (entry.event_id, entry.state, entry.outcome) == ("b", State.DONE, "rebind_failed")


def test_a_woken_swap_is_claimed_once_and_waits_again() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    work = swap(0, event_id="a")
    ledger.admit(work)
    ledger.claim(work)
    ledger.wait(work, wait_state(5_000))
    [(device, due)] = ledger.pop_due(5_000, 10)
    assert (device, due.state) == ("dev-1", State.WAITING)  # waiting until claimed
    again = woken(ledger)
    assert ledger.claim(again) == (Claim.CLAIMED, None)
    assert ledger.waiting == 0
    entry = ledger.get("dev-1")
    assert entry is not None
    assert entry.state is State.PENDING
    assert ledger.claim(again) == (Claim.GONE, None)  # no longer waiting: not claimed twice
    assert ledger.wait(again, wait_state(9_000, attempts=2))
    assert ledger.waiting == 1
    assert ledger.next_due_ms() == 9_000


def test_a_woken_swap_replaced_before_its_claim_is_gone() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    work = swap(0, event_id="a")
    ledger.admit(work)
    ledger.claim(work)
    ledger.wait(work, wait_state(5_000))
    ledger.pop_due(5_000, 10)
    late = woken(ledger)
    ledger.admit(swap(1, event_id="b"))  # supersedes the waiting swap (answered at admission)
    assert ledger.claim(late) == (Claim.GONE, None)


# ---- waiting swaps ---------------------------------------------------------------------------


def _waiting(ledger: DeviceLedger, device: str, offset: int, due_ms: int) -> None:
    work = swap(offset, event_id=f"{device}-{offset}", device=device)
    ledger.admit(work)
    ledger.claim(work)
    assert ledger.wait(work, wait_state(due_ms))


def test_pop_due_hands_out_the_earliest_due_first_up_to_the_limit() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    for offset, (device, due) in enumerate([("d3", 300), ("d1", 100), ("d4", 900), ("d2", 200)]):
        _waiting(ledger, device, offset, due)
    assert ledger.next_due_ms() == 100
    assert [d for d, _ in ledger.pop_due(250, 1)] == ["d1"]
    assert [d for d, _ in ledger.pop_due(250, 10)] == ["d2"]
    assert [d for d, _ in ledger.pop_due(10_000, 10)] == ["d3", "d4"]
    assert ledger.pop_due(10_000, 10) == []
    assert ledger.waiting == 4  # they wait until their jobs claim them


def test_pop_due_skips_swaps_that_no_longer_wait_for_that_time() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    _waiting(ledger, "d1", 0, 100)
    _waiting(ledger, "d2", 1, 200)
    ledger.admit(swap(2, event_id="newer", device="d1"))  # d1's waiting swap is replaced
    assert [d for d, _ in ledger.pop_due(1_000, 10)] == ["d2"]
    assert ledger.next_due_ms() is None


def test_an_entry_is_handed_out_once_when_an_earlier_item_had_the_same_due_time() -> None:
    """Found by the model: the waiting swap of d1 is replaced by a newer one due in the same
    millisecond. The replaced entry's heap item looked live (same due time), so d1 was handed
    out twice: with the bind watch, its watch ended twice (two outcome records)."""
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    _waiting(ledger, "d1", 0, 100)
    newer = swap(1, event_id="newer", device="d1")
    ledger.admit(newer)
    ledger.claim(newer)
    assert ledger.wait(newer, wait_state(100))
    assert [(d, e.event_id) for d, e in ledger.pop_due(1_000, 10)] == [("d1", "newer")]
    assert ledger.pop_due(1_000, 10) == []


def test_a_record_loaded_twice_is_handed_out_once() -> None:
    source = DeviceLedger(LEDGER_TOPIC, 0)
    _waiting(source, "d1", 0, 100)
    record = source.record("d1")
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    ledger.load(record.key, record.value)
    ledger.load(record.key, record.value)
    assert ledger.waiting == 1
    assert [d for d, _ in ledger.pop_due(1_000, 10)] == ["d1"]
    assert ledger.pop_due(1_000, 10) == []


# ---- records ---------------------------------------------------------------------------------


def test_records_round_trip() -> None:
    pending = Entry("a", "/src", (1_000, 4), "node-a", State.PENDING)
    done = Entry("b", "/src", (2_000, 5), "node-b", State.DONE, outcome="credential_updated")
    waiting = Entry(
        "c",
        "/src",
        (3_000, 6),
        "node-c",
        State.WAITING,
        wait=replace(wait_state(50_000), reason="transient", attempt_deadline_ms=60_000),
        value=b'{"binary": "\x00\xff"}',
        headers=[("ce_id", b"c"), ("raw", b"\x00\x01")],
    )
    for entry in (pending, done, waiting):
        assert decode_entry(encode_entry(entry)) == entry


def test_a_waiting_record_keeps_the_swap_to_retry() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    work = swap(7, event_id="a")
    ledger.admit(work)
    ledger.claim(work)
    ledger.wait(work, wait_state(5_000))
    record = ledger.record("dev-1")
    assert (record.topic, record.key, record.partition) == (LEDGER_TOPIC, b"dev-1", 0)
    assert record.value is not None
    entry = decode_entry(record.value)
    assert entry is not None
    assert entry.value == work.raw_value
    assert entry.wait == wait_state(5_000)


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"{}",
        b'{"v":1,"eventId":"a"}',
        b'{"v":1,"eventId":"a","source":"s","timeMs":1,"offset":2,"nodeId":"n","state":"waiting"}',
    ],
)
def test_unreadable_records_are_ignored(value: bytes) -> None:
    assert decode_entry(value) is None
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    ledger.load(b"dev-1", value)
    assert ledger.get("dev-1") is None


def test_loading_keeps_the_last_record_of_each_device_and_honours_tombstones() -> None:
    source = DeviceLedger(LEDGER_TOPIC, 0)
    _waiting(source, "d1", 0, 100)
    first = source.record("d1")
    source.admit(swap(1, event_id="later", device="d1"))
    second = source.record("d1")
    _waiting(source, "d2", 2, 200)
    third = source.record("d2")

    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    for record in (first, second, third):
        ledger.load(record.key, record.value)
    entry = ledger.get("d1")
    assert entry is not None
    assert (entry.event_id, entry.state) == ("later", State.PENDING)
    assert ledger.waiting == 1
    assert [d for d, _ in ledger.pop_due(1_000, 10)] == ["d2"]
    ledger.load(b"d2", None)  # a tombstone
    assert ledger.get("d2") is None
    assert ledger.waiting == 0
    ledger.load(None, second.value)  # no key: ignored
    assert len(ledger) == 1


def test_a_waiting_swap_of_the_urgent_lane_comes_back_from_its_lane() -> None:
    """A swap of the urgent lane that waits (or is watched) is read back by the next owner with
    the lane's topic: its origin offset is an offset of the lane, so its outcome's source
    headers (what replay follows to the original record) must name the lane, not the input."""
    urgent_topic = "asset.device-swapped.urgent.v1"
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    work = replace(swap(3, event_id="e-urgent"), topic=urgent_topic, urgent=True)
    ledger.admit(work)
    assert ledger.wait(work, wait_state(1_000))
    again = reloaded(ledger, "dev-1")
    entry = again.get("dev-1")
    assert entry is not None
    back = rebuild_work(TOPIC, 0, "dev-1", entry)
    assert back is not None
    assert (back.topic, back.urgent, back.origin_offset) == (urgent_topic, True, 3)
    assert back.origin == f"{urgent_topic}:0:3"
    # waiting again keeps the mark once; a bulk swap carries none
    assert again.claim(back)[0] is Claim.CLAIMED
    assert again.wait(back, wait_state(2_000))
    kept = again.get("dev-1")
    assert kept is not None
    assert [name for name, _ in kept.headers].count("rebind-lane-topic") == 1
    bulk = DeviceLedger(LEDGER_TOPIC, 0)
    plain = swap(4, event_id="e-bulk")
    bulk.admit(plain)
    assert bulk.wait(plain, wait_state(1_000))
    entry = bulk.get("dev-1")
    assert entry is not None
    assert (rebuild_work(TOPIC, 0, "dev-1", entry) or plain).topic == TOPIC
