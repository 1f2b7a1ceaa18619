"""The replica's share of the application's calls per minute, spent over a sliding 60 s window.

The platform counts calls in a sliding 60 s window, so a token bucket (which allows a burst on top
of its refill rate) could overrun it. :class:`RateBudget` instead remembers when it granted each
of its last calls and grants a new one only while fewer than ``limit`` grants lie within the last
``window + safety margin`` seconds. Whatever the pattern of demand, no 60 s window ever sees more
than ``limit`` grants. The margin absorbs the difference between when we grant a call and when the
platform counts it (network latency, a request queued in the connection pool).

``limit = max(1, floor(share * rate_limit_per_minute))``. The pipeline sets the share at every
rebalance (e.g. my partitions / all partitions), so N replicas share the budget instead of
multiplying it. The floor of 1 keeps a replica able to make progress; with more replicas than
calls per minute that floor could overrun, which the settings' documentation warns about.

Priorities. ``PRIORITY_URGENT`` (< 0: logins and token refreshes, which every other call is
waiting on) is always served first. Then two classes: ``PRIORITY_FRESH`` (0: fresh events and
their reconciliation queries) and ``PRIORITY_DEFERRED`` (>= 1: retries of deferred events).
Waiters of one class are served in FIFO order. When both classes wait, fresh ones go first,
except that the deferred class is guaranteed ``deferred_reserve`` (a fraction, default 0.2) of the
window's grants: while it has had fewer than that share of the grants in the window, a deferred
waiter goes first. So fresh events are not stuck behind a backlog of deferred retries, and deferred
retries are never starved by a stream of fresh events. When only one class waits, it may use the
whole budget.

Flow control. :meth:`penalize` is called on every 1010009 answer: grants stop until our oldest
grant in the window has aged out (or for the given seconds), and for one window the limit is capped
at the number of grants we then had in the window: something else is spending the application's
budget, and we adapt to what the platform actually allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

from service.metrics import Metrics

PRIORITY_URGENT: Final = -1
PRIORITY_FRESH: Final = 0
PRIORITY_DEFERRED: Final = 1

WINDOW_SECONDS: Final = 60.0
DEFAULT_SAFETY_MARGIN_SECONDS: Final = 1.0
MIN_PENALTY_SECONDS: Final = 1.0

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RateBudget:
    def __init__(
        self,
        rate_limit_per_minute: int,
        *,
        share: float = 1.0,
        metrics: Metrics | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        window_seconds: float = WINDOW_SECONDS,
        safety_margin_seconds: float = DEFAULT_SAFETY_MARGIN_SECONDS,
        deferred_reserve: float = 0.2,
    ) -> None:
        if rate_limit_per_minute < 1:
            raise ValueError("rate_limit_per_minute must be >= 1")
        if not 0.0 <= deferred_reserve < 1.0:
            raise ValueError("deferred_reserve must be in [0, 1)")
        self._total = rate_limit_per_minute
        self._share = 1.0
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._span = window_seconds + safety_margin_seconds
        self._reserve = deferred_reserve
        self._grants: deque[tuple[float, bool]] = deque()  # (time, deferred?)
        self._deferred_in_window = 0
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._fresh: deque[asyncio.Future[None]] = deque()
        self._deferred: deque[asyncio.Future[None]] = deque()
        self._paused_until = 0.0
        self._ceiling: int | None = None
        self._ceiling_until = 0.0
        self._changed = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._limit = 1
        self.set_share(share)

    # ------------------------------------------------------------------ configuration
    @property
    def limit(self) -> int:
        """Calls this replica may make in any window (before a 1010009 ceiling)."""
        return self._limit

    @property
    def share(self) -> float:
        return self._share

    def set_share(self, fraction: float) -> None:
        """This replica's fraction of the application's budget (0 < fraction <= 1)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError("share must be in (0, 1]")
        self._share = fraction
        self._apply_limit(max(1, math.floor(fraction * self._total + 1e-9)))

    def set_limit(self, n: int) -> None:
        """Set this replica's calls per window directly."""
        if n < 1:
            raise ValueError("limit must be >= 1")
        self._share = min(1.0, n / self._total)
        self._apply_limit(n)

    def set_total(self, rate_limit_per_minute: int) -> None:
        """Change the application's whole budget, keeping this replica's share."""
        if rate_limit_per_minute < 1:
            raise ValueError("rate_limit_per_minute must be >= 1")
        self._total = rate_limit_per_minute
        self.set_share(self._share)

    def _apply_limit(self, n: int) -> None:
        self._limit = n
        if self._metrics is not None:
            self._metrics.rate_limit_per_minute.set(n)
        self._changed.set()

    def penalize(self, seconds: float | None = None) -> None:
        """The platform answered 1010009: stop granting for a while and cap the limit."""
        now = self._clock()
        self._prune(now)
        if seconds is None:
            oldest = self._grants[0][0] if self._grants else now
            seconds = max(MIN_PENALTY_SECONDS, oldest + self._span - now)
        self._paused_until = max(self._paused_until, now + seconds)
        self._ceiling = max(1, min(self._effective_limit(now), len(self._grants)))
        self._ceiling_until = now + self._span
        self._changed.set()

    # ------------------------------------------------------------------ state
    def in_window(self) -> int:
        """Grants within the current window."""
        self._prune(self._clock())
        return len(self._grants)

    def waiting(self) -> int:
        queues = (self._urgent, self._fresh, self._deferred)
        return sum(not f.done() for q in queues for f in q)

    def _prune(self, now: float) -> None:
        horizon = now - self._span
        while self._grants and self._grants[0][0] <= horizon:
            _, deferred = self._grants.popleft()
            if deferred:
                self._deferred_in_window -= 1

    def _effective_limit(self, now: float) -> int:
        if self._ceiling is not None and now < self._ceiling_until:
            return min(self._limit, self._ceiling)
        self._ceiling = None
        return self._limit

    def _can_grant(self, now: float) -> bool:
        self._prune(now)
        return now >= self._paused_until and len(self._grants) < self._effective_limit(now)

    def _next_free_at(self, now: float) -> float:
        at = self._paused_until
        excess = len(self._grants) - self._effective_limit(now)
        if excess >= 0:
            at = max(at, self._grants[excess][0] + self._span)
        if self._ceiling is not None:
            # the ceiling lifts before the window frees: look again then
            at = min(at, max(self._ceiling_until, self._paused_until))
        return max(at, now)

    def _record(self, now: float, deferred: bool) -> None:
        self._grants.append((now, deferred))
        if deferred:
            self._deferred_in_window += 1

    # ------------------------------------------------------------------ acquire
    async def acquire(self, priority: int = PRIORITY_FRESH) -> float:
        """Wait for one call's worth of budget; return the seconds waited."""
        deferred = priority > PRIORITY_FRESH
        start = self._clock()
        if not self._urgent and not self._fresh and not self._deferred and self._can_grant(start):
            self._record(start, deferred)
            self._observe(0.0)
            return 0.0
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if priority < PRIORITY_FRESH:
            self._urgent.append(fut)
        else:
            (self._deferred if deferred else self._fresh).append(fut)
        self._ensure_pump()
        # A caller cancelled while waiting leaves a cancelled future that the dispatcher skips;
        # one cancelled just after its grant has spent it (conservative: budget is never lent).
        await fut
        waited = max(0.0, self._clock() - start)
        self._observe(waited)
        return waited

    def _observe(self, waited: float) -> None:
        if self._metrics is not None:
            self._metrics.rate_limiter_wait.observe(waited)

    def _ensure_pump(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    @staticmethod
    def _drop_done(queue: deque[asyncio.Future[None]]) -> None:
        while queue and queue[0].done():
            queue.popleft()

    def _pick(self) -> tuple[deque[asyncio.Future[None]], bool] | None:
        self._drop_done(self._urgent)
        self._drop_done(self._fresh)
        self._drop_done(self._deferred)
        if self._urgent:
            return self._urgent, False
        if not self._fresh and not self._deferred:
            return None
        if not self._deferred:
            return self._fresh, False
        if not self._fresh:
            return self._deferred, True
        reserved = max(1, math.floor(self._reserve * self._limit)) if self._reserve > 0 else 0
        if self._deferred_in_window < reserved:
            return self._deferred, True
        return self._fresh, False

    async def _run_pump(self) -> None:
        while True:
            now = self._clock()
            picked = self._pick()
            if picked is None:
                return
            if self._can_grant(now):
                queue, deferred = picked
                fut = queue.popleft()
                self._record(now, deferred)
                fut.set_result(None)
                await asyncio.sleep(0)  # let the granted caller run
                continue
            self._changed.clear()
            delay = self._next_free_at(now) - now
            await self._wait(max(delay, 1e-3))  # never spin on float rounding at the edge

    async def _wait(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if the limit changes meanwhile."""
        sleeper = asyncio.ensure_future(self._sleep(max(delay, 0.0)))
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({sleeper, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, changed):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def aclose(self) -> None:
        """Stop the dispatcher; waiting callers are cancelled."""
        pump, self._pump = self._pump, None
        if pump is not None and not pump.done():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        for queue in (self._urgent, self._fresh, self._deferred):
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.cancel()
