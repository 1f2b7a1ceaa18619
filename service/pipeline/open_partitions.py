"""The input partitions this member has open: each one's :class:`PartitionCore` and the
:class:`PartitionCommitter` built with it, and the partitions whose opening failed.

:meth:`OpenPartitions.open` takes partitions over: it fences their earlier owners (initialising
each partition's transactional id aborts what they left open), then reads their state (committed
offset and metadata, ledger, dedupe index) and builds each core with its committer. A failed open
(:meth:`open_failed`) forgets what was half built and is tried again with a growing pause
(:meth:`retry_due`); :meth:`drop` forgets a partition that moved away or was fenced. The totals
the consume loop and the gauges read (buffered, in flight, waiting) are summed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from service.bind.watch import WatchPolicy
from service.config import KafkaSettings, TopicSettings
from service.kafka import committed_with_metadata, read_to_end, reader
from service.metrics import Metrics
from service.pipeline.committer import PartitionCommitter
from service.pipeline.dedupe import DedupeReader
from service.pipeline.expiry import Retention
from service.pipeline.intake import Routing
from service.pipeline.ledger import DeviceLedger
from service.pipeline.partition_core import PartitionCore
from service.pipeline.progress import PartitionProgress
from service.pipeline.takeover import LedgerLoad, load_backwards
from service.pipeline.work import Answers, Work

log = structlog.get_logger(__name__)

_OPEN_RETRY_INITIAL_SECONDS = 0.5
_OPEN_RETRY_MAX_SECONDS = 15.0
_PARKED_MAX_SECONDS = 300.0
"""How long a revoked partition's ledger is kept for its return. Its tail is read on return;
compaction could remove a tombstone from that tail only after the topic's delete.retention.ms
(a day by default), far longer."""


@dataclass
class _Parked:
    """A revoked partition whose ledger in memory was exactly its committed state: kept until
    the assignment that ends the rebalance, in case the partition comes back."""

    ledger: DeviceLedger
    committer: PartitionCommitter
    at: float  # time.monotonic() of the revocation


class OpenPartitions:
    """The open input partitions, by number: ``cores`` and ``committers`` hold the same keys."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        metrics: Metrics,
        *,
        answers: Answers,
        dedupe: DedupeReader,
        watch: WatchPolicy | None,
        notify_topic: str | None,
        retention: Retention | None = None,
    ) -> None:
        self._kafka = kafka
        self._topics = topics
        self._metrics = metrics
        self._answers = answers
        self._dedupe = dedupe
        self._watch = watch
        self._notify_topic = notify_topic
        self.urgent_topic: str | None = None  # the urgent lane, when it is read (Pipeline.start)
        self._retention = retention
        self.cores: dict[int, PartitionCore] = {}
        self.committers: dict[int, PartitionCommitter] = {}
        self.failed_open: set[int] = set()  # assigned partitions whose opening failed
        self._parked: dict[int, _Parked] = {}
        self.ledger_records_read = 0  # ledger records read when opening partitions, in all
        self._open_retry_in = 0.0  # the pause before the next try at a failed partition open
        self._open_retry_at = 0.0
        # Ledgers read from their end back while their partition already works (one task per
        # partition taken over, at most the partitions assigned; service.pipeline.takeover).
        self._loads: dict[int, asyncio.Task[None]] = {}
        # The pipeline's: held swaps whose device became known (admit and run them).
        self.on_released: Callable[[PartitionCore, list[Work]], None] = lambda _core, _works: None
        self.on_body_wanted: Callable[[], None] = lambda: None  # the pipeline's BodyFetches
        self._consumer: AIOKafkaConsumer | None = None  # the group's, given to open()
        self._opening_at = 0.0  # time.monotonic() when open() was called last

    # ---- totals ----------------------------------------------------------------------------

    def assigned(self) -> list[TopicPartition]:
        return [TopicPartition(self._topics.device_swapped, p) for p in self.cores]

    def buffered(self) -> int:
        """Input records read and not yet finished (the backpressure measure)."""
        return sum(core.outbox.unfinished for core in self.cores.values())

    def inflight(self) -> int:
        """Swaps being worked on: unfinished input records, plus woken waiting swaps."""
        return sum(core.outbox.unfinished + core.woken for core in self.cores.values())

    def waiting(self) -> int:
        return sum(core.ledger.waiting for core in self.cores.values())

    def pending_outputs(self) -> int:
        return sum(c.outbox.pending_outputs for c in self.cores.values())

    def stuck(self) -> list[int]:
        """Partitions whose oldest unfinished record is older than the configured bound."""
        bound = self._kafka.stuck_partition_seconds
        return sorted(
            p for p, core in self.cores.items() if core.progress.oldest_unfinished_seconds() > bound
        )

    def skipped(self) -> int:
        return sum(core.skipped for core in self.cores.values())

    # ---- opening ---------------------------------------------------------------------------

    async def open(
        self,
        consumer: AIOKafkaConsumer,
        ledger_reader: AIOKafkaConsumer,
        tps: list[TopicPartition],
        kept: Callable[[int], bool] = lambda _: False,
    ) -> None:
        """Take the partitions over: fence their earlier owners first, then read their state.

        A partition this member parked at the revocation (:meth:`park`) keeps its ledger: only
        the ledger's records after the last one this member saw are read (another owner's
        writes, if it had one). Its producer is reused when ``kept(p)`` says no other member
        was assigned p since (the group's consecutive generations, :mod:`service.assignor`):
        no one else initialised its transactional id. Otherwise a new producer fences them."""
        now = self._opening_at = time.monotonic()
        self._consumer = consumer
        parked = {tp.partition: self._parked.pop(tp.partition, None) for tp in tps}
        committers: dict[int, PartitionCommitter] = {}
        fresh: list[PartitionCommitter] = []
        for tp in tps:
            keep = parked[tp.partition]
            if keep is not None and now - keep.at > _PARKED_MAX_SECONDS:
                await keep.committer.stop()
                keep = parked[tp.partition] = None
            if keep is not None and kept(tp.partition):
                committers[tp.partition] = keep.committer
                continue
            if keep is not None:
                await keep.committer.stop()  # fenced by another owner meanwhile, maybe
            committer = PartitionCommitter(self._kafka, tp.topic, tp.partition, self._metrics)
            committer.notify_topic = self._notify_topic
            committer.urgent_topic = self.urgent_topic
            committer.ledger_topic = self._topics.ledger
            committers[tp.partition] = committer
            fresh.append(committer)
        try:
            await self._load(consumer, ledger_reader, tps, committers, fresh, parked)
        except BaseException:
            for committer in committers.values():
                await committer.stop()
            raise

    async def _load(  # noqa: PLR0917 - the clients, then what open() decided
        self,
        consumer: AIOKafkaConsumer,
        ledger_reader: AIOKafkaConsumer,
        tps: list[TopicPartition],
        committers: dict[int, PartitionCommitter],
        fresh: list[PartitionCommitter],
        parked: dict[int, _Parked | None],
    ) -> None:
        # Initialising each partition's transactional id aborts whatever its earlier owner left
        # open and fences it; only then is the state below final.
        await asyncio.gather(*(c.start() for c in fresh))
        lanes = [TopicPartition(self.urgent_topic, tp.partition) for tp in tps if self.urgent_topic]
        committed = await committed_with_metadata(consumer, tps + lanes)
        ledgers: dict[int, DeviceLedger] = {}
        start: dict[TopicPartition, int] = {}
        fresh_ledgers: list[TopicPartition] = []
        for tp in tps:
            keep = parked[tp.partition]
            ledger_tp = TopicPartition(self._topics.ledger, tp.partition)
            if keep is None:
                ledgers[tp.partition] = DeviceLedger(
                    self._topics.ledger, tp.partition, bodies_out=True
                )
                fresh_ledgers.append(ledger_tp)
            else:
                ledgers[tp.partition] = keep.ledger
                start[ledger_tp] = keep.committer.ledger_next
        started = time.monotonic()
        # A kept ledger reads its tail (usually nothing) before the partition starts.
        reached: dict[TopicPartition, int] = {}
        loaded = await read_to_end(
            ledger_reader,
            list(start),
            lambda tp, record: ledgers[tp.partition].load(record.key, record.value, record.offset),
            start=start,
            reached=reached,
        )
        self.ledger_records_read += loaded
        # A ledger taken over is read from its end back, while the partition already works
        # (service.pipeline.takeover): up to the end it has now, after its earlier owner was
        # fenced; the records after it are this member's.
        if fresh_ledgers:
            beginnings = await ledger_reader.beginning_offsets(fresh_ledgers)
            reached.update(await ledger_reader.end_offsets(fresh_ledgers))
            for ledger_tp in fresh_ledgers:
                ledger = ledgers[ledger_tp.partition]
                load = LedgerLoad(ledger, beginnings[ledger_tp], reached[ledger_tp])
                ledger.loading = None if load.done else load
        for tp, end in reached.items():
            committers[tp.partition].ledger_next = end
        indexes = await self._dedupe.load([tp.partition for tp in tps])
        count = len(consumer.partitions_for_topic(self._topics.device_swapped) or ())
        routing = Routing(self._kafka.partitioner, count) if count else None
        for tp in tps:
            progress = _progress(committed.get(tp))
            urgent = None
            if self.urgent_topic is not None:
                lane = TopicPartition(self.urgent_topic, tp.partition)
                urgent = (self.urgent_topic, _progress(committed.get(lane)))
            core = PartitionCore(
                topic=tp.topic,
                partition=tp.partition,
                dead_letter_topic=self._topics.dead_letter,
                progress=progress,
                ledger=ledgers[tp.partition],
                dedupe=indexes[tp.partition],
                answers=self._answers,
                watch=self._watch,
                max_input_bytes=self._kafka.max_input_bytes,
                max_clock_skew_ms=int(self._kafka.max_clock_skew_seconds * 1000),
                routing=routing,
                retention=self._retention,
                urgent=urgent,
            )
            core.bodies.on_want = self.on_body_wanted
            committers[tp.partition].core = core
            self.cores[tp.partition] = core
            self.committers[tp.partition] = committers[tp.partition]
            if core.ledger.loading is not None:
                self._loads[tp.partition] = asyncio.create_task(
                    self._load_backwards(core, core.ledger.loading),
                    name=f"ledger-load-{tp.partition}",
                )
        log.info(
            "partition_state_loaded",
            partitions=sorted(tp.partition for tp in tps),
            kept=sorted(p for p, keep in parked.items() if keep is not None),
            loading=sorted(self._loads),
            ledger_records=loaded,
            devices=sum(len(ledger) for ledger in ledgers.values()),
            waiting=sum(ledger.waiting for ledger in ledgers.values()),
            seconds=round(time.monotonic() - started, 3),
            open_seconds=round(time.monotonic() - self._opening_at, 3),  # since the assignment
        )

    def loading(self) -> list[int]:
        """Open partitions whose ledger is still being read."""
        return sorted(self._loads)

    async def _load_backwards(self, core: PartitionCore, load: LedgerLoad) -> None:
        """Read ``core``'s ledger from its end back (:func:`load_backwards`), with a reader of
        its own; held swaps go to :attr:`on_released` as their devices become known."""
        tp = TopicPartition(self._topics.ledger, core.partition)
        pause = _OPEN_RETRY_INITIAL_SECONDS
        while True:
            ledger_reader = reader(self._kafka, bulk=True)
            try:
                await ledger_reader.start()
                await load_backwards(
                    ledger_reader, tp, load, lambda works: self.on_released(core, works)
                )
                break
            except Exception as exc:  # noqa: BLE001 - cannot connect: tried again
                log.warning("ledger_reader_failed", partition=core.partition, error=repr(exc))
                await asyncio.sleep(pause)
                pause = min(pause * 2, _OPEN_RETRY_MAX_SECONDS)
            finally:
                await ledger_reader.stop()
        core.ledger.loading = None
        core.watches.adopt_loaded()  # watches read in the background get their poll slots
        self.on_released(core, load.release())
        self.ledger_records_read += load.records
        if self._loads.get(core.partition) is asyncio.current_task():
            del self._loads[core.partition]
        log.info(
            "partition_ledger_loaded",
            partition=core.partition,
            ledger_records=load.records,
            devices=len(core.ledger),
            waiting=core.ledger.waiting,
            seconds=round(time.monotonic() - load.started, 3),
        )
        notify = self._notify_tp(core.partition)
        if notify is not None and self._consumer is not None and not core.closing:
            self._consumer.resume(notify)  # its pushes now meet every entry

    def _notify_tp(self, partition: int) -> TopicPartition | None:
        return None if self._notify_topic is None else TopicPartition(self._notify_topic, partition)

    def resumable(self, assigned: list[TopicPartition]) -> list[TopicPartition]:
        """Of ``assigned``, what may be read now: not the bind-notify partition of a partition
        whose ledger is still read (a push for a device not read yet would find no watch and
        be lost; it is read once the ledger is)."""
        held = {self._notify_tp(p) for p in self._loads}
        return [tp for tp in assigned if tp not in held]

    async def _stop_load(self, partition: int) -> None:
        task = self._loads.pop(partition, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def try_open(
        self, tps: list[TopicPartition], open_: Callable[[list[TopicPartition]], Awaitable[None]]
    ) -> bool:
        """Open ``tps`` with ``open_`` (the pipeline's :meth:`open` with its clients); on failure
        (a broker hiccup while fencing or loading) they stay assigned and paused,
        :meth:`unopened` names them (``/readyz`` 503), and the consume loop tries again with a
        growing pause (aiokafka would only log the callback's error)."""
        try:
            await open_(tps)
        except Exception as exc:  # noqa: BLE001 - any failure: retried, and visible meanwhile
            await self.open_failed(tps, exc)
            return False
        self.opened(tps)
        return True

    async def open_failed(self, tps: list[TopicPartition], exc: Exception) -> None:
        """Forget what opening ``tps`` built; they are tried again after a growing pause."""
        self.failed_open.update(tp.partition for tp in tps)
        for tp in tps:
            await self._stop_load(tp.partition)
            committer = self.committers.pop(tp.partition, None)
            self.cores.pop(tp.partition, None)
            if committer is not None:
                await committer.stop()
        self._open_retry_in = min(
            max(self._open_retry_in * 2, _OPEN_RETRY_INITIAL_SECONDS),
            _OPEN_RETRY_MAX_SECONDS,
        )
        self._open_retry_at = time.monotonic() + self._open_retry_in
        log.error(
            "partitions_open_failed",
            action="trying again",
            partitions=sorted(tp.partition for tp in tps),
            retry_in=self._open_retry_in,
            error=repr(exc),
        )

    def opened(self, tps: list[TopicPartition]) -> None:
        self.failed_open.difference_update(tp.partition for tp in tps)
        self._open_retry_in = 0.0

    def unopened(self, group_assignment: list[int]) -> list[int]:
        """Of ``group_assignment``, the partitions whose opening failed (and is being tried
        again). A partition dropped because it was fenced is not one of them."""
        return [p for p in group_assignment if p in self.failed_open and p not in self.cores]

    def retry_due(self) -> bool:
        return time.monotonic() >= self._open_retry_at

    # ---- closing ---------------------------------------------------------------------------

    def closing(self, revoked: list[TopicPartition]) -> list[int]:
        """Mark the revoked partitions that are open as closing (their queued jobs will not
        start) and return them; a revoked partition whose opening failed is tried no more."""
        self.failed_open.difference_update(tp.partition for tp in revoked)
        # Partition numbers, once each: the input, the urgent lane and bind-notify share them.
        ours = sorted({tp.partition for tp in revoked if tp.partition in self.cores})
        for p in ours:
            self.cores[p].closing = True
        return ours

    def close(self, partitions: list[int]) -> None:
        """Closed before their last transaction: a result decided from now on (a job that still
        runs, a poll answered while the producers stop) is dropped, not left in a core that
        never commits again; the next owner decides it again from the ledger."""
        for p in partitions:
            self.cores[p].closed = True

    def park(self, partition: int) -> bool:
        """Forget a revoked partition, but keep its ledger and producer for its return in this
        rebalance (:meth:`open`), when :meth:`PartitionCore.keep_ledger` allows; else False."""
        core = self.cores.get(partition)
        committer = self.committers.get(partition)
        if core is None or committer is None or committer.core is not core:
            return False
        if not core.keep_ledger():  # undone to its committed state, or nothing kept
            return False
        del self.cores[partition]
        del self.committers[partition]
        core.closed = True
        committer.core = None  # nothing more is committed until the partition is opened again
        self._parked[partition] = _Parked(core.ledger, committer, time.monotonic())
        return True

    async def revoked(
        self, partitions: list[int], *, keep: bool, forget: Callable[[int], None]
    ) -> None:
        """Revoked partitions, their last transaction done: each parked (``keep``, and its
        state allows it) or dropped; ``forget`` is called for each."""
        for partition in partitions:
            if not (keep and self.park(partition)):
                await self.drop(partition)
            forget(partition)

    async def to_open(self, assigned: list[TopicPartition]) -> list[TopicPartition]:
        """Of the ``assigned`` input partitions, those not open; the parked partitions not among
        them are let go (:meth:`unpark`)."""
        await self.unpark(keep={tp.partition for tp in assigned})
        return [tp for tp in assigned if tp.partition not in self.cores]

    async def unpark(self, keep: set[int] | None = None) -> None:
        """Forget the parked partitions not in ``keep`` (all: None), stopping their producers."""
        for partition in [p for p in self._parked if keep is None or p not in keep]:
            await self._parked.pop(partition).committer.stop()

    async def drop(self, partition: int) -> None:
        """Forget a partition: its core is closed (a late result is dropped), its producer
        and the read of its ledger stopped; what it had not finished is redone by its next
        owner."""
        await self._stop_load(partition)
        core = self.cores.pop(partition, None)
        if core is not None:
            core.closed = True
            if core.progress.unfinished:
                log.info(
                    "revoked_with_unfinished_work",
                    action="the next owner redoes it",
                    partition=partition,
                    unfinished=core.progress.unfinished,
                )
        committer = self.committers.pop(partition, None)
        if committer is not None:
            await committer.stop()

    async def stop_committers(self) -> None:
        for partition in list(self._loads):
            await self._stop_load(partition)
        for committer in list(self.committers.values()):
            await committer.stop()
        self.committers.clear()
        await self.unpark()


def _progress(found: OffsetAndMetadata | None) -> PartitionProgress:
    """A partition's progress from its committed offset and metadata (None: never committed)."""
    return PartitionProgress(
        found.offset if found is not None and found.offset >= 0 else None,
        found.metadata if found is not None else None,
    )
