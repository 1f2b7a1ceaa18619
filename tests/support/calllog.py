"""Figures read from the simulator's call log: budget use, throttling, calls on the wire.

The simulator logs every call when it arrives (``time``, the simulator clock: the wall clock
while no test moves it) and sets its ``status``/``error_code`` once it has answered. A call held
by an injected ``latency`` fault is answered ``delay`` seconds after it arrived; until then its
``status`` is 0.

* :func:`window_use`: how much of a budget of ``limit`` calls per sliding window (60 s unless the
  run's platform clock is compressed: ``tests/support/clock.py``) a run used:
  the busiest window, and the mean (and least) share over every window that lies inside a
  period, each window starting on a 1 s grid. Under saturation every window holds ``limit``
  calls, whatever the shape of the calls inside (bursts at the window edges or an even pace).
* :func:`on_wire`: the calls that had started and were not answered when a process died.
* :func:`Calls`: the log of one run split by operation and answer.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.simulator.control import SimulatorControl

WINDOW_S = 60.0
THROTTLED = "1010009"


def max_in_window(times: Sequence[float], window: float = WINDOW_S) -> int:
    """Most timestamps (sorted) inside any half-open window ``[t, t + window)``."""
    best = lo = 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@dataclass(frozen=True)
class WindowUse:
    """Budget use of ``calls`` timestamps against ``limit`` calls per ``window`` seconds."""

    limit: int
    window: float
    """The window's length (seconds)."""
    start: float
    """First window start (usually the run's first call)."""
    end: float
    """Every measured window ends by then (the end of the saturated period)."""
    busiest: int
    """Most calls in any sliding window over the whole log (the platform's view)."""
    mean: float
    """Mean over the windows inside [start, end] of (calls in the window) / limit."""
    least: float
    """The least used of those windows, as a share of the limit."""
    windows: int
    whole_minutes: int
    """Whole windows (minutes at full length) from ``start`` within the period."""
    calls_in_whole_minutes: int
    """Calls in [start, start + whole_minutes x window)."""

    @property
    def minutes(self) -> float:
        """The period's length in windows (minutes at full length)."""
        return (self.end - self.start) / self.window

    @property
    def per_minute(self) -> float:
        """Calls in the whole minutes from ``start`` / (limit x those minutes): the plain average
        (whole minutes, so that calls bunched at the windows' starts are not counted twice)."""
        if self.whole_minutes <= 0:
            return 0.0
        return self.calls_in_whole_minutes / (self.limit * self.whole_minutes)

    def line(self) -> str:
        return (
            f"budget N={self.limit}/{self.window:g}s over {self.minutes:.1f} windows: "
            f"busiest window {self.busiest}/{self.limit}, mean sliding-window use {self.mean:.1%} "
            f"(least {self.least:.1%}, {self.windows} windows), calls/(N x windows) "
            f"{self.calls_in_whole_minutes}/({self.limit} x {self.whole_minutes}) = "
            f"{self.per_minute:.1%}"
        )


def window_use(
    times: Iterable[float],
    limit: int,
    *,
    start: float,
    end: float,
    window: float = WINDOW_S,
    step: float = 1.0,
) -> WindowUse:
    """Budget use over the windows ``[s, s + window)`` with ``start <= s <= end - window``."""
    ordered = sorted(times)
    shares: list[float] = []
    s = start
    while s + window <= end + 1e-9:
        n = bisect_left(ordered, s + window) - bisect_left(ordered, s)
        shares.append(n / limit)
        s += step
    whole = int((end - start) // window)
    in_whole = bisect_left(ordered, start + whole * window) - bisect_left(ordered, start)
    return WindowUse(
        limit=limit,
        window=window,
        start=start,
        end=end,
        busiest=max_in_window(ordered, window),
        mean=sum(shares) / len(shares) if shares else 0.0,
        least=min(shares, default=0.0),
        windows=len(shares),
        whole_minutes=whole,
        calls_in_whole_minutes=in_whole,
    )


def on_wire(
    calls: Iterable[dict[str, Any]],
    killed_at: float,
    latency: float,
    *,
    restarted_at: float | None = None,
    slack: float = 0.1,
) -> list[dict[str, Any]]:
    """Calls of a process killed at ``killed_at`` whose answer it never got.

    Sent by the killed process: logged before ``restarted_at`` (when its successor was started;
    a request still in the network at the kill reaches the platform just after it), else before
    ``killed_at``. Not answered in time: the answer, sent ``latency`` seconds after the arrival,
    left after ``killed_at - slack`` (``slack`` covers an answer still in the socket buffers).
    """
    sent_before = killed_at if restarted_at is None else restarted_at
    return [c for c in calls if c["time"] < sent_before and c["time"] + latency > killed_at - slack]


@dataclass
class Calls:
    """One run's call log, by operation and answer."""

    log: list[dict[str, Any]]

    @classmethod
    async def read(cls, control: SimulatorControl) -> Calls:
        return cls(await control.calls())

    def of(self, operation: str) -> list[dict[str, Any]]:
        return [c for c in self.log if c["operation"] == operation]

    @property
    def throttled(self) -> list[dict[str, Any]]:
        return [c for c in self.log if c["error_code"] == THROTTLED]

    @property
    def accepted_times(self) -> list[float]:
        """Times of the calls the platform counted (every call not answered 1010009)."""
        return sorted(c["time"] for c in self.log if c["error_code"] != THROTTLED)

    @property
    def all_times(self) -> list[float]:
        return sorted(c["time"] for c in self.log)

    def by_operation(self) -> dict[str, int]:
        return dict(Counter(c["operation"] for c in self.log))

    def answers(self, operation: str) -> dict[str, int]:
        return dict(Counter(str(c["error_code"] or c["status"]) for c in self.of(operation)))

    def node_ids(self, device_id: str) -> list[tuple[str | None, str | None]]:
        """(nodeId sent, error code answered) of every key refresh of one device, in order."""
        return [
            (c["body"].get("nodeId") if isinstance(c["body"], dict) else None, c["error_code"])
            for c in self.of("refresh_key")
            if c["device_id"] == device_id
        ]
