"""`make bench` sections 6-9: the service under budget saturation and with many deferred swaps.

The service's normal state is a backlog larger than the platform's budget. Sections 6-8 run the
simulator and the service at the same N calls per minute with the swaps produced before the
service starts, so every 60 s window is full; every figure comes from the simulator's call log
(``tests/support/calllog.py``) and a ``read_committed`` consumer of the outputs.

6. answer -> visible: for each swap, from the platform's answer to its refresh call (the call
   log's time; no latency is injected, so the answer leaves within milliseconds of the arrival)
   to the moment a ``read_committed`` consumer has the outcome. p50, p99, max.
7. one SIGKILL: 0.3 s latency on every refresh, the service SIGKILLed once the first window is
   spent while calls are on the wire, restarted; redone refresh calls = refresh calls - swaps,
   against the calls on the wire at the kill (arrived, answer not yet sent).
8. 1 -> 3 -> 1: one replica, two more join 40 s after the first call, they leave 40 s later;
   mean and least sliding-window use over the windows inside the first 120 s, busiest window,
   1010009 answers.
9. waiting is not work: fresh-input throughput (no flow control) with 10,000 swaps deferred
   (devices online, next try in an hour) against 0 deferred, same fresh backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from tests.simulator.control import SimulatorControl
from tests.support.calllog import THROTTLED, WindowUse, on_wire, window_use
from tests.support.events import fresh_swap_event

if TYPE_CHECKING:
    from bench.run import Bench, Report, ServiceProc, Topics

TARGET_SATURATED_USE = 0.90
TARGET_DEFERRED_RATIO = 0.90
DEFERRED_BASE = 5_000_000
"""Device numbers of the online (deferred) devices of section 9, apart from the fresh ones."""


def _run() -> Any:
    """bench.run, imported when a section runs (it imports this module)."""
    from bench import run  # noqa: PLC0415 - a cycle: bench.run runs these sections

    return run


async def produce_range(bootstrap: str, topic: str, start: int, count: int, tag: str) -> None:
    """Swaps of devices ``start .. start + count - 1`` (one each), as fast as the client can."""
    run = _run()
    producer = run.fast_producer(bootstrap)
    await producer.start()
    try:
        pending: list[asyncio.Future[Any]] = []
        for i in range(start, start + count):
            dev = run.device_id(i)
            value = fresh_swap_event(dev, f"new-{i:07d}", event_id=f"{tag}-{i}")
            pending.append(await producer.send(topic, value, key=dev.encode()))
            if len(pending) >= 5_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def seed_range(
    control: SimulatorControl, start: int, count: int, status: str = "OFFLINE"
) -> None:
    run = _run()
    for first in range(start, start + count, 2_000):
        await control.seed_devices(
            [
                {"device_id": run.device_id(i), "node_id": f"old-{i:07d}", "status": status}
                for i in range(first, min(start + count, first + 2_000))
            ]
        )


async def first_call_time(control: SimulatorControl, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = await control.calls()
        if log:
            return float(log[0]["time"])
        await asyncio.sleep(0.05)
    raise RuntimeError("the service made no platform call")


async def until(wall: float) -> None:
    """The section's schedule: wait until the wall clock reaches ``wall``."""
    await asyncio.sleep(max(0.0, wall - time.time()))


def reader(b: Bench, topics: Topics, target: int, timeout: float) -> Any:
    """A background read_committed reader counting distinct answered swaps, keeping records."""
    run = _run()
    progress = run.Progress(target, distinct=set())
    task = asyncio.create_task(
        run.read_outcomes(b.bootstrap, topics.outcomes, progress, timeout, keep_records=True)
    )
    return progress, task


def swap_id_of(value: bytes | None) -> str | None:
    if value is None:
        return None
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(orjson.loads(value)["data"]["swapEventId"])
    return None


# ---------------------------------------------------------------------------- 6. answer -> visible
@dataclass
class AnswerDelayResult:
    limit: int
    swaps: int
    matched: int
    p50: float
    p99: float
    max: float
    seconds: float
    duplicates: int


async def bench_answer_delay(b: Bench) -> AnswerDelayResult:
    run = _run()
    limit, swaps = b.sizes.saturation_limit, b.sizes.saturation_swaps
    topics = b.topics("answerdelay")
    await topics.create(b.bootstrap)
    await run.produce_backlog(b.bootstrap, topics.input, swaps)
    with run.simulator(limit) as (url, control, _):
        await run.seed(control, swaps)
        started = time.monotonic()
        progress, task = reader(b, topics, swaps, timeout=swaps / limit * 60 + 90)
        svc = b.start_service(topics, url, rate=limit)
        await task
        seconds = time.monotonic() - started
        puts = await control.calls(operation="refresh_key")
        svc.stop()
    answered: dict[str, float] = {}
    for c in puts:
        if c["status"] == 200 and c["error_code"] is None:
            answered[c["device_id"]] = float(c["time"])
    delays: list[float] = []
    for value, _ts, wall in progress.records:
        swap_id = swap_id_of(value)
        if swap_id is None or not swap_id.startswith("ev-"):
            continue
        dev = run.device_id(int(swap_id.removeprefix("ev-")))
        if dev in answered:
            delays.append(wall - answered[dev])
    result = AnswerDelayResult(
        limit,
        swaps,
        len(delays),
        run.percentile(delays, 0.5),
        run.percentile(delays, 0.99),
        max(delays, default=float("nan")),
        seconds,
        progress.duplicates,
    )
    run.say(
        f"answer -> visible, saturated at {limit}/min ({swaps} swaps): p50 {result.p50:.2f}s, "
        f"p99 {result.p99:.2f}s, max {result.max:.2f}s ({len(delays)} matched, {seconds:.0f}s)"
    )
    return result


def add_answer_delay(rep: Report, r: AnswerDelayResult) -> None:
    rep.add(
        f"6. platform answer -> visible read_committed, p50 / p99 / max "
        f"(N={r.limit}, {r.swaps} backlog)",
        f"{r.p50:.2f} / {r.p99:.2f} / {r.max:.2f} s",
    )
    if r.matched < r.swaps or r.duplicates:
        rep.notes.append(
            f"answer -> visible: {r.matched} of {r.swaps} outcomes matched to a platform answer, "
            f"{r.duplicates} duplicate outcomes"
        )


# ---------------------------------------------------------------------------- 7. one SIGKILL
@dataclass
class KillResult:
    limit: int
    swaps: int
    refresh_calls: int
    on_wire: int
    queries: int
    throttled: int
    outcomes: int
    duplicates: int
    seconds: float

    @property
    def redone(self) -> int:
        return self.refresh_calls - self.swaps


async def bench_sigkill_redo(b: Bench) -> KillResult:
    run = _run()
    limit, swaps = b.sizes.saturation_limit, b.sizes.saturation_swaps
    latency = b.sizes.kill_latency
    topics = b.topics("sigkill")
    await topics.create(b.bootstrap)
    await run.produce_backlog(b.bootstrap, topics.input, swaps)
    with run.simulator(limit) as (url, control, _):
        await run.seed(control, swaps)
        await control.inject_latency(latency, operation="refresh_key", times=-1)
        started = time.monotonic()
        progress, task = reader(b, topics, swaps, timeout=swaps / limit * 60 + 150)
        svc = b.start_service(topics, url, rate=limit)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            puts = await control.calls(operation="refresh_key")
            if len(puts) > limit and any(c["status"] == 0 for c in puts):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"no calls on the wire after the first window; log {svc.log_path}")
        killed_at = time.time()
        svc.proc.kill()
        svc.proc.wait(10)
        run.say(f"  SIGKILL with {sum(c['status'] == 0 for c in puts)} calls held by the platform")
        restarted_at = time.time()
        svc = b.start_service(topics, url, rate=limit)
        await task
        seconds = time.monotonic() - started
        log = await control.calls()
        svc.stop()
    puts = [c for c in log if c["operation"] == "refresh_key"]
    result = KillResult(
        limit,
        swaps,
        len(puts),
        len(on_wire(puts, killed_at, latency, restarted_at=restarted_at)),
        sum(1 for c in log if c["operation"] == "get_device"),
        sum(1 for c in log if c["error_code"] == THROTTLED),
        progress.count,
        progress.duplicates,
        seconds,
    )
    run.say(
        f"one SIGKILL at {limit}/min: {result.refresh_calls} refresh calls for {swaps} swaps "
        f"(redone {result.redone}, on the wire at the kill {result.on_wire}), "
        f"{result.queries} queries, {result.throttled} x 1010009, "
        f"{result.outcomes}/{swaps} outcomes, {result.duplicates} duplicates"
    )
    return result


def add_sigkill_redo(rep: Report, r: KillResult) -> None:
    run = _run()
    rep.add(
        f"7. redone refresh calls after one SIGKILL (N={r.limit}, {r.swaps} swaps)",
        f"{r.redone} ({r.on_wire} on the wire at the kill; {r.queries} queries, "
        f"{r.throttled} x 1010009)",
        "<= on the wire",
        run.verdict(r.redone <= r.on_wire),
    )
    rep.add(
        "7.   outcomes / duplicate outcomes",
        f"{r.outcomes}/{r.swaps} / {r.duplicates} in {r.seconds:.0f}s",
        "all / 0",
        run.verdict(r.outcomes == r.swaps and r.duplicates == 0),
    )


# ---------------------------------------------------------------------------- 8. 1 -> 3 -> 1
@dataclass
class ChurnResult:
    limit: int
    swaps: int
    use: WindowUse
    throttled: int
    applied_in_period: int


async def bench_budget_churn(b: Bench) -> ChurnResult:
    run = _run()
    limit, swaps = b.sizes.saturation_limit, b.sizes.churn_swaps
    step, measured = b.sizes.churn_step, b.sizes.churn_measured
    topics = b.topics("churn")
    await topics.create(b.bootstrap)
    await run.produce_backlog(b.bootstrap, topics.input, swaps)
    procs: list[ServiceProc] = []
    with run.simulator(limit) as (url, control, _):
        await run.seed(control, swaps)
        procs.append(b.start_service(topics, url, rate=limit, instance="churn-0"))
        t0 = await first_call_time(control)
        await until(t0 + step)
        joined = [b.start_service(topics, url, rate=limit, instance=f"churn-{i}") for i in (1, 2)]
        procs += joined
        for p in joined:
            await asyncio.to_thread(p.wait_ready)
        await until(t0 + 2 * step)
        await asyncio.to_thread(run.stop_all, joined)
        await until(t0 + measured)
        log = await control.calls()
        await asyncio.to_thread(run.stop_all, procs)
    accepted = [float(c["time"]) for c in log if c["error_code"] != THROTTLED]
    use = window_use(accepted, limit, start=t0, end=t0 + measured)
    result = ChurnResult(
        limit,
        swaps,
        use,
        sum(1 for c in log if c["error_code"] == THROTTLED),
        sum(
            1
            for c in log
            if c["operation"] == "refresh_key" and c["status"] == 200 and c["error_code"] is None
        ),
    )
    run.say(f"1 -> 3 -> 1 at {limit}/min: {use.line()}, {result.throttled} x 1010009")
    if result.applied_in_period >= swaps:
        run.say("  the backlog ran out inside the measured period: use is not a saturated figure")
    return result


def add_budget_churn(rep: Report, r: ChurnResult) -> None:
    run = _run()
    u = r.use
    rep.add(
        f"8. budget use through 1 -> 3 -> 1 (N={r.limit}, {u.minutes:.0f} min saturated)",
        f"mean {u.mean:.1%}, least {u.least:.1%}, busiest {u.busiest}/{r.limit}",
        f">= {TARGET_SATURATED_USE:.0%}",
        run.verdict(u.mean >= TARGET_SATURATED_USE and r.applied_in_period < r.swaps),
    )
    rep.add(
        "8. 1010009 answers through 1 -> 3 -> 1",
        str(r.throttled),
        "0",
        run.verdict(r.throttled == 0),
    )


# ---------------------------------------------------------------------------- 9. deferred load
@dataclass
class FreshResult:
    deferred: int
    fresh: int
    outcomes: int
    eps: float
    deferred_seconds: float


async def _fresh_throughput(b: Bench, deferred: int) -> FreshResult:
    run = _run()
    fresh = b.sizes.fresh_swaps
    topics = b.topics(f"deferred{deferred}")
    await topics.create(b.bootstrap)
    wait_online = {
        "REBIND_PLATFORM__ONLINE_RETRY_INITIAL_SECONDS": "3600",
        "REBIND_PLATFORM__ONLINE_RETRY_MAX_SECONDS": "3600",
    }
    with run.simulator(run.UNLIMITED) as (url, control, _):
        await seed_range(control, 0, fresh)
        await seed_range(control, DEFERRED_BASE, deferred, status="ONLINE")
        svc = b.start_service(topics, url, rate=run.UNLIMITED, extra_env=wait_online)
        await asyncio.to_thread(svc.wait_ready)
        deferred_seconds = 0.0
        if deferred:
            started = time.monotonic()
            await produce_range(b.bootstrap, topics.input, DEFERRED_BASE, deferred, "wait")
            deadline = started + 300
            online = 0
            while online < deferred and time.monotonic() < deadline and svc.alive():
                online = (await control.stats())["calls_by_result"].get("100611", 0)
                await asyncio.sleep(0.5)
            deferred_seconds = time.monotonic() - started
            if online < deferred:
                raise RuntimeError(f"only {online}/{deferred} swaps deferred; log {svc.log_path}")
            run.say(f"  {deferred} swaps deferred in {deferred_seconds:.0f}s")
        progress = run.Progress(fresh, pid=svc.pid)
        reading = asyncio.create_task(
            run.read_outcomes(b.bootstrap, [topics.ok], progress, timeout=180, alive=svc.alive)
        )
        await produce_range(b.bootstrap, topics.input, 0, fresh, "fresh")
        await reading
        svc.stop()
    eps = progress.rate
    if progress.count < fresh:  # stalled: the pace of what did come
        span = time.monotonic() - progress.t_first if progress.count else 0.0
        eps = (progress.count - progress.c_first) / span if span > 0 else 0.0
    run.say(
        f"fresh throughput with {deferred} deferred: {eps:.0f} events/s "
        f"({progress.count}/{fresh} fresh outcomes)"
    )
    return FreshResult(deferred, fresh, progress.count, eps, deferred_seconds)


async def bench_deferred_load(b: Bench) -> tuple[FreshResult, FreshResult]:
    without = await _fresh_throughput(b, 0)
    with_deferred = await _fresh_throughput(b, b.sizes.deferred_devices)
    return without, with_deferred


def add_deferred_load(rep: Report, without: FreshResult, loaded: FreshResult) -> None:
    run = _run()
    for r in (without, loaded):
        done = "" if r.outcomes >= r.fresh else f", only {r.outcomes}/{r.fresh} outcomes"
        rep.add(
            f"9. fresh-input throughput, {r.deferred} deferred ({r.fresh} fresh)",
            f"{r.eps:.0f} events/s{done}",
        )
    ratio = loaded.eps / without.eps if without.eps else 0.0
    rep.add(
        f"9. fresh throughput {loaded.deferred} deferred / 0 deferred",
        f"{ratio:.2f}",
        f">= {TARGET_DEFERRED_RATIO}",
        run.verdict(ratio >= TARGET_DEFERRED_RATIO and loaded.outcomes >= loaded.fresh),
    )
