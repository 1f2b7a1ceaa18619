"""The platform's clock in the fault tests: compressed in CI, full length under ``make soak``.

What paces the slow fault tests is the platform's clock, not the service's work: the sliding
flow-control window (60 s on a production platform), the access token's lifetime, and the
budget's slack for a killed replica (its share counts as spent for one window). Both the service
(``REBIND_PLATFORM__RATE_WINDOW_SECONDS``) and the simulator (``flow_window_seconds``) take the
window as a parameter, and the simulator's token lifetime is one too, so the fault tests run on a
compressed clock: the same number of windows and token lifetimes, each :data:`SCALE` as long.
They prove the same things in a fraction of the time.

``TEST_SOAK=1`` (``make soak``) runs the same tests at full length: 60 s windows and the
full-length token lifetimes. A test states its durations in full-length seconds and passes them
through :func:`scaled` (or picks both explicitly with :func:`pick`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final, TypeVar

if TYPE_CHECKING:
    from tests.fixtures.service import Harness

T = TypeVar("T")

FULL_WINDOW_SECONDS: Final = 60.0
"""The production platform's flow-control window."""
COMPRESSED_WINDOW_SECONDS: Final = 15.0
"""The window of the fault tests in CI."""

WAIT_WINDOW_SECONDS: Final = 5.0
"""The window of the fault tests that only wait for it and measure nothing of it: a SIGKILLed or
frozen replica's calls (its whole share: docs/budget.md, *slack for the missing*) count as spent
for one window, so its successor calls nothing until they age out. Tests that assert loss,
duplicates and fencing, not budget figures, run that wait on this shorter window in CI (one
window per kill, as at full length)."""

SOAK: Final = os.environ.get("TEST_SOAK", "").strip() not in ("", "0", "false", "no")
"""``TEST_SOAK=1``: the full-length runs (``make soak``). Not a ``REBIND_`` name: the service
refuses unknown ``REBIND_`` variables, and in-process services read this environment."""

WINDOW_SECONDS: Final = FULL_WINDOW_SECONDS if SOAK else COMPRESSED_WINDOW_SECONDS
"""The flow-control window the fault tests give the simulator and the service."""

SCALE: Final = WINDOW_SECONDS / FULL_WINDOW_SECONDS
"""Compressed seconds per full-length second (1 under soak)."""


def scaled(full_seconds: float) -> float:
    """A duration stated at full length, on this run's clock."""
    return full_seconds * SCALE


def pick(full: T, compressed: T) -> T:
    """``full`` under soak, else ``compressed`` (for values that do not scale linearly, such as
    a whole number of seconds the simulator takes)."""
    return full if SOAK else compressed


def window(compressed: float = COMPRESSED_WINDOW_SECONDS) -> float:
    """The flow-control window of a test: 60 s under soak, else ``compressed``. A test whose
    figures compare the window with a fixed real-time cost (a rebalance takes seconds whatever
    the window) asks for a longer compressed window than the suite's."""
    return FULL_WINDOW_SECONDS if SOAK else compressed


def describe(seconds: float = WINDOW_SECONDS) -> str:
    """One line for the test output: which clock this run uses."""
    mode = "soak (full length)" if SOAK else "compressed"
    return f"platform clock: {mode}, flow-control window {seconds:g}s (x{seconds / 60:g})"


async def apply(harness: Harness, seconds: float = WINDOW_SECONDS) -> float:
    """Put a test on this run's clock: the simulator's flow-control window and the services'
    ``rate_window_seconds`` (of every service the harness configures from then on)."""
    harness.rate_window_seconds = seconds
    await harness.sim.control.configure(flow_window_seconds=seconds)
    print(f"\n{describe(seconds)}")
    return seconds
