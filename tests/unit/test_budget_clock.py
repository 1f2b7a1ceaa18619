"""Ages in budget records follow the clock as it is now, not as it was at start (issue 19.7).

A replica converts its monotonic call times to epoch seconds for the budget topic. With an offset
read once at start, a host whose clock was stepped later (NTP correcting it, a VM resumed) keeps
publishing every call shifted by that step for the rest of the process: calls that look older
than they are are counted out early by the other replicas, an overrun (docs/budget.md, *Clocks*).
"""

from __future__ import annotations

import time

import pytest

from service.platform.budget import RateBudget
from service.shared.budget_exchange import BudgetExchange, decode_record
from tests.support.budget_sim import SCOPE, MemoryTopic

TRUE0 = 1_700_000_000.0
"""The true epoch time at monotonic 500 on every host."""


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Host:
    """One host: a monotonic clock and a wall clock ``error`` seconds off the true time."""

    def __init__(self, error: float) -> None:
        self.mono = Clock(500.0)
        self.error = error

    def wall(self) -> float:
        return TRUE0 + (self.mono.now - 500.0) + self.error

    def advance(self, seconds: float) -> None:
        self.mono.now += seconds


async def _replica(
    host: Host, topic: MemoryTopic, name: str, monkeypatch: pytest.MonkeyPatch
) -> BudgetExchange:
    monkeypatch.setattr(time, "time", host.wall)  # what the budget reads as the wall clock
    budget = RateBudget(100, clock=host.mono)
    exchange = BudgetExchange({}, "budget", name, budget, scope=SCOPE, io=topic)
    await exchange.start()
    await exchange.on_assigned(0.5)
    return exchange


def _last_record(topic: MemoryTopic, name: str) -> tuple[float, tuple[float, ...]]:
    value = [v for k, v in topic.records if k == f"{SCOPE}/{name}".encode()][-1]
    record = decode_record(value)
    return record.published_at, record.grants


async def test_a_clock_step_after_start_does_not_skew_the_shared_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = MemoryTopic()
    stepped = Host(error=-30.0)  # starts 30 s behind; NTP will correct it
    a = await _replica(stepped, topic, "a", monkeypatch)
    assert a.budget.try_acquire()  # a call at the true time TRUE0
    stepped.advance(1.0)
    stepped.error = 0.0  # the clock is stepped to the right time
    stepped.advance(1.0)
    await a.on_revoked()  # a held record: complete, so the others add no slack for it
    published_at, grants = _last_record(topic, "a")
    assert published_at == pytest.approx(TRUE0 + 2.0, abs=0.02)
    assert list(grants) == [pytest.approx(TRUE0, abs=0.02)]  # its true age, not 30 s older

    # A replica on a right clock that rebalances now counts that call until it really ages out.
    right = Host(error=0.0)
    right.advance(2.0)
    b = await _replica(right, topic, "b", monkeypatch)
    assert b.last_log is not None
    assert b.last_log.calls == [pytest.approx(TRUE0, abs=0.02)]
    right.advance(58.5)  # 60.5 s after the call: it still counts (window 60 s + 1 s margin)
    assert b.budget.weighted_in_window() == pytest.approx(0.5)
    await a.budget.aclose()
    await b.budget.aclose()


class StampingTopic(MemoryTopic):
    """A budget topic whose broker stamps every record with its (true) append time."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    async def append(self, key: bytes, value: bytes) -> float | None:
        await super().append(key, value)
        return TRUE0 + (self.clock.now - 500.0)


async def test_with_broker_stamps_no_host_clock_matters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both hosts' wall clocks are wrong, in opposite directions, and one steps while running:
    anchored to the broker's append times, the shared log is right for both."""
    true = Clock(500.0)
    topic = StampingTopic(true)
    behind, ahead = Host(error=-30.0), Host(error=+45.0)

    def advance(seconds: float) -> None:
        for clock in (true, behind.mono, ahead.mono):
            clock.now += seconds

    a = await _replica(behind, topic, "a", monkeypatch)
    assert a.broker_time
    assert a.budget.try_acquire()  # at the true time TRUE0
    advance(1.0)
    behind.error = -90.0  # a's clock steps further off while it runs
    await a.on_revoked()  # a held record: complete, so the others add no slack for it
    assert list(_last_record(topic, "a")[1]) == [pytest.approx(TRUE0, abs=0.02)]

    b = await _replica(ahead, topic, "b", monkeypatch)
    assert b.broker_time
    assert b.last_log is not None
    assert b.last_log.calls == [pytest.approx(TRUE0, abs=0.02)]
    advance(59.5)  # 60.5 s after the call: it still counts (window 60 s + 1 s margin)
    assert b.budget.weighted_in_window() == pytest.approx(0.5)
    advance(1.0)  # 61.5 s: aged out
    assert b.budget.weighted_in_window() == pytest.approx(0.0)
    await a.budget.aclose()
    await b.budget.aclose()
