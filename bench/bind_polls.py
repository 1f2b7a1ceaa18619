"""`make bench` section 10: bind-watch polls behind a saturated refresh backlog.

Every refreshed device is watched until its new hardware binds; with no push listener the service
polls the activation status, in the budget's poll class: a reserve and a cap of
``REBIND_BIND__POLL_BUDGET_SHARE`` (20 %) of the window. A backlog of swaps is produced before the
service starts (the simulator and the service at the same N calls per minute, so every window is
full); each device's new hardware connects as soon as its key is refreshed, so one poll ends its
watch. From the simulator's call log: for each device, the delay of its first poll behind its
schedule (first activation query - refresh - ``REBIND_BIND__POLL_INITIAL_SECONDS``), p50 / p90 /
max; the polls' share of the calls while refreshes still ran; the busiest window and 1010009s.

What the share buys (docs/bind.md): under saturation refreshes get ``(1 - s) N`` calls a minute
and polls ``s N``; each refresh needs at least one poll, so with ``s < 0.5`` the polls fall behind
by ``(1 - 2 s) N`` a minute, and a device refreshed ``t`` minutes into the backlog is first polled
about ``t (1 - 2 s) / s`` minutes late (1.5 t at 20 %): detection waits, refreshes do not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tests.support.calllog import THROTTLED, max_in_window

if TYPE_CHECKING:
    from bench.run import Bench, Report

POLL_INITIAL = 15.0
SHARE = 0.2


@dataclass
class PollDelayResult:
    limit: int
    swaps: int
    polled: int
    """Devices polled by the end (the others count in the delays with their overdue so far)."""
    p50: float
    p90: float
    max: float
    expected_max: float
    poll_share: float
    polls_busiest: int
    """Polls in the busiest 60 s window: the share's reserve used, its cap kept."""
    busiest: int
    throttled: int
    seconds: float
    schedule: str = "grid"
    """``REBIND_BIND__POLL_SCHEDULE`` of the run."""


async def bench_poll_delay(b: Bench, schedule: str = "grid") -> PollDelayResult:
    from bench import run, saturation  # noqa: PLC0415 - bench.run runs this section

    limit, swaps = b.sizes.saturation_limit, b.sizes.poll_delay_swaps
    topics = b.topics(f"polldelay{schedule}")
    await topics.create(b.bootstrap)
    await run.produce_backlog(b.bootstrap, topics.input, swaps)
    with run.simulator(limit) as (url, control, _):
        for first in range(0, swaps, 2_000):
            await control.seed_devices(
                [
                    {
                        "device_id": run.device_id(i),
                        "node_id": f"old-{i:07d}",
                        "connect_after_refresh": 0,
                    }
                    for i in range(first, min(swaps, first + 2_000))
                ]
            )
        started = time.monotonic()
        svc = b.start_service(
            topics,
            url,
            rate=limit,
            extra_env={
                "REBIND_BIND__POLL": "true",
                "REBIND_BIND__POLL_INITIAL_SECONDS": str(POLL_INITIAL),
                "REBIND_BIND__POLL_BUDGET_SHARE": str(SHARE),
                "REBIND_BIND__POLL_SCHEDULE": schedule,
            },
        )
        try:
            # The backlog is larger than a window: once the first window is spent, refreshes and
            # polls compete for every call. The run ends 30 s after the last refresh.
            deadline = time.monotonic() + swaps / ((1 - SHARE) * limit) * 60 + 120
            last_refresh_seen = None
            while time.monotonic() < deadline:
                done = sum(
                    c["status"] == 200 and not c["error_code"]
                    for c in await control.calls(operation="refresh_key")
                )
                if done >= swaps and last_refresh_seen is None:
                    last_refresh_seen = time.monotonic()
                if last_refresh_seen is not None and time.monotonic() - last_refresh_seen > 30:
                    break
                await saturation.until(time.time() + 1.0)
            calls = await control.calls()
        finally:
            svc.stop()
    seconds = time.monotonic() - started
    refreshed: dict[str, float] = {}
    first_poll: dict[str, float] = {}
    for c in calls:
        if c["operation"] == "refresh_key" and c["status"] == 200 and not c["error_code"]:
            refreshed.setdefault(c["device_id"], float(c["time"]))
        elif c["operation"] == "query_activation":
            first_poll.setdefault(c["device_id"], float(c["time"]))
    delays = [first_poll[d] - refreshed[d] - POLL_INITIAL for d in first_poll if d in refreshed]
    end = max((float(c["time"]) for c in calls), default=0.0)
    # devices not polled by the end: overdue by at least (end - due)
    delays += [end - t - POLL_INITIAL for d, t in refreshed.items() if d not in first_poll]
    times = sorted(float(c["time"]) for c in calls)
    last_refresh = max(refreshed.values(), default=0.0)
    # the saturated period: from the moment a first window's worth of calls was made
    saturated_from = times[limit - 1] if len(times) >= limit else last_refresh
    during = [c for c in calls if saturated_from <= float(c["time"]) <= last_refresh]
    polls_during = sum(c["operation"] == "query_activation" for c in during)
    minutes = (last_refresh - min(refreshed.values(), default=0.0)) / 60
    result = PollDelayResult(
        limit,
        swaps,
        len(first_poll),
        run.percentile(delays, 0.5),
        run.percentile(delays, 0.9),
        max(delays, default=float("nan")),
        minutes * (1 - 2 * SHARE) / SHARE * 60,
        polls_during / max(1, len(during)),
        max_in_window(
            sorted(float(c["time"]) for c in calls if c["operation"] == "query_activation")
        ),
        max_in_window(sorted(float(c["time"]) for c in calls)),
        sum(c["error_code"] == THROTTLED for c in calls),
        seconds,
        schedule,
    )
    run.say(
        f"[{schedule}] first poll behind a saturated backlog at {limit}/min, share {SHARE:.0%} "
        f"({swaps} swaps): delay p50 {result.p50:.1f}s, p90 {result.p90:.1f}s, "
        f"max {result.max:.1f}s "
        f"(expected max ~{result.expected_max:.0f}s); polls' share while refreshing "
        f"{result.poll_share:.1%}; polls in the busiest window {result.polls_busiest} (share x N = "
        f"{int(SHARE * limit)}); busiest window {result.busiest}/{limit}; 1010009 "
        f"{result.throttled}; {len(first_poll)}/{swaps} polled in {seconds:.0f}s"
    )
    return result


def add_poll_delay(rep: Report, r: PollDelayResult) -> None:
    """The rows of one run. The backoff takes exactly its share's reserve under saturation; the
    grid (issue 20) at most it: a partition's slots that its own watches do not need stay
    unused (the refreshes take those calls)."""
    run_ok = r.throttled == 0 and r.busiest <= r.limit
    rep.add(
        f"10. first bind poll behind a saturated backlog ({r.swaps} swaps, {r.limit}/min, "
        f"share {SHARE:.0%}, {r.schedule}): delay p50 / p90 / max",
        f"{r.p50:.0f} / {r.p90:.0f} / {r.max:.0f} s",
        f"max ~ {r.expected_max:.0f} s (t (1-2s)/s)",
        "ok" if run_ok else "CHECK",
    )
    cap = int(SHARE * r.limit)
    share_ok = r.polls_busiest == cap if r.schedule == "backoff" else r.polls_busiest <= cap
    rep.add(
        f"10. polls in the busiest window (the share's reserve and cap), {r.schedule}; all "
        "calls; 1010009",
        f"{r.polls_busiest}; {r.busiest}/{r.limit}; {r.throttled}",
        f"{'=' if r.schedule == 'backoff' else '<='} {cap} (share x N); <= N; 0",
        "ok" if share_ok and run_ok else "CHECK",
    )
