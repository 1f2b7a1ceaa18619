"""`make bench` section 12: bind detection delay as the number of watched devices grows
(issue 20, item 5), the poll grid against the plain backoff in the same run.

The real service and the platform simulator, at N = 100 calls per window and a poll share of
20 % (20 polls per window), on a **compressed clock**: the window is ``WINDOW`` seconds instead
of 60 (both the simulator and the service take it: ``flow_window_seconds``,
``REBIND_PLATFORM__RATE_WINDOW_SECONDS``), and every duration of the watch (first poll 15 s,
longest interval 300 s, the 24 h deadline) is divided by ``SCALE`` with it. Delays are printed
back in full-length seconds.

For each count of watched devices (100, 1,000, 10,000) and each schedule (``backoff``: every
device on its own doubling interval, the schedule before; ``grid``: the slots of
``service.bind.schedule``), the ledger topic is written directly with that many watches of
timeout 0 whose hardware never binds, as each schedule leaves them at its steady state (the
backoff: every watch at its longest interval and as overdue as n watches at 20 polls a window
make it; the grid: each on the slot the rule gives it). The service loads them, and then
``PROBES`` new swaps arrive, ``PER_WINDOW`` a window, whose hardware connects after a delay
drawn from an exponential of mean 60 s (clipped at 300 s: most devices bind within minutes).
From the simulator's call log: each probe's detection delay (its first activation query after
its hardware connected, minus the connect time; a probe never seen bound by the end counts
with the time it has waited so far, printed with ``>=``), and the polls in the busiest window.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.bind.schedule import PollGrid
from service.bind.watch import Watch, WatchPolicy
from service.partitioner import partition_for
from service.pipeline.ledger import Entry, State, encode_entry
from tests.simulator.control import SimulatorControl
from tests.simulator.process import SimulatorProcess
from tests.support.calllog import THROTTLED, max_in_window
from tests.support.events import fresh_swap_event, swap_event

if TYPE_CHECKING:
    from bench.run import Bench, Report

FULL_WINDOW = 60.0
WINDOW = 4.0
"""Seconds per flow-control window in this section (60 at full length)."""
SCALE = FULL_WINDOW / WINDOW
LIMIT = 100
SHARE = 0.2
CAPACITY = int(SHARE * LIMIT)
POLL_INITIAL = 15.0
POLL_MAX = 300.0
DEADLINE = 86_400.0
COUNTS = (100, 1_000, 10_000)
SCHEDULES = ("backoff", "grid")
PROBES = 32
PER_WINDOW = 4
DRAIN_WINDOWS = 12
"""Windows waited after the last probe for the probes still unseen (then they count as waited)."""
CONNECT_MEAN = 60.0
CONNECT_MAX = 300.0


@dataclass
class WatchScaleResult:
    watched: int
    schedule: str
    probes: int
    seen: int
    p50: float
    p90: float
    polls_busiest: int
    all_busiest: int
    throttled: int
    seconds: float


def _ms(seconds_full: float) -> int:
    """A full-length duration in milliseconds of the compressed clock."""
    return int(seconds_full / SCALE * 1000)


def _policy(schedule: str) -> WatchPolicy:
    grid = PollGrid.for_budget(poll_share=SHARE, rate_limit=LIMIT, window_seconds=WINDOW)
    return WatchPolicy(
        poll=True,
        poll_initial_ms=_ms(POLL_INITIAL),
        poll_max_ms=_ms(POLL_MAX),
        watch_deadline_ms=_ms(DEADLINE),
        grace_ms=0,
        grid=grid if schedule == "grid" else None,
    )


def steady_watches(schedule: str, count: int, partitions: int, t0_ms: int) -> list[Watch]:
    """``count`` old watches of timeout 0 as ``schedule`` leaves them at its steady state."""
    policy = _policy(schedule)
    old = Watch(t0_ms - _ms(3_600), t0_ms + _ms(DEADLINE), False, None, t0_ms, polls=5)
    if schedule == "grid":
        # At its steady state each old watch waits 2 x (the lane's watches) slots of its lane:
        # they sit on every other slot of their lane, from now on.
        lanes = [policy.slots(p, partitions) for p in range(partitions)]
        ranks = [0] * partitions
        out = []
        for i in range(count):
            lane = _partition(i, partitions)
            slots = lanes[lane]
            assert slots is not None
            out.append(policy.replace_loaded(old, t0_ms, slots, _watched(i), ranks[lane]))
            ranks[lane] += 1
        return out
    # The backoff: each watch waits poll_max after its last poll; n watches at CAPACITY polls a
    # window are each polled once a cycle of max(poll_max, n / CAPACITY windows).
    cycle = max(_ms(POLL_MAX), count * _ms(FULL_WINDOW) // CAPACITY)
    return [
        Watch(
            old.refreshed_ms,
            old.deadline_ms,
            False,
            None,
            t0_ms - (i * cycle) // count + _ms(POLL_MAX),
            polls=5,
        )
        for i in range(count)
    ]


def _watched(i: int) -> str:
    return f"watched-{i:06d}"


def _probe(i: int) -> str:
    return f"probe-{i:04d}"


def _partition(i: int, partitions: int) -> int:
    return partition_for(_watched(i).encode(), partitions, "murmur2")


async def write_watches(b: Bench, topic: str, watches: list[Watch], partitions: int) -> None:
    from bench import run  # noqa: PLC0415 - bench.run runs this section

    producer = run.fast_producer(b.bootstrap)
    await producer.start()
    try:
        pending: list[asyncio.Future[Any]] = []
        for i, watch in enumerate(watches):
            device = _watched(i)
            event_id = f"old-swap-{i}"
            entry = Entry(
                event_id,
                "/inventory/test",
                (watch.refreshed_ms - 1_000, i),
                f"new-{i}",
                State.WATCHING,
                outcome="credential_updated",
                watch=watch,
                value=swap_event(device, f"new-{i}", event_id=event_id),
            )
            pending.append(
                await producer.send(
                    topic,
                    bytes(memoryview(encode_entry(entry))),
                    key=device.encode(),
                    partition=_partition(i, partitions),
                )
            )
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def one_run(b: Bench, schedule: str, count: int) -> WatchScaleResult:
    from bench import run  # noqa: PLC0415 - bench.run runs this section

    topics = b.topics(f"watch{count}{schedule}")
    await topics.create(b.bootstrap)
    rng = random.Random(count)  # noqa: S311 - the same probes in both schedules' runs
    connect = [min(CONNECT_MAX, rng.expovariate(1 / CONNECT_MEAN)) / SCALE for _ in range(PROBES)]
    sim = SimulatorProcess(rate_limit_per_minute=LIMIT, flow_window_seconds=WINDOW)
    url = sim.start()
    try:
        control = SimulatorControl(url)
        for first in range(0, count, 2_000):
            await control.seed_devices(
                [
                    {"device_id": _watched(i), "node_id": f"new-{i}", "activated": False}
                    for i in range(first, min(count, first + 2_000))
                ]
            )
        await control.seed_devices(
            [
                {"device_id": _probe(i), "node_id": f"old-{i}", "connect_after_refresh": c}
                for i, c in enumerate(connect)
            ]
        )
        t0_ms = int(time.time() * 1000) + 8_000  # the service is up by then
        watches = steady_watches(schedule, count, run.PARTITIONS, t0_ms)
        await write_watches(b, topics.ledger, watches, run.PARTITIONS)
        started = time.monotonic()
        svc = b.start_service(
            topics,
            url,
            rate=LIMIT,
            extra_env={
                "REBIND_PLATFORM__RATE_WINDOW_SECONDS": str(WINDOW),
                "REBIND_BIND__POLL": "true",
                "REBIND_BIND__POLL_SCHEDULE": schedule,
                "REBIND_BIND__POLL_BUDGET_SHARE": str(SHARE),
                "REBIND_BIND__POLL_INITIAL_SECONDS": str(POLL_INITIAL / SCALE),
                "REBIND_BIND__POLL_MAX_SECONDS": str(POLL_MAX / SCALE),
                "REBIND_BIND__WATCH_DEADLINE_SECONDS": str(DEADLINE / SCALE),
            },
        )
        try:
            await asyncio.to_thread(svc.wait_ready)
            producer = run.fast_producer(b.bootstrap)
            await producer.start()
            try:
                for i in range(PROBES):
                    dev = _probe(i)
                    await producer.send_and_wait(
                        topics.input,
                        fresh_swap_event(dev, f"node-{i}", event_id=f"probe-ev-{i}"),
                        key=dev.encode(),
                    )
                    if (i + 1) % PER_WINDOW == 0:
                        await asyncio.sleep(WINDOW)  # pacing the producer, not a synchronisation
            finally:
                await producer.stop()
            deadline = time.monotonic() + DRAIN_WINDOWS * WINDOW
            while time.monotonic() < deadline:
                if len(_detected(await control.calls(), connect)[0]) == PROBES:
                    break
                await asyncio.sleep(0.5)
            calls = await control.calls()
        finally:
            svc.stop()
    finally:
        sim.stop()
    seen, waited = _detected(calls, connect)
    delays = [d * SCALE for d in [*seen.values(), *waited.values()]]
    polls = sorted(float(c["time"]) for c in calls if c["operation"] == "query_activation")
    result = WatchScaleResult(
        count,
        schedule,
        PROBES,
        len(seen),
        run.percentile(delays, 0.5),
        run.percentile(delays, 0.9),
        max_in_window(polls, WINDOW),
        max_in_window(sorted(float(c["time"]) for c in calls), WINDOW),
        sum(c["error_code"] == THROTTLED for c in calls),
        time.monotonic() - started,
    )
    run.say(
        f"watch scale {schedule} {count} watched: detection p50 {result.p50:.0f}s p90 "
        f"{result.p90:.0f}s (full length; {result.seen}/{PROBES} seen bound); polls in the "
        f"busiest window {result.polls_busiest}/{CAPACITY}; all calls {result.all_busiest}/"
        f"{LIMIT}; 1010009 {result.throttled}; {result.seconds:.0f}s"
    )
    return result


def _detected(
    calls: list[dict[str, Any]], connect: list[float]
) -> tuple[dict[str, float], dict[str, float]]:
    """Probes seen bound (detection delay, compressed seconds) and those refreshed but not seen
    bound yet (time waited since their hardware connected, if it has)."""
    refreshed: dict[str, float] = {}
    polls: dict[str, list[float]] = {}
    for c in calls:
        dev = c["device_id"]
        if not dev or not dev.startswith("probe-"):
            continue
        if c["operation"] == "refresh_key" and c["status"] == 200 and not c["error_code"]:
            refreshed.setdefault(dev, float(c["time"]))
        elif c["operation"] == "query_activation":
            polls.setdefault(dev, []).append(float(c["time"]))
    end = max((float(c["time"]) for c in calls), default=0.0)
    seen: dict[str, float] = {}
    waited: dict[str, float] = {}
    for dev, at in refreshed.items():
        connected = at + connect[int(dev.split("-")[1])]
        after = [t for t in polls.get(dev, []) if t >= connected]
        if after:
            seen[dev] = min(after) - connected
        elif end > connected:
            waited[dev] = end - connected
    return seen, waited


async def bench_watch_scale(b: Bench) -> list[WatchScaleResult]:
    return [await one_run(b, s, n) for n in COUNTS for s in SCHEDULES]


def add_watch_scale(rep: Report, results: list[WatchScaleResult]) -> None:
    for r in results:
        unseen = r.probes - r.seen
        prefix = ">= " if unseen else ""
        ok = r.polls_busiest <= CAPACITY and r.throttled == 0
        rep.add(
            f"12. bind detection delay p50 / p90, {r.watched:,} watched, {r.schedule} "
            f"(N = {LIMIT}/min, share {SHARE:.0%}, window compressed x{SCALE:g}; "
            f"{r.seen}/{r.probes} seen bound)",
            f"{prefix}{r.p50:.0f} / {prefix}{r.p90:.0f} s",
        )
        rep.add(
            f"12. polls in the busiest window, {r.watched:,} watched, {r.schedule}; all calls; "
            "1010009",
            f"{r.polls_busiest}; {r.all_busiest}/{LIMIT}; {r.throttled}",
            f"<= {CAPACITY} (share x N); <= N; 0",
            "ok" if ok else "CHECK",
        )
