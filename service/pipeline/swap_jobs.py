"""The job of one swap, read as a chain: claim -> commit the claim -> call -> decide; beside it
the bind-watch polls and the re-publishing of a duplicate's stored outcome.

:class:`SwapJobs` builds the job the :class:`KeyedScheduler` runs for a swap (per device, in
order) and starts the polls, which run beside the scheduler's queues. Every platform call of a
job or poll leaves through the call guard (:mod:`service.ownership`): only while the member has
fresh proof that it owns the partition. A job whose partition moves away, or that the input hold
stops before it started, is abandoned: the partition's next owner (or the release) does it.
What is decided goes to the partition's core; the commit loop publishes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Protocol

import structlog
from aiokafka.errors import KafkaError

from service.metrics import Metrics
from service.ownership import CALL_GUARD
from service.pipeline.committer import PartitionFencedError
from service.pipeline.dedupe import DedupeReader
from service.pipeline.input_hold import InputHold
from service.pipeline.open_partitions import OpenPartitions
from service.pipeline.partition_core import PartitionCore
from service.pipeline.scheduler import KeyedScheduler
from service.pipeline.work import HandlerResult, PollResult, Republish, Work

log = structlog.get_logger(__name__)

_REPUBLISH_RETRY_INITIAL_SECONDS = 0.2
_REPUBLISH_RETRY_MAX_SECONDS = 10.0


class Handler(Protocol):
    """Turns one swap into its result (an outcome, or a wait in the ledger); never raises."""

    async def handle(self, work: Work) -> HandlerResult: ...

    async def poll(self, work: Work) -> PollResult: ...


class SwapJobs:
    """Runs the swaps of the open partitions and the polls of their bind watches."""

    def __init__(
        self,
        handler: Handler,
        partitions: OpenPartitions,
        scheduler: KeyedScheduler,
        dedupe: DedupeReader,
        *,
        commit_batch_size: int,
        wait_owner: Callable[[PartitionCore], Awaitable[None]],
        hold: InputHold,
        progress: asyncio.Event,
        flush_now: asyncio.Event,
        metrics: Metrics | None = None,
    ) -> None:
        self._handler = handler
        self._metrics = metrics
        self._partitions = partitions
        self._scheduler = scheduler
        self._dedupe = dedupe
        self._commit_batch_size = commit_batch_size
        self._wait_owner = wait_owner
        self._hold = hold
        self._progress = progress
        self._flush_now = flush_now
        self.side_tasks: set[asyncio.Task[None]] = set()
        self._polls: dict[asyncio.Task[None], PartitionCore] = {}  # bind-watch polls out

    def submit(self, core: PartitionCore, work: Work) -> None:
        """Queue the swap's job behind the device's earlier ones."""
        self._scheduler.submit(
            work.device, self._job(core, work), urgent=work.urgent, group=core.partition
        )

    def admit_held(self, core: PartitionCore, works: list[Work]) -> None:
        """Swaps a take-over held until their device's ledger entry was read
        (:mod:`service.pipeline.takeover`): judged now, in the order read, and queued. A
        partition being revoked judges none: its next owner does."""
        if core.closed or core.closing:
            return
        for work in works:
            job = core.admit(work)
            if job is not None:
                self.submit(core, job)
        self.decided()

    def start(self, core: PartitionCore, jobs: list[Work | Republish]) -> None:
        """What waited for a swap body read back from the ledger topic: woken swaps and held
        ones to queue, polls to run, duplicates to re-publish."""
        if core.closed or core.closing:
            return
        for job in jobs:
            if isinstance(job, Republish):
                self.republish(core, job)
            elif job.watch is not None:
                self.start_poll(core, job)
            else:
                self.submit(core, job)
        self.decided()

    def decided(self) -> None:
        """Something was decided: the consume loop may go on, and a full batch commits now."""
        self._progress.set()
        if self._partitions.pending_outputs() >= self._commit_batch_size:
            self._flush_now.set()

    def _job(self, core: PartitionCore, work: Work) -> Callable[[], Awaitable[None]]:
        first_call = [work.offset is not None]  # a fresh record: its first call is measured

        async def guarded() -> None:
            await self._wait_owner(core)
            if first_call[0]:
                first_call[0] = False
                self._calling(core, work)

        async def job() -> None:
            guard = CALL_GUARD.set(guarded)
            try:
                await run()
            finally:
                CALL_GUARD.reset(guard)

        async def run() -> None:
            if core.closed or core.closing:
                core.abandoned(work)
                return  # the partition moves away: its next owner does this work
            if self._hold.held() and not await self._hold.until_released(core):
                core.abandoned(work)
                self._progress.set()
                return
            with _log_context(work):
                if not core.claim(work):
                    self.decided()
                    return
                if work.offset is not None and not await self._claim_durably(core, work):
                    core.abandoned(work)
                    return
                try:
                    result = await self._handler.handle(work)
                except asyncio.CancelledError:
                    core.abandoned(work)
                    raise
            if core.closed:
                return
            core.decide(work, result)
            self.decided()

        return job

    def _calling(self, core: PartitionCore, work: Work) -> None:
        """The swap's first platform call leaves now: its time from the record, by lane."""
        if self._metrics is None or work.offset is None:
            return
        stamp = core.outbox.lane(work.urgent).produced_at(work.offset)
        if stamp is not None:
            lane = "urgent" if work.urgent else "bulk"
            waited = max(0.0, time.time() - stamp / 1000)
            self._metrics.record_to_call.labels(lane=lane).observe(waited)

    async def _claim_durably(self, core: PartitionCore, work: Work) -> bool:
        """Commit the claim of a fresh swap before its call (see PartitionCore.note_claim).
        Concurrent claims of a partition share the next transaction, with the outcomes decided
        meanwhile (PartitionCommitter.durable). False when the partition moves away meanwhile:
        the next owner does the work. A claim that need not be durable first (the device had
        nothing open: PartitionCore.note_claim) rides the next transaction without a wait."""
        if not core.note_claim(work):
            return not (core.closed or core.closing)
        while not (core.closed or core.closing):
            committer = self._partitions.committers.get(core.partition)
            if committer is None or committer.core is not core:
                return False
            try:
                return await committer.durable()
            except PartitionFencedError:
                return False
            except Exception:  # noqa: BLE001 - any failed transaction: the commit loop retries too
                log.warning("claim_commit_failed", action="trying again", partition=core.partition)
                await asyncio.sleep(0.5)  # the commit loop retries too: a broker hiccup
        return False

    async def settle(self, partitions: list[int], *, lost: bool, seconds: float) -> None:
        """Let the running jobs of revoked ``partitions`` finish for up to ``seconds`` before
        they move; cancel them at once when the group already gave them away (``lost``), or at
        the end when every open partition moves. Their polls are cancelled (their watches stay,
        the next owner polls them)."""
        loop = asyncio.get_running_loop()
        if lost:
            # The group gave the partitions away already (this member was frozen or cut off):
            # nothing it still runs may reach the platform; cancel instead of draining.
            log.warning(
                "revoked_after_losing_group", action="running jobs cancelled", partitions=partitions
            )
            await self._scheduler.cancel_all()
        deadline = loop.time() + seconds
        while self._scheduler.running and loop.time() < deadline:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), max(0.0, deadline - loop.time()))
        if self._scheduler.running and len(partitions) == len(self._partitions.cores):
            # Everything moves (the eager protocol revokes all): stop what still runs, so a
            # retry cannot reach the platform after the new owner applied a newer swap.
            await self._scheduler.cancel_all()
        await self.cancel_polls(set(partitions))

    async def drain(self, timeout: float) -> None:
        """At shutdown: finish what is running (for up to ``timeout``); what is queued has not
        touched the platform and is redone after the restart, so stopping does not wait for a
        whole buffer of work. Polls and side tasks are cancelled."""
        self._scheduler.close()
        await self.cancel_polls()
        drained = await self._scheduler.join(timeout)
        if not drained:
            log.warning("drain_timed_out", action="unfinished work is left for redelivery")
            await self._scheduler.cancel_all()
        for task in list(self.side_tasks):
            task.cancel()

    # ---- bind-watch polls ------------------------------------------------------------------

    def start_poll(self, core: PartitionCore, work: Work) -> None:
        """A bind-watch poll runs beside the per-device jobs, not in their queues: a poll waits
        only for its budget share, never behind the fresh swaps that fill the scheduler (it
        needs no per-device order: its answer applies only to the watch it was sent for)."""
        task = asyncio.get_running_loop().create_task(self._poll(core, work))
        self._polls[task] = core
        task.add_done_callback(lambda done: self._polls.pop(done, None))

    async def _poll(self, core: PartitionCore, work: Work) -> None:
        CALL_GUARD.set(lambda: self._wait_owner(core))  # this task's own context
        with _log_context(work):
            try:
                if self._hold.held() and not await self._hold.until_released(core):
                    core.abandoned(work)
                    return
                polled = await self._handler.poll(work)
            except asyncio.CancelledError:
                core.abandoned(work)
                raise
            if not core.closed:
                core.polled(work, polled)
                self.decided()

    async def cancel_polls(self, cores: set[int] | None = None) -> None:
        """Cancel the polls of these partitions (all: None); their watches stay due."""
        tasks = [t for t, c in self._polls.items() if cores is None or c.partition in cores]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- duplicates ------------------------------------------------------------------------

    def republish(self, core: PartitionCore, job: Republish) -> None:
        """Re-publish a duplicate's stored outcome, in a side task."""
        task: asyncio.Task[None] = asyncio.ensure_future(self._republish(core, job))
        self.side_tasks.add(task)
        task.add_done_callback(self.side_tasks.discard)

    async def _republish(self, core: PartitionCore, job: Republish) -> None:
        """Read a duplicate's stored outcome back and re-publish it. A failed read is tried
        again with a growing pause until it succeeds or the partition moves: the duplicate's
        offset holds the partition's committed offset until it is answered."""
        pause = _REPUBLISH_RETRY_INITIAL_SECONDS
        while not core.closed:
            try:
                found = await self._dedupe.fetch(core.partition, job.dedupe_offset)
            except KafkaError as exc:
                log.warning(
                    "stored_outcome_unreadable",
                    action="trying again",
                    partition=core.partition,
                    dedupe_offset=job.dedupe_offset,
                    retry_in=pause,
                    error=repr(exc),
                )
                await asyncio.sleep(pause)  # a backoff between reads, not a synchronisation
                pause = min(pause * 2, _REPUBLISH_RETRY_MAX_SECONDS)
                continue
            core.republished(job, found)
            self.decided()
            return


def _log_context(work: Work) -> AbstractContextManager[None]:
    """The swap's coordinates on every log line of its job or poll."""
    return structlog.contextvars.bound_contextvars(
        topic=work.topic,
        partition=work.partition,
        offset=work.origin_offset,
        device_id=work.device,
        event_id=work.swap.id,
    )
