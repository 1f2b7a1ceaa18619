"""The wake loop: hands the waiting swaps whose time has come back to work.

A swap that waits in the ledger (the device was online, a transient failure, a bind watch) is
due at a time; every ``WAKE_INTERVAL_SECONDS`` (or at once when something sets ``wake_now``) the
due ones of each open partition are handed over, a bounded number at once: a swap to the
scheduler as a job, a bind watch to a poll (:class:`SwapJobs`). Nothing wakes while the input is
held.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from service.metrics import Metrics
from service.pipeline.input_hold import WAKE_INTERVAL_SECONDS, InputHold
from service.pipeline.open_partitions import OpenPartitions
from service.pipeline.swap_jobs import SwapJobs


class WakeLoop:
    """Wakes the due waiting swaps of the open partitions."""

    def __init__(
        self,
        partitions: OpenPartitions,
        jobs: SwapJobs,
        metrics: Metrics,
        *,
        concurrency: int,
        hold: InputHold,
        wake_now: asyncio.Event,
    ) -> None:
        self._partitions = partitions
        self._jobs = jobs
        self._metrics = metrics
        self._limit = max(1, concurrency // 2)
        self._hold = hold
        self._wake_now = wake_now

    async def run(self) -> None:
        """Hand waiting swaps whose time has come to the scheduler, a bounded number at once."""
        limit = self._limit
        while True:
            now_ms = int(time.time() * 1000)
            for core in list(self._partitions.cores.values()):
                if core.closing or self._hold.held():
                    continue
                expired = core.expired
                for work in core.wake(now_ms, limit, core.watches.poll_room(limit)):
                    if work.watch is not None:
                        self._jobs.start_poll(core, work)
                    else:
                        self._jobs.submit(core, work)
                if core.expired > expired:  # the retention sweep runs in wake
                    self._metrics.ledger_entries_expired.inc(core.expired - expired)
            self._metrics.deferred_events.set(self._partitions.waiting())
            self._wake_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_now.wait(), WAKE_INTERVAL_SECONDS)
