"""Faults while the platform's budget is the bottleneck (issue 10, proof).

The service's normal state is a backlog larger than what the platform grants in a window. The
simulator enforces N calls per sliding flow-control window, the service is configured with the
same N and the same window, and the swaps wait on the input topic before the service starts. The
window is a platform clock of ``tests/support/clock.py``: compressed in CI (each test says how
far), 60 s under ``make soak``; the schedules below are stated in full-length seconds or windows.

* A SIGKILL while calls are on the wire must not redo finished work: the platform sees at most
  one refresh call per swap, plus one for each call whose answer the killed process never got.
* Replicas 1 -> 2 -> 3 -> 1 while the backlog lasts: no call is answered 1010009, and the budget
  stays used (at least 90% of N in the sliding windows of the saturated period).

Both read every figure from the simulator's call log (``tests/support/calllog.py``).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.faults.conftest import FaultKit
from tests.support import clock
from tests.support.calllog import Calls, max_in_window, on_wire, window_use
from tests.support.clock import scaled
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

N = 120
"""Calls per window: the simulator enforces it, the service is configured with it."""


async def _first_call_time(fault_kit: FaultKit, timeout: float = 60) -> float:
    async def first() -> float:
        log = await fault_kit.control.calls()
        return float(log[0]["time"]) if log else 0.0

    return await wait_until(first, timeout, "the first platform call")


# ------------------------------------------------------------------------------------ SIGKILL
KILL_SWAPS = 300
"""2.5 windows of calls: the backlog outlasts the first window, when the kill comes."""
LATENCY = 0.5
"""Every key refresh is answered this long after it arrives, so calls are on the wire."""
KILL_WINDOW = clock.window(clock.WAIT_WINDOW_SECONDS)
"""This test's flow-control window: 60 s under soak, 5 s in CI. It counts calls against swaps,
not the budget's use, so the window's length only sets the pace (N calls per window, the same
2.5 windows of backlog) and the restarted process's wait for its killed share to age out."""


@pytest.mark.timeout(420)
async def test_sigkill_under_budget_saturation_redoes_only_the_calls_on_the_wire(
    fault_kit: FaultKit, process_logs: None
) -> None:
    control = fault_kit.control
    await clock.apply(fault_kit.harness, KILL_WINDOW)
    devices = await fault_kit.seed(KILL_SWAPS, prefix="satk")
    await control.configure(rate_limit_per_minute=N)
    await control.inject_latency(LATENCY, operation="refresh_key", times=-1)
    inputs = await fault_kit.produce_swaps(devices)  # the backlog waits for the service
    reader = await fault_kit.start_reader()
    service = fault_kit.process(instance="satk0", rate_limit_per_minute=N)
    await service.start_ready()

    # The kill: once the first window's calls are spent (the backlog outlasts it) and while
    # refresh calls are held by the platform (arrived, not answered).
    async def calls_on_the_wire() -> bool:
        puts = await control.calls(operation="refresh_key")
        in_flight = sum(1 for c in puts if c["status"] == 0)
        return len(puts) > N and in_flight >= 1

    await wait_until(
        calls_on_the_wire, scaled(150) + 30, f"more than {N} refresh calls, some on the wire"
    )
    killed_at = time.time()
    await service.kill()
    committed_at_kill = reader.count
    restarted_at = time.time()
    await service.start_ready()
    await reader.wait_answered(inputs, timeout=scaled(300) + 60)
    accounting = await fault_kit.finish("budget-sigkill", inputs)

    calls = await Calls.read(control)
    puts = calls.of("refresh_key")
    wire = on_wire(puts, killed_at, LATENCY, restarted_at=restarted_at)
    swaps = len(inputs)
    bound = swaps + len(wire)
    figures: dict[str, Any] = {
        "refresh_calls": len(puts),
        "per_swap": len(puts) / swaps,
        "on_wire_at_kill": len(wire),
        "allowed_per_swap": bound / swaps,
        "redone": len(puts) - swaps,
        "queries": len(calls.of("get_device")),
        "logins": len(calls.of("login")) + len(calls.of("refresh_token")),
        "throttled_1010009": len(calls.throttled),
        "committed_at_kill": committed_at_kill,
        "refresh_answers": calls.answers("refresh_key"),
    }
    print(accounting.line_with(**figures), flush=True)
    accounting.assert_clean()
    assert len(puts) <= bound, (
        f"{len(puts)} refresh calls for {swaps} swaps: more than 1 + {len(wire)}/{swaps} per swap "
        f"({len(calls.throttled)} answered 1010009, {figures['refresh_answers']})"
    )


# ------------------------------------------------------------------------ group 1 -> 2 -> 3 -> 1
GROUP_WINDOW = clock.window(45.0)
"""This test's flow-control window: 60 s under soak, 45 s in CI. Not the suite's 15 s: each
membership change holds the budget for seconds of real time whatever the window (a process
starts, the group rebalances, the exchange publishes), and the test measures how much of the
budget is used despite them, so those seconds weigh more in a shorter window. Measured on this
machine, one run each: a mean use of 86.2 % at 15 s, 90.2 % at 30 s, 91.0 % at 45 s and 91.6 % at
the full 60 s (``make soak``), against the 90 % asserted: 45 s keeps about the full length's
margin at three quarters of its time. A shorter window cannot be bought back by other figures:
the budget keeps each grant for the window plus a 1 s safety margin, so a saturated replica's
mean sliding-window use is at most W / (W + 1) (93.8 % at 15 s, 96.8 % at 30 s, 97.8 % at 45 s,
98.4 % at 60 s), and the runs above sit about 7 points under that bound at every length."""
GROUP_SWAPS = 510
"""4.25 N: the backlog outlasts the measured period (3.5 windows) even if the calls come in bursts
at the start of each window (bursts at 0, 1, 2, 3 windows: 4 N)."""
CHANGES_AT = tuple(w * GROUP_WINDOW for w in (0.5, 1.5, 2.5))
"""Seconds after the first call (30, 90, 150 at full length): every window, in the middle of it
(when the windows are full of the previous members' calls, not when they have just emptied)."""
MEASURED = 3.5 * GROUP_WINDOW
"""Budget use is measured over the windows inside [first call, first call + MEASURED]."""


@pytest.mark.timeout(480)
async def test_group_1_2_3_1_under_budget_saturation_holds_and_uses_the_budget(
    fault_kit: FaultKit, process_logs: None
) -> None:
    control = fault_kit.control
    await clock.apply(fault_kit.harness, GROUP_WINDOW)
    devices = await fault_kit.seed(GROUP_SWAPS, prefix="satg")
    await control.configure(rate_limit_per_minute=N)
    inputs = await fault_kit.produce_swaps(devices)  # the backlog waits for the service
    reader = await fault_kit.start_reader()
    first, second, third = (
        fault_kit.process(instance=f"satg{i}", rate_limit_per_minute=N) for i in range(3)
    )
    await first.start_ready()
    t0 = await _first_call_time(fault_kit)

    async def at(offset: float, what: str) -> None:
        """The test's schedule: membership changes ``offset`` s after the first call."""
        await wait_until(lambda: time.time() >= t0 + offset, offset + 30, what)

    changes: list[tuple[str, float]] = []
    await at(CHANGES_AT[0], "the first change (1 -> 2)")
    await second.start_ready()
    changes.append(("1->2", time.time() - t0))
    await at(CHANGES_AT[1], "the second change (2 -> 3)")
    await third.start_ready()
    changes.append(("2->3", time.time() - t0))
    await at(CHANGES_AT[2], "the third change (3 -> 1)")
    for member in (third, second):
        member.signal(signal.SIGTERM)
    codes = [await member.wait_exit(45) for member in (third, second)]
    changes.append(("3->1", time.time() - t0))
    await at(MEASURED, "the end of the measured period")
    measured = await Calls.read(control)

    await reader.wait_answered(inputs, timeout=4 * GROUP_WINDOW + 60)
    accounting = await fault_kit.finish("budget-group-1-2-3-1", inputs)
    calls = await Calls.read(control)
    use = window_use(calls.accepted_times, N, start=t0, end=t0 + MEASURED, window=GROUP_WINDOW)
    applied_in_period = sum(
        1 for c in measured.of("refresh_key") if c["error_code"] is None and c["status"] == 200
    )
    backlog_left = len(inputs) - applied_in_period
    figures: dict[str, Any] = {
        "throttled_1010009": len(calls.throttled),
        "budget_use_mean": use.mean,
        "budget_use_least": use.least,
        "calls_per_N_minute": use.per_minute,
        "busiest_window": f"{use.busiest}/{N}",
        "busiest_window_all_logged": max_in_window(calls.all_times, GROUP_WINDOW),
        "backlog_left_at_period_end": backlog_left,
        "calls_by_operation": calls.by_operation(),
        "changes_at_s": [f"{name}@{at_s:.0f}" for name, at_s in changes],
    }
    print(f"\n{use.line()}")
    print(accounting.line_with(**figures), flush=True)
    assert codes == [0, 0], f"members leaving exited with {codes}"
    assert backlog_left > 0, "the backlog ran out inside the measured period: not saturated"
    accounting.assert_clean()
    assert not calls.throttled, (
        f"{len(calls.throttled)} calls answered 1010009: "
        f"{[(c['operation'], round(c['time'] - t0, 1)) for c in calls.throttled[:10]]}"
    )
    assert use.mean >= 0.9, use.line()
