"""The Kafka side: consume, hand work to devices, commit outcomes and offsets together.

    poll -> decode (bad input -> dead letter) -> per-device scheduler -> handler -> tracker
                                                                         |
                   one Kafka transaction: outputs of the finished prefix + its offsets

Nothing here knows HTTP or the platform: the handler turns one event into the records that
answer it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError, ProducerFenced

from service.config import KafkaSettings, SecurityProtocol, TopicSettings
from service.events import InvalidEvent, dead_letter_headers, decode_swap
from service.handler import BadRetryRecordError, RetryState, Work, strip_retry_headers
from service.metrics import Metrics
from service.pipeline.dedupe import DedupeStore, Seen
from service.pipeline.scheduler import KeyedScheduler
from service.pipeline.tracker import Output, PartitionTracker

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RecordMeta:
    """Where an event came from: bound to every log line about it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None


class Handler(Protocol):
    """Turns one valid swap into the records that answer it (outcome, or a deferral)."""

    async def handle(self, work: Work) -> list[Output]: ...

    def superseded(self, work: Work, newer_event_id: str) -> Output: ...


@dataclass(slots=True)
class _Waiting:
    """A deferred swap read back from the retry topic, waiting in memory until it is due."""

    tp: TopicPartition
    tracker: PartitionTracker
    work: Work
    meta: RecordMeta
    timer: asyncio.TimerHandle | None = None


SUPERSEDE_HEADER = "rebind-retry-supersede"
SUPERSEDED_BY_HEADER = "rebind-retry-superseded-by"
_MAX_SUPERSEDED = 100_000
_MAX_COMMIT_FAILURES = 30


class FatalPipelineError(Exception):
    """The instance must stop: e.g. a newer instance with the same transactional id fenced it."""


def kafka_client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by the consumer, the producer and the admin tools."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol.value,
    }
    if settings.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL):
        from aiokafka.helpers import create_ssl_context  # noqa: PLC0415 - only with TLS

        options["ssl_context"] = create_ssl_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
        )
    if settings.sasl_mechanism is not None:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password else None
        )
    return options


async def partition_counts(settings: KafkaSettings, names: Sequence[str]) -> dict[str, int]:
    """Partitions of each topic (0 when it does not exist)."""
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    await admin.start()
    try:
        described = await admin.describe_topics(list(names))
    finally:
        await admin.close()
    return {t["topic"]: (len(t["partitions"]) if t["error_code"] == 0 else 0) for t in described}


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._pipeline.partitions_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self._pipeline.partitions_assigned(list(assigned))


AssignmentCallback = Callable[[int, int], Awaitable[None] | None]


class Pipeline:
    """One consumer group member with its transactional producer."""

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
    ) -> None:
        self._kafka = kafka
        self._topics = topics
        self._handler = handler
        self._metrics = metrics
        self._scheduler = KeyedScheduler(concurrency)
        self._max_buffered = max_buffered or max(concurrency * 8, kafka.max_poll_records * 2)
        self._drain_timeout = drain_timeout
        self._on_assignment = on_assignment
        self._trackers: dict[TopicPartition, PartitionTracker] = {}
        self._carry_offsets: dict[TopicPartition, int] = {}
        self._carry_outputs: list[Output] = []
        self._carry_stamps: list[int] = []
        self._commit_lock = asyncio.Lock()
        self._progress = asyncio.Event()
        self._flush_now = asyncio.Event()
        self._paused = False
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._fatal: BaseException | None = None
        self.started = asyncio.Event()
        self._lag_partitions: set[int] = set()
        self._waiting: dict[str, _Waiting] = {}
        self._dedupe = DedupeStore(
            topics.dedupe, kafka.dedupe_entries_per_partition, kafka_client_options(kafka)
        )
        # Input partitions held back until their retry partition was read to where it ended at
        # assignment: waiting swaps must be known before newer swaps of their devices arrive.
        self._gated: dict[int, int] = {}
        # Devices whose latest deferral has not ended yet: device -> swap id. A newer swap of such
        # a device writes a supersede marker into the retry topic, so the older swap is answered
        # SUPERSEDED when it is read back, even after a crash.
        self._outstanding: dict[str, str] = {}
        self._superseded: dict[str, str] = {}  # older swap id -> newer swap id, bounded

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def transactional_id(self) -> str:
        return f"{self._kafka.transactional_id_prefix}-{self._kafka.instance_id}"

    def assigned(self) -> list[TopicPartition]:
        return list(self._trackers)

    async def start(self) -> None:
        options = kafka_client_options(self._kafka)
        self._producer = AIOKafkaProducer(
            **options,
            transactional_id=self.transactional_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
        )
        self._consumer = AIOKafkaConsumer(
            **options,
            group_id=self._kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=self._kafka.max_poll_records,
            session_timeout_ms=self._kafka.session_timeout_ms,
            # Co-partitioning: partition p of the input, retry and dedupe topics goes to one
            # member, so the state of a device lives in one place.
            partition_assignment_strategy=(RangePartitionAssignor,),
            heartbeat_interval_ms=max(1000, self._kafka.session_timeout_ms // 10),
            # Bounded prefetch: memory must not grow with the backlog behind the buffer.
            fetch_max_bytes=4 * 1024 * 1024,
            max_partition_fetch_bytes=512 * 1024,
        )
        # The producer first: initialising its transactional id fences a zombie predecessor
        # before this instance reads anything.
        try:
            await self._check_topics()
            await self._producer.start()
            await self._dedupe.start()
            await self._consumer.start()
        except BaseException:
            await self._close_clients()
            raise
        self._consumer.subscribe(
            [self._topics.device_swapped, self._topics.retry], listener=_Listener(self)
        )
        self.started.set()

    async def _close_clients(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        with contextlib.suppress(Exception):
            await self._dedupe.stop()

    async def _check_topics(self) -> None:
        """The service topics must exist and be co-partitioned with the input topic."""
        names = (self._topics.device_swapped, self._topics.retry, self._topics.dedupe)
        counts = await partition_counts(self._kafka, names)
        missing = [name for name, n in counts.items() if n == 0]
        if missing:
            raise FatalPipelineError(f"topics missing: {', '.join(missing)} (see deploy/)")
        if len(set(counts.values())) != 1:
            raise FatalPipelineError(
                "the input, retry and dedupe topics must have the same number of partitions "
                f"(co-partitioned): {counts}"
            )

    async def run(self) -> None:
        """Consume until stop() is called, then drain, commit and close."""
        if self._consumer is None:
            await self.start()
        assert self._consumer is not None
        committer = asyncio.create_task(self._commit_loop(), name="committer")
        lag = asyncio.create_task(self._lag_loop(), name="lag")
        try:
            while not self._stopping.is_set():
                if self._fatal is not None:
                    raise FatalPipelineError(str(self._fatal)) from self._fatal
                self._apply_backpressure()
                await self._open_gates()
                batches = await self._consumer.getmany(
                    timeout_ms=100, max_records=self._kafka.max_poll_records
                )
                for tp, records in batches.items():
                    self._accept(tp, records)
            if self._fatal is not None:  # the committer sets it together with the stop flag
                raise FatalPipelineError(str(self._fatal)) from self._fatal
        finally:
            lag.cancel()
            await self._shutdown(committer)

    def stop(self) -> None:
        self._stopping.set()

    async def _shutdown(self, committer: asyncio.Task[None]) -> None:
        consumer = self._consumer
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.pause(*consumer.assignment())
        for waiting in self._waiting.values():
            if waiting.timer is not None:
                waiting.timer.cancel()
        self._waiting.clear()
        # Finish what is running; what is queued has not touched the platform and is redone
        # after the restart, so stopping does not wait for a whole buffer of work.
        self._scheduler.close()
        drained = await self._scheduler.join(self._drain_timeout)
        if not drained:
            log.warning("drain timed out; unfinished work is left for redelivery")
            await self._scheduler.cancel_all()
        # Never cancel a transaction half way: the committer may be between producing a batch
        # and clearing it, and the final commit below would produce that batch a second time.
        async with self._commit_lock:
            committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        if self._fatal is None:
            try:
                await self._commit()
            except Exception:
                log.exception("final commit failed; uncommitted work will be redelivered")
        await self._close_clients()
        self._metrics.inflight_events.set(0)

    # ---- intake ----------------------------------------------------------------------------

    def _accept(self, tp: TopicPartition, records: Sequence[Any]) -> None:
        tracker = self._trackers.get(tp)
        if tracker is None:  # fetched just before a revocation
            return
        consumed = self._metrics.events_consumed.labels(topic=tp.topic)
        is_retry = tp.topic == self._topics.retry
        for record in records:
            consumed.inc()
            meta = RecordMeta(tp.topic, tp.partition, record.offset, record.timestamp, record.key)
            tracker.start(record.offset, None if is_retry else record.timestamp)
            headers = list(record.headers or ())
            if is_retry and self._marker(record, headers):
                tracker.finish(record.offset)
                continue
            try:
                retry = RetryState.from_headers(headers) if is_retry else None
                swap = decode_swap(
                    record.value, strip_retry_headers(headers) if is_retry else headers
                )
            except (InvalidEvent, BadRetryRecordError) as exc:
                reason = exc.reason if isinstance(exc, InvalidEvent) else "bad_retry_record"
                detail = exc.detail if isinstance(exc, InvalidEvent) else str(exc)
                tracker.finish(record.offset, [self._dead_letter(record, meta, reason, detail)])
                log.warning(
                    "dead-lettered",
                    topic=meta.topic,
                    partition=meta.partition,
                    offset=meta.offset,
                    reason=reason,
                    detail=detail,
                )
                continue
            origin = retry.origin if retry else f"{meta.topic}:{meta.partition}:{meta.offset}"
            work = Work(swap, record.value, headers, origin, retry)
            device = swap.data.device_id
            waiting = self._waiting.get(device)
            if (
                waiting is not None
                and waiting.work.swap.id != swap.id
                and (is_retry or self._dedupe.seen(meta.partition, swap.id) is None)
            ):  # a newer swap of the device replaces the waiting one
                del self._waiting[device]
                self._supersede(waiting, swap.id)
            if retry is not None and (newer := self._superseded.pop(swap.id, None)):
                self._supersede(_Waiting(tp, tracker, work, meta), newer)
            elif retry is not None and retry.due_ms > time.time() * 1000:
                self._outstanding[device] = swap.id
                self._wait(_Waiting(tp, tracker, work, meta))
            else:
                self._scheduler.submit(device, self._job(tp, tracker, work, meta))
        self._metrics.inflight_events.set(self._inflight())
        self._metrics.deferred_events.set(len(self._waiting))

    def _wait(self, waiting: _Waiting) -> None:
        device = waiting.work.swap.data.device_id
        loop = asyncio.get_running_loop()
        delay = (
            max(0.0, waiting.work.retry.due_ms / 1000 - time.time()) if waiting.work.retry else 0
        )
        self._waiting[device] = waiting

        def due() -> None:
            if self._waiting.get(device) is not waiting:
                return
            del self._waiting[device]
            self._metrics.deferred_events.set(len(self._waiting))
            self._scheduler.submit(
                device, self._job(waiting.tp, waiting.tracker, waiting.work, waiting.meta)
            )

        waiting.timer = loop.call_later(delay, due)

    def _marker(self, record: Any, headers: list[tuple[str, bytes]]) -> bool:
        """Apply a supersede marker read from the retry topic; False if the record is none."""
        found = dict(headers)
        older = found.get(SUPERSEDE_HEADER)
        if older is None:
            return False
        older_id = older.decode(errors="replace")
        newer_id = found.get(SUPERSEDED_BY_HEADER, b"").decode(errors="replace")
        device = (record.key or b"").decode(errors="replace")
        waiting = self._waiting.get(device)
        if waiting is not None and waiting.work.swap.id == older_id:
            del self._waiting[device]
            self._supersede(waiting, newer_id)
        else:  # not read back yet (or already ended): answer it when it comes
            self._superseded[older_id] = newer_id
            while len(self._superseded) > _MAX_SUPERSEDED:
                del self._superseded[next(iter(self._superseded))]
        return True

    def _supersede(self, waiting: _Waiting, newer_event_id: str) -> None:
        device = waiting.work.swap.data.device_id
        if self._outstanding.get(device) == waiting.work.swap.id:
            del self._outstanding[device]
        if waiting.timer is not None:
            waiting.timer.cancel()
        if self._trackers.get(waiting.tp) is waiting.tracker:
            outputs = [self._handler.superseded(waiting.work, newer_event_id)]
            outputs.append(
                self._dedupe.record(waiting.meta.partition, waiting.work.swap.id, outputs)
            )
            waiting.tracker.finish(waiting.meta.offset, outputs)
            self._progress.set()

    def _dead_letter(self, record: Any, meta: RecordMeta, reason: str, detail: str) -> Output:
        headers = dead_letter_headers(
            list(record.headers or ()),
            reason=reason,
            detail=detail,
            topic=meta.topic,
            partition=meta.partition,
            offset=meta.offset,
        )
        return Output(
            self._topics.dead_letter, record.key, record.value, headers, outcome="dead_lettered"
        )

    def _job(
        self, tp: TopicPartition, tracker: PartitionTracker, work: Work, meta: RecordMeta
    ) -> Callable[[], Awaitable[None]]:
        async def job() -> None:
            if self._trackers.get(tp) is not tracker:
                return  # the partition moved away; its new owner redoes this event
            with structlog.contextvars.bound_contextvars(
                topic=meta.topic,
                partition=meta.partition,
                offset=meta.offset,
                device_id=work.swap.data.device_id,
                event_id=work.swap.id,
            ):
                try:
                    outputs = await self._work(work, meta)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug, not a platform answer: leave the offset unfinished so nothing is
                    # committed past it, and let the operator see it (the event is redone
                    # after a restart). Never crash the loop.
                    log.exception("handler failed; the event stays uncommitted")
                    return
            if self._trackers.get(tp) is not tracker:
                return
            tracker.finish(meta.offset, outputs)
            self._progress.set()
            if self._pending_outputs() >= self._kafka.commit_batch_size:
                self._flush_now.set()

        return job

    async def _work(self, work: Work, meta: RecordMeta) -> list[Output]:
        """Answer one swap: from the dedupe memory when seen before, else by the handler."""
        partition = meta.partition  # co-partitioned: the input partition of this device
        if work.retry is None:
            seen = self._dedupe.seen(partition, work.swap.id)
            if seen is not None:
                return await self._duplicate(partition, seen)
        outputs = [
            replace(o, partition=partition) if o.topic == self._topics.retry else o
            for o in await self._handler.handle(work)
        ]
        outputs.append(self._dedupe.record(partition, work.swap.id, outputs))
        device = work.swap.data.device_id
        older = self._outstanding.get(device)
        if work.retry is None and older is not None and older != work.swap.id:
            outputs.append(
                Output(
                    self._topics.retry,
                    device.encode(),
                    None,
                    [
                        (SUPERSEDE_HEADER, older.encode()),
                        (SUPERSEDED_BY_HEADER, work.swap.id.encode()),
                    ],
                    partition=partition,
                )
            )
        if any(o.topic == self._topics.retry and o.value is not None for o in outputs):
            self._outstanding[device] = work.swap.id
        elif device in self._outstanding and self._outstanding[device] in (work.swap.id, older):
            del self._outstanding[device]
        return outputs

    async def _duplicate(self, partition: int, seen: Seen) -> list[Output]:
        if seen.pending:
            republished = [replace(o, outcome="duplicate") for o in seen.pending]
        elif seen.offset is not None and (
            stored := await self._dedupe.fetch(partition, seen.offset)
        ):
            republished = [stored]
        else:  # still deferred: its outcome comes when it ends
            republished = []
        log.info("duplicate input: not calling the platform", republished=len(republished))
        if not republished:
            self._metrics.outcomes.labels(outcome="duplicate").inc()
        return republished

    def _inflight(self) -> int:
        """Events being worked on: read and unfinished, less the deferred ones waiting."""
        return sum(t.unfinished for t in self._trackers.values()) - len(self._waiting)

    def _pending_outputs(self) -> int:
        return sum(t.finished_waiting for t in self._trackers.values())

    async def _open_gates(self) -> None:
        """Resume input partitions whose retry partition was read up to its end at assignment."""
        consumer = self._consumer
        assert consumer is not None
        for partition, end in list(self._gated.items()):
            retry_tp = TopicPartition(self._topics.retry, partition)
            if retry_tp not in self._trackers or await consumer.position(retry_tp) >= end:
                del self._gated[partition]
                if not self._paused:
                    consumer.resume(TopicPartition(self._topics.device_swapped, partition))

    def _apply_backpressure(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        buffered = sum(len(t) for t in self._trackers.values())
        if not self._paused and buffered >= self._max_buffered:
            consumer.pause(*self._trackers)
            self._paused = True
        elif self._paused and buffered <= self._max_buffered // 2:
            consumer.resume(
                *(
                    tp
                    for tp in self._trackers
                    if not (tp.topic == self._topics.device_swapped and tp.partition in self._gated)
                )
            )
            self._paused = False

    # ---- commits ---------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        interval = self._kafka.commit_interval_ms / 1000
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), interval)
            self._flush_now.clear()
            try:
                await self._commit()
                failures = 0
            except FatalPipelineError as exc:
                self._fail(exc)
                return
            except Exception as exc:
                failures += 1
                if failures >= _MAX_COMMIT_FAILURES:
                    # The producer is in a state it does not leave (e.g. fenced mid-commit):
                    # stop, so the orchestrator restarts a clean instance; nothing is lost.
                    self._fail(
                        FatalPipelineError(f"{failures} transactions in a row failed: {exc}")
                    )
                    return
                log.exception("transaction failed; retrying with the next commit")
                await asyncio.sleep(min(5.0, interval * 5))

    def _fail(self, exc: FatalPipelineError) -> None:
        self._fatal = exc
        self._stopping.set()

    async def _commit(self) -> None:
        """Produce the outputs of every finished prefix and commit its offsets, atomically."""
        async with self._commit_lock:
            for tp, tracker in self._trackers.items():
                offset, outputs, stamps = tracker.take_committable()
                if offset is not None:
                    self._carry_offsets[tp] = offset
                    self._carry_outputs.extend(outputs)
                    self._carry_stamps.extend(stamps)
            self._metrics.inflight_events.set(self._inflight())
            if not self._carry_offsets:
                return
            written = await self._transact(self._carry_offsets, self._carry_outputs)
            for output, offset in zip(self._carry_outputs, written, strict=True):
                if output.topic == self._dedupe.topic and output.key is not None:
                    assert output.partition is not None
                    self._dedupe.committed(output.partition, output.key.decode(), offset)
            now_ms = time.time() * 1000
            for stamp in self._carry_stamps:
                self._metrics.event_latency.observe(max(0.0, (now_ms - stamp) / 1000))
            for output in self._carry_outputs:
                if output.outcome:
                    self._metrics.outcomes.labels(outcome=output.outcome).inc()
            self._carry_offsets = {}
            self._carry_outputs = []
            self._carry_stamps = []

    async def _transact(
        self, offsets: dict[TopicPartition, int], outputs: list[Output]
    ) -> list[int]:
        """Produce ``outputs`` and commit ``offsets`` in one transaction; return their offsets."""
        producer = self._producer
        assert producer is not None
        try:
            async with producer.transaction():
                futures = [
                    await producer.send(
                        o.topic, o.value, key=o.key, headers=o.headers, partition=o.partition
                    )
                    for o in outputs
                ]
                await producer.send_offsets_to_transaction(offsets, self._kafka.group_id)
                written = [m.offset for m in await asyncio.gather(*futures)] if futures else []
        except ProducerFenced as exc:
            self._metrics.transactions.labels(result="aborted").inc()
            raise FatalPipelineError(
                f"producer fenced: another instance uses transactional id {self.transactional_id}"
            ) from exc
        except KafkaError:
            self._metrics.transactions.labels(result="aborted").inc()
            raise
        self._metrics.transactions.labels(result="committed").inc()
        return written

    # ---- rebalances ------------------------------------------------------------------------

    async def partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        for tp in assigned:
            self._trackers.setdefault(tp, PartitionTracker())
        if self._paused:
            consumer.resume(*assigned)
            self._paused = False
        inputs = [tp for tp in assigned if tp.topic == self._topics.device_swapped]
        retries = {tp.partition for tp in assigned if tp.topic == self._topics.retry}
        if inputs:
            consumer.pause(*inputs)
            ends = await consumer.end_offsets(
                [TopicPartition(self._topics.retry, tp.partition) for tp in inputs]
            )
        loaded = await self._dedupe.load([tp.partition for tp in inputs])
        log.info("dedupe memory loaded", partitions=len(inputs), entries=loaded)
        for tp in inputs:
            if tp.partition in retries:
                self._gated[tp.partition] = ends[TopicPartition(self._topics.retry, tp.partition)]
            else:
                consumer.resume(tp)
        log.info(
            "partitions assigned", partitions=sorted(f"{t.topic}:{t.partition}" for t in assigned)
        )
        if self._on_assignment is not None and self._consumer is not None:
            total = len(self._consumer.partitions_for_topic(self._topics.device_swapped) or ())
            mine = sum(1 for t in assigned if t.topic == self._topics.device_swapped)
            result = self._on_assignment(mine, total)
            if result is not None:
                await result

    def _unpark(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Forget the deferred swaps of moving partitions; they stay uncommitted and the next
        owner reads them again from the retry topic. Returns how many per partition."""
        parked = dict.fromkeys(partitions, 0)
        for device, waiting in list(self._waiting.items()):
            if waiting.tp in parked:
                if waiting.timer is not None:
                    waiting.timer.cancel()
                del self._waiting[device]
                parked[waiting.tp] += 1
        self._metrics.deferred_events.set(len(self._waiting))
        return parked

    async def partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Settle the revoked partitions' work before they move: finish, or leave uncommitted."""
        ours = [tp for tp in revoked if tp in self._trackers]
        if not ours:
            return
        parked = self._unpark(ours)
        loop = asyncio.get_running_loop()
        # The group waits for this member's rejoin only for the rebalance timeout (= the session
        # timeout: the consumer sets no other). A member that drains longer is dropped from the
        # group while it still commits (TxnOffsetCommit v0 carries no generation), and the new
        # owner redoes the same records: duplicated outcomes. Keep two thirds for the commit.
        deadline = loop.time() + min(self._drain_timeout, self._kafka.session_timeout_ms / 3000)
        while any(self._trackers[tp].unfinished > parked[tp] for tp in ours):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        try:
            await self._commit()
        except FatalPipelineError as exc:
            self._fail(exc)
        except Exception:
            log.exception("commit at revocation failed; the new owner redoes the work")
            self._carry_offsets = {}
            self._carry_outputs = []
            self._carry_stamps = []
        for tp in ours:
            if tp.topic == self._topics.device_swapped:
                self._dedupe.drop(tp.partition)
                self._gated.pop(tp.partition, None)
            left = self._trackers.pop(tp)
            if left.unfinished:
                log.warning(
                    "revoked with unfinished work; it is redone by the next owner",
                    topic=tp.topic,
                    partition=tp.partition,
                    unfinished=left.unfinished,
                )
            if tp.partition in self._lag_partitions and tp.topic == self._topics.device_swapped:
                self._metrics.consumer_lag.remove(str(tp.partition))
                self._lag_partitions.discard(tp.partition)
        if not self._trackers:
            # Everything moved (the eager protocol revokes all): stop the work still running, so
            # a retry of an older swap cannot reach the platform after the new owner applied a
            # newer swap of the same device. The new owner redoes it.
            await self._scheduler.cancel_all()
            self._metrics.inflight_events.set(0)
        log.info("partitions revoked", partitions=sorted(f"{t.topic}:{t.partition}" for t in ours))

    async def _lag_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            await asyncio.sleep(5)
            for tp in list(self._trackers):
                if tp.topic != self._topics.device_swapped:
                    continue
                high = consumer.highwater(tp)
                if high is None:
                    continue
                try:
                    position = await consumer.position(tp)
                except Exception:  # noqa: BLE001 - the partition may have just moved
                    log.debug("no position for lag", partition=tp.partition)
                    continue
                behind = high - position + len(self._trackers.get(tp) or ())
                self._metrics.consumer_lag.labels(partition=str(tp.partition)).set(max(0, behind))
                self._lag_partitions.add(tp.partition)
