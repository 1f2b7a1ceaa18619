"""`make bench` section 14: a rebalance in which a member keeps its partitions.

Every ledger partition holds ``KEPT_LEDGER_DEVICES`` ``done`` devices (written straight into the
ledger, ``tests/support/ledger_fill.py``). Member A starts alone and takes all six partitions
over (read in full). A steady producer then sends a swap every 50 ms; after ``CALM_SECONDS``
member B joins: one rebalance (eager: every partition revoked and assigned again), in which A
keeps three partitions and B takes three over. Measured, from the members' logs and the
committed outcomes:

* ledger records A reads again for the partitions it keeps (target 0), and whether it reads any
  partition in full after the rebalance;
* the extra wait of the swaps of A's kept partitions produced during the rebalance: their
  latency (outcome record timestamp minus input record timestamp, both CreateTime on this
  machine) minus the median latency before B joined (the baseline, same run). Target: at most
  2 s.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.answers import by_swap, first_answers
from bench.takeover import log_lines
from tests.support.events import fresh_swap_event
from tests.support.ledger_fill import filler, write_ledger

if TYPE_CHECKING:
    from bench.run import Bench, Report

KEPT_LEDGER_DEVICES = 50_000
CALM_SECONDS = 10.0
AFTER_SECONDS = 15.0
INTERVAL = 0.05
TARGET_EXTRA_SECONDS = 2.0


@dataclass
class KeptResult:
    ledger_devices: int
    kept: list[int]
    moved: list[int]
    reread: int  # ledger records A read for its kept partitions at the rebalance
    full_reads_after: int  # partitions A read in full after the rebalance
    moved_read: int  # ledger records B read taking its partitions over
    baseline_p50: float
    baseline_max: float
    rebalance_max: float  # latency of the kept partitions' swaps produced during the rebalance
    rebalance_swaps: int
    swaps: int
    answered: int


async def _produce(bootstrap: str, topic: str, stop: asyncio.Event) -> dict[str, Any]:
    """A swap every ``INTERVAL`` until ``stop``: event id -> (partition, input timestamp ms)."""
    from bench.run import device_id, fast_producer  # noqa: PLC0415 - a cycle

    sent: dict[str, Any] = {}
    producer = fast_producer(bootstrap)
    await producer.start()
    try:
        n = 0
        while not stop.is_set():
            dev = device_id(n)
            event_id = f"kept-{n}"
            meta = await (
                await producer.send(
                    topic, fresh_swap_event(dev, f"new-{n}", event_id=event_id), key=dev.encode()
                )
            )
            sent[event_id] = (meta.partition, meta.timestamp)
            n += 1
            await asyncio.sleep(INTERVAL)
    finally:
        await producer.stop()
    return sent


async def bench_kept(b: Bench) -> KeptResult:
    from bench.run import PARTITIONS, UNLIMITED, say, seed, simulator  # noqa: PLC0415

    topics = b.topics("kept")
    await topics.create(b.bootstrap)
    for p in range(PARTITIONS):
        await write_ledger(b.bootstrap, topics.ledger, p, filler(KEPT_LEDGER_DEVICES, seed=100 + p))
    with simulator(UNLIMITED) as (url, control, _):
        await seed(control, 2_000)
        a = b.start_service(topics, url, rate=UNLIMITED, instance="kept-a")
        await asyncio.to_thread(a.wait_ready)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            read = [r for r in log_lines(a.log_path) if r.get("event") == "partition_ledger_loaded"]
            if len(read) >= PARTITIONS:
                break
            await asyncio.sleep(0.5)
        stop = asyncio.Event()
        producing = asyncio.create_task(_produce(b.bootstrap, topics.input, stop))
        await asyncio.sleep(CALM_SECONDS)
        joined_ms = int(time.time() * 1000)
        second = b.start_service(topics, url, rate=UNLIMITED, instance="kept-b")
        await asyncio.to_thread(second.wait_ready)
        while time.monotonic() < deadline:
            opened = [
                r for r in log_lines(a.log_path) if r.get("event") == "partition_state_loaded"
            ]
            if len(opened) >= 2:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(AFTER_SECONDS)
        stop.set()
        sent = await producing
        found = await first_answers(b.bootstrap, topics.outcomes, set(sent), by_swap, 120)
        answered = {swap: stamp for swap, (_, stamp) in found.items()}
        a_lines, b_lines = log_lines(a.log_path), log_lines(second.log_path)
        for svc in (a, second):
            await asyncio.to_thread(svc.stop)
    a_opened = [r for r in a_lines if r.get("event") == "partition_state_loaded"]
    again = a_opened[1]
    again_ms = int(at_ms(again["timestamp"]))
    kept = list(again["kept"])
    a_full_after = [
        r
        for r in a_lines
        if r.get("event") == "partition_ledger_loaded" and at_ms(r["timestamp"]) >= again_ms - 1
    ]
    b_read = sum(
        int(r["ledger_records"]) for r in b_lines if r.get("event") == "partition_ledger_loaded"
    )
    latency = {e: (answered[e] - ts) / 1000 for e, (_, ts) in sent.items() if e in answered}
    calm = [latency[e] for e, (_, ts) in sent.items() if e in latency and ts < joined_ms]
    during = [
        latency[e]
        for e, (p, ts) in sent.items()
        if e in latency and p in kept and joined_ms <= ts <= again_ms
    ]
    result = KeptResult(
        ledger_devices=KEPT_LEDGER_DEVICES,
        kept=kept,
        moved=sorted(set(range(PARTITIONS)) - set(kept)),
        reread=int(again["ledger_records"]),
        full_reads_after=len(a_full_after),
        moved_read=b_read,
        baseline_p50=statistics.median(calm) if calm else float("nan"),
        baseline_max=max(calm, default=float("nan")),
        rebalance_max=max(during, default=float("nan")),
        rebalance_swaps=len(during),
        swaps=len(sent),
        answered=len(latency),
    )
    say(
        f"kept rebalance: A kept {kept}, read {result.reread} ledger records for them and "
        f"{result.full_reads_after} partitions in full after it; B read {b_read:,}; latency "
        f"before p50 {result.baseline_p50:.2f}s max {result.baseline_max:.2f}s, kept partitions "
        f"during the rebalance max {result.rebalance_max:.2f}s ({len(during)} swaps); "
        f"{result.answered}/{result.swaps} answered"
    )
    return result


def at_ms(text: str) -> float:
    from bench.takeover import at  # noqa: PLC0415 - one parser

    return at(text) * 1000


def add_kept(rep: Report, r: KeptResult) -> None:
    rep.add(
        f"14. rebalance that keeps partitions ({r.ledger_devices:,} ledger devices each): "
        "ledger records re-read by the member for the partitions it keeps",
        f"{r.reread} (kept {r.kept}; {r.full_reads_after} read in full after; the joining "
        f"member read {r.moved_read:,} for {r.moved})",
        "0",
        "met" if r.reread == 0 and r.full_reads_after == 0 else "NOT MET",
    )
    extra = r.rebalance_max - r.baseline_p50
    rep.add(
        "14. extra wait of a kept partition's swap during the rebalance: its latency minus the "
        "median before (baseline, same run)",
        f"{extra:.2f} s (max {r.rebalance_max:.2f} s over {r.rebalance_swaps} swaps; before: "
        f"p50 {r.baseline_p50:.2f} s, max {r.baseline_max:.2f} s); {r.answered}/{r.swaps} "
        "answered",
        f"<= {TARGET_EXTRA_SECONDS:.0f} s",
        "met" if extra <= TARGET_EXTRA_SECONDS else "NOT MET",
    )
