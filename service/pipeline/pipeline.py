"""The consume loop: fetch, hand records to their partition, hold back when the buffer is full or
the input is held, follow rebalances; :class:`Pipeline` assembles the pieces that do the rest.

    poll -> PartitionCore.intake -> KeyedScheduler (per device, bounded) -> SwapJobs -> decide
                                                                                         |
          CommitLoop: one transaction per input partition (PartitionCommitter), every interval

Each piece owns its state: :class:`OpenPartitions` (``open_partitions.py``) the open partitions,
each core with its committer; :class:`SwapJobs` (``swap_jobs.py``) the job of one swap (claim ->
commit the claim -> call -> decide) and the bind-watch polls; :class:`CommitLoop`
(``commit_loop.py``) the transactions; :class:`WakeLoop` (``wake_loop.py``) the waiting swaps;
:class:`PipelineGauges` (``gauges.py``) the gauges. Everything decided about a partition lives in
its :class:`PartitionCore`; the pipeline only moves records and results between Kafka, the cores
and the handler. It knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from service.assignor import CoPartitionedAssignor, consumer_generation
from service.bind.watch import WatchPolicy
from service.config import KafkaSettings, TopicSettings
from service.kafka import (
    FatalPipelineError,
    client_options,
    on_heartbeat,
    partition_counts,
    reader,
)
from service.metrics import Metrics
from service.pipeline.bodies import BodyFetches, BodyReader
from service.pipeline.commit_loop import CommitLoop
from service.pipeline.dedupe import DedupeReader
from service.pipeline.expiry import Retention
from service.pipeline.gauges import PipelineGauges
from service.pipeline.input_hold import InputHold
from service.pipeline.lanes import Lanes, accept_pushes
from service.pipeline.membership import MembershipProof
from service.pipeline.open_partitions import OpenPartitions
from service.pipeline.partition_core import PartitionCore
from service.pipeline.records import ConsumedRecord
from service.pipeline.scheduler import KeyedScheduler
from service.pipeline.swap_jobs import Handler, SwapJobs
from service.pipeline.wake_loop import WakeLoop
from service.pipeline.work import Answers, Republish, Work

log = structlog.get_logger(__name__)

__all__ = ["FatalPipelineError", "Handler", "Pipeline"]


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
    """One consumer-group member: the consume loop, the input hold, the proof of membership and
    the rebalances; the open partitions, the jobs, the commits, the wake-ups and the gauges are
    the pieces it assembles."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        handler: Handler,
        metrics: Metrics,
        *,
        outcomes: Answers,
        concurrency: int,
        max_buffered: int | None = None,
        share_reads: bool = False,
        drain_timeout: float = 20.0,
        on_assignment: AssignmentCallback | None = None,
        on_revocation: RevocationCallback | None = None,
        watch: WatchPolicy | None = None,
        bind_notify: bool = False,
        on_drain: Callable[[bool], None] | None = None,
        retention: Retention | None = None,
    ) -> None:
        self._kafka = kafka
        self._topics = topics
        self._metrics = metrics
        self._scheduler = KeyedScheduler(concurrency)
        self._max_buffered = max_buffered or max(concurrency * 8, kafka.max_poll_records * 2)
        self._max_pending = 4 * kafka.commit_batch_size  # outputs waiting for a transaction
        self._drain_timeout = drain_timeout
        self._on_assignment = on_assignment
        self._on_revocation = on_revocation
        # Called with True when work is being handed over (a revocation or a shutdown): jobs
        # still waiting for the platform budget are abandoned instead of drained; False after.
        self._on_drain = on_drain
        # Pushes arrive on the bind-notify topic, co-partitioned with the input: partition p of
        # both goes to the same member (service.assignor), whose core correlates them.
        self._notify_topic = topics.bind_notify if bind_notify else None
        self._progress = asyncio.Event()
        self._flush_now = asyncio.Event()
        self._wake_now = asyncio.Event()
        self._lanes = Lanes(
            topics.device_swapped, self._notify_topic, self._max_buffered, share_reads=share_reads
        )
        self._stopping = asyncio.Event()
        self._hold = InputHold(self._stopping)  # why the input is held (hold/release), if it is
        self._consumer: AIOKafkaConsumer | None = None
        self._assignor = CoPartitionedAssignor()
        self._fatal: BaseException | None = None
        self.started = asyncio.Event()
        self._dedupe = DedupeReader(
            topics.dedupe, kafka.dedupe_entries_per_partition, client_options(kafka)
        )
        self._ledger_reader: AIOKafkaConsumer | None = None
        self._partitions = OpenPartitions(
            kafka,
            topics,
            metrics,
            answers=outcomes,
            dedupe=self._dedupe,
            watch=watch,
            notify_topic=self._notify_topic,
            retention=retention,
        )
        # Proof of membership (service.ownership): the call guard of every job's calls.
        self._membership = MembershipProof(
            kafka.session_timeout_ms, cores=self._partitions.cores, stopping=self._stopping
        )
        self._jobs = SwapJobs(
            handler,
            self._partitions,
            self._scheduler,
            self._dedupe,
            commit_batch_size=kafka.commit_batch_size,
            wait_owner=self._wait_owner,
            hold=self._hold,
            progress=self._progress,
            flush_now=self._flush_now,
            metrics=metrics,
        )
        self._partitions.on_released = self._jobs.admit_held  # a take-over's held swaps
        self._bodies = BodyFetches(  # swap bodies read back from the ledger topic
            BodyReader(kafka, topics.ledger),
            lambda: list(self._partitions.cores.values()),
            self._jobs.start,
            metrics,
        )
        self._partitions.on_body_wanted = self._bodies.want
        self._commits = CommitLoop(
            topics.device_swapped,
            self._partitions,
            metrics,
            interval_seconds=kafka.commit_interval_ms / 1000,
            flush_now=self._flush_now,
            consumer=lambda: self._consumer,
            drop=self._drop,
            fail=self._fail,
        )
        self._wake = WakeLoop(
            self._partitions,
            self._jobs,
            metrics,
            concurrency=concurrency,
            hold=self._hold,
            wake_now=self._wake_now,
        )
        self._gauges = PipelineGauges(topics.device_swapped, self._partitions, metrics)

    @property
    def _cores(self) -> dict[int, PartitionCore]:
        return self._partitions.cores

    # ---- what the service reads ------------------------------------------------------------

    def assigned(self) -> list[TopicPartition]:
        return self._partitions.assigned()

    def buffered(self) -> int:
        """Input records read and not yet finished (the backpressure measure)."""
        return self._partitions.buffered()

    def inflight(self) -> int:
        """Swaps being worked on: unfinished input records, plus woken waiting swaps."""
        return self._partitions.inflight()

    def waiting(self) -> int:
        return self._partitions.waiting()

    def stuck_partitions(self) -> list[int]:
        """Partitions whose oldest unfinished record is older than the configured bound."""
        return self._partitions.stuck()

    def skipped(self) -> int:
        return self._partitions.skipped()

    @property
    def urgent_lane(self) -> str | None:
        """The urgent lane's topic while it is read (None: off)."""
        return self._lanes.urgent

    # ---- holding the input -----------------------------------------------------------------

    @property
    def held(self) -> str | None:
        """Why the input is held (see :meth:`hold`); None when it is not."""
        return self._hold.reason

    def hold(self, reason: str) -> None:
        """Stop taking work until :meth:`release`: every assigned input partition is paused, and
        stays paused across rebalances (newly assigned ones too); jobs that have not started yet
        wait instead of running (a job already running goes on: its calls wait for the platform
        themselves); waiting swaps are not woken. Nothing fails, nothing is dropped."""
        self._hold.hold(reason)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.pause(*self._lanes.inputs(self._cores))

    def release(self) -> None:
        """Take work again: resume the input partitions (unless the buffer is full), let the
        waiting jobs run and wake the waiting swaps that are due."""
        if not self._hold.release():
            return
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._lanes.resume(self._consumer, list(self._cores))
        self._wake_now.set()

    def paused(self) -> list[TopicPartition]:
        """The input partitions that are paused now (held, or a full buffer)."""
        if self._consumer is None:
            return []
        topic = self._topics.device_swapped
        return sorted(
            (tp for tp in self._consumer.paused() if tp.topic == topic), key=lambda tp: tp.partition
        )

    # ---- proof of membership ---------------------------------------------------------------

    def _proved(self, at: float | None = None) -> None:
        """The group accepted a heartbeat sent at ``at`` (or assigned partitions: now): still a
        member as of then."""
        self._membership.proved(at)

    def owner_fresh(self) -> bool:
        """True while this member has recent proof that the group still counts it."""
        return self._membership.fresh()

    async def _wait_owner(self, core: PartitionCore) -> None:
        """The call guard of ``core``'s jobs (:meth:`MembershipProof.wait_owner`)."""
        await self._membership.wait_owner(core)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        heartbeat = self._membership.heartbeat_seconds
        self._consumer = input_consumer(self._kafka, heartbeat, self._assignor)
        self._ledger_reader = reader(self._kafka)
        try:
            urgent = await check_topics(self._kafka, self._topics, self._notify_topic)
            await self._dedupe.start()
            await self._ledger_reader.start()
            await self._consumer.start()
        except BaseException:
            await self._close_clients()
            raise
        if not on_heartbeat(self._consumer, self._proved):
            log.warning(
                "heartbeats_not_observable", action="ownership is proved by assignments only"
            )
            self._membership.unobservable()
        self._lanes.urgent = self._partitions.urgent_topic = self._gauges.urgent_topic = urgent
        self._consumer.subscribe(self._lanes.subscribed(), listener=_Listener(self))
        self.started.set()

    async def _close_clients(self) -> None:
        await self._partitions.stop_committers()
        for client in (self._consumer, self._ledger_reader):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        with contextlib.suppress(Exception):
            await self._dedupe.stop()

    async def run(self) -> None:
        """Consume until stop() is called, then drain, commit and close."""
        if self._consumer is None:
            await self.start()
        assert self._consumer is not None
        tasks = [
            asyncio.create_task(self._commits.run(), name="committer"),
            asyncio.create_task(self._wake.run(), name="wake"),
            asyncio.create_task(self._bodies.run(), name="bodies"),
            asyncio.create_task(self._gauges.run(self._consumer), name="gauges"),
        ]
        try:
            while not self._stopping.is_set():
                if self._fatal is not None:
                    raise FatalPipelineError(str(self._fatal)) from self._fatal
                await self._retry_open()
                self._apply_backpressure()
                batch = self._lanes.batch(len(self._cores), self._kafka.max_poll_records)
                batches = await self._consumer.getmany(timeout_ms=100, max_records=batch)
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
        await self._jobs.drain(self._drain_timeout)  # finish what runs; the queue is redone
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._fatal is None:
            await self._commits.commit_all(final=True)
        await self._close_clients()
        self._metrics.inflight_events.set(0)

    def _fail(self, exc: FatalPipelineError) -> None:
        self._fatal = exc
        self._stopping.set()

    # ---- intake ----------------------------------------------------------------------------

    def _accept(self, tp: TopicPartition, records: Sequence[ConsumedRecord]) -> None:
        core = self._cores.get(tp.partition)
        if core is None or core.closing:  # fetched just before a revocation
            return
        self._metrics.events_consumed.labels(topic=tp.topic).inc(len(records))
        if tp.topic == self._notify_topic:
            accept_pushes(core, records, self._metrics)
            self._jobs.decided()
            return
        skipped, misrouted, too_old = core.skipped, core.misrouted, core.too_old
        urgent = tp.topic == self._lanes.urgent
        for record in records:
            job = core.intake(record, urgent)
            if isinstance(job, Work):
                self._jobs.submit(core, job)
            elif isinstance(job, Republish):
                self._jobs.republish(core, job)
        if core.skipped > skipped:
            self._metrics.redeliveries_skipped.inc(core.skipped - skipped)
        if core.misrouted > misrouted:
            self._metrics.misrouted_records.inc(core.misrouted - misrouted)
        if core.too_old > too_old:
            self._metrics.swaps_too_old.inc(core.too_old - too_old)
        self._progress.set()
        self._metrics.inflight_events.set(self.inflight())

    def _apply_backpressure(self) -> None:
        """Each lane paused while its own buffer is full, the bulk lane also while decided outputs
        wait for their transactions (held: all, whatever the buffer)."""
        assert self._consumer is not None
        waiting = self._partitions.pending_outputs() / self._max_pending
        self._lanes.backpressure(self._consumer, self._cores, self._hold.held(), waiting)

    # ---- rebalances ------------------------------------------------------------------------

    async def partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        inputs = [tp for tp in assigned if tp.topic == self._topics.device_swapped]
        new = await self._partitions.to_open(inputs)  # parked ones not assigned are let go
        if new:
            consumer.pause(*assigned)
            if await self._partitions.try_open(new, self._open):
                consumer.resume(*self._partitions.resumable(assigned))
                self._lanes.resumed()
                if self._hold.held():  # held: newly assigned input partitions stay paused
                    consumer.pause(*self._lanes.inputs(tp.partition for tp in inputs))
        self._proved()  # the group just counted this member in
        if self._on_drain is not None:
            self._on_drain(False)
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in inputs))
        if self._on_assignment is not None:
            total = len(consumer.partitions_for_topic(self._topics.device_swapped) or ())
            result = self._on_assignment(len(inputs), total)
            if result is not None:
                await result
        self._wake_now.set()

    async def _open(self, tps: list[TopicPartition]) -> None:
        """Take the partitions over (:meth:`OpenPartitions.open`); tried by
        :meth:`OpenPartitions.try_open`, which keeps a failed open for a later try."""
        assert self._consumer is not None
        assert self._ledger_reader is not None
        await self._partitions.open(self._consumer, self._ledger_reader, tps, self._assignor.kept)

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
        return self._partitions.unopened(self.group_assignment())

    async def _retry_open(self) -> None:
        """The consume loop's turn at partitions whose opening failed."""
        consumer = self._consumer
        assert consumer is not None
        missing = self.unopened()
        if not missing or not self._partitions.retry_due():
            return
        topic = self._topics.device_swapped
        tps = [TopicPartition(topic, p) for p in missing]
        if await self._partitions.try_open(tps, self._open):
            log.info("partitions_opened", partitions=missing)
            if not self._hold.held():
                self._lanes.resume(consumer, missing)
            self._wake_now.set()

    async def partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Settle the revoked partitions' work before they move: finish, or leave it to the
        next owner (who skips what was published and redoes the rest)."""
        ours = self._partitions.closing(revoked)  # their queued jobs will not start
        if ours and len(ours) == len(self._cores) and self._on_drain is not None:
            self._on_drain(True)  # everything moves: what waits for the budget is not drained
        # The group waits for this member only for the rebalance timeout (= the session timeout).
        await self._jobs.settle(
            ours,
            lost=bool(ours) and not self.owner_fresh(),
            seconds=min(self._drain_timeout, self._kafka.session_timeout_ms / 3000),
        )
        self._partitions.close(ours)
        await self._commits.commit_all(final=True)
        keep = self.owner_fresh() and not self._stopping.is_set()  # kept if p comes back
        await self._partitions.revoked(ours, keep=keep, forget=self._gauges.forget)
        if self._on_revocation is not None:
            await self._on_revocation()
        if ours:
            log.info("partitions_revoked", partitions=sorted(ours))

    async def _drop(self, partition: int) -> None:
        await self._partitions.drop(partition)
        self._gauges.forget(partition)


async def check_topics(
    kafka: KafkaSettings, topics: TopicSettings, notify: str | None
) -> str | None:
    """The service topics must exist and be co-partitioned with the input topic. Returns the
    urgent lane's topic, or None when it is off: not set, or missing (an upstream that has only
    the bulk topic works unchanged; the lane is read from the next start after it is created)."""
    names: tuple[str, ...] = (topics.device_swapped, topics.ledger, topics.dedupe)
    if notify is not None:
        names = (*names, notify)
    urgent = topics.device_swapped_urgent or None
    counts = await partition_counts(kafka, (*names, urgent) if urgent else names)
    if urgent is not None and counts.get(urgent, 0) == 0:
        log.warning(
            "urgent_lane_off",
            topic=urgent,
            reason="the topic does not exist",
            action="create it (device-rebind topics create) and restart to read it",
        )
        del counts[urgent]
        urgent = None
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise FatalPipelineError(
            f"topics missing: {', '.join(missing)} (see 'Topics to create' in the README)"
        )
    if len(set(counts.values())) != 1:
        raise FatalPipelineError(
            "the input, ledger, dedupe (and bind-notify, urgent lane) topics must have the same "
            f"number of partitions (co-partitioned): {counts}"
        )
    return urgent


def input_consumer(
    kafka: KafkaSettings,
    heartbeat_seconds: float,
    assignor: CoPartitionedAssignor | None = None,
) -> AIOKafkaConsumer:
    """The group member's consumer of the input (and bind-notify) topic."""
    options = client_options(kafka)
    assignor = assignor or CoPartitionedAssignor()
    consumer = AIOKafkaConsumer(
        **options,
        group_id=kafka.group_id,
        # Static membership (KIP-345), opt-in: a member that comes back within the session
        # timeout under the same instance id gets its partitions back without a rebalance.
        group_instance_id=kafka.instance_id if kafka.static_membership else None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=kafka.max_poll_records,
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=int(heartbeat_seconds * 1000),
        # Co-partitioning: partition p of the input and of the bind-notify topic go to one
        # member, so a device's pushes meet its ledger entry. The sticky assignor first; range
        # while members that know only range are in the group (a rolling deploy).
        partition_assignment_strategy=(assignor,),  # one: see service/assignor.py
        # Bounded prefetch: memory must not grow with the backlog behind the buffer.
        fetch_max_bytes=4 * 1024 * 1024,
        max_partition_fetch_bytes=512 * 1024,
    )
    assignor.read_generation(consumer_generation(consumer))
    return consumer
