"""`make bench` section 13: taking over a partition whose ledger holds 1,000,000 devices.

The fixture is built fast: ``done`` ledger records written straight into ledger partition 0
with the service's own encoder, in hand-built record batches (``tests/support/ledger_fill.py``):
one device of input partition 0 swapped an hour ago (its record is the newest), then 1,000,000
devices with UUID deviceIds. Two swaps wait on input partition 0 before the member starts: a
fresh swap of that recently swapped device, and a swap of a device with no ledger record at all.

A member then starts and is assigned every partition: a take-over of all of them. Measured, from
the member's own log (one clock: the outcome's CloudEvent ``time`` is the member's decision):

* assignment -> outcome of the recently swapped device's swap: its entry is in the first chunk
  read, so it is decided while the rest of the ledger is still read (issue 20: <= 10 s);
* assignment -> outcome of the swap of the device with no record: it waits for the whole read,
  as every swap waited before issue 20 item 4 (the ledger was read completely in the assignment
  callback before any swap ran): **the baseline**, in the same run, with the whole read's time;
* the member's group membership while it reads: assignments, revocations and failed heartbeats
  in its log (a member evicted for loading would be revoked and assigned again).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.answers import by_device, first_answers
from tests.support.events import fresh_swap_event
from tests.support.ledger_fill import done_record, filler, write_ledger
from tests.support.partitioning import device_on

if TYPE_CHECKING:
    from bench.run import Bench, Report

TARGET_FIRST_OUTCOME_SECONDS = 10.0
HOUR_MS = 3_600_000


@dataclass
class TakeoverResult:
    devices: int
    build_seconds: float
    known_seconds: float  # assignment -> outcome of the swap of a device in the newest records
    unknown_seconds: float  # assignment -> outcome of the swap of a device with no record
    read_seconds: float  # the ledger's whole read (partition_ledger_loaded)
    read_records: int
    read_cpu_seconds: float  # the member's CPU (user + system) while it read
    assignments: int
    revocations: int
    heartbeat_failures: int


def log_lines(path: Path) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            found.append(rec)
    return found


def at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def bench_takeover(b: Bench) -> TakeoverResult:
    from bench.run import (  # noqa: PLC0415 - a cycle
        PARTITIONS,
        UNLIMITED,
        cpu_seconds,
        fast_producer,
        say,
        simulator,
    )

    devices = b.sizes.ledger_devices
    topics = b.topics("takeover")
    await topics.create(b.bootstrap)
    known = device_on(0, PARTITIONS, f"known-{uuid.uuid4().hex[:6]}")
    unknown = device_on(0, PARTITIONS, f"unknown-{uuid.uuid4().hex[:6]}")
    now_ms = int(time.time() * 1000)
    started = time.monotonic()
    written = await write_ledger(
        b.bootstrap,
        topics.ledger,
        0,
        itertools.chain(
            filler(devices, time_ms=now_ms - HOUR_MS),
            [done_record(known, time_ms=now_ms - HOUR_MS)],
        ),
    )
    build = time.monotonic() - started
    say(f"ledger partition 0: {written:,} records written in {build:.1f}s")
    producer_swaps = [
        (d.encode(), fresh_swap_event(d, f"new-{d}", event_id=str(uuid.uuid4())))
        for d in (known, unknown)
    ]
    producer = fast_producer(b.bootstrap)
    await producer.start()
    try:
        for key, value in producer_swaps:
            await (await producer.send(topics.input, value, key=key))
    finally:
        await producer.stop()
    with simulator(UNLIMITED) as (url, control, _):
        await control.seed_devices(
            [{"device_id": d, "node_id": f"old-{d}", "status": "OFFLINE"} for d in (known, unknown)]
        )
        svc = b.start_service(topics, url, rate=UNLIMITED, instance="takeover-0")
        cpu_open = cpu_read = 0.0
        watching = asyncio.create_task(
            first_answers(b.bootstrap, [topics.ok, topics.failed], {known, unknown}, by_device, 300)
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            lines = log_lines(svc.log_path)
            if not cpu_open and any(r.get("event") == "partition_state_loaded" for r in lines):
                cpu_open = cpu_seconds(svc.pid)
            loaded = [r for r in lines if r.get("event") == "partition_ledger_loaded"]
            if any(r.get("partition") == 0 for r in loaded):
                cpu_read = cpu_seconds(svc.pid)
                break
            await asyncio.sleep(0.2)
        answers = {device: event for device, (event, _) in (await watching).items()}
        # A few heartbeats after the read: an eviction caused by it would show by now.
        await asyncio.sleep(8)
        lines = log_lines(svc.log_path)
        await asyncio.to_thread(svc.stop)
    opened = next(r for r in lines if r.get("event") == "partition_state_loaded")
    assigned_at = at(opened["timestamp"]) - float(opened.get("open_seconds", 0.0))
    read = next(
        r for r in lines if r.get("event") == "partition_ledger_loaded" and r["partition"] == 0
    )
    result = TakeoverResult(
        devices=written,
        build_seconds=build,
        known_seconds=at(answers[known]["time"]) - assigned_at,
        unknown_seconds=at(answers[unknown]["time"]) - assigned_at,
        read_seconds=float(read["seconds"]),
        read_records=int(read["ledger_records"]),
        read_cpu_seconds=cpu_read - cpu_open,
        assignments=sum(1 for r in lines if r.get("event") == "partitions_assigned"),
        revocations=sum(1 for r in lines if r.get("event") == "partitions_revoked"),
        heartbeat_failures=sum(1 for r in lines if "Heartbeat failed" in str(r.get("event"))),
    )
    say(
        f"take-over of {written:,} ledger records: known device answered "
        f"{result.known_seconds:.2f}s after the assignment, a device without a record "
        f"{result.unknown_seconds:.2f}s; whole read {result.read_seconds:.2f}s "
        f"({result.read_records:,} records, {result.read_cpu_seconds:.1f}s of the member's CPU); "
        f"{result.assignments} assignment(s), "
        f"{result.revocations} revocation(s), {result.heartbeat_failures} failed heartbeat(s)"
    )
    return result


def add_takeover(rep: Report, r: TakeoverResult) -> None:
    ok = r.known_seconds <= TARGET_FIRST_OUTCOME_SECONDS
    rep.add(
        f"13. take-over, {r.devices:,} ledger devices: assignment -> outcome of a swap of a "
        "device read first (its record among the newest)",
        f"{r.known_seconds:.2f} s",
        f"<= {TARGET_FIRST_OUTCOME_SECONDS:.0f} s",
        "met" if ok else "NOT MET",
    )
    rep.add(
        "13. baseline: assignment -> outcome of a swap that waits for the whole read (a device "
        "with no record; every swap waited so before); the whole read",
        f"{r.unknown_seconds:.2f} s; read {r.read_seconds:.2f} s "
        f"({r.read_records / max(r.read_seconds, 1e-9):,.0f} records/s, "
        f"{r.read_cpu_seconds:.1f} s of CPU)",
    )
    quiet = r.assignments == 1 and r.revocations == 0 and r.heartbeat_failures == 0
    rep.add(
        "13. membership while reading: assignments / revocations / failed heartbeats",
        f"{r.assignments} / {r.revocations} / {r.heartbeat_failures}",
        "1 / 0 / 0",
        "met" if quiet else "NOT MET",
    )
    rep.add("13. fixture: ledger records written (batching producer)", f"{r.build_seconds:.1f} s")
