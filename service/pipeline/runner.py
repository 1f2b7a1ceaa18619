"""The consumer loop: fetch, hand records to their partition, run jobs, commit, follow rebalances.

    poll -> PartitionCore.intake -> KeyedScheduler (per device, bounded) -> handler -> decide
                                                                                         |
          PartitionCommitter: one transaction per input partition, every commit interval

Everything decided about a partition lives in its :class:`PartitionCore`; this module only moves
records and results between Kafka, the cores and the handler. It knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError

from service.bind.watch import WatchPolicy, near_expiry
from service.config import KafkaSettings, TopicSettings
from service.kafka import (
    FatalPipelineError,
    client_options,
    committed_with_metadata,
    on_heartbeat,
    partition_counts,
    read_to_end,
    reader,
)
from service.metrics import Metrics
from service.ownership import CALL_GUARD
from service.pipeline.committer import PartitionCommitter, PartitionFencedError
from service.pipeline.dedupe import DedupeReader
from service.pipeline.expiry import Retention
from service.pipeline.intake import Routing
from service.pipeline.ledger import DeviceLedger
from service.pipeline.partition import PartitionCore, Republish
from service.pipeline.progress import PartitionProgress
from service.pipeline.records import Output
from service.pipeline.scheduler import KeyedScheduler
from service.pipeline.work import HandlerResult, Outcome, PollResult, Work

log = structlog.get_logger(__name__)

__all__ = ["FatalPipelineError", "Handler", "Pipeline"]

_MAX_COMMIT_FAILURES = 30
_WAKE_INTERVAL_SECONDS = 0.25
_OPEN_RETRY_INITIAL_SECONDS = 0.5
_OPEN_RETRY_MAX_SECONDS = 15.0
_REPUBLISH_RETRY_INITIAL_SECONDS = 0.2
_REPUBLISH_RETRY_MAX_SECONDS = 10.0


class Handler(Protocol):
    """Turns one swap into its result (an outcome, or a wait in the ledger); never raises."""

    async def handle(self, work: Work) -> HandlerResult: ...

    def superseded(self, work: Work, newer_event_id: str) -> Outcome: ...

    def rebound(self, work: Work, via: str, bound_at_ms: int, refreshed_ms: int) -> Output: ...

    def bind_failed(self, work: Work, code: str, desc: str) -> Outcome: ...

    async def poll(self, work: Work) -> PollResult: ...


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._pipeline.partitions_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self._pipeline.partitions_assigned(list(assigned))


AssignmentCallback = Callable[[int, int], Awaitable[None] | None]
RevocationCallback = Callable[[], Awaitable[None]]


class Pipeline:
    """One consumer-group member: its input partitions, each with its core and its producer."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        handler: Handler,
        metrics: Metrics,
        *,
        concurrency: int,
        max_buffered: int | None = None,
        drain_timeout: float = 20.0,
        on_assignment: AssignmentCallback | None = None,
        on_revocation: RevocationCallback | None = None,
        watch: WatchPolicy | None = None,
        bind_notify: bool = False,
        on_drain: Callable[[bool], None] | None = None,
        retention: Retention | None = None,
    ) -> None:
        self._retention = retention
        self._kafka = kafka
        self._topics = topics
        self._handler = handler
        self._metrics = metrics
        self._concurrency = concurrency
        self._scheduler = KeyedScheduler(concurrency)
        self._max_buffered = max_buffered or max(concurrency * 8, kafka.max_poll_records * 2)
        self._drain_timeout = drain_timeout
        self._on_assignment = on_assignment
        self._on_revocation = on_revocation
        self._watch = watch
        # Called with True when work is being handed over (a revocation or a shutdown): jobs
        # still waiting for the platform budget are abandoned instead of drained; False after.
        self._on_drain = on_drain
        # Pushes arrive on the bind-notify topic, co-partitioned with the input: partition p of
        # both goes to the same member (range assignment), whose core correlates them.
        self._notify_topic = topics.bind_notify if bind_notify else None
        self._cores: dict[int, PartitionCore] = {}
        self._committers: dict[int, PartitionCommitter] = {}
        self._progress = asyncio.Event()
        self._flush_now = asyncio.Event()
        self._wake_now = asyncio.Event()
        self._paused = False
        self._held: str | None = None  # why the input is held (hold/release), None: it is not
        self._held_since = 0.0
        self._released = asyncio.Event()
        self._released.set()
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._fatal: BaseException | None = None
        self.started = asyncio.Event()
        self._gauged: set[int] = set()
        self._dedupe = DedupeReader(
            topics.dedupe, kafka.dedupe_entries_per_partition, client_options(kafka)
        )
        self._ledger_reader: AIOKafkaConsumer | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._polls: dict[asyncio.Task[None], PartitionCore] = {}  # bind-watch polls out
        # Proof of membership (service.ownership): the last accepted heartbeat or assignment.
        # A call of a swap leaves only while it is younger than the session timeout less one
        # heartbeat interval (and a second): the group cannot have given the partition away.
        session = kafka.session_timeout_ms / 1000
        self._heartbeat_seconds = max(1.0, session / 10)
        self._proof_bound = max(1.0, session - max(1.0, self._heartbeat_seconds))
        self._proof_at = -math.inf
        self._proof = asyncio.Event()
        self._open_retry_in = 0.0  # the pause before the next try at a failed partition open
        self._failed_open: set[int] = set()  # assigned partitions whose opening failed
        self._open_retry_at = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    def assigned(self) -> list[TopicPartition]:
        return [TopicPartition(self._topics.device_swapped, p) for p in self._cores]

    def buffered(self) -> int:
        """Input records read and not yet finished (the backpressure measure)."""
        return sum(core.progress.unfinished for core in self._cores.values())

    def inflight(self) -> int:
        """Swaps being worked on: unfinished input records, plus woken waiting swaps."""
        return sum(core.progress.unfinished + core.woken for core in self._cores.values())

    def waiting(self) -> int:
        return sum(core.ledger.waiting for core in self._cores.values())

    # ---- holding the input -----------------------------------------------------------------

    @property
    def held(self) -> str | None:
        """Why the input is held (see :meth:`hold`); None when it is not."""
        return self._held

    def hold(self, reason: str) -> None:
        """Stop taking work until :meth:`release`: every assigned input partition is paused, and
        stays paused across rebalances (newly assigned ones too); jobs that have not started yet
        wait instead of running (a job already running goes on: its calls wait for the platform
        themselves); waiting swaps are not woken. Nothing fails, nothing is dropped."""
        if self._held is None:
            log.warning("input held", reason=reason)
            self._held_since = time.monotonic()
        self._held = reason
        self._released.clear()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.pause(*self.assigned())

    def release(self) -> None:
        """Take work again: resume the input partitions (unless the buffer is full), let the
        waiting jobs run and wake the waiting swaps that are due."""
        if self._held is None:
            return
        log.info("input released", held_seconds=round(time.monotonic() - self._held_since, 1))
        self._held = None
        self._released.set()
        if self._consumer is not None and not self._paused:
            with contextlib.suppress(Exception):
                self._consumer.resume(*self.assigned())
        self._wake_now.set()

    def paused(self) -> list[TopicPartition]:
        """The input partitions that are paused now (held, or a full buffer)."""
        if self._consumer is None:
            return []
        topic = self._topics.device_swapped
        return sorted(
            (tp for tp in self._consumer.paused() if tp.topic == topic), key=lambda tp: tp.partition
        )

    def _proved(self) -> None:
        """The group accepted a heartbeat (or assigned partitions): still a member."""
        self._proof_at = time.monotonic()
        self._proof.set()

    def owner_fresh(self) -> bool:
        """True while this member has recent proof that the group still counts it."""
        return time.monotonic() - self._proof_at < self._proof_bound

    async def _wait_owner(self, core: PartitionCore) -> None:
        """The call guard of ``core``'s jobs: return while the member owns the partition with
        fresh proof; wait while the proof is stale (frozen, cut off: the next heartbeat says);
        CancelledError once the partition moves away or the pipeline stops."""
        warned = False
        while True:
            if (
                core.closed
                or core.closing
                or self._stopping.is_set()
                or self._cores.get(core.partition) is not core  # dropped, or opened anew
            ):
                raise asyncio.CancelledError
            if self.owner_fresh():
                return
            if not warned:
                warned = True
                log.warning(
                    "no recent proof of owning the partition: the call waits",
                    partition=core.partition,
                    proof_age=round(time.monotonic() - self._proof_at, 1),
                )
            self._proof.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proof.wait(), _WAKE_INTERVAL_SECONDS)

    async def _until_released(self, core: PartitionCore) -> bool:
        """Wait while the input is held; False when the partition moves away or the pipeline
        stops meanwhile (the job is then left to be redone)."""
        while self._held is not None:
            if core.closed or core.closing or self._stopping.is_set():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), _WAKE_INTERVAL_SECONDS)
        return True

    def stuck_partitions(self) -> list[int]:
        """Partitions whose oldest unfinished record is older than the configured bound."""
        bound = self._kafka.stuck_partition_seconds
        return sorted(
            p
            for p, core in self._cores.items()
            if core.progress.oldest_unfinished_seconds() > bound
        )

    def skipped(self) -> int:
        return sum(core.skipped for core in self._cores.values())

    async def start(self) -> None:
        options = client_options(self._kafka)
        self._consumer = AIOKafkaConsumer(
            **options,
            group_id=self._kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=self._kafka.max_poll_records,
            session_timeout_ms=self._kafka.session_timeout_ms,
            heartbeat_interval_ms=int(self._heartbeat_seconds * 1000),
            # Co-partitioning: partition p of the input and of the bind-notify topic go to one
            # member, so a device's pushes meet its ledger entry.
            partition_assignment_strategy=(RangePartitionAssignor,),
            # Bounded prefetch: memory must not grow with the backlog behind the buffer.
            fetch_max_bytes=4 * 1024 * 1024,
            max_partition_fetch_bytes=512 * 1024,
        )
        self._ledger_reader = reader(self._kafka)
        try:
            await self._check_topics()
            await self._dedupe.start()
            await self._ledger_reader.start()
            await self._consumer.start()
        except BaseException:
            await self._close_clients()
            raise
        if not on_heartbeat(self._consumer, self._proved):
            log.warning("heartbeats not observable: ownership is proved by assignments only")
            self._proof_bound = math.inf
        subscribed = [self._topics.device_swapped]
        if self._notify_topic is not None:
            subscribed.append(self._notify_topic)
        self._consumer.subscribe(subscribed, listener=_Listener(self))
        self.started.set()

    async def _close_clients(self) -> None:
        for committer in list(self._committers.values()):
            await committer.stop()
        self._committers.clear()
        for client in (self._consumer, self._ledger_reader):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        with contextlib.suppress(Exception):
            await self._dedupe.stop()

    async def _check_topics(self) -> None:
        """The service topics must exist and be co-partitioned with the input topic."""
        names: tuple[str, ...] = (
            self._topics.device_swapped,
            self._topics.ledger,
            self._topics.dedupe,
        )
        if self._notify_topic is not None:
            names = (*names, self._notify_topic)
        counts = await partition_counts(self._kafka, names)
        missing = [name for name, n in counts.items() if n == 0]
        if missing:
            raise FatalPipelineError(
                f"topics missing: {', '.join(missing)} (see 'Topics to create' in the README)"
            )
        if len(set(counts.values())) != 1:
            raise FatalPipelineError(
                "the input, ledger, dedupe (and bind-notify) topics must have the same number of "
                "partitions "
                f"(co-partitioned): {counts}"
            )

    async def run(self) -> None:
        """Consume until stop() is called, then drain, commit and close."""
        if self._consumer is None:
            await self.start()
        assert self._consumer is not None
        tasks = [
            asyncio.create_task(self._commit_loop(), name="committer"),
            asyncio.create_task(self._wake_loop(), name="wake"),
            asyncio.create_task(self._gauge_loop(), name="gauges"),
        ]
        try:
            while not self._stopping.is_set():
                if self._fatal is not None:
                    raise FatalPipelineError(str(self._fatal)) from self._fatal
                await self._retry_open()
                self._apply_backpressure()
                batches = await self._consumer.getmany(
                    timeout_ms=100, max_records=self._kafka.max_poll_records
                )
                for tp, records in batches.items():
                    self._accept(tp, records)
            if self._fatal is not None:
                raise FatalPipelineError(str(self._fatal)) from self._fatal
        finally:
            await self._shutdown(tasks)

    def stop(self) -> None:
        self._stopping.set()

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        consumer = self._consumer
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.pause(*consumer.assignment())
        for core in self._cores.values():
            core.closing = True
        if self._on_drain is not None:
            self._on_drain(True)
        # Finish what is running; what is queued has not touched the platform and is redone
        # after the restart, so stopping does not wait for a whole buffer of work.
        self._scheduler.close()
        await self._cancel_polls()
        drained = await self._scheduler.join(self._drain_timeout)
        if not drained:
            log.warning("drain timed out; unfinished work is left for redelivery")
            await self._scheduler.cancel_all()
        for task in [*tasks, *self._side_tasks]:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._fatal is None:
            await self._commit_all(final=True)
        await self._close_clients()
        self._metrics.inflight_events.set(0)

    # ---- intake ----------------------------------------------------------------------------

    def _accept(self, tp: TopicPartition, records: Sequence[Any]) -> None:
        core = self._cores.get(tp.partition)
        if core is None or core.closing:  # fetched just before a revocation
            return
        self._metrics.events_consumed.labels(topic=tp.topic).inc(len(records))
        if tp.topic == self._notify_topic:
            duplicates, unproven = core.duplicate_pushes, core.unproven_pushes
            for record in records:
                core.notify(record)
            if core.duplicate_pushes > duplicates:
                self._metrics.bind_notifications.labels(result="duplicate").inc(
                    core.duplicate_pushes - duplicates
                )
            if core.unproven_pushes > unproven:
                self._metrics.bind_notifications.labels(result="unproven").inc(
                    core.unproven_pushes - unproven
                )
            self._decided()
            return
        skipped, misrouted = core.skipped, core.misrouted
        for record in records:
            job = core.intake(record)
            if isinstance(job, Work):
                self._scheduler.submit(job.device, self._job(core, job))
            elif isinstance(job, Republish):
                self._spawn(self._republish(core, job))
        if core.skipped > skipped:
            self._metrics.redeliveries_skipped.inc(core.skipped - skipped)
        if core.misrouted > misrouted:
            self._metrics.misrouted_records.inc(core.misrouted - misrouted)
        self._progress.set()
        self._metrics.inflight_events.set(self.inflight())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

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
                    "could not read a stored outcome back; trying again",
                    partition=core.partition,
                    dedupe_offset=job.dedupe_offset,
                    retry_in=pause,
                    error=repr(exc),
                )
                await asyncio.sleep(pause)  # a backoff between reads, not a synchronisation
                pause = min(pause * 2, _REPUBLISH_RETRY_MAX_SECONDS)
                continue
            core.republished(job, found)
            self._decided()
            return

    def _job(self, core: PartitionCore, work: Work) -> Callable[[], Awaitable[None]]:
        async def job() -> None:
            guard = CALL_GUARD.set(lambda: self._wait_owner(core))
            try:
                await run()
            finally:
                CALL_GUARD.reset(guard)

        async def run() -> None:
            if core.closed or core.closing:
                core.abandoned(work)
                return  # the partition moves away: its next owner does this work
            if self._held is not None and not await self._until_released(core):
                core.abandoned(work)
                self._progress.set()
                return
            with structlog.contextvars.bound_contextvars(
                topic=work.topic,
                partition=work.partition,
                offset=work.origin_offset,
                device_id=work.device,
                event_id=work.swap.id,
            ):
                if not core.claim(work):
                    self._decided()
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
            self._decided()

        return job

    def _start_poll(self, core: PartitionCore, work: Work) -> None:
        """A bind-watch poll runs beside the per-device jobs, not in their queues: a poll waits
        only for its budget share, never behind the fresh swaps that fill the scheduler (it
        needs no per-device order: its answer applies only to the watch it was sent for)."""
        task = asyncio.get_running_loop().create_task(self._poll(core, work))
        self._polls[task] = core
        task.add_done_callback(lambda done: self._polls.pop(done, None))

    async def _poll(self, core: PartitionCore, work: Work) -> None:
        CALL_GUARD.set(lambda: self._wait_owner(core))  # this task's own context
        with structlog.contextvars.bound_contextvars(
            topic=work.topic,
            partition=work.partition,
            offset=work.origin_offset,
            device_id=work.device,
            event_id=work.swap.id,
        ):
            try:
                if self._held is not None and not await self._until_released(core):
                    core.abandoned(work)
                    return
                polled = await self._handler.poll(work)
            except asyncio.CancelledError:
                core.abandoned(work)
                raise
            if not core.closed:
                core.polled(work, polled)
                self._decided()

    async def _cancel_polls(self, cores: set[int] | None = None) -> None:
        """Cancel the polls of these partitions (all: None); their watches stay due."""
        tasks = [t for t, c in self._polls.items() if cores is None or c.partition in cores]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _claim_durably(self, core: PartitionCore, work: Work) -> bool:
        """Commit the claim of a fresh swap before its call (see PartitionCore.note_claim).
        Concurrent claims of a partition share the next transaction, with the outcomes decided
        meanwhile (PartitionCommitter.durable). False when the partition moves away meanwhile:
        the next owner does the work. A claim that need not be durable first (the device had
        nothing open: PartitionCore.note_claim) rides the next transaction without a wait."""
        if not core.note_claim(work):
            return not (core.closed or core.closing)
        while not (core.closed or core.closing):
            committer = self._committers.get(core.partition)
            if committer is None or committer.core is not core:
                return False
            try:
                return await committer.durable()
            except PartitionFencedError:
                return False
            except Exception:  # noqa: BLE001 - any failed transaction: the commit loop retries too
                log.warning("could not commit a claim; trying again", partition=core.partition)
                await asyncio.sleep(0.5)  # the commit loop retries too: a broker hiccup
        return False

    def _decided(self) -> None:
        self._progress.set()
        if sum(c.pending_outputs for c in self._cores.values()) >= self._kafka.commit_batch_size:
            self._flush_now.set()

    def _apply_backpressure(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        buffered = self.buffered()
        inputs = self.assigned()
        if self._held is not None:
            consumer.pause(*inputs)  # held: whatever the buffer, read nothing
            return
        if not self._paused and buffered >= self._max_buffered:
            consumer.pause(*inputs)
            self._paused = True
        elif self._paused and buffered <= self._max_buffered // 2:
            consumer.resume(*inputs)
            self._paused = False

    # ---- waiting swaps ---------------------------------------------------------------------

    async def _wake_loop(self) -> None:
        """Hand waiting swaps whose time has come to the scheduler, a bounded number at once."""
        limit = max(1, self._concurrency // 2)
        while True:
            now_ms = int(time.time() * 1000)
            for core in list(self._cores.values()):
                if core.closing or self._held is not None:
                    continue
                for work in core.wake(now_ms, limit, limit):
                    if work.watch is not None:
                        self._start_poll(core, work)
                    else:
                        self._scheduler.submit(work.device, self._job(core, work))
            self._metrics.deferred_events.set(self.waiting())
            self._wake_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_now.wait(), _WAKE_INTERVAL_SECONDS)

    # ---- commits ---------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        interval = self._kafka.commit_interval_ms / 1000
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), interval)
            self._flush_now.clear()
            await self._commit_all()

    async def _commit_all(self, *, final: bool = False) -> None:
        committers = list(self._committers.items())
        results = await asyncio.gather(*(c.commit() for _, c in committers), return_exceptions=True)
        for (partition, committer), result in zip(committers, results, strict=True):
            if isinstance(result, PartitionFencedError):
                log.warning("partition fenced by a newer owner; dropping it", partition=partition)
                if self._consumer is not None:
                    with contextlib.suppress(Exception):  # read nothing more of it until rejoined
                        self._consumer.pause(TopicPartition(self._topics.device_swapped, partition))
                await self._drop(partition)
                self._rejoin()
            elif isinstance(result, BaseException):
                if committer.failures >= _MAX_COMMIT_FAILURES or final:
                    message = f"{committer.failures} transactions in a row failed: {result}"
                    if final:
                        log.error("final commit failed; uncommitted work will be redelivered")
                    else:
                        self._fail(FatalPipelineError(message))
                else:
                    log.warning(
                        "transaction failed; retrying with the next commit",
                        partition=partition,
                        error=repr(result),
                    )
        self._metrics.inflight_events.set(self.inflight())

    def _rejoin(self) -> None:
        """Ask the group to hand the partitions out again: a partition fenced without a
        rebalance (``device-rebind ledger clear``) would otherwise stay dropped and paused until
        the next one. Its next owner (maybe this member) reloads its state from Kafka."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is not None:
            with contextlib.suppress(Exception):
                coordinator.request_rejoin()

    def _fail(self, exc: FatalPipelineError) -> None:
        self._fatal = exc
        self._stopping.set()

    # ---- rebalances ------------------------------------------------------------------------

    async def partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        inputs = [tp for tp in assigned if tp.topic == self._topics.device_swapped]
        new = [tp for tp in inputs if tp.partition not in self._cores]
        if new:
            consumer.pause(*assigned)
            if await self._try_open(new):
                consumer.resume(*assigned)
                self._paused = False
                if self._held is not None:  # held: newly assigned input partitions stay paused
                    consumer.pause(*inputs)
        self._proved()  # the group just counted this member in
        if self._on_drain is not None:
            self._on_drain(False)
        log.info("partitions assigned", partitions=sorted(tp.partition for tp in inputs))
        if self._on_assignment is not None:
            total = len(consumer.partitions_for_topic(self._topics.device_swapped) or ())
            result = self._on_assignment(len(inputs), total)
            if result is not None:
                await result
        self._wake_now.set()

    async def _try_open(self, tps: list[TopicPartition]) -> bool:
        """Open ``tps``; on failure (a broker hiccup while fencing or loading) they stay
        assigned and paused, :meth:`unopened` names them (``/readyz`` 503), and the consume
        loop tries again with a growing pause (aiokafka would only log the callback's error)."""
        try:
            await self._open(tps)
        except Exception as exc:  # noqa: BLE001 - any failure: retried, and visible meanwhile
            self._failed_open.update(tp.partition for tp in tps)
            for tp in tps:
                committer = self._committers.pop(tp.partition, None)
                self._cores.pop(tp.partition, None)
                if committer is not None:
                    await committer.stop()
            self._open_retry_in = min(
                max(self._open_retry_in * 2, _OPEN_RETRY_INITIAL_SECONDS),
                _OPEN_RETRY_MAX_SECONDS,
            )
            self._open_retry_at = time.monotonic() + self._open_retry_in
            log.error(  # noqa: TRY400 - the error is in the line; no traceback needed
                "could not open the assigned partitions; trying again",
                partitions=sorted(tp.partition for tp in tps),
                retry_in=self._open_retry_in,
                error=repr(exc),
            )
            return False
        self._failed_open.difference_update(tp.partition for tp in tps)
        self._open_retry_in = 0.0
        return True

    def group_assignment(self) -> list[int]:
        """The input partitions the group assigned to this member (open or not)."""
        if self._consumer is None:
            return []
        topic = self._topics.device_swapped
        return sorted(tp.partition for tp in self._consumer.assignment() if tp.topic == topic)

    def unopened(self) -> list[int]:
        """Input partitions the group assigned to this member whose opening failed (and is
        being tried again). A partition dropped because it was fenced is not one of them: it
        waits for the rebalance its drop asked for."""
        return [
            p for p in self.group_assignment() if p in self._failed_open and p not in self._cores
        ]

    async def _retry_open(self) -> None:
        """The consume loop's turn at partitions whose opening failed."""
        consumer = self._consumer
        assert consumer is not None
        missing = self.unopened()
        if not missing or time.monotonic() < self._open_retry_at:
            return
        topic = self._topics.device_swapped
        tps = [TopicPartition(topic, p) for p in missing]
        if await self._try_open(tps):
            log.info("partitions opened", partitions=missing)
            if self._held is None and not self._paused:
                consumer.resume(*tps)
            self._wake_now.set()

    async def _open(self, tps: list[TopicPartition]) -> None:
        """Take the partitions over: fence their earlier owners first, then read their state."""
        consumer = self._consumer
        assert consumer is not None
        assert self._ledger_reader is not None
        committers = {
            tp.partition: PartitionCommitter(self._kafka, tp.topic, tp.partition, self._metrics)
            for tp in tps
        }
        for committer in committers.values():
            committer.notify_topic = self._notify_topic
        # Initialising each partition's transactional id aborts whatever its earlier owner left
        # open and fences it; only then is the state below final.
        await asyncio.gather(*(c.start() for c in committers.values()))
        committed = await committed_with_metadata(consumer, tps)
        ledgers = {tp.partition: DeviceLedger(self._topics.ledger, tp.partition) for tp in tps}
        started = time.monotonic()
        loaded = await read_to_end(
            self._ledger_reader,
            [TopicPartition(self._topics.ledger, tp.partition) for tp in tps],
            lambda tp, record: ledgers[tp.partition].load(record.key, record.value),
        )
        indexes = await self._dedupe.load([tp.partition for tp in tps])
        count = len(consumer.partitions_for_topic(self._topics.device_swapped) or ())
        routing = Routing(self._kafka.partitioner, count) if count else None
        for tp in tps:
            found = committed.get(tp)
            progress = PartitionProgress(
                found.offset if found is not None and found.offset >= 0 else None,
                found.metadata if found is not None else None,
            )
            core = PartitionCore(
                topic=tp.topic,
                partition=tp.partition,
                dead_letter_topic=self._topics.dead_letter,
                progress=progress,
                ledger=ledgers[tp.partition],
                dedupe=indexes[tp.partition],
                answers=self._handler,
                watch=self._watch,
                max_input_bytes=self._kafka.max_input_bytes,
                max_clock_skew_ms=int(self._kafka.max_clock_skew_seconds * 1000),
                routing=routing,
                retention=self._retention,
            )
            committers[tp.partition].core = core
            self._cores[tp.partition] = core
            self._committers[tp.partition] = committers[tp.partition]
        log.info(
            "partition state loaded",
            partitions=sorted(tp.partition for tp in tps),
            ledger_records=loaded,
            devices=sum(len(ledger) for ledger in ledgers.values()),
            waiting=sum(ledger.waiting for ledger in ledgers.values()),
            seconds=round(time.monotonic() - started, 3),
        )

    async def partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Settle the revoked partitions' work before they move: finish, or leave it to the
        next owner (who skips what was published and redoes the rest)."""
        self._failed_open.difference_update(tp.partition for tp in revoked)
        ours = [tp.partition for tp in revoked if tp.partition in self._cores]
        for p in ours:
            self._cores[p].closing = True  # queued jobs of these partitions will not start
        if ours and len(ours) == len(self._cores) and self._on_drain is not None:
            self._on_drain(True)  # everything moves: what waits for the budget is not drained
        loop = asyncio.get_running_loop()
        if ours and not self.owner_fresh():
            # The group gave the partitions away already (this member was frozen or cut off):
            # nothing it still runs may reach the platform; cancel instead of draining.
            log.warning("revoked after losing the group: running jobs cancelled", partitions=ours)
            await self._scheduler.cancel_all()
        # The group waits for this member only for the rebalance timeout (= the session timeout).
        deadline = loop.time() + min(self._drain_timeout, self._kafka.session_timeout_ms / 3000)
        while self._scheduler.running and loop.time() < deadline:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), max(0.0, deadline - loop.time()))
        if self._scheduler.running and len(ours) == len(self._cores):
            # Everything moves (the eager protocol revokes all): stop what still runs, so a
            # retry cannot reach the platform after the new owner applied a newer swap.
            await self._scheduler.cancel_all()
        await self._cancel_polls(set(ours))  # the next owner polls them (their watches stay)
        for p in ours:
            # Closed before the last transaction: a result decided from now on (a job that
            # still runs, a poll answered while the producers stop) is dropped, not left in a
            # core that never commits again; the next owner decides it again from the ledger.
            self._cores[p].closed = True
        await self._commit_all(final=True)
        for p in ours:
            await self._drop(p)
        if self._on_revocation is not None:
            await self._on_revocation()
        if ours:
            log.info("partitions revoked", partitions=sorted(ours))

    async def _drop(self, partition: int) -> None:
        core = self._cores.pop(partition, None)
        if core is not None:
            core.closed = True
            if core.progress.unfinished:
                log.info(
                    "revoked with unfinished work; the next owner redoes it",
                    partition=partition,
                    unfinished=core.progress.unfinished,
                )
        committer = self._committers.pop(partition, None)
        if committer is not None:
            await committer.stop()
        if partition in self._gauged:
            self._gauged.discard(partition)
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(str(partition))
            with contextlib.suppress(KeyError):
                self._metrics.oldest_unfinished.remove(str(partition))

    # ---- gauges ----------------------------------------------------------------------------

    async def _gauge_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        ticks = 0
        while True:
            await asyncio.sleep(1)
            ticks += 1
            for p, core in list(self._cores.items()):
                label = str(p)
                self._metrics.oldest_unfinished.labels(partition=label).set(
                    core.progress.oldest_unfinished_seconds()
                )
                self._gauged.add(p)
                if ticks % 5:
                    continue
                tp = TopicPartition(self._topics.device_swapped, p)
                high = consumer.highwater(tp)
                if high is None:
                    continue
                try:
                    position = await consumer.position(tp)
                except Exception:  # noqa: BLE001 - the partition may have just moved
                    log.debug("no position for lag", partition=p)
                    continue
                behind = high - position + core.progress.unfinished
                self._metrics.consumer_lag.labels(partition=label).set(max(0, behind))
            self._metrics.inflight_events.set(self.inflight())
            self._metrics.deferred_events.set(self.waiting())
            self._gauge_watches()

    def _gauge_watches(self) -> None:
        now_ms = int(time.time() * 1000)
        watched = near = 0
        overdue_ms = 0
        for core in self._cores.values():
            ledger = core.ledger
            watched += len(ledger.watching)
            for device in ledger.watching:
                entry = ledger.get(device)
                if entry is not None and entry.watch is not None:
                    near += near_expiry(entry.watch, now_ms)
                    # A poll stays due (its entry unchanged) until its answer is decided.
                    overdue_ms = max(overdue_ms, now_ms - entry.watch.due_ms)
        self._metrics.bind_watches.set(watched)
        self._metrics.bind_near_expiry.set(near)
        self._metrics.bind_poll_overdue.set(overdue_ms / 1000)
