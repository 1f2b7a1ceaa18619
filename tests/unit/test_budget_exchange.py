"""The budget across rebalances, without Kafka (docs/budget.md).

RateBudget's weighted preload, the budget-topic record, the global log (stale records add slack),
and the whole scheme on virtual time: replicas that join, leave, are killed and restarted never
overrun N calls in any 60 s window together, and keep using the budget when saturated.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from service.platform.budget import PRIORITY_DEFERRED, RateBudget
from service.shared.budget_exchange import (
    SPAN_SECONDS,
    BudgetExchange,
    BudgetRecord,
    InvalidBudgetRecordError,
    build_global_log,
    decode_record,
    encode_record,
    is_complete,
    phantom_calls,
)
from tests.support.budget_sim import (
    SCOPE,
    WALL0,
    MemoryTopic,
    Simulation,
    max_in_any_window,
)


class Clock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


OFFSET = WALL0 - 500.0
"""wall = monotonic + OFFSET for the budgets below (monotonic 500 is WALL0)."""


def _budget(clock: Clock, total: int = 100) -> RateBudget:
    return RateBudget(total, clock=clock, wall_offset=OFFSET)


def _grant_all(budget: RateBudget) -> int:
    n = 0
    while budget.try_acquire():
        n += 1
    return n


# ---------------------------------------------------------------------------- RateBudget
def test_preload_weighs_share_and_reduces_the_allowance() -> None:
    clock = Clock()
    budget = _budget(clock)
    others = [WALL0 - 10.0] * 50  # 50 calls of other replicas, 10 s ago
    budget.rebalance(0.5, others)
    assert budget.limit == 50
    assert budget.weighted_in_window() == pytest.approx(25.0)
    assert budget.allowance() == pytest.approx(25.0)
    assert _grant_all(budget) == 25
    # the old calls leave the window 61 s after they were made: the share is whole again
    assert budget.next_free_at() == pytest.approx(500.0 - 10.0 + SPAN_SECONDS)
    clock.now = 500.0 - 10.0 + SPAN_SECONDS + 0.01
    assert _grant_all(budget) == 25
    assert budget.in_window() == 50


def test_a_configured_window_shortens_the_preload_and_the_phantoms() -> None:
    """With a 12 s window, calls 20 s old no longer count, at a rebalance or as phantoms."""
    clock = Clock()
    budget = RateBudget(100, clock=clock, wall_offset=OFFSET, window_seconds=12.0)
    span = budget.span_seconds
    assert span == pytest.approx(13.0)
    old = BudgetRecord(
        instance="gone",
        scope="s",
        published_at=WALL0 - 20.0,
        limit=3,
        grants=(WALL0 - 21.0,),
        held=False,
        final=False,
        assigned_at=None,
        counted_since=WALL0 - 21.0,
    )
    # it may have called 3 times until its lease ended 10 s ago; its call 21 s ago is gone
    assert phantom_calls(old, 10.0, span) == [WALL0 - 10.0] * 3
    glog = build_global_log(
        [old],
        own_instance="me",
        own_grants=[WALL0 - 20.0, WALL0 - 5.0],
        fresh_after=WALL0,
        now=WALL0,
        lease_seconds=10.0,
        span_seconds=span,
    )
    assert sorted(glog.calls) == pytest.approx([WALL0 - 10.0] * 3 + [WALL0 - 5.0])
    # with the default 61 s span the same log would hold the call 20 s ago too
    assert (
        len(
            build_global_log(
                [old],
                own_instance="me",
                own_grants=[WALL0 - 20.0],
                fresh_after=WALL0,
                now=WALL0,
                lease_seconds=10.0,
            ).calls
        )
        == 5
    )
    budget.rebalance(0.5, [WALL0 - 20.0] * 50)
    assert budget.weighted_in_window() == pytest.approx(0.0)


def test_grant_log_is_in_wall_clock_and_survives_rebalances() -> None:
    clock = Clock()
    budget = _budget(clock)
    assert budget.try_acquire()
    clock.now += 1.5
    assert budget.try_acquire()
    assert budget.grant_log() == pytest.approx([WALL0, WALL0 + 1.5])
    budget.rebalance(0.5, budget.grant_log())
    # own grants before the rebalance are in the preload (weight 0.5) and still ours to report
    assert budget.weighted_in_window() == pytest.approx(1.0)
    assert budget.grant_log() == pytest.approx([WALL0, WALL0 + 1.5])
    assert budget.counted_since() == pytest.approx(WALL0 + 1.5)
    clock.now = 500.0 + SPAN_SECONDS + 0.5
    assert budget.grant_log() == pytest.approx([WALL0 + 1.5])


def test_fractional_weights_never_round_in_our_favour() -> None:
    clock = Clock()
    budget = _budget(clock, total=99)
    budget.rebalance(1 / 3, [WALL0 - 1.0] * 99)  # 33 calls' worth exactly
    assert budget.limit == 33
    assert not budget.try_acquire()
    budget.rebalance(1 / 3, [WALL0 - 1.0] * 97)  # 32.33: one more call fits, not two
    assert _grant_all(budget) == 0
    budget.rebalance(1 / 3, [WALL0 - 1.0] * 96)  # 32
    assert _grant_all(budget) == 1


def test_hold_and_lease_stop_grants_until_released_or_renewed() -> None:
    clock = Clock()
    budget = _budget(clock)
    budget.freeze()
    assert not budget.try_acquire()
    budget.thaw()
    assert budget.try_acquire()
    budget.renew_lease(clock.now + 6.0)
    assert budget.try_acquire()
    clock.now += 6.0
    assert not budget.try_acquire()
    budget.renew_lease(clock.now + 6.0)
    assert budget.try_acquire()
    budget.freeze()
    budget.rebalance(1.0, [])  # an assignment ends the hold
    assert budget.try_acquire()


async def test_a_waiter_is_woken_by_release() -> None:
    never = asyncio.Event()

    async def sleep_forever(_: float) -> None:
        await never.wait()

    clock = Clock()
    budget = RateBudget(10, clock=clock, sleep=sleep_forever)
    budget.freeze()
    waiter = asyncio.create_task(budget.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()
    budget.rebalance(0.5, [])
    assert await asyncio.wait_for(waiter, 1.0) == 0.0
    await budget.aclose()


def test_penalize_counts_the_preload() -> None:
    clock = Clock()
    budget = _budget(clock)
    budget.rebalance(0.5, [WALL0 - 30.0] * 40)  # 20 in the window
    assert _grant_all(budget) == 30
    budget.penalize()
    # paused until the oldest entry (a preloaded call) ages out, capped at what we had (50)
    assert not budget.try_acquire()
    assert budget.next_free_at() == pytest.approx(500.0 - 30.0 + SPAN_SECONDS)


def test_deferred_reserve_still_counts_after_a_rebalance() -> None:
    clock = Clock()
    budget = _budget(clock)
    for _ in range(5):
        assert budget.try_acquire(PRIORITY_DEFERRED)
    budget.rebalance(0.5, budget.grant_log())
    assert budget.in_window() == 5
    assert budget.weighted_in_window() == pytest.approx(2.5)


# ---------------------------------------------------------------------------- records
def _record(**kw: object) -> BudgetRecord:
    fields: dict[str, object] = {
        "instance": "b",
        "scope": SCOPE,
        "published_at": WALL0,
        "limit": 50,
        "grants": (),
        "held": False,
        "final": False,
        "assigned_at": WALL0 - 100.0,
        "counted_since": WALL0 - 100.0,
    }
    fields.update(kw)
    return BudgetRecord(**fields)  # type: ignore[arg-type]


def test_record_round_trip_rounds_times_up_and_packs_them() -> None:
    record = _record(grants=(WALL0 - 5.0001, WALL0 - 5.0001, WALL0 - 1.0))
    value = encode_record(record)
    payload = json.loads(value)
    assert payload["grants"] == [[pytest.approx(WALL0 - 5.0), 2], [pytest.approx(WALL0 - 1.0), 1]]
    back = decode_record(value)
    assert back.grants == pytest.approx((WALL0 - 5.0, WALL0 - 5.0, WALL0 - 1.0))
    assert all(b >= a for a, b in zip(record.grants, back.grants, strict=True))
    assert back.instance == "b"
    assert back.limit == 50


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"not json",
        b"[]",
        b'{"version": 2}',
        b'{"version": 1, "instance": "b", "scope": "s", "limit": 5, "published_at": 1,'
        b' "counted_since": 1, "held": false, "final": false, "grants": [[1, 0]]}',
        b'{"version": 1, "instance": "b", "scope": "s", "limit": 5, "published_at": "x",'
        b' "counted_since": 1, "held": false, "final": false, "grants": []}',
    ],
)
def test_invalid_records_are_refused(value: bytes) -> None:
    with pytest.raises(InvalidBudgetRecordError):
        decode_record(value)


def test_completeness() -> None:
    assert is_complete(_record(held=True), fresh_after=WALL0 + 50)
    assert is_complete(_record(assigned_at=WALL0 + 60), fresh_after=WALL0 + 50)
    assert not is_complete(_record(), fresh_after=WALL0 + 50)
    assert is_complete(_record(), fresh_after=WALL0 + 50, recent_after=WALL0 - 1)


def test_phantom_calls_bound_what_a_vanished_replica_could_still_call() -> None:
    # It had 45 calls that still count when its lease ran out: at most 5 more.
    lease = 6.0
    grants = tuple([WALL0 - 20.0] * 45 + [WALL0 - 59.0] * 5)  # the 5 old ones age out by then
    phantoms = phantom_calls(_record(grants=grants), lease)
    assert phantoms == [WALL0 + lease] * 5
    # grants from before its last rebalance weighed less than 1 in its window: they do not count
    assert len(phantom_calls(_record(grants=grants, counted_since=WALL0 - 10.0), lease)) == 50


def test_global_log_replaces_own_record_and_adds_slack_for_stale_ones() -> None:
    now = WALL0
    records = [
        _record(instance="a", grants=(now - 1.0,) * 3, held=True),  # ours, old: replaced
        _record(instance="b", grants=(now - 10.0,) * 20, held=True),  # revoked: complete
        _record(instance="c", grants=(now - 10.0,) * 20, limit=30, published_at=now - 15.0),
        _record(instance="d", grants=(now - 90.0,) * 20, published_at=now - 80.0),  # gone
    ]
    glog = build_global_log(
        records,
        own_instance="a",
        own_grants=[now - 2.0] * 7,
        fresh_after=now - 5.0,
        now=now,
        lease_seconds=6.0,
    )
    assert glog.logged == 7 + 20 + 20
    assert glog.phantom == 10  # c: limit 30, 20 calls still counting at its lease's end
    assert glog.stale == ("c",)
    assert len(glog.calls) == 57
    assert glog.replicas == 3


# ---------------------------------------------------------------------------- exchange
async def test_exchange_publishes_reads_and_rebalances_in_memory() -> None:
    topic = MemoryTopic()
    clock = Clock()
    a_budget, b_budget = _budget(clock), _budget(clock)
    a = BudgetExchange({}, "t", "a", a_budget, scope=SCOPE, io=topic)
    b = BudgetExchange({}, "t", "b", b_budget, scope=SCOPE, io=topic)
    await a.start()
    assert a_budget.frozen  # nothing before the first assignment
    await a.on_assigned(1.0)
    assert not a_budget.frozen
    assert _grant_all(a_budget) == 100
    clock.now += 5.0
    await b.start()
    await a.on_revoked()
    await b.on_revoked()
    await a.on_assigned(0.5)
    await b.on_assigned(0.5)
    # the 100 calls made 5 s ago weigh half in each window: nothing left until they age out
    assert a_budget.allowance() == pytest.approx(0.0)
    assert b_budget.allowance() == pytest.approx(0.0)
    assert b.last_log is not None
    assert b.last_log.logged == 100
    assert b.last_log.phantom == 0


async def test_another_scope_is_ignored() -> None:
    topic = MemoryTopic()
    clock = Clock()
    other = BudgetExchange({}, "t", "x", _budget(clock), scope="other/app", io=topic)
    await other.start()
    await other.on_assigned(1.0)
    assert _grant_all(other.budget) == 100
    await other.publish()
    mine = BudgetExchange({}, "t", "a", _budget(clock), scope=SCOPE, io=topic)
    await mine.start()
    await mine.on_assigned(1.0)
    assert mine.budget.allowance() == pytest.approx(100.0)


async def test_a_restarted_process_inherits_its_killed_predecessors_calls() -> None:
    topic = MemoryTopic()
    clock = Clock()
    first = BudgetExchange({}, "t", "a", _budget(clock), scope=SCOPE, io=topic)
    await first.start()
    await first.on_assigned(1.0)
    clock.now += 1.0
    assert _grant_all(first.budget) == 100
    await first.publish()
    clock.now += 10.0  # SIGKILL: no final record
    second = BudgetExchange({}, "t", "a", _budget(clock), scope=SCOPE, io=topic)
    await second.start()
    await second.on_revoked()
    await second.on_assigned(1.0)
    assert second.budget.allowance() <= 0.0
    assert not second.budget.try_acquire()
    # its own records carry the predecessor's calls on, for the other replicas
    payload = json.loads(topic.records[-1][1] or b"")
    assert sum(n for _, n in payload["grants"]) == 100


async def test_a_stopped_process_leaves_a_final_held_record() -> None:
    topic = MemoryTopic()
    clock = Clock()
    ex = BudgetExchange({}, "t", "a", _budget(clock), scope=SCOPE, io=topic)
    await ex.start()
    await ex.on_assigned(1.0)
    assert _grant_all(ex.budget) == 100
    await ex.stop()
    assert ex.budget.frozen
    record = decode_record(topic.records[-1][1])
    assert record.final
    assert record.held
    assert len(record.grants) == 100


async def test_an_unannounced_rebalance_publishes_first_and_warns() -> None:
    topic = MemoryTopic()
    clock = Clock()
    ex = BudgetExchange({}, "t", "a", _budget(clock), scope=SCOPE, io=topic)
    await ex.start()
    await ex.on_assigned(1.0)
    assert _grant_all(ex.budget) == 100
    with capture_logs() as logs:
        await ex.on_assigned(0.5)  # no on_revoked in between
    assert ex.budget.allowance() == pytest.approx(0.0)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "budget_revocation_not_announced"
    ]
    rebalanced = next(e for e in logs if e["event"] == "budget_rebalanced")
    assert rebalanced["global_calls_in_window"] == 100
    assert rebalanced["allowance"] == 0.0


# ---------------------------------------------------------------------------- simulations
def test_saturation_through_1_2_3_1_replicas_uses_at_least_90_percent() -> None:
    """Six minutes, 6 partitions, every replica always wanting more than it gets."""
    n = 120

    async def run() -> Simulation:
        sim = Simulation(n, 6, seed=3)
        await sim.join("r1")
        await sim.advance_to(60.0)
        await sim.join("r2", stagger=1.0, sync_delay=0.5)
        await sim.advance_to(120.0)
        await sim.join("r3", stagger=1.0, sync_delay=0.5)
        await sim.advance_to(180.0)
        await sim.leave("r2", stagger=1.0, sync_delay=0.5)
        await sim.leave("r3", stagger=1.0, sync_delay=0.5)
        await sim.advance_to(360.0)
        return sim

    sim = asyncio.run(run())
    per_minute = sim.per_minute(0.0, 6)
    assert max_in_any_window(sim.calls) <= n
    assert all(c >= 0.9 * n for c in per_minute), per_minute
    assert len(sim.calls) >= 0.9 * 6 * n


def test_a_replica_killed_between_publications_is_covered_by_slack() -> None:
    """r1's first calls age out at 61 s and it calls 50 times at once; its last record (60 s)
    does not name them, and it is killed at 61.5 s. At the rebalance (71.5 s) r0 must still count
    them, or it would add 50 calls to a window that already holds 100."""
    n = 100

    async def run() -> Simulation:
        sim = Simulation(n, 2, seed=5)
        await sim.start("r0")
        await sim.join("r1")
        await sim.advance_to(61.5)
        await sim.kill("r1")
        await sim.advance_to(200.0)
        return sim

    sim = asyncio.run(run())
    r1 = sim.replicas["r1"]
    assert sum(t >= 61.0 for t in r1.grants) == 50
    assert max_in_any_window(sim.calls) <= n
    assert sim.replicas["r0"].exchange.last_log is not None
    assert sim.replicas["r0"].exchange.last_log.stale == ("r1",)


_ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["join", "leave", "kill", "restart"]),
        st.floats(min_value=0.5, max_value=90.0),  # seconds before the action
        st.floats(min_value=0.0, max_value=3.0),  # revocations spread over this
        st.floats(min_value=0.0, max_value=2.0),  # then the assignment after this
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limit=st.sampled_from([7, 30, 100, 120]),
    partitions=st.integers(min_value=1, max_value=8),
    actions=_ACTIONS,
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_no_60s_window_ever_exceeds_n_however_partitions_move(
    limit: int, partitions: int, actions: list[tuple[str, float, float, float]], seed: int
) -> None:
    async def run() -> Simulation:
        sim = Simulation(limit, partitions, seed=seed)
        await sim.join("r0")
        fresh = 1
        for action, gap, stagger, sync in actions:
            await sim.advance_to(sim.now + gap)
            members, dead = sim.members(), sim.dead()
            kw = {"stagger": stagger, "sync_delay": sync}
            if action == "join" and len(members) < partitions:
                await sim.join(f"r{fresh}", **kw)
                fresh += 1
            elif action == "leave" and len(members) > 1:
                await sim.leave(sim.rng.choice(members), **kw)
            elif action == "kill" and len(members) > 1:
                await sim.kill(sim.rng.choice(members), **kw)
            elif action == "restart" and dead and len(members) < partitions:
                await sim.join(sim.rng.choice(dead), **kw)
        await sim.advance_to(sim.now + 130.0)
        return sim

    sim = asyncio.run(run())
    assert sim.calls, "nobody called"
    assert max_in_any_window(sim.calls) <= limit


def test_a_record_of_very_many_calls_stays_small_and_never_makes_a_call_look_earlier() -> None:
    """A replica with a huge budget (or a preload of phantoms) still publishes a record that
    fits a Kafka message: past MAX_PACKED_ENTRIES distinct times, times are rounded up."""
    import random  # noqa: PLC0415 - this test only
    import time  # noqa: PLC0415

    from service.shared.budget_exchange import (  # noqa: PLC0415
        MAX_PACKED_ENTRIES,
        pack_times,
        unpack_times,
    )

    rng = random.Random(3)
    now = time.time()
    times = sorted(now + rng.random() * 60 for _ in range(100_000))
    packed = pack_times(times)
    assert len(packed) <= MAX_PACKED_ENTRIES
    back = unpack_times(packed)
    assert len(back) == len(times)
    # rounding up only: the k-th call never looks earlier than it was
    assert all(b >= t - 1e-9 for b, t in zip(back, times, strict=True))
    assert len(str(packed)) < 200_000
