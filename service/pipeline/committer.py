"""Transactions, one producer per input partition.

Each input partition p has its own transactional producer, ``transactional.id =
<prefix>-<group>-<input topic>-<p>`` (Kafka Streams' "exactly-once alpha" before KIP-447). The
owner of p starts it when p is assigned, which fences any earlier owner of p (its open
transaction is aborted, its later commits fail): a member dropped from the group, paused or cut
off, can no longer publish an outcome or move an offset of p, whatever it believes. aiokafka's
TxnOffsetCommit carries no group generation, so this is the fence that makes zombies harmless.

One transaction of p writes the outputs decided since the previous one (outcomes, dead letters,
duplicate-memory and ledger records) and commits p's offset with its metadata (the records
finished beyond it, :mod:`service.pipeline.progress`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import ProducerFenced
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import OffsetAndMetadata

from service.config import KafkaSettings
from service.kafka import client_options, producer_fatal
from service.metrics import Metrics
from service.pipeline.outbox import Commit
from service.pipeline.partition_core import PartitionCore
from service.pipeline.records import Output

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES: Final = 1_048_576
"""The producers' ``max_request_size``: the largest record they send (the brokers' default
``message.max.bytes`` is 1 MiB as well). ``REBIND_KAFKA__MAX_INPUT_BYTES`` bounds every record
the service writes well below it (``service.events.DEFAULT_MAX_RECORD_BYTES``)."""


def fits(output: Output) -> bool:
    """True when the producer can send ``output`` (its size as the producer counts it)."""
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        output.key, output.value, output.headers
    )
    return bool(size <= MAX_REQUEST_BYTES)


class PartitionFencedError(Exception):
    """Another member owns the partition now: this one must drop it."""


def transactional_id(kafka: KafkaSettings, topic: str, partition: int) -> str:
    return f"{kafka.transactional_id_prefix}-{kafka.group_id}-{topic}-{partition}"


class PartitionCommitter:
    """The transactional producer of one input partition."""

    def __init__(self, kafka: KafkaSettings, topic: str, partition: int, metrics: Metrics) -> None:
        self._kafka = kafka
        self.topic = topic
        self.partition = partition
        self.core: PartitionCore | None = None  # set once the partition's state is loaded
        self.notify_topic: str | None = None  # the bind-notify topic, when pushes are read
        self.urgent_topic: str | None = None  # the urgent lane, when it is read
        self._metrics = metrics
        self.transactional_id = transactional_id(kafka, topic, partition)
        self._producer = AIOKafkaProducer(
            **client_options(kafka),
            transactional_id=self.transactional_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_request_size=MAX_REQUEST_BYTES,
        )
        self._lock = asyncio.Lock()
        self.failures = 0
        # Tickets order what is noted in the core against transactions: a transaction takes the
        # ticket current when it takes its commit (everything noted before is in it, or in the
        # core again if it failed) and moves the counter on; ``_durable`` is the ticket of the
        # latest transaction that committed, or found nothing to write.
        self._next_ticket = 1
        self._durable = 0
        self._ended = asyncio.Event()  # set (and replaced) at the end of every commit()
        self._committing = 0  # commit() calls running or waiting for the lock
        self._carried = 0  # the latest ticket the running transaction carries
        # The ledger partition's offset up to which this member has seen every record: the end
        # read up to when the partition was opened, moved past each ledger record it commits.
        # Records from there on are what another writer added (OpenPartitions.park).
        self.ledger_next = 0
        self.ledger_topic: str | None = None  # set by the opener

    async def start(self) -> None:
        """Initialise the transactional id: fences the partition's earlier owner."""
        await self._producer.start()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._producer.stop()

    async def commit(self) -> None:
        """Write what the partition decided since the last transaction; raises on failure (the
        outputs stay for the next try) and :class:`PartitionFencedError` when fenced."""
        core = self.core
        if core is None:
            return
        self._committing += 1  # waiting for the lock included: see durable()
        try:
            await self._commit(core)
        finally:
            self._committing -= 1
            ended, self._ended = self._ended, asyncio.Event()
            ended.set()

    async def _commit(self, core: PartitionCore) -> None:
        async with self._lock:
            ticket = self._next_ticket
            self._next_ticket += 1
            commit = core.take_commit()
            if commit is None:
                self._durable = ticket
                return
            self._leave_out_oversized(commit)
            self._carried = ticket  # _transact moves it on when it takes late outputs too
            try:
                written, cancelled = await self._to_its_end(commit)
            except BaseException:
                core.restore(commit)  # the transaction failed: its outputs go in the next one
                raise
            core.committed(commit, written)
            for output, offset in zip(commit.outputs, written, strict=True):
                if output.topic == self.ledger_topic:
                    self.ledger_next = max(self.ledger_next, offset + 1)
            self._durable = self._carried
            self.failures = 0
            now_ms = time.time() * 1000
            for stamp in commit.stamps:
                self._metrics.event_latency.observe(max(0.0, (now_ms - stamp) / 1000))
            for kind in commit.counts:
                self._metrics.outcomes.labels(outcome=kind.value).inc()
            for lane, answered in zip(("bulk", "urgent"), commit.answered, strict=True):
                if answered:
                    self._metrics.lane_answered.labels(lane=lane).inc(answered)
            for result, seconds in commit.binds:
                self._metrics.bind_results.labels(result=result).inc()
                if seconds is not None:
                    self._metrics.bind_seconds.observe(seconds)
            if cancelled:
                raise asyncio.CancelledError

    async def _to_its_end(self, commit: Commit) -> tuple[list[int], bool]:
        """Run the transaction to its end, even when the caller is cancelled meanwhile (a
        revocation's cancel_all, a stop). Once EndTxn may have been sent, only the end says
        whether the outputs were committed: restoring them on a cancellation and sending them
        again in a later transaction could publish them twice. Returns the offsets written and
        whether the caller was cancelled (the caller settles the commit, then passes the
        cancellation on); raises the transaction's failure (CancelledError when the caller was
        cancelled)."""
        task = asyncio.ensure_future(self._transact(commit))
        cancelled = False
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                cancelled = True  # the transaction goes on; its end is settled first
        if task.cancelled():
            raise asyncio.CancelledError
        failure = task.exception()
        if failure is not None:
            if cancelled:
                raise asyncio.CancelledError from failure
            raise failure
        return task.result(), cancelled

    async def durable(self) -> bool:
        """Return True once everything the core noted before this call is committed; False
        when the partition is being revoked first. Raises like :meth:`commit`.

        A claim does not start a transaction of its own when one is running: that one takes it
        too if it has not yet taken its second look (:meth:`_take_late`), else the next one
        (begun by the first waiter, or by the commit loop) carries every claim and outcome
        noted meanwhile. So jobs that start together share one transaction, and a job whose
        claim a transaction already carried calls the platform at once instead of queueing for
        a transaction of its own."""
        ticket = self._next_ticket
        while self._durable < ticket:
            core = self.core
            if core is None or core.closed or core.closing:
                return False
            if self._committing:
                # Not the lock's own queue: every waiter queued there would run a transaction
                # of its own in turn (a convoy, one claim per transaction, measured in issue 24).
                await self._ended.wait()
            else:
                await self.commit()
        return True

    def _leave_out_oversized(self, commit: Commit) -> None:
        """Last line of defence: a record the producer would refuse would fail every transaction
        of the partition (and stop the service after 30). Every output is built to fit; one that
        does not is a defect, logged and left out rather than wedging the partition."""
        oversized = [o for o in commit.outputs if not fits(o)]
        for output in oversized:
            log.error(
                "output_record_too_large",
                action="left out",
                topic=output.topic,
                partition=self.partition,
                value_bytes=len(output.value or b""),
                limit=MAX_REQUEST_BYTES,
            )
        if oversized:
            commit.outputs = [o for o in commit.outputs if fits(o)]

    async def _transact(self, commit: Commit) -> list[int]:
        """One transaction: the records, then (once they are acknowledged) the offsets.

        Why in that order (issue 24): brokers since Kafka 3.6 verify that a transactional
        produce belongs to an ongoing transaction (KIP-890), the partition's leader asking the
        transaction coordinator. While the coordinator writes a state change of the transaction,
        such as the AddOffsetsToTxn of ``send_offsets_to_transaction``, it answers
        CONCURRENT_TRANSACTIONS, which the leader turns into the retriable NOT_ENOUGH_REPLICAS
        for clients of aiokafka's protocol versions: aiokafka logs "Got error produce response
        ... NotEnoughReplicasError" and sends the records again after ``retry_backoff_ms``
        (100 ms). Measured with ``bench/txn_probe.py`` (docs/benchmarks.md): with the offsets
        sent while records were in flight, about one retry every two transactions, however far
        apart the transactions were (200 ms too), and a shorter backoff only retried more; with
        the offsets sent once the records are acknowledged, none. The price is that the
        AddOffsetsToTxn round trip no longer overlaps the produce (a few ms against 100).

        A transaction may begin as soon as the previous one ended: its first AddPartitionsToTxn,
        while the coordinator still writes the previous one's markers, is answered
        CONCURRENT_TRANSACTIONS before any record is sent, and aiokafka retries that one after
        20 ms, without a warning.
        """
        producer = self._producer
        try:
            async with producer.transaction():
                written = await self._send(commit.outputs)
                self._take_late(commit)
                written += await self._send(commit.outputs[len(written) :])
                # The records first, the offsets once every record is acknowledged: never both
                # at once (see the docstring).
                offsets: dict[TopicPartition, OffsetAndMetadata] = {}
                if commit.offset is not None:
                    tp = TopicPartition(self.topic, self.partition)
                    offsets[tp] = OffsetAndMetadata(commit.offset, commit.metadata)
                if commit.urgent_offset is not None and self.urgent_topic is not None:
                    tp = TopicPartition(self.urgent_topic, self.partition)
                    offsets[tp] = OffsetAndMetadata(commit.urgent_offset, commit.urgent_metadata)
                if commit.notify_offset is not None and self.notify_topic is not None:
                    tp = TopicPartition(self.notify_topic, self.partition)
                    offsets[tp] = OffsetAndMetadata(commit.notify_offset, "")
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, self._kafka.group_id)
        except ProducerFenced as exc:
            self._metrics.transactions.labels(result="aborted").inc()
            raise PartitionFencedError(
                f"partition {self.partition} fenced: a newer owner uses "
                f"transactional id {self.transactional_id}"
            ) from exc
        except Exception as exc:
            self._metrics.transactions.labels(result="aborted").inc()
            if producer_fatal(producer):
                # Fenced while a transaction was open: aiokafka then fails every later
                # transaction of this producer with an internal error. The partition is gone.
                raise PartitionFencedError(
                    f"partition {self.partition}: transactional id {self.transactional_id} is "
                    "fenced (its producer can no longer commit)"
                ) from exc
            self.failures += 1
            raise
        self._metrics.transactions.labels(result="committed").inc()
        return written

    async def _send(self, outputs: list[Output]) -> list[int]:
        """Send ``outputs`` in the open transaction; their offsets once all are acknowledged."""
        producer = self._producer
        futures = [
            await producer.send(
                o.topic,
                o.value,
                key=o.key,
                headers=o.headers,
                partition=o.partition,
                timestamp_ms=o.timestamp_ms,
            )
            for o in outputs
        ]
        return [m.offset for m in await asyncio.gather(*futures)] if futures else []

    def _take_late(self, commit: Commit) -> None:
        """Add to the open transaction what the core noted while its records were on their way
        (claims of jobs that started meanwhile, outcomes decided meanwhile), with the newer
        offset: a claim then waits for the transaction in progress rather than for the next
        one. Once, before the offsets: the transaction ends soon after."""
        core = self.core
        if core is None or core.closed:
            return
        late = core.take_commit()
        if late is None:
            return
        self._carried = self._next_ticket
        self._next_ticket += 1
        self._leave_out_oversized(late)
        commit.outputs += late.outputs
        commit.offset, commit.metadata = late.offset, late.metadata
        commit.counts += late.counts
        commit.stamps += late.stamps
        commit.binds += late.binds
        commit.notify_offset = late.notify_offset
        commit.urgent_offset, commit.urgent_metadata = late.urgent_offset, late.urgent_metadata
        commit.answered = (
            commit.answered[0] + late.answered[0],
            commit.answered[1] + late.answered[1],
        )
