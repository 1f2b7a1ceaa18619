"""A budget grant is spent only when the call can leave at once (issue 19, item 5).

The client takes a grant, then the token. When the token takes long (a rotation's hold, a refused
login waiting for the right secret), the grant is stale: had the call been sent then, every call
granted during the hold would leave together on top of the calls granted after them, and a window
would hold more than N. The client gives such a grant back and takes a fresh one, token in hand.
Virtual time (the budget's clock); the calls go to an in-memory transport that notes when each
was sent.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from pydantic import SecretStr

from service.config import PlatformSettings
from service.metrics import Metrics
from service.ownership import CALL_GUARD
from service.platform import PlatformClient, RateBudget
from service.platform.budget import PRIORITY_FRESH
from tests.unit.test_budget import FakeClock, max_in_any_window

LIMIT = 10


class HeldTokens:
    """A token provider whose token cannot be had during ``[hold_from, hold_until)``."""

    def __init__(self, clock: FakeClock, hold_from: float, hold_until: float) -> None:
        self.clock = clock
        self.hold = (hold_from, hold_until)
        self.unsent = 0

    async def get(self) -> str:
        start, end = self.hold
        if start <= self.clock.now < end:
            await self.clock.sleep(end - self.clock.now)
        return "unit-token"

    async def invalidated(self, token: str) -> str:
        return await self.get()

    def release(self, token: str, *, refused: bool = False, sent: bool = True) -> None:
        self.unsent += not sent


async def _run(hold: tuple[float, float], calls: int) -> tuple[list[float], HeldTokens]:
    clock = FakeClock()
    sent: list[float] = []

    def respond(request: httpx.Request) -> httpx.Response:
        sent.append(clock.now)
        return httpx.Response(200, json={"deviceId": "dev-1", "activated": False})

    tokens = HeldTokens(clock, *hold)
    await _queries(clock, tokens, httpx.MockTransport(respond), calls)
    return sent, tokens


async def _queries(
    clock: FakeClock, tokens: HeldTokens, transport: httpx.AsyncBaseTransport, calls: int
) -> None:
    """``calls`` activation queries at once through a client on a budget of ``LIMIT``."""
    budget = RateBudget(LIMIT, metrics=Metrics(), clock=clock, sleep=clock.sleep)
    settings = PlatformSettings(
        base_url="https://iot.example.com:8743", app_id="app-1", secret=SecretStr("s" * 16)
    )
    client = PlatformClient(settings, Metrics(), budget, transport=transport, tokens=tokens)
    try:
        await clock.run(
            *(client.query_activation("dev-1", None, priority=PRIORITY_FRESH) for _ in range(calls))
        )
    finally:
        await client.aclose()
        await budget.aclose()


async def test_calls_granted_during_a_token_hold_do_not_leave_on_top_of_a_full_window() -> None:
    start = FakeClock().now
    # The first 10 calls leave at once; the next 10 are granted one window later, while the
    # token is held for 5 s; then 10 more.
    sent, tokens = await _run((start + 10, start + 66), 3 * LIMIT)
    assert len(sent) == 3 * LIMIT
    assert max_in_any_window(sent) <= LIMIT, sorted(sent)
    assert tokens.unsent == LIMIT  # the stale grants were given back, not used


async def test_a_short_token_wait_keeps_its_grant() -> None:
    start = FakeClock().now
    sent, tokens = await _run((start, start + 0.5), LIMIT)
    assert len(sent) == LIMIT
    assert tokens.unsent == 0
    assert max(sent) <= start + 0.5


async def test_a_late_token_and_slow_connections_stay_within_the_margin() -> None:
    """The grant's staleness limit leaves part of the 1 s safety margin to the way from the token
    to the platform. The start's burst: its token comes 0.9 s after the grants and each new
    connection takes 0.3 s; the next window's burst is granted when the first burst's grants age
    out of the budget's window + margin, and leaves at once. Counted where the platform counts
    them (on arrival), no window holds more than the limit. With the whole margin as the staleness
    limit (1.0 s) the first burst kept its grants and arrived at +1.2 s, and the second, at
    +61.0 s, met it in one window: 20 calls for a limit of 10."""
    clock = FakeClock()
    start = clock.now
    arrived: list[float] = []

    async def respond(request: httpx.Request) -> httpx.Response:
        if len(arrived) + pending[0] < LIMIT:  # the first burst opens its connections
            pending[0] += 1
            await clock.sleep(0.3)
            pending[0] -= 1
        arrived.append(clock.now)
        return httpx.Response(200, json={"deviceId": "dev-1", "activated": False})

    pending = [0]
    tokens = HeldTokens(clock, start, start + 0.9)
    await _queries(clock, tokens, httpx.MockTransport(respond), 2 * LIMIT)
    assert len(arrived) == 2 * LIMIT
    assert max_in_any_window(arrived) <= LIMIT, sorted(a - start for a in arrived)
    assert tokens.unsent == LIMIT  # the first burst's grants were given back and taken anew


async def test_a_call_whose_partition_moved_away_is_not_sent_and_gives_its_grant_back() -> None:
    """Only the owner calls (issue 19, item 6): the call guard bound by the pipeline is awaited
    right before the call leaves; when it says the partition moved away, nothing is sent and the
    grant no longer counts."""
    clock = FakeClock()
    sent: list[float] = []

    def respond(request: httpx.Request) -> httpx.Response:
        sent.append(clock.now)
        return httpx.Response(200, json={"deviceId": "dev-1", "activated": False})

    budget = RateBudget(LIMIT, metrics=Metrics(), clock=clock, sleep=clock.sleep)
    tokens = HeldTokens(clock, 0, 0)
    settings = PlatformSettings(
        base_url="https://iot.example.com:8743", app_id="app-1", secret=SecretStr("s" * 16)
    )
    client = PlatformClient(
        settings, Metrics(), budget, transport=httpx.MockTransport(respond), tokens=tokens
    )

    async def moved_away() -> None:
        raise asyncio.CancelledError

    async def call() -> None:
        CALL_GUARD.set(moved_away)
        with pytest.raises(asyncio.CancelledError):
            await client.query_activation("dev-1", None, priority=PRIORITY_FRESH)

    try:
        await asyncio.create_task(call())
    finally:
        await client.aclose()
        await budget.aclose()
    assert sent == []
    assert tokens.unsent == 1
    assert budget.in_window() == 0


async def test_the_budget_grants_nothing_after_interrupt_even_when_it_is_free() -> None:
    clock = FakeClock()
    budget = RateBudget(LIMIT, metrics=Metrics(), clock=clock, sleep=clock.sleep)
    budget.interrupt()
    with pytest.raises(asyncio.CancelledError):
        await budget.acquire(PRIORITY_FRESH)
    assert not budget.try_acquire(PRIORITY_FRESH)
    assert budget.in_window() == 0
    budget.resume()
    assert await budget.acquire(PRIORITY_FRESH) == 0.0
    await budget.aclose()
