"""`make bench` section 15: a rolling restart of 3 replicas holding 3,000,000 ledger devices.

Each of the 6 ledger partitions holds ``ROLLING_DEVICES / 6`` ``done`` devices (written straight
into the ledger, ``tests/support/ledger_fill.py``). Three replicas start and share the 6
partitions (each takes its 2 over, reading 1,000,000 records). A steady producer sends a swap
every 50 ms; then each replica in turn gets SIGTERM, is started again under the same instance id
once it exited, and the next one follows once it is ready and has read its ledgers. Measured:

* the longest gap between two consecutive committed outcomes (outcome record timestamps, all
  partitions) from the first SIGTERM to the end (target 15 s);
* evicted members: lines of the replicas' logs saying the coordinator no longer knew a member
  (an unknown member id, a failed heartbeat of a member that was removed) (target 0);
* every swap answered.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.answers import by_swap, first_answers
from bench.kept import _produce
from bench.takeover import log_lines
from tests.support.ledger_fill import filler, write_ledger

if TYPE_CHECKING:
    from bench.run import Bench, Report, ServiceProc

ROLLING_DEVICES = 3_000_000
REPLICAS = 3
TARGET_GAP_SECONDS = 15.0
EVICTED = ("UnknownMemberId", "unknown member", "member id is not valid")


@dataclass
class RollingResult:
    devices: int
    build_seconds: float
    first_read_seconds: float
    longest_gap: float
    evicted: int
    swaps: int
    answered: int
    restart_seconds: list[float]


async def _read_all(svc: ServiceProc, deadline: float) -> None:
    """Until ``svc`` has read in full every ledger its last assignment had it take over."""
    while time.monotonic() < deadline:
        lines = log_lines(svc.log_path)
        opened = [i for i, r in enumerate(lines) if r.get("event") == "partition_state_loaded"]
        if opened:
            last = lines[opened[-1]]
            read = {
                r.get("partition")
                for r in lines[opened[-1] :]
                if r.get("event") == "partition_ledger_loaded"
            }
            if set(last.get("loading", [])) <= read:
                return
        await asyncio.sleep(0.5)


async def bench_rolling(b: Bench) -> RollingResult:
    from bench.run import PARTITIONS, UNLIMITED, say, seed, simulator  # noqa: PLC0415

    topics = b.topics("rolling")
    await topics.create(b.bootstrap)
    started = time.monotonic()
    per = ROLLING_DEVICES // PARTITIONS
    for p in range(PARTITIONS):
        await write_ledger(b.bootstrap, topics.ledger, p, filler(per, seed=200 + p))
    build = time.monotonic() - started
    say(f"ledger: {per * PARTITIONS:,} records written in {build:.1f}s")
    static = {"REBIND_KAFKA__STATIC_MEMBERSHIP": "false"}
    with simulator(UNLIMITED) as (url, control, _):
        await seed(control, 5_000)
        names = [f"rolling-{i}" for i in range(REPLICAS)]
        procs = [
            b.start_service(topics, url, rate=UNLIMITED, instance=n, extra_env=static)
            for n in names
        ]
        for svc in procs:
            await asyncio.to_thread(svc.wait_ready, 180.0)
        t0 = time.monotonic()
        for svc in procs:
            await _read_all(svc, t0 + 300)
        first_read = time.monotonic() - t0
        stop = asyncio.Event()
        producing = asyncio.create_task(_produce(b.bootstrap, topics.input, stop))
        await asyncio.sleep(5)
        rolled_ms = int(time.time() * 1000)
        restarts: list[float] = []
        logs = []
        for i, name in enumerate(names):
            began = time.monotonic()
            await asyncio.to_thread(procs[i].stop)
            logs.append(procs[i].log_path)
            procs[i] = b.start_service(topics, url, rate=UNLIMITED, instance=name, extra_env=static)
            await asyncio.to_thread(procs[i].wait_ready, 180.0)
            await asyncio.sleep(3)  # the group settles
            for svc in procs:
                await _read_all(svc, time.monotonic() + 240)
            restarts.append(time.monotonic() - began)
        await asyncio.sleep(5)
        stop.set()
        sent = await producing
        found = await first_answers(b.bootstrap, topics.outcomes, set(sent), by_swap, 240)
        answered = {swap: stamp for swap, (_, stamp) in found.items()}
        logs += [svc.log_path for svc in procs]
        for svc in procs:
            await asyncio.to_thread(svc.stop)
    times = sorted(t for t in answered.values() if t >= rolled_ms)
    gap = max((b2 - a2 for a2, b2 in itertools.pairwise(times)), default=0) / 1000
    evicted = sum(
        1
        for path in dict.fromkeys(logs)
        for line in path.read_text(errors="replace").splitlines()
        if any(mark in line for mark in EVICTED)
    )
    result = RollingResult(
        devices=per * PARTITIONS,
        build_seconds=build,
        first_read_seconds=first_read,
        longest_gap=gap,
        evicted=evicted,
        swaps=len(sent),
        answered=len(answered),
        restart_seconds=restarts,
    )
    say(
        f"rolling restart of {REPLICAS} replicas, {result.devices:,} ledger devices: longest gap "
        f"between outcomes {gap:.2f}s, {evicted} eviction line(s), {len(answered)}/{len(sent)} "
        f"answered; restarts took {', '.join(f'{s:.0f}s' for s in restarts)}; first reads "
        f"{first_read:.0f}s"
    )
    return result


def add_rolling(rep: Report, r: RollingResult) -> None:
    rep.add(
        f"15. rolling restart of {REPLICAS} replicas, {r.devices:,} ledger devices: longest gap "
        "between two committed outcomes",
        f"{r.longest_gap:.2f} s ({r.answered}/{r.swaps} answered; restarts "
        f"{', '.join(f'{s:.0f}' for s in r.restart_seconds)} s)",
        f"<= {TARGET_GAP_SECONDS:.0f} s",
        "met" if r.longest_gap <= TARGET_GAP_SECONDS and r.answered == r.swaps else "NOT MET",
    )
    rep.add(
        "15. evicted members (unknown member ids in the replicas' logs)",
        str(r.evicted),
        "0",
        "met" if r.evicted == 0 else "NOT MET",
    )
