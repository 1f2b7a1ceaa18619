"""The budget's answer to the platform's flow control (1010009): a pause, and a ceiling on the
limit that rises back by ``CEILING_RECOVERY`` of the limit per window without another 1010009
(:mod:`service.platform.budget`).

Invariants:

- nothing is granted before ``paused_until`` (it only moves forward);
- while a ceiling is set, the limit in force is ``min(limit, ceiling)``, the ceiling is at least
  1, and it is gone once it has risen to the limit;
- a ceiling holds for one span after the last 1010009, then rises once per span.
"""

from __future__ import annotations

import math
from typing import Final

CEILING_RECOVERY: Final = 0.1
"""After a 1010009 the limit is capped at what the platform allowed; each window without another
one raises the cap by this fraction of the configured limit (at least one call), until it is
gone. A platform that really allows less answers 1010009 again, and the cap follows it down."""


class FlowCeiling:
    """The pause and the ceiling set by the last 1010009 answers."""

    def __init__(self, span: float) -> None:
        self.span = span
        self.paused_until = 0.0
        self._ceiling: float | None = None
        self._ceiling_until = 0.0

    def penalize(self, now: float, seconds: float, allowed: float) -> None:
        """A 1010009: pause ``seconds`` and cap the limit at ``allowed`` (what the window held)."""
        self.paused_until = max(self.paused_until, now + seconds)
        self._ceiling = max(1.0, allowed)
        self._ceiling_until = now + self.span

    def limit(self, limit: int, now: float) -> float:
        """The limit in force at ``now`` (the ceiling rises with each quiet window)."""
        if self._ceiling is None:
            return limit
        if now >= self._ceiling_until:  # windows without a 1010009: the cap rises
            windows = math.floor((now - self._ceiling_until) / self.span) + 1
            self._ceiling += windows * max(1.0, CEILING_RECOVERY * limit)
            self._ceiling_until += windows * self.span
            if self._ceiling >= limit:
                self._ceiling = None
                return limit
        return min(limit, self._ceiling)

    def next_look(self) -> float | None:
        """While a ceiling is set: when to look again (it may lift before the window frees)."""
        if self._ceiling is None:
            return None
        return max(self._ceiling_until, self.paused_until)
