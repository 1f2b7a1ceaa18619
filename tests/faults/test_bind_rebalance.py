"""Bind watches through rebalances and kills (issue 25): every ``credential-updated`` ends with
exactly one bind result, and every device whose new hardware connected is ``device.rebound``.

The shape that lost watches: two replicas as processes, a backlog that saturates the budget,
devices whose new hardware connects 15-40 s after their refresh (so their polls come due while
partitions are revoked and reassigned), the second replica joining, the first SIGKILLed and
restarted. The figures here are the full-length ones (``make soak``: 60 s windows); in CI the
test runs on the suite's compressed clock (``tests/support/clock.py``), every figure tied to the
platform's clock scaled with the window: the same calls per second, a backlog of the same
number of windows, connect delays and poll intervals of the same fraction of a window. After the
drain it prints, per run::

    BIND rebalance: watched=.. bound=.. results={..} without_result=0 committed_twice=0
      longest_first_poll_delay=..s

and asserts ``without_result == 0``, ``committed_twice == 0`` and every device bound.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter, defaultdict

import orjson
import pytest

from service.config import BindSettings
from tests.faults.conftest import FaultKit
from tests.support import clock
from tests.support.accounting import OutcomeReader, produce_inputs
from tests.support.calllog import Calls
from tests.support.events import Received, swap_event
from tests.support.waiting import WaitTimeoutError, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

WINDOW = clock.window()
"""The flow-control window of the simulator and the service: 60 s under soak, 15 s in CI."""
SCALE = WINDOW / clock.FULL_WINDOW_SECONDS
"""This run's seconds (and calls) per full-length one: every figure below tied to the platform's
clock is stated at full length and scaled by it."""
N = round(600 * SCALE)
"""Calls per window, the simulator's and the service's (600 per minute at full length; the same
10 calls per second on every clock). The backlog below is larger than a window, so once the first
window is spent every call is contended. The limit scales with the window rather than staying at
600: 600 calls per 15 s would be 40 per second, more than the two replicas send, and an
unsaturated budget proves nothing about polls behind a backlog."""
BACKLOG = round(1000 * SCALE)
"""Swaps that connect at once: 1.7 windows of calls (plus a poll each)."""
WATCHED = round(40 * SCALE)
"""Swaps whose hardware connects CONNECT_AFTER seconds after their refresh."""
CONNECT_AFTER = (15 * SCALE, 40 * SCALE)
"""The watched devices' hardware connects this long after the refresh (15-40 s at full length):
their polls come due again and again while the partitions move."""
POLL_INITIAL = 3.0 * SCALE
CONNECT_AT_ONCE = POLL_INITIAL / 6
"""The backlog's hardware: connected before the first poll (0.5 s at full length)."""
SHARE = 0.5
"""Every refreshed device needs about one poll: at half the budget, polls keep up with refreshes."""
BIND = BindSettings(
    poll=True,
    poll_initial_seconds=POLL_INITIAL,
    poll_max_seconds=8 * SCALE,
    poll_budget_share=SHARE,
    watch_deadline_seconds=900,
)
MIN_POLL_SHARE_SATURATED = SHARE / 2
"""While refreshes still wait, polls get their share of the calls (a reserve, not what refreshes
leave): starved polls would leave every watch open until the backlog is worked off."""
BIND_CODES = ("BIND_EXPIRED", "BIND_NOT_CONFIRMED")


def _data(rec: Received) -> dict[str, object]:
    return dict(orjson.loads(rec.value or b"")["data"])


def bind_results(records: list[Received], rebound: str, failed: str) -> dict[str, list[str]]:
    """swapEventId -> the kinds of bind result committed for it."""
    found: dict[str, list[str]] = defaultdict(list)
    for rec in records:
        if rec.topic == rebound:
            data = _data(rec)
            found[str(data["swapEventId"])].append(f"rebound_{data['via']}")
        elif rec.topic == failed:
            data = _data(rec)
            if data.get("errorCode") in BIND_CODES:
                found[str(data["swapEventId"])].append(str(data["errorCode"]))
    return found


@pytest.mark.timeout(600)
async def test_every_refreshed_swap_gets_one_bind_result_through_rebalances_and_kills(
    fault_kit: FaultKit, process_logs: None
) -> None:
    rng = random.Random()
    control = fault_kit.control
    await clock.apply(fault_kit.harness, WINDOW)
    await control.configure(rate_limit_per_minute=N)
    tag = uuid.uuid4().hex[:6]
    watched = [f"bw-{i:03d}-{tag}" for i in range(WATCHED)]
    backlog = [f"bb-{i:04d}-{tag}" for i in range(BACKLOG)]
    # The watched devices poll again and again while the backlog saturates the budget: more
    # poll demand than the share, so starved polls show as a share far below it.
    connect = {d: rng.uniform(*CONNECT_AFTER) for d in watched} | dict.fromkeys(
        backlog, CONNECT_AT_ONCE
    )
    for start in range(0, len(connect), 500):
        chunk = list(connect.items())[start : start + 500]
        await control.seed_devices(
            [
                {"device_id": d, "node_id": f"old-{d}", "connect_after_refresh": after}
                for d, after in chunk
            ]
        )
    topics = fault_kit.harness.topics
    # The kit's reader reads the outcome topics; this one the bind results too.
    reader = OutcomeReader(
        fault_kit.harness.bootstrap,
        [topics.credential_updated, topics.rebind_failed, topics.device_rebound],
    )
    await reader.start()
    fault_kit.reader = reader
    first, second = (
        fault_kit.process(
            instance=f"w{i}",
            bind=BIND,
            rate_limit_per_minute=N,
            max_concurrency=16,
        )
        for i in range(2)
    )
    await first.start_ready()
    # The watched devices first (their polls come due while the backlog still saturates the
    # budget), then the backlog, interleaved a little so every partition has both.
    order = watched[: WATCHED // 2] + backlog[: BACKLOG // 4] + watched[WATCHED // 2 :]
    order += backlog[BACKLOG // 4 :]
    inputs = await produce_inputs(
        fault_kit.harness.bootstrap,
        topics.device_swapped,
        [
            (d.encode(), swap_event(d, f"new-{d}", event_id=eid), [], (eid, d, f"new-{d}"))
            for d in order
            for eid in [str(uuid.uuid4())]
        ],
    )

    def updated() -> int:
        return sum(r.topic == topics.credential_updated for r in reader.records)

    async def until_updated(n: int) -> None:
        await wait_until(lambda: updated() >= n, 300, f"{n} credential-updated")

    total = len(order)
    await until_updated(int(total * rng.uniform(0.12, 0.2)))
    await second.start_ready()
    await until_updated(int(total * rng.uniform(0.45, 0.6)))
    await first.kill()
    await until_updated(min(total, updated() + round(20 * SCALE)))
    await first.start_ready()

    def unresolved() -> list[str]:
        results = bind_results(reader.records, topics.device_rebound, topics.rebind_failed)
        refreshed = {
            str(_data(r)["swapEventId"])
            for r in reader.records
            if r.topic == topics.credential_updated
        }
        return sorted(e for e in refreshed if not results.get(e))

    drained = True
    try:
        await until_updated(total)
        await wait_until(lambda: not unresolved(), 240, "a bind result for every refresh")
    except WaitTimeoutError:
        drained = False
    missing_at_drain = unresolved()
    for proc in (first, second):
        if proc.running():
            await proc.terminate(45)
    records = await reader.read_to_end()

    results = bind_results(records, topics.device_rebound, topics.rebind_failed)
    refreshed = {
        str(_data(r)["swapEventId"]): str(_data(r)["deviceId"])
        for r in records
        if r.topic == topics.credential_updated
    }
    kinds = Counter(k for ks in results.values() for k in ks)
    without = sorted(e for e in refreshed if not results.get(e))
    twice = sorted(e for e, ks in results.items() if len(ks) > 1)
    bound = {refreshed[e] for e, ks in results.items() if e in refreshed and ks[0][:7] == "rebound"}
    calls = await Calls.read(control)
    first_refresh: dict[str, float] = {}
    for c in calls.of("refresh_key"):
        first_refresh.setdefault(c["device_id"], c["time"])
    first_poll: dict[str, float] = {}
    for c in calls.of("query_activation"):
        first_poll.setdefault(c["device_id"], c["time"])
    delays = {
        d: first_poll.get(d, calls.log[-1]["time"]) - first_refresh[d] - POLL_INITIAL
        for d in first_refresh
    }
    watched_delay = max(delays[d] for d in watched if d in delays)
    saturated = max(first_refresh.values()) - min(first_refresh.values())
    times = sorted(c["time"] for c in calls.log)
    saturated_from = times[N - 1] if len(times) >= N else max(first_refresh.values())
    during = [c for c in calls.log if saturated_from <= c["time"] <= max(first_refresh.values())]
    poll_share = sum(c["operation"] == "query_activation" for c in during) / max(1, len(during))
    print(
        f"\nBIND rebalance: watched={len(refreshed)} bound={len(bound)} results={dict(kinds)} "
        f"without_result={len(without)} committed_twice={len(twice)} "
        f"longest_first_poll_delay={max(delays.values(), default=0.0):.1f}s "
        f"(watched devices {watched_delay:.1f}s, refreshes spread over {saturated:.0f}s) "
        f"polls' share while saturated={poll_share:.1%} "
        f"polls={len(calls.of('query_activation'))} 1010009={len(calls.throttled)} "
        f"drained={drained}"
    )
    if without:
        print(
            f"without a result: {[refreshed[e] for e in without[:10]]} (at drain: "
            f"{len(missing_at_drain)})"
        )
    assert len(refreshed) == total, "every swap was refreshed"
    assert not without, f"{len(without)} refreshed swaps without a bind result"
    assert not twice, f"{len(twice)} swaps with more than one bind result"
    assert bound == set(order), f"not bound: {sorted(set(order) - bound)[:10]}"
    assert len(inputs) == total
    assert poll_share >= MIN_POLL_SHARE_SATURATED, "polls starved behind the refresh backlog"
