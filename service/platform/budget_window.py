"""What the budget's sliding window holds: this replica's grants, and the application's calls
preloaded at the last rebalance, each weighing a share of a call (:mod:`service.platform.budget`).

Invariants:

- every entry is younger than ``span`` (the window plus the safety margin) once :meth:`prune` ran
  for the current time; the deques are ordered oldest first;
- ``weighted()`` is the own grants since the last :meth:`preload` (1 each) plus the preloaded
  calls (``weight`` each): what a new grant is compared with;
- ``own`` holds every own grant still in the span, those before the last preload included: it is
  the log shared with the other replicas;
- ``deferred`` counts the grants since the last preload made to the deferred class, and
  ``poll_times`` the grants made to polls, ``lane_times`` those made to the urgent lane, all
  within the span.

Times are on the budget's (monotonic) clock; the budget converts them to epoch seconds.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable
from typing import Final

EPSILON: Final = 1e-6
"""Tolerance of the weighted comparisons (weights are fractions such as 1/3)."""


class GrantWindow:
    """The grants and preloaded calls that still count, and how they age out."""

    def __init__(self, span: float) -> None:
        self.span = span
        self.grants: deque[tuple[float, bool]] = deque()  # (time, deferred?) since the preload
        self.deferred = 0  # deferred grants among ``grants``
        self.own: deque[float] = deque()  # every own grant in the window, for the shared log
        self.poll_times: deque[float] = deque()  # grants to bind-watch polls
        self.lane_times: deque[float] = deque()  # grants to swaps of the urgent lane
        self._preload: deque[tuple[float, int]] = deque()  # (time, calls) of the global log
        self._preload_calls = 0
        self._preload_weight = 0.0

    def preload(self, times: Iterable[float], weight: float, now: float) -> None:
        """Replace what counts by the application's calls at ``times`` (each weighing
        ``weight``); own grants from now on count 1, those before stay in the shared log."""
        horizon = now - self.span
        preload: deque[tuple[float, int]] = deque()
        for t in sorted(times):
            if t <= horizon:
                continue
            if preload and preload[-1][0] == t:
                preload[-1] = (t, preload[-1][1] + 1)
            else:
                preload.append((t, 1))
        self._preload = preload
        self._preload_calls = sum(n for _, n in preload)
        self._preload_weight = weight
        self.grants.clear()
        self.deferred = 0

    def prune(self, now: float) -> None:
        """Forget what is older than the span."""
        horizon = now - self.span
        while self.grants and self.grants[0][0] <= horizon:
            _, deferred = self.grants.popleft()
            if deferred:
                self.deferred -= 1
        while self.own and self.own[0] <= horizon:
            self.own.popleft()
        while self.lane_times and self.lane_times[0] <= horizon:
            self.lane_times.popleft()
        while self._preload and self._preload[0][0] <= horizon:
            self._preload_calls -= self._preload.popleft()[1]

    def polls(self, now: float) -> int:
        """Poll grants within the span at ``now``."""
        horizon = now - self.span
        while self.poll_times and self.poll_times[0] <= horizon:
            self.poll_times.popleft()
        return len(self.poll_times)

    def weighted(self) -> float:
        return len(self.grants) + self._preload_weight * self._preload_calls

    def oldest(self, now: float) -> float:
        """The oldest entry that counts (``now`` when none)."""
        oldest = now
        if self.grants:
            oldest = min(oldest, self.grants[0][0])
        if self._preload:
            oldest = min(oldest, self._preload[0][0])
        return oldest

    def frees_at(self, excess: float) -> float:
        """The time of the entry whose ageing out frees ``excess`` weight (oldest first)."""
        grants, preload, weight = self.grants, self._preload, self._preload_weight
        i = j = 0
        freed = 0.0
        at = 0.0
        while freed < excess - EPSILON and (i < len(grants) or j < len(preload)):
            if j >= len(preload) or (i < len(grants) and grants[i][0] <= preload[j][0]):
                at = grants[i][0]
                freed += 1.0
                i += 1
            else:
                at, calls = preload[j]
                freed += weight * calls
                j += 1
        return at

    def bulk(self) -> int:
        """Own grants within the span that did not go to the urgent lane (prune first)."""
        return len(self.own) - len(self.lane_times)

    def record(self, now: float, deferred: bool, *, poll: bool = False, lane: bool = False) -> None:
        """One grant made at ``now``."""
        if poll:
            self.poll_times.append(now)
        if lane:
            self.lane_times.append(now)
        self.grants.append((now, deferred))
        self.own.append(now)
        if deferred:
            self.deferred += 1

    def remove(self, at: float, deferred: bool, poll: bool, lane: bool = False) -> None:
        """A grant given back: it no longer counts, nor is it in the shared log."""
        with contextlib.suppress(ValueError):
            self.grants.remove((at, deferred))
            if deferred:
                self.deferred -= 1
        with contextlib.suppress(ValueError):
            self.own.remove(at)
        if poll:
            with contextlib.suppress(ValueError):
                self.poll_times.remove(at)
        if lane:
            with contextlib.suppress(ValueError):
                self.lane_times.remove(at)
