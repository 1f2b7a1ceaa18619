"""`make bench` section 11: the memory a partition's ledger holds per ``done`` device.

A child process per measure (``python -m bench.ledger_memory --devices N --form F``) builds
ledger records with the service's own :func:`~service.pipeline.ledger.encode_entry` (device and
event ids UUIDs, a 15-digit nodeId, one source, the outcome ``credential_updated``), in batches of
10,000, and loads each batch as the service loads the ledger topic at assignment (``load(key,
value)`` per record). Only the loads are timed. Once all are loaded it prints its RSS
(``VmRSS``). The same child with 0 devices is the baseline: RSS(N) - RSS(0) is what the devices
cost. Two forms, in the same run:

* ``packed``: :class:`~service.pipeline.ledger.DeviceLedger` as the service runs it;
* ``before``: the representation before issue 20, one ``Entry`` object per device in a dict
  (``decode_entry`` as the ledger used it), kept here only to measure it;
* ``waiting`` and ``watching``: :class:`~service.pipeline.ledger.DeviceLedger` holding devices
  whose swap waits (the device online) or whose new hardware is watched until it binds, as the
  service loads them (issue 20 item 2): the record's offset kept, the swap itself (a structured
  CloudEvent of ``WAITING_BODY_BYTES`` bytes) left in the ledger topic until it is due. A tenth
  of the done devices' count;
* ``waiting-kept`` and ``watching-kept``: the same records loaded as before, each entry keeping
  its swap in memory, kept here only to measure the difference in the same run;
* ``dedupe``: the duplicate memory of one partition (:class:`~service.pipeline.dedupe.DedupeIndex`)
  holding as many answered events, as loaded at assignment.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import orjson

from service.bind.watch import Watch
from service.pipeline.dedupe import DedupeIndex, id_hash
from service.pipeline.ledger import DeviceLedger, Entry, State, decode_entry, encode_entry
from service.pipeline.work import WaitState

if TYPE_CHECKING:
    from bench.run import Bench, Report

ROOT = Path(__file__).resolve().parents[1]
BATCH = 10_000
TARGET_BYTES = 120.0
FORMS = ("before", "packed")
WAITING = "waiting"
WATCHING = "watching"
KEPT = "-kept"  # the swap kept in memory, as before issue 20 item 2
OPEN_FORMS = (WAITING + KEPT, WAITING, WATCHING + KEPT, WATCHING)
DEDUPE = "dedupe"


class Loader(Protocol):
    def load(self, key: bytes | None, value: bytes | None, offset: int | None = None) -> object: ...


class EntryObjects:
    """The ledger's representation before issue 20: every device's entry an object."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def load(self, key: bytes | None, value: bytes | None, offset: int | None = None) -> None:
        if key is None:
            return
        device = key.decode("utf-8", "replace")
        self.entries.pop(device, None)
        entry = decode_entry(value) if value else None
        if entry is not None:
            self.entries[device] = entry


def batches(devices: int, seed: int = 20) -> Iterator[list[tuple[bytes, bytes]]]:
    """Ledger records of ``devices`` done devices, ``BATCH`` at a time (never all at once)."""
    rng = random.Random(seed)  # noqa: S311 - ids of a fixture, the same in every run
    base_ms = 1_790_000_000_000
    for first in range(0, devices, BATCH):
        batch = []
        for i in range(first, min(devices, first + BATCH)):
            device = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            entry = Entry(
                str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "/inventory/erp-eu",
                (base_ms + i * 1_000, i),
                f"{rng.randrange(10**14, 10**15)}",
                State.DONE,
                outcome="credential_updated",
            )
            # a copy: orjson's own buffer is a few KiB, and a batch of them would weigh in RSS
            batch.append((device.encode(), bytes(memoryview(encode_entry(entry)))))
        yield batch


def _waiting_body(device: str, event_id: str, node_id: str) -> bytes:
    """A ``device.swapped`` CloudEvent as producers send it (structured mode)."""
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": "/inventory/erp-eu",
            "type": "com.example.iot.device.swapped.v1",
            "time": "2026-12-06T09:30:00.000Z",
            "subject": device,
            "datacontenttype": "application/json",
            "data": {"deviceId": device, "nodeId": node_id, "verifyCode": node_id},
        }
    )


def open_batches(devices: int, form: str, seed: int = 21) -> Iterator[list[tuple[bytes, bytes]]]:
    """Ledger records of ``devices`` devices whose swap waits (the device online) or, with
    ``watching``, whose new hardware is watched until it binds."""
    rng = random.Random(seed)  # noqa: S311 - ids of a fixture, the same in every run
    base_ms = 1_790_000_000_000
    watching = form.startswith(WATCHING)
    for first in range(0, devices, BATCH):
        batch = []
        for i in range(first, min(devices, first + BATCH)):
            device = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            node_id = f"{rng.randrange(10**14, 10**15)}"
            watch = Watch(base_ms, base_ms + 86_400_000, False, None, base_ms + 15_000 + i)
            entry = Entry(
                event_id,
                "/inventory/erp-eu",
                (base_ms + i * 1_000, i),
                node_id,
                State.WATCHING if watching else State.WAITING,
                outcome="credential_updated" if watching else None,
                watch=watch if watching else None,
                wait=None
                if watching
                else WaitState(
                    due_ms=base_ms + 3_600_000 + i,
                    deadline_ms=base_ms + 86_400_000,
                    deferrals=1,
                    attempts=1,
                    first_attempt_ms=base_ms,
                    last_code="100611",
                    reason="device_online",
                ),
                value=_waiting_body(device, event_id, node_id),
            )
            batch.append((device.encode(), bytes(memoryview(encode_entry(entry)))))
        yield batch


WAITING_BODY_BYTES = len(_waiting_body(str(uuid.UUID(int=0)), str(uuid.UUID(int=0)), "1" * 15))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def dedupe_child(entries: int) -> dict[str, float]:
    """The duplicate memory of one partition holding ``entries`` answered events."""
    rng = random.Random(22)  # noqa: S311 - ids of a fixture, the same in every run
    index = DedupeIndex("dedupe", 0, max(entries, 1))
    seconds = 0.0
    for first in range(0, entries, BATCH):
        keys = [
            id_hash(f"/inventory/erp-eu {uuid.UUID(int=rng.getrandbits(128), version=4)}")
            for _ in range(first, min(entries, first + BATCH))
        ]
        started = time.perf_counter()
        for offset, key in enumerate(keys, first):
            index.add(key, offset)
        seconds += time.perf_counter() - started
    gc.collect()
    return {"devices": entries, "rss_kib": rss_kib(), "seconds": seconds, "loaded": entries}


def child(devices: int, form: str) -> dict[str, float]:
    if form == DEDUPE:
        return dedupe_child(devices)
    # The service's ledger: a kept swap's body stays in the topic, at the record's offset (here
    # the record's place in the fixture); "-kept": as before, the body in memory.
    kept = form.endswith(KEPT)
    ledger: Loader = (
        DeviceLedger("ledger", 0, bodies_out=not kept) if form != "before" else EntryObjects()
    )
    seconds = 0.0
    loaded = 0
    for batch in open_batches(devices, form) if form in OPEN_FORMS else batches(devices):
        started = time.perf_counter()
        for offset, (key, value) in enumerate(batch, loaded):
            ledger.load(key, value, None if kept else offset)
        seconds += time.perf_counter() - started
        loaded += len(batch)
    gc.collect()
    return {"devices": devices, "rss_kib": rss_kib(), "seconds": seconds, "loaded": loaded}


@dataclass
class LedgerMemoryResult:
    devices: int
    baseline_kib: dict[str, int]
    loaded_kib: dict[str, int]
    rate: dict[str, float]
    waiting_devices: int = 0

    def per_device(self, form: str) -> float:
        count = self.waiting_devices if form in (*OPEN_FORMS, DEDUPE) else self.devices
        return (self.loaded_kib[form] - self.baseline_kib[form]) * 1024 / count

    def mib(self, form: str) -> float:
        return (self.loaded_kib[form] - self.baseline_kib[form]) / 1024


async def measure(devices: int, form: str) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.ledger_memory",
        "--devices",
        str(devices),
        "--form",
        form,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ledger memory child ({form}, {devices}) exited {proc.returncode}")
    found: dict[str, float] = orjson.loads(out.splitlines()[-1])
    return found


async def bench_ledger_memory(b: Bench) -> LedgerMemoryResult:
    from bench import run  # noqa: PLC0415 - bench.run runs this section

    n = b.sizes.ledger_devices
    result = LedgerMemoryResult(n, {}, {}, {}, waiting_devices=n // 10)
    for form in (*FORMS, *OPEN_FORMS, DEDUPE):
        count = result.waiting_devices if form in (*OPEN_FORMS, DEDUPE) else n
        none = await measure(0, form)
        full = await measure(count, form)
        result.baseline_kib[form] = int(none["rss_kib"])
        result.loaded_kib[form] = int(full["rss_kib"])
        result.rate[form] = full["loaded"] / full["seconds"] if full["seconds"] else 0.0
        what = (
            f"{count} {form} devices ({WAITING_BODY_BYTES}-byte swaps)"
            if form in OPEN_FORMS
            else f"{count} done devices, {form}"
        )
        if form == DEDUPE:
            run.say(
                f"duplicate memory of {count} answered events: RSS "
                f"{full['rss_kib'] / 1024:.1f} MiB - {none['rss_kib'] / 1024:.1f} MiB with none "
                f"= {result.mib(form):.1f} MiB, {result.per_device(form):.0f} bytes per event"
            )
            continue
        run.say(
            f"ledger of {what}: RSS {full['rss_kib'] / 1024:.1f} MiB - "
            f"{none['rss_kib'] / 1024:.1f} MiB with none = {result.mib(form):.1f} MiB, "
            f"{result.per_device(form):.0f} bytes per device; loaded at "
            f"{result.rate[form]:,.0f} records/s"
        )
    return result


def add_ledger_memory(rep: Report, r: LedgerMemoryResult) -> None:
    before, after = r.per_device("before"), r.per_device("packed")
    rep.add(
        f"11. ledger RSS per done device, before (an Entry object each; {r.devices} devices)",
        f"{before:.0f} bytes ({r.mib('before'):.0f} MiB)",
    )
    rep.add(
        f"11. ledger RSS per done device, packed ({r.devices} devices)",
        f"{after:.0f} bytes ({r.mib('packed'):.0f} MiB)",
        f"<= {TARGET_BYTES:.0f} bytes",
        "met" if after <= TARGET_BYTES else "NOT MET",
    )
    rep.add(
        "11. ledger load rate, before / packed (decode + load, no fetch)",
        f"{r.rate['before']:,.0f} / {r.rate['packed']:,.0f} records/s",
    )
    rep.add(
        f"11. duplicate memory RSS per answered event ({r.waiting_devices} events)",
        f"{r.per_device(DEDUPE):.0f} bytes ({r.mib(DEDUPE):.0f} MiB)",
    )
    for form in (WAITING, WATCHING):
        rep.add(
            f"11. ledger RSS per {form} device, swap kept in memory as before "
            f"({WAITING_BODY_BYTES}-byte swap; {r.waiting_devices} devices)",
            f"{r.per_device(form + KEPT):.0f} bytes ({r.mib(form + KEPT):.0f} MiB); loaded at "
            f"{r.rate[form + KEPT]:,.0f} records/s",
        )
        rep.add(
            f"11. ledger RSS per {form} device, swap in the ledger topic "
            f"({WAITING_BODY_BYTES}-byte swap; {r.waiting_devices} devices)",
            f"{r.per_device(form):.0f} bytes ({r.mib(form):.0f} MiB); loaded at "
            f"{r.rate[form]:,.0f} records/s",
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ledger_memory", description=__doc__)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--form", choices=(*FORMS, *OPEN_FORMS, DEDUPE), required=True)
    args = p.parse_args(argv)
    print(orjson.dumps(child(args.devices, args.form)).decode(), flush=True)


if __name__ == "__main__":
    main()
