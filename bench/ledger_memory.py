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
  (``decode_entry`` as the ledger used it), kept here only to measure it.
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

from service.pipeline.ledger import DeviceLedger, Entry, State, decode_entry, encode_entry

if TYPE_CHECKING:
    from bench.run import Bench, Report

ROOT = Path(__file__).resolve().parents[1]
BATCH = 10_000
TARGET_BYTES = 120.0
FORMS = ("before", "packed")


class Loader(Protocol):
    def load(self, key: bytes | None, value: bytes | None) -> None: ...


class EntryObjects:
    """The ledger's representation before issue 20: every device's entry an object."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def load(self, key: bytes | None, value: bytes | None) -> None:
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


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(devices: int, form: str) -> dict[str, float]:
    ledger: Loader = DeviceLedger("ledger", 0) if form == "packed" else EntryObjects()
    seconds = 0.0
    loaded = 0
    for batch in batches(devices):
        started = time.perf_counter()
        for key, value in batch:
            ledger.load(key, value)
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

    def per_device(self, form: str) -> float:
        return (self.loaded_kib[form] - self.baseline_kib[form]) * 1024 / self.devices

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
    result = LedgerMemoryResult(n, {}, {}, {})
    for form in FORMS:
        none = await measure(0, form)
        full = await measure(n, form)
        result.baseline_kib[form] = int(none["rss_kib"])
        result.loaded_kib[form] = int(full["rss_kib"])
        result.rate[form] = full["loaded"] / full["seconds"] if full["seconds"] else 0.0
        run.say(
            f"ledger of {n} done devices, {form}: RSS {full['rss_kib'] / 1024:.1f} MiB - "
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ledger_memory", description=__doc__)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--form", choices=FORMS, required=True)
    args = p.parse_args(argv)
    print(orjson.dumps(child(args.devices, args.form)).decode(), flush=True)


if __name__ == "__main__":
    main()
