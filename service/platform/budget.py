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

Priorities. ``PRIORITY_URGENT`` (logins and token refreshes, which every other call is
waiting on) is always served first. ``PRIORITY_URGENT_LANE`` (swaps read from the urgent lane: a
person waits for them) goes next, before every bulk call, retry or poll, except that the bulk lane
keeps ``bulk_min_share`` of the window's grants (:meth:`set_bulk_min_share`): while every other
class together has had less than that share and one of its waiters may go, it goes first (but
not while it only waits for its pace and the window has room for both: :meth:`_bulk_first`).
Then two classes: ``PRIORITY_FRESH`` (0: fresh events and
their reconciliation queries) and ``PRIORITY_DEFERRED`` (>= 1: retries of deferred events).
Waiters of one class are served in FIFO order. When both classes wait, fresh ones go first,
except that the deferred class is guaranteed ``deferred_reserve`` (a fraction, default 0.2) of the
window's grants: while it has had fewer than that share of the grants in the window, a deferred
waiter goes first. So fresh events are not stuck behind a backlog of deferred retries, and deferred
retries are never starved by a stream of fresh events. When only one class waits, it may use the
whole budget. ``PRIORITY_POLL`` (bind-watch polls) has a reserve that is also its cap: while polls
have had fewer than ``poll_share`` of the limit in the window they go first (after urgent calls),
and beyond it they never go, so a saturated refresh backlog delays a due poll by at most the time
its share needs to work off the polls due before it, and refreshes always keep the rest.

Flow control. :meth:`penalize` is called on every 1010009 answer: grants stop until our oldest
grant in the window has aged out (or for the given seconds), and the limit is capped at the number
of grants we then had in the window: something else is spending the application's budget, or the
platform allows this application less than configured, and we adapt to what it actually allows.
The cap holds for a window, then rises by ``CEILING_RECOVERY`` of the limit per window without
another 1010009 (lifting it at once would spend a whole misconfigured limit every other window,
the poll share of it first). The poll share is a share of the limit in force, cap included.

Rebalances (docs/budget.md). A replica that gains share at a rebalance must not start from an
empty window while the platform still counts the calls the other replicas (or a killed previous
incarnation) made in the last minute. :meth:`rebalance` therefore *replaces* the window's content
by the application's global call log (every replica's :meth:`grant_log`, exchanged through Kafka
by ``service.shared.budget_exchange.BudgetExchange``, which this package does not import), each of
those calls weighing ``share`` of a call, while this replica's own grants from then on weigh 1.
A grant needs ``weight in window + 1 <= limit``. Summed over the replicas, the weighted preloads
are exactly the application's calls in the window, and each replica's new grants stay within
``limit - share * G``: together at most ``N - G``. As the old calls age out, the allowance grows
back to the whole share.

:meth:`freeze` stops every grant until the next :meth:`rebalance` or :meth:`thaw` (the exchange
freezes between a revocation and the next assignment, so the log it published stays complete), and
:meth:`renew_lease` lets grants happen only until a given time (the exchange renews it after each
acknowledged publication, so a replica that can no longer publish stops calling soon after).
Decisions use the monotonic clock; the log travels as epoch seconds, converted with an offset
that :meth:`reanchor` sets again: the exchange re-anchors it at every publication, to the broker's
append time of its last acknowledged record when the budget topic stamps one, else to the wall
clock read then (docs/budget.md, *Clocks*). A clock step therefore shifts the shared log for at
most one publication interval, not for the rest of the process.

Who owns what: :class:`RateBudget` (here) the waiters, their classes and the dispatcher, the share
and limit, the freeze and the lease, the wall-clock offset; :class:`~service.platform.budget_window.
GrantWindow` what the window holds; :class:`~service.platform.budget_ceiling.FlowCeiling` the pause
and the ceiling after a 1010009.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from service.metrics import Metrics
from service.platform.budget_ceiling import CEILING_RECOVERY, FlowCeiling
from service.platform.budget_queue import (
    PRIORITY_DEFERRED,
    PRIORITY_FRESH,
    PRIORITY_POLL,
    PRIORITY_URGENT,
    PRIORITY_URGENT_LANE,
    GrantQueue,
)
from service.platform.budget_window import EPSILON, GrantWindow

WINDOW_SECONDS: Final = 60.0
DEFAULT_SAFETY_MARGIN_SECONDS: Final = 1.0
MIN_PENALTY_SECONDS: Final = 1.0
RECHECK_SECONDS: Final = 1.0
"""While frozen or without a lease, the dispatcher looks again this often (a change wakes it)."""

Clock = Callable[[], float]

__all__ = [
    "CEILING_RECOVERY",
    "DEFAULT_SAFETY_MARGIN_SECONDS",
    "EPSILON",
    "PRIORITY_DEFERRED",
    "PRIORITY_FRESH",
    "PRIORITY_POLL",
    "PRIORITY_URGENT",
    "PRIORITY_URGENT_LANE",
    "WINDOW_SECONDS",
    "FlowCeiling",
    "Grant",
    "GrantQueue",
    "GrantWindow",
    "RateBudget",
]


@dataclass(frozen=True, slots=True)
class Grant:
    """One call's worth of budget: when it was granted (budget clock), its class, the wait."""

    at: float
    deferred: bool
    poll: bool
    waited: float
    lane: bool = False  # granted to a swap of the urgent lane


Sleep = Callable[[float], Awaitable[None]]


class _ClassShares:
    """The shares that order the classes of waiters (:class:`RateBudget` is one): the deferred
    reserve, the polls' share (a reserve and a cap), the bulk lane's minimum share while urgent
    swaps wait."""

    _in_window: GrantWindow
    _clock: Clock
    _limit: int
    _reserve: float
    _poll_share: float = 0.2
    _bulk_min_share: float = 0.0
    _lane_headroom = False
    _last_bulk = -math.inf  # when the bulk lane was last granted a call (budget clock)
    _span: float
    _changed: asyncio.Event

    def _effective_limit(self, now: float) -> float:
        raise NotImplementedError

    def set_poll_share(self, fraction: float) -> None:
        """The largest share of the limit that polls (``PRIORITY_POLL``) may use in a window."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError("poll share must be in (0, 1]")
        self._poll_share = fraction
        self._changed.set()

    def set_bulk_min_share(self, fraction: float) -> None:
        """The share of the window's grants the bulk lane (every class but the urgent lane)
        keeps while urgent swaps wait (``REBIND_PLATFORM__BULK_MIN_SHARE``; 0: none)."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError("bulk min share must be in [0, 1)")
        self._bulk_min_share = fraction
        self._changed.set()

    def set_lane_headroom(self, on: bool) -> None:
        """With the urgent lane on, the bulk lane leaves one call of the window free and is
        paced (:meth:`_headroom`, :meth:`_paced_until`), so an urgent swap finds a call at once,
        or within one pacing interval, instead of waiting for a saturated window to free."""
        self._lane_headroom = on
        self._changed.set()

    def _headroom(self, *, bulk: bool) -> float:
        """Calls a bulk grant must leave free in the window: one, for the next urgent swap (never
        so many that the bulk lane falls under its minimum share). Once an urgent swap took it,
        the next call that frees is the next urgent swap's: bulk grants need two free then."""
        if not bulk or not self._lane_headroom:
            return 0.0
        limit = math.floor(self._effective_limit(self._clock()) + EPSILON)
        floor = max(1, math.floor(self._bulk_min_share * limit + EPSILON))
        return float(max(0, min(1, limit - floor)))

    def _paced_until(self, now: float) -> float:
        """With the urgent lane on, the bulk lane's grants are spaced by the span over the limit
        (its steady rate when saturated), so they age out of the window one at a time: a call
        frees every interval instead of a whole burst once a window, and an urgent swap that
        finds the window full waits at most about one interval (not up to a window, as after a
        burst). The cost: a burst of bulk swaps on a quiet budget is spread at that rate too."""
        if not self._lane_headroom or self._last_bulk == -math.inf:
            return -math.inf
        return self._last_bulk + self._span / max(1.0, self._effective_limit(now))

    def polls_in_window(self) -> int:
        self._in_window.prune(self._clock())
        return len(self._in_window.poll_times)

    def lane_in_window(self) -> int:
        """Own grants to the urgent lane within the window."""
        self._in_window.prune(self._clock())
        return len(self._in_window.lane_times)

    def _poll_allowed(self, now: float) -> bool:
        polls = self._in_window.polls(now)
        cap = max(1, math.floor(self._poll_share * self._effective_limit(now) + EPSILON))
        return polls < cap

    def _deferred_first(self) -> bool:
        """The deferred class has had less than its reserve of the window's grants."""
        reserved = max(1, math.floor(self._reserve * self._limit)) if self._reserve > 0 else 0
        return self._in_window.deferred < reserved

    def _bulk_due(self) -> bool:
        """The bulk lane has had less than its minimum share of the window's grants."""
        if self._bulk_min_share <= 0:
            return False
        now = self._clock()
        self._in_window.prune(now)
        share = math.floor(self._bulk_min_share * self._effective_limit(now) + EPSILON)
        return self._in_window.bulk() < max(1, share)

    def _bulk_first(self) -> bool:
        """The bulk lane goes before a waiting urgent swap: it is below its minimum share
        (:meth:`_bulk_due`), unless it only waits for its pace (the interval between two bulk
        grants) and the window keeps room for its next grant after the urgent one. Then the
        urgent swap passes, and the bulk lane loses nothing. Without that, after a quiet window
        (a start, a pause of the calls) every urgent swap waited until the paced bulk lane had
        made its whole minimum share: 30 grants 0.1 s apart at N = 600/min, 3 s (bench 16)."""
        if not self._bulk_due():
            return False
        now = self._clock()
        paced = now + EPSILON < self._paced_until(now)
        room = self._in_window.weighted() + 2.0 + self._headroom(bulk=True)
        return not (paced and room <= self._effective_limit(now) + EPSILON)


class RateBudget(_ClassShares):
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
        wall_offset: float | None = None,
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
        if window_seconds <= 0:
            raise ValueError("window_seconds must be > 0")
        self._window = window_seconds
        self._span = window_seconds + safety_margin_seconds
        self._reserve = deferred_reserve
        self._in_window = GrantWindow(self._span)
        self._flow = FlowCeiling(self._span)
        fixed = wall_offset  # given: a wall clock that never steps (tests, simulations)
        self._wall: Clock = time.time if fixed is None else (lambda: clock() + fixed)
        self._wall_offset = self._wall() - clock()
        self._counted_since = clock()
        self._frozen = False
        self._lease_until: float | None = None
        self._queue = GrantQueue()
        if metrics is not None:
            metrics.budget_lease_expired.set_function(lambda: 1.0 if self.lease_expired() else 0.0)
        self._interrupted = False
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

    @property
    def total(self) -> int:
        """The application's whole budget (calls per window, all replicas together)."""
        return self._total

    @property
    def window_seconds(self) -> float:
        """The length of the platform's flow-control window (``rate_window_seconds``)."""
        return self._window

    @property
    def span_seconds(self) -> float:
        """How long a grant counts here: the window plus the safety margin."""
        return self._span

    @property
    def frozen(self) -> bool:
        return self._frozen

    def now(self) -> float:
        """The budget's (monotonic) clock."""
        return self._clock()

    def wall_now(self) -> float:
        """The budget's clock as epoch seconds (the fixed offset of :meth:`grant_log`)."""
        return self._clock() + self._wall_offset

    def to_wall(self, monotonic: float) -> float:
        return monotonic + self._wall_offset

    def reanchor(self, wall: float | None = None, *, at: float | None = None) -> float:
        """The epoch time was ``wall`` at budget-clock time ``at`` (default: the wall clock, now).

        Own grants are kept on the monotonic clock, so the next :meth:`grant_log` carries them at
        their true age whatever the wall clock did since they were granted. Returns the step
        (the new offset minus the old one).
        """
        when = self._clock() if at is None else at
        offset = (self._wall() if wall is None else wall) - when
        step = offset - self._wall_offset
        self._wall_offset = offset
        return step

    def set_share(self, fraction: float) -> None:
        """This replica's fraction of the application's budget (0 < fraction <= 1)."""
        self._share = self._check_share(fraction)
        self._apply_limit(self._limit_for(fraction))

    @staticmethod
    def _check_share(fraction: float) -> float:
        if not 0.0 < fraction <= 1.0:
            raise ValueError("share must be in (0, 1]")
        return fraction

    def _limit_for(self, fraction: float) -> int:
        return max(1, math.floor(fraction * self._total + 1e-9))

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

    def rebalance(self, share: float, global_log: Iterable[float]) -> None:
        """A new share, and the window's content replaced by the application's call log.

        ``global_log`` holds the epoch seconds of the calls of *every* replica of the application
        (this one's included, plus phantom calls for replicas that may have called unseen). Each
        counts ``share`` of a call in this replica's window until it ages out; this replica's
        grants from now on count 1. Ends a :meth:`freeze`.
        """
        self._share = self._check_share(share)
        now = self._clock()
        self._in_window.preload((t - self._wall_offset for t in global_log), share, now)
        self._counted_since = now
        self._frozen = False
        self._apply_limit(self._limit_for(share))

    def freeze(self) -> None:
        """Grant nothing until :meth:`rebalance` or :meth:`thaw`."""
        self._frozen = True

    def thaw(self) -> None:
        """End a :meth:`freeze`."""
        if self._frozen:
            self._frozen = False
            self._changed.set()

    def lease_until(self) -> float:
        """Grants stop at this time (budget clock) unless the lease is renewed; inf: no lease."""
        return math.inf if self._lease_until is None else self._lease_until

    def lease_expired(self) -> bool:
        """A lease was set and has run out: nothing is granted until it is renewed."""
        return self._lease_until is not None and self._clock() >= self._lease_until

    def renew_lease(self, until: float | None) -> None:
        """Grant only before ``until`` (budget clock); None: no lease (the default)."""
        expired = self._lease_until is not None and self._lease_until <= self._clock()
        self._lease_until = until
        if expired or until is None:
            self._changed.set()

    def penalize(self, seconds: float | None = None) -> None:
        """The platform answered 1010009: stop granting for a while and cap the limit."""
        now = self._clock()
        self._prune(now)
        if seconds is None:
            oldest = self._in_window.oldest(now)
            seconds = max(MIN_PENALTY_SECONDS, oldest + self._span - now)
        allowed = min(self._effective_limit(now), self._weighted())
        self._flow.penalize(now, seconds, allowed)
        self._changed.set()

    # ------------------------------------------------------------------ state
    def in_window(self) -> int:
        """This replica's own grants within the current window."""
        self._prune(self._clock())
        return len(self._in_window.own)

    def weighted_in_window(self) -> float:
        """What the window holds: own grants since the last rebalance + the weighted preload."""
        self._prune(self._clock())
        return self._weighted()

    def allowance(self) -> float:
        """Grants possible right now (ignoring a freeze, a pause or the lease); may be < 0."""
        now = self._clock()
        self._prune(now)
        return self._effective_limit(now) - self._weighted()

    def grant_log(self) -> list[float]:
        """Epoch seconds of this replica's own grants still within the window (+ margin)."""
        self._prune(self._clock())
        return [t + self._wall_offset for t in self._in_window.own]

    def counted_since(self) -> float:
        """Epoch seconds of the last :meth:`rebalance` (or construction): own grants made since
        count 1 in the window; earlier ones are part of the preload."""
        return self._counted_since + self._wall_offset

    def interrupt(self) -> None:
        """Work is being handed over (a rebalance or a shutdown): every caller waiting for a
        grant, and every later one that would have to wait, gets ``CancelledError`` until
        :meth:`resume`. Their calls were not made, so the next owner simply does them; only the
        calls already granted run to their end. Logins and token refreshes are not affected."""
        self._interrupted = True
        self._queue.cancel(urgent=False)

    def resume(self) -> None:
        self._interrupted = False

    def waiting(self) -> int:
        return self._queue.waiting()

    def _weighted(self) -> float:
        return self._in_window.weighted()

    def _prune(self, now: float) -> None:
        self._in_window.prune(now)

    def _effective_limit(self, now: float) -> float:
        return self._flow.limit(self._limit, now)

    def _lease_ok(self, now: float) -> bool:
        return self._lease_until is None or now < self._lease_until

    def _can_grant(self, now: float, *, bulk: bool = False) -> bool:
        """A grant fits now; for the bulk lane, leaving the urgent lane's headroom free and
        at its pace (:meth:`_paced_until`)."""
        self._prune(now)
        headroom = self._headroom(bulk=bulk)
        return (
            not self._frozen
            and now >= self._flow.paused_until
            and self._lease_ok(now)
            and self._weighted() + 1.0 + headroom <= self._effective_limit(now) + EPSILON
            and (not bulk or now + EPSILON >= self._paced_until(now))
        )

    def _next_free_at(self, now: float, *, bulk: bool = False) -> float:
        at = self._flow.paused_until
        if bulk:
            at = max(at, self._paced_until(now))
        if self._frozen or not self._lease_ok(now):
            at = max(at, now + RECHECK_SECONDS)  # or earlier: thaw/renew_lease wake us
        excess = self._weighted() + 1.0 + self._headroom(bulk=bulk) - self._effective_limit(now)
        if excess > EPSILON:
            at = max(at, self._in_window.frees_at(excess) + self._span)
        look = self._flow.next_look()
        if look is not None:  # the ceiling lifts before the window frees: look again then
            at = min(at, look)
        return max(at, now)

    def next_free_at(self) -> float:
        """When the next grant could happen (budget clock), if nothing changes meanwhile."""
        now = self._clock()
        if self._can_grant(now):
            return now
        return self._next_free_at(now)

    def _record(
        self,
        now: float,
        deferred: bool,
        *,
        poll: bool = False,
        lane: bool = False,
        bulk: bool = False,
    ) -> None:
        self._in_window.record(now, deferred, poll=poll, lane=lane)
        if bulk:
            self._last_bulk = now

    # ------------------------------------------------------------------ acquire
    def try_acquire(self, priority: int = PRIORITY_FRESH) -> bool:
        """Take one call's worth of budget now if nobody waits and it is free (no waiting)."""
        if self._interrupted and priority > PRIORITY_URGENT:
            return False
        now = self._clock()
        poll = priority >= PRIORITY_POLL
        lane = priority == PRIORITY_URGENT_LANE
        bulk = priority >= PRIORITY_FRESH
        if (
            self.waiting()
            or not self._can_grant(now, bulk=bulk)
            or (poll and not self._poll_allowed(now))
        ):
            return False
        self._record(now, priority > PRIORITY_FRESH, poll=poll, lane=lane, bulk=bulk)
        self._observe(0.0)
        return True

    async def acquire(self, priority: int = PRIORITY_FRESH) -> float:
        """Wait for one call's worth of budget; return the seconds waited."""
        grant = await self.acquire_grant(priority)
        return grant.waited

    async def acquire_grant(self, priority: int = PRIORITY_FRESH) -> Grant:
        """Wait for one call's worth of budget; the grant can be given back (:meth:`give_back`)
        while its call has not been sent."""
        deferred, poll = priority > PRIORITY_FRESH, priority >= PRIORITY_POLL
        lane = priority == PRIORITY_URGENT_LANE
        if self._interrupted and priority > PRIORITY_URGENT:
            raise asyncio.CancelledError  # see interrupt(): nothing is granted, not even at once
        start = self._clock()
        if (
            not self.waiting()
            and self._can_grant(start, bulk=priority >= PRIORITY_FRESH)
            and (not poll or self._poll_allowed(start))
        ):
            self._record(start, deferred, poll=poll, lane=lane, bulk=priority >= PRIORITY_FRESH)
            self._observe(0.0)
            return Grant(start, deferred, poll, 0.0, lane)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._queue.add(fut, priority)
        if (not poll and self._queue.poll) or priority < PRIORITY_FRESH:
            self._changed.set()  # the pump may sleep until a poll (or a bulk call) may go
        self._ensure_pump()
        # A caller cancelled while waiting leaves a cancelled future that the dispatcher skips;
        # one cancelled just after its grant has spent it (conservative: budget is never lent).
        granted_at = await fut
        waited = max(0.0, self._clock() - start)
        self._observe(waited)
        return Grant(granted_at, deferred, poll, waited, lane)

    def give_back(self, grant: Grant) -> None:
        """A grant whose call was not sent (its token could not be had at once): it no longer
        counts, in the window nor in the log shared with the other replicas."""
        self._in_window.remove(grant.at, grant.deferred, grant.poll, grant.lane)
        self._changed.set()

    def _observe(self, waited: float) -> None:
        if self._metrics is not None:
            self._metrics.rate_limiter_wait.observe(waited)

    def _ensure_pump(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    def _pick(self) -> tuple[deque[asyncio.Future[float]], bool] | None:
        return self._queue.pick(
            lambda: self._poll_allowed(self._clock()), self._deferred_first, self._bulk_first
        )

    async def _run_pump(self) -> None:
        while True:
            now = self._clock()
            picked = self._pick()
            if picked is None:
                if (
                    self._queue.poll and self._in_window.poll_times
                ):  # polls wait for their share to free
                    self._changed.clear()
                    await self._wait(max(self._in_window.poll_times[0] + self._span - now, 1e-3))
                    continue
                return
            queue, deferred = picked
            q = self._queue
            bulk = queue is not q.urgent and queue is not q.lane
            if self._can_grant(now, bulk=bulk):
                fut = queue.popleft()
                self._record(now, deferred, poll=queue is q.poll, lane=queue is q.lane, bulk=bulk)
                fut.set_result(now)
                await asyncio.sleep(0)  # let the granted caller run
                continue
            self._changed.clear()
            delay = self._next_free_at(now, bulk=bulk) - now
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
        self._queue.cancel(urgent=True)
