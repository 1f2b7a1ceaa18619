"""Reading swap bodies back from the ledger topic.

A waiting or watched swap keeps its body (its bytes and headers) in its ledger record; once that
record is committed, memory keeps only its offset (:class:`service.pipeline.ledger.Entry`'s
``body_at``). When the swap is needed (woken, polled, replaced by a newer swap, settled by a
push) its partition asks for the body (:class:`service.pipeline.body_holds.BodyHolds`), and
:class:`BodyFetches` reads it back here: one reader of its own, without a group, manually
assigned, ``read_committed``, the offsets asked together read in one pass (seek to the first
one not read yet, fetch, take every asked offset the fetch covered, repeat).

An asked offset the fetch passed without finding the device's record there (removed by
compaction or by retention, or below the partition's beginning) is reported lost; the
partition goes on as :mod:`service.pipeline.body_holds` says, and logs it. A failed read (a
broker hiccup) is asked again after a pause that grows to 15 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from service.config import KafkaSettings
from service.kafka import reader
from service.metrics import Metrics
from service.pipeline.body_holds import Body
from service.pipeline.ledger import decode_entry
from service.pipeline.partition_core import PartitionCore
from service.pipeline.work import Republish, Work

log = structlog.get_logger(__name__)

READ_TIMEOUT_SECONDS: Final = 30.0
"""A read that has not found every asked offset by then fails (and is asked again)."""
MAX_RECORDS: Final = 500
_RETRY_INITIAL_SECONDS: Final = 0.5
_RETRY_MAX_SECONDS: Final = 15.0


class BodyReader:
    """Reads ledger records at given offsets (a consumer without a group, started lazily)."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._kafka = kafka
        self.topic = topic
        self._consumer: AIOKafkaConsumer | None = None
        self.records_read = 0  # records fetched, asked for or not (the cost of a read)

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = reader(self._kafka)
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def read(self, partition: int, asked: dict[str, int]) -> tuple[dict[str, Body], set[str]]:
        """The bodies of ``asked`` (device -> offset in ``partition``): found, and lost (the
        record at the offset is gone, or is not a kept swap of that device)."""
        consumer = await self._started()
        tp = TopicPartition(self.topic, partition)
        consumer.assign([tp])
        devices = {at: device for device, at in asked.items()}
        found: dict[str, Body] = {}
        lost: set[str] = set()
        pending = sorted(devices)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_TIMEOUT_SECONDS
        while pending:
            if loop.time() > deadline:
                raise TimeoutError(f"ledger partition {partition}: {len(pending)} bodies unread")
            first = pending[0]
            consumer.seek(tp, first)
            batch = await consumer.getmany(tp, timeout_ms=500, max_records=MAX_RECORDS)
            records = batch.get(tp, [])
            self.records_read += len(records)
            reached = records[-1].offset + 1 if records else await consumer.position(tp)
            if reached <= first:  # nothing fetched: past the partition's end?
                end = (await consumer.end_offsets([tp]))[tp]
                lost.update(devices[at] for at in pending if at >= end)
                pending = [at for at in pending if at < end]
                continue
            by_offset = {record.offset: record for record in records}
            for at in pending:
                if at >= reached:
                    break
                body = _body(by_offset.get(at), devices[at])
                if body is None:
                    lost.add(devices[at])
                else:
                    found[devices[at]] = body
            pending = [at for at in pending if at >= reached]
        return found, lost


def _body(record: ConsumerRecord[bytes, bytes] | None, device: str) -> Body | None:
    """The kept swap in ``record`` when it is ``device``'s ledger record holding one."""
    if record is None or record.key != device.encode() or record.value is None:
        return None
    entry = decode_entry(record.value)
    if entry is None or entry.value is None:
        return None
    return entry.value, entry.headers


class BodyFetches:
    """The member's reads of swap bodies: whenever a partition wants some, they are read and
    handed back to it, and what waited for them starts (``start``)."""

    def __init__(
        self,
        body_reader: BodyReader,
        cores: Callable[[], list[PartitionCore]],
        start: Callable[[PartitionCore, list[Work | Republish]], None],
        metrics: Metrics,
    ) -> None:
        self._reader = body_reader
        self._metrics = metrics
        self._cores = cores
        self._start = start
        self.wanted = asyncio.Event()

    def want(self) -> None:
        """A partition wants a body (its BodyHolds' ``on_want``)."""
        self.wanted.set()

    async def run(self) -> None:
        pause = 0.0
        try:
            while True:
                await self.wanted.wait()
                self.wanted.clear()
                if await self._read_all():
                    pause = 0.0
                    continue
                pause = min(max(pause * 2, _RETRY_INITIAL_SECONDS), _RETRY_MAX_SECONDS)
                await asyncio.sleep(pause)
                self.wanted.set()
        finally:
            await self._reader.stop()

    async def _read_all(self) -> bool:
        """One pass over the open partitions; False when a read failed (asked again later)."""
        ok = True
        for core in self._cores():
            if core.closed or core.closing:
                continue  # its next owner (or this member, reopening it) reads them
            asked = core.bodies.take()
            if not asked:
                continue
            reads = self._metrics.ledger_body_reads
            began = time.monotonic()
            try:
                found, lost = await self._reader.read(core.partition, asked)
            except asyncio.CancelledError:
                core.bodies.failed(asked)
                raise
            except Exception as exc:  # noqa: BLE001 - a broker hiccup: asked again
                core.bodies.failed(asked)
                reads.labels(result="failed").inc(len(asked))
                log.warning("ledger_body_read_failed", partition=core.partition, error=repr(exc))
                ok = False
                continue
            self._metrics.ledger_body_read_seconds.observe(time.monotonic() - began)
            reads.labels(result="found").inc(len(found))
            reads.labels(result="lost").inc(len(lost))
            if core.closed or core.closing:
                continue
            self._start(core, core.bodies.arrived(found, lost))
        return ok
