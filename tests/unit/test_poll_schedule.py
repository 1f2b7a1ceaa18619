"""The poll schedule of bind watches (service.bind.schedule): polls due in any window never
exceed the poll share, whatever the number of watched devices; a newly refreshed device gets
its early first poll even behind thousands of watches; the state stays bounded."""

from __future__ import annotations

import heapq
import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from service.bind.schedule import RECONCILE_SLACK, REPEAT_SPACING, PollGrid, PollSlots
from service.bind.watch import Watch, WatchPolicy
from service.config import PlatformSettings, Settings
from service.handler import RebindHandler
from service.metrics import Metrics
from service.pipeline import partition_core as partition_module
from service.pipeline.dedupe import DedupeIndex
from service.pipeline.intake import Routing
from service.pipeline.ledger import DeviceLedger, Entry, State, encode_entry
from service.pipeline.partition_core import PartitionCore
from service.pipeline.progress import PartitionProgress
from tests.support.events import swap_event

MINUTE = 60_000
HOUR = 60 * MINUTE


def max_in_window(times: list[int], window_ms: int) -> int:
    """The most times in one half-open window ``[t, t + window_ms)`` (the busiest starts at
    one of them)."""
    times = sorted(times)
    best, j = 0, 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] < start + window_ms:
            j += 1
        best = max(best, j - i)
    return best


def policy(grid: PollGrid, *, deadline_ms: int = 24 * 60 * MINUTE) -> WatchPolicy:
    return WatchPolicy(
        poll=True,
        poll_initial_ms=15_000,
        poll_max_ms=300_000,
        watch_deadline_ms=deadline_ms,
        grace_ms=30_000,
        grid=grid,
    )


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 40),
    window_ms=st.integers(1_000, 120_000),
    lanes=st.integers(1, 8),
    ops=st.lists(
        st.tuples(st.integers(0, 7), st.integers(0, 300), st.integers(0, 600_000), st.booleans()),
        max_size=300,
    ),
)
def test_slots_taken_in_any_window_never_exceed_the_capacity(
    capacity: int, window_ms: int, lanes: int, ops: list[tuple[int, int, int, bool]]
) -> None:
    """Every lane of the application (one per input partition, scheduling alone) places and
    releases at will: the taken slots of all lanes together, in any window, are at most the
    capacity (floor(share x N))."""
    grid = PollGrid(window_ms=window_ms, capacity=capacity, lanes=lanes)
    lane_slots = [PollSlots(grid, lane) for lane in range(lanes)]
    for lane, device, at, release in ops:
        slots = lane_slots[lane % lanes]
        if release:
            slots.release(f"d{device}")
        else:
            placed = slots.place(f"d{device}", at)
            assert placed >= at
    taken = [t for slots in lane_slots for t in slots.slot_times()]
    assert max_in_window(taken, window_ms) <= capacity


def run_watches(
    count: int, *, capacity: int, lanes: int, horizon_ms: int, fresh_every_ms: int = 0
) -> tuple[list[int], list[int]]:
    """``count`` watches with timeout 0 that never bind, spread over every lane, polled when
    due over ``horizon_ms`` (virtual clock); optionally one newly refreshed
    device every ``fresh_every_ms``. Returns every poll's time and each fresh device's delay
    from its refresh to its first poll."""
    grid = PollGrid(window_ms=MINUTE, capacity=capacity, lanes=lanes)
    watch_policy = policy(grid)
    lane_slots = [watch_policy.slots(lane, lanes) for lane in range(lanes)]
    due: list[tuple[int, str, int]] = []  # (due ms, device, lane)
    watches: dict[str, Watch] = {}
    fresh: dict[str, int] = {}
    for i in range(count):  # watched for an hour already, polled 5 times: the steady state
        lane, device = i % lanes, f"w{i}"
        old = Watch(-HOUR, 23 * HOUR, expires=False, expires_at_ms=None, next_poll_ms=0, polls=5)
        watches[device] = watch_policy.after_poll(old, 0, lane_slots[lane], device)
        heapq.heappush(due, (watches[device].due_ms, device, lane))
    next_fresh, fresh_count = (MINUTE if fresh_every_ms else horizon_ms), 0
    polls: list[int] = []
    delays: list[int] = []
    while due and due[0][0] < horizon_ms:
        if next_fresh <= due[0][0]:
            lane, device = fresh_count % lanes, f"new{fresh_count}"
            fresh_count += 1
            watches[device] = watch_policy.start(next_fresh, 0, lane_slots[lane], device)
            fresh[device] = next_fresh
            heapq.heappush(due, (watches[device].due_ms, device, lane))
            next_fresh += fresh_every_ms
            continue
        now, device, lane = heapq.heappop(due)
        polls.append(now)
        if device in fresh:  # a fresh device's first poll: it binds then, its watch ends
            delays.append(now - fresh.pop(device))
            slots = lane_slots[lane]
            assert slots is not None
            slots.release(device)
            continue
        watches[device] = watch_policy.after_poll(watches[device], now, lane_slots[lane], device)
        heapq.heappush(due, (watches[device].due_ms, device, lane))
    return polls, delays


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 3_000), capacity=st.integers(1, 40), lanes=st.integers(1, 6))
def test_polls_per_window_fit_the_share_for_any_count(
    count: int, capacity: int, lanes: int
) -> None:
    """However many devices are watched, the polls made in any 60 s window, over two hours of
    watching, are at most the share's capacity: more devices make each one's polls rarer."""
    polls, _ = run_watches(count, capacity=capacity, lanes=lanes, horizon_ms=120 * MINUTE)
    assert polls
    assert max_in_window(polls, MINUTE) <= capacity


def test_the_plain_backoff_overruns_the_share_the_grid_keeps_it() -> None:
    """The baseline: 1,000 watches on the plain backoff (15 s doubling to 300 s) are due ~200
    polls a minute at steady state, ten times a 20-poll share; on the grid, 20 at most."""
    grid = PollGrid(window_ms=MINUTE, capacity=20)
    plain = policy(grid)
    plain_polls = []
    for i in range(1_000):
        watch = plain.start(i * 60, 0)  # no slots: the plain backoff
        while watch.due_ms < 60 * MINUTE:
            plain_polls.append(watch.due_ms)
            watch = plain.after_poll(watch, watch.due_ms)
    assert max_in_window(plain_polls, MINUTE) > 10 * 20
    polls, _ = run_watches(1_000, capacity=20, lanes=1, horizon_ms=60 * MINUTE)
    assert max_in_window(polls, MINUTE) <= 20


def test_a_newly_refreshed_device_is_polled_early_behind_ten_thousand_watches() -> None:
    """10,000 watches on 6 partitions at a 20-poll share: a device refreshed every 30 s still
    has its first poll within 15 s + a few of its lane's slots (18 s apart), because repeats
    are spaced by the count and land beyond the slots already taken."""
    polls, delays = run_watches(
        10_000, capacity=20, lanes=6, horizon_ms=180 * MINUTE, fresh_every_ms=30_000
    )
    assert max_in_window(polls, MINUTE) <= 20
    assert len(delays) > 300
    delays.sort()
    assert delays[len(delays) // 2] <= 15_000 + 2 * 18_000
    assert delays[int(len(delays) * 0.9)] <= 15_000 + 4 * 18_000


def test_young_and_expiring_watches_keep_their_backoff_old_ones_are_spaced_by_the_count() -> None:
    grid = PollGrid(window_ms=MINUTE, capacity=20)
    watch_policy = policy(grid)
    slots = watch_policy.slots(0, 1)
    assert slots is not None
    for i in range(1_000):
        slots.place(f"w{i}", 10 * MINUTE + i)
    expiring = watch_policy.start(0, 3_600, slots, "exp")
    forever = watch_policy.start(0, 0, slots, "forever")
    assert expiring.next_poll_ms is not None
    assert expiring.next_poll_ms <= 15_000 + 3_000
    after = watch_policy.after_poll(expiring, 20_000, slots, "exp")
    assert after.next_poll_ms is not None
    assert after.next_poll_ms <= 20_000 + 30_000 + 3_000
    young = watch_policy.after_poll(forever, 20_000, slots, "forever")
    assert young.next_poll_ms is not None
    assert young.next_poll_ms <= 20_000 + 30_000 + 6_000  # still doubling: not spaced
    later = watch_policy.after_poll(replace(forever, polls=5), 20_000, slots, "forever")
    # 1,001 other devices hold a slot, 3 s apart: the next look is ~100 minutes away.
    assert later.next_poll_ms is not None
    assert later.next_poll_ms >= 20_000 + REPEAT_SPACING * 1_001 * 3_000


def test_a_poll_at_or_past_the_deadline_holds_no_slot() -> None:
    grid = PollGrid(window_ms=MINUTE, capacity=20)
    watch_policy = policy(grid, deadline_ms=10 * MINUTE)
    slots = watch_policy.slots(0, 1)
    assert slots is not None
    for i in range(1_000):  # every slot of the next 50 minutes is taken
        slots.place(f"w{i}", 0)
    watch = watch_policy.start(0, 0, slots, "late")
    assert watch.next_poll_ms == watch.deadline_ms == 10 * MINUTE
    assert slots.slot_of("late") is None


def test_the_table_stays_bounded_by_the_watched_devices() -> None:
    """Slots whose watch ended without a release (missed) are dropped when the table holds
    more than twice the watched devices plus the slack."""
    slots = PollSlots(PollGrid(window_ms=MINUTE, capacity=20), 0)
    watched = {f"w{i}" for i in range(100)}
    for i in range(5_000):
        slots.place(f"gone{i}", i * 3_000)
        slots.reconcile(watched)
        assert len(slots) <= 2 * len(watched) + RECONCILE_SLACK + 1
    for device in watched:
        slots.place(device, 0)
    slots.reconcile(watched)
    assert len(slots) <= 2 * len(watched) + RECONCILE_SLACK


def test_a_new_owner_adopts_the_slots_of_the_watches_it_loads() -> None:
    grid = PollGrid(window_ms=MINUTE, capacity=20, lanes=3)
    before = PollSlots(grid, 1)
    at = before.place("dev", 100_000)
    after = PollSlots(grid, 1)
    after.adopt("dev", at)
    assert after.slot_of("dev") == before.slot_of("dev")
    assert after.place("other", at) > at  # the adopted slot is not given twice
    elsewhere = PollSlots(grid, 2)
    elsewhere.adopt("dev", at)  # not a slot of this lane: nothing taken
    assert elsewhere.slot_of("dev") is None


def _core_with(watches: dict[str, Watch], lanes: int = 1) -> PartitionCore:
    """A partition core over a ledger loaded with these watches (as the ledger topic holds
    them), polling on the grid of the default settings."""
    settings = Settings(
        platform=PlatformSettings(
            base_url="https://iot.example.test:8743", app_id="app-1", secret=SecretStr("s")
        )
    )
    ledger = DeviceLedger(settings.topics.ledger, 0)
    for i, (device, watch) in enumerate(watches.items()):
        value = swap_event(device, f"n-{i}", event_id=f"e-{i}")
        entry = Entry(f"e-{i}", "/inventory/test", (i, i), f"n-{i}", State.WATCHING, watch=watch)
        entry.outcome, entry.value = "credential_updated", value
        ledger.load(device.encode(), encode_entry(entry))
    handler = RebindHandler(settings, client=Any, metrics=Metrics())  # type: ignore[arg-type]
    return PartitionCore(
        topic=settings.topics.device_swapped,
        partition=0,
        dead_letter_topic=settings.topics.dead_letter,
        progress=PartitionProgress(None, None),
        ledger=ledger,
        dedupe=DedupeIndex(settings.topics.dedupe, 0, 100),
        answers=handler.outcomes,
        watch=WatchPolicy.from_settings(settings.bind, settings.platform),
        routing=Routing("murmur2", lanes),
    )


def test_loaded_watches_keep_their_slot_or_are_placed_again_by_the_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new owner takes the slot an earlier owner placed a watch on; a watch whose next poll
    is on no slot (a record from before the grid) is placed again: a young one on the next free
    slot, old ones after it, spread on every other slot; all hold slots the grid counts."""
    # the core's clock is the wall clock (some model tests leave their own clock in place)
    monkeypatch.setattr(partition_module, "time", time)
    now = int(time.time() * 1000)
    grid = PollGrid(window_ms=MINUTE, capacity=20)
    on_slot = grid.slot_ms(grid.first_slot(now + 10 * MINUTE))
    deadline = now + 20 * HOUR
    watches = {
        "kept": Watch(now - HOUR, deadline, False, None, on_slot, polls=5),
        "young": Watch(now - 20_000, deadline, False, None, now - 5_001, polls=0),
        **{
            f"old{k}": Watch(now - HOUR, deadline, False, None, now - 7_001 - k, polls=5)
            for k in range(10)
        },
    }
    core = _core_with(watches)
    built = int(time.time() * 1000)  # the core reads the clock itself, between now and this
    slots = core.watches.slots
    assert slots is not None
    assert len(slots) == 12
    kept = core.ledger.get("kept")
    assert kept is not None
    assert kept.watch == watches["kept"]  # adopted as it stands
    young = core.ledger.get("young")
    assert young is not None
    assert young.watch is not None
    assert young.watch.next_poll_ms is not None
    assert now <= young.watch.next_poll_ms <= built + 3_000  # due: the next slot of the lane
    # old watches after the young one, on every other slot of the lane from now (3 s apart)
    olds = []
    for k in range(10):
        entry = core.ledger.get(f"old{k}")
        assert entry is not None
        assert entry.watch is not None
        assert entry.watch.next_poll_ms is not None
        olds.append(entry.watch.next_poll_ms)
    assert young.watch.next_poll_ms < min(olds)
    assert max(olds) - min(olds) >= (REPEAT_SPACING * 9 - 1) * 3_000
    assert max_in_window(slots.slot_times(), MINUTE) <= 20


def test_a_watch_that_ends_frees_its_slot() -> None:
    now = int(time.time() * 1000)
    core = _core_with({"dev": Watch(now, now + HOUR, False, None, now + MINUTE)})
    slots = core.watches.slots
    assert slots is not None
    assert slots.slot_of("dev") is not None
    entry = core.ledger.get("dev")
    assert entry is not None
    core.watches.bound("dev", entry, "push", now)
    assert slots.slot_of("dev") is None


def test_every_poll_a_lane_may_make_in_a_window_can_wait_for_its_budget_slot_at_once() -> None:
    """Behind a saturated budget a sliding window frees a burst of calls at once (the calls of
    the last burst age out together): every overdue poll the lane's share allows in a window
    must already be waiting then, or the refreshes queued behind take the burst (the polls'
    share of the calls fell to 17.6 % of the 50 % asked in a fault test, with 8 polls out per
    partition). The wake loop's room for polls is the lane's slots of one window when that is
    more than its limit: no more than that can fall due in a window."""
    now = int(time.time() * 1000)
    watches = {f"d{i}": Watch(now - HOUR, now + HOUR, False, None, now - MINUTE) for i in range(30)}
    core = _core_with(watches)  # the default grid, one lane: 20 polls a minute
    room = core.watches.poll_room(1)
    assert room == 20
    polls = core.wake(now + 10 * MINUTE, 1, room)
    assert len(polls) == 20
    assert all(p.watch is not None for p in polls)
    spread = _core_with(watches, lanes=6)
    assert spread.watches.poll_room(1) == 4  # 20 slots a minute over 6 lanes
    assert spread.watches.poll_room(8) == 8
