"""The callers waiting for a grant of the budget, by class, and which of them goes next
(:mod:`service.platform.budget`; the classes and their reserves are described there).

Invariants:

- a waiter is one future in exactly one queue (its class); each queue is served in FIFO order;
  a cancelled or already answered future is skipped, never granted;
- urgent waiters (logins, token refreshes) always go first; then swaps of the urgent lane
  (``PRIORITY_URGENT_LANE``), unless the bulk lane (every other class) has had less than its
  minimum share of the window's grants and one of its waiters may go; polls go next while below
  their share of the window, and never beyond it; of fresh and deferred waiters, the deferred
  class goes first while it has had less than its reserve of the window's grants.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final

PRIORITY_URGENT: Final = -2
"""Logins and token refreshes: every other call waits on them."""
PRIORITY_URGENT_LANE: Final = -1
"""Swaps read from the urgent lane (a person waits): before every bulk call, retry or poll,
except the bulk lane's minimum share (``RateBudget.set_bulk_min_share``)."""
PRIORITY_FRESH: Final = 0
PRIORITY_DEFERRED: Final = 1
PRIORITY_POLL: Final = 2
"""Bind-watch polls (activation queries): a reserve and a cap of the poll share (set_poll_share)."""

Waiters = deque[asyncio.Future[float]]


class GrantQueue:
    """The waiting callers of the five classes."""

    def __init__(self) -> None:
        self.urgent: Waiters = deque()
        self.lane: Waiters = deque()  # the urgent lane's swaps
        self.fresh: Waiters = deque()
        self.deferred: Waiters = deque()
        # Bind-watch polls: served first while they have had less than ``poll_share`` of the
        # limit within the window, never beyond it (a reserve and a cap).
        self.poll: Waiters = deque()

    def add(self, fut: asyncio.Future[float], priority: int) -> None:
        if priority <= PRIORITY_URGENT:
            self.urgent.append(fut)
        elif priority == PRIORITY_URGENT_LANE:
            self.lane.append(fut)
        elif priority >= PRIORITY_POLL:
            self.poll.append(fut)
        else:
            (self.deferred if priority > PRIORITY_FRESH else self.fresh).append(fut)

    def waiting(self) -> int:
        queues = (self.urgent, self.lane, self.fresh, self.deferred, self.poll)
        return sum(not f.done() for q in queues for f in q)

    def cancel(self, *, urgent: bool) -> None:
        """Cancel every waiter (``urgent``: logins and refreshes too)."""
        queues = (self.lane, self.fresh, self.deferred, self.poll)
        for queue in (self.urgent, *queues) if urgent else queues:
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.cancel()

    @staticmethod
    def _drop_done(queue: Waiters) -> None:
        while queue and queue[0].done():
            queue.popleft()

    def pick(
        self,
        poll_allowed: Callable[[], bool],
        deferred_first: Callable[[], bool],
        bulk_due: Callable[[], bool] = lambda: False,
    ) -> tuple[Waiters, bool] | None:
        """The queue whose head goes next, and whether it is of the deferred class (polls count
        as deferred); None when nobody waits, or only polls beyond their share. ``bulk_due``:
        the bulk lane has had less than its minimum share of the window's grants."""
        self._drop_done(self.urgent)
        self._drop_done(self.lane)
        if self.urgent:
            return self.urgent, False
        if not self.lane:
            return self._pick_bulk(poll_allowed, deferred_first)
        if bulk_due():
            bulk = self._pick_bulk(poll_allowed, deferred_first)
            if bulk is not None:
                return bulk
        return self.lane, False

    def _pick_bulk(  # noqa: PLR0911 - one per class
        self, poll_allowed: Callable[[], bool], deferred_first: Callable[[], bool]
    ) -> tuple[Waiters, bool] | None:
        self._drop_done(self.urgent)
        self._drop_done(self.fresh)
        self._drop_done(self.deferred)
        self._drop_done(self.poll)
        if self.urgent:
            return self.urgent, False
        if self.poll and poll_allowed():
            # Below their share of the window, polls go first: under a saturated refresh
            # backlog they still get exactly their share (a watch must end, and a device whose
            # registration expires must be seen in time), never more.
            return self.poll, True
        if not self.fresh and not self.deferred:
            return None
        if not self.deferred:
            return self.fresh, False
        if not self.fresh:
            return self.deferred, True
        if deferred_first():
            return self.deferred, True
        return self.fresh, False
