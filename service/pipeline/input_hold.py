"""Holding the input: why the pipeline takes no work now, since when, and waiting for the release.

The service holds the input while the platform refuses its login (:meth:`Pipeline.hold`): the
pipeline pauses its input partitions, jobs that have not started wait in
:meth:`InputHold.until_released`, and no waiting swap is woken. Nothing fails, nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from service.pipeline.partition_core import PartitionCore

log = structlog.get_logger(__name__)

WAKE_INTERVAL_SECONDS = 0.25


class InputHold:
    """Why the input is held (None: it is not), and the event its release sets."""

    def __init__(self, stopping: asyncio.Event) -> None:
        self.reason: str | None = None
        self._since = 0.0
        self._released = asyncio.Event()
        self._released.set()
        self._stopping = stopping

    def held(self) -> bool:
        return self.reason is not None

    def hold(self, reason: str) -> None:
        if self.reason is None:
            log.warning("input_held", reason=reason)
            self._since = time.monotonic()
        self.reason = reason
        self._released.clear()

    def release(self) -> bool:
        """False when the input was not held."""
        if self.reason is None:
            return False
        log.info("input_released", held_seconds=round(time.monotonic() - self._since, 1))
        self.reason = None
        self._released.set()
        return True

    async def until_released(self, core: PartitionCore) -> bool:
        """Wait while the input is held; False when the partition moves away or the pipeline
        stops meanwhile (the job is then left to be redone)."""
        while self.reason is not None:
            if core.closed or core.closing or self._stopping.is_set():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), WAKE_INTERVAL_SECONDS)
        return True
