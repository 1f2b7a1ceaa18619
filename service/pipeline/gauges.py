"""The pipeline's gauges, set once a second: per-partition oldest unfinished record and consumer
lag, the in-flight and waiting swaps, and the bind watches (count, near expiry, poll overdue).

:class:`PipelineGauges` only reads the open partitions (:class:`OpenPartitions`) and the
consumer's positions; a partition's labels are removed when it is dropped (:meth:`forget`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from service.bind.watch import near_expiry
from service.metrics import Metrics
from service.pipeline.open_partitions import OpenPartitions

log = structlog.get_logger(__name__)


class PipelineGauges:
    """Sets the pipeline's gauges from the open partitions, once a second (lag every fifth)."""

    def __init__(self, input_topic: str, partitions: OpenPartitions, metrics: Metrics) -> None:
        self._input_topic = input_topic
        self._partitions = partitions
        self._metrics = metrics
        self._gauged: set[int] = set()
        self.urgent_topic: str | None = None  # the urgent lane, when it is read

    async def run(self, consumer: AIOKafkaConsumer) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1)
            ticks += 1
            self._gauge_urgent_wait()
            if ticks % 5 == 0:
                await self._gauge_lanes(consumer)
            for p, core in list(self._partitions.cores.items()):
                label = str(p)
                self._metrics.oldest_unfinished.labels(partition=label).set(
                    core.progress.oldest_unfinished_seconds()
                )
                self._gauged.add(p)
                if ticks % 5:
                    continue
                tp = TopicPartition(self._input_topic, p)
                high = consumer.highwater(tp)
                if high is None:
                    continue
                try:
                    position = await consumer.position(tp)
                except Exception:  # noqa: BLE001 - the partition may have just moved
                    log.debug("lag_position_unknown", partition=p)
                    continue
                behind = high - position + core.progress.unfinished
                self._metrics.consumer_lag.labels(partition=label).set(max(0, behind))
            self._metrics.inflight_events.set(self._partitions.inflight())
            self._metrics.deferred_events.set(self._partitions.waiting())
            self._gauge_watches()

    def forget(self, partition: int) -> None:
        """Remove a dropped partition's labels (they would otherwise keep their last value)."""
        if partition in self._gauged:
            self._gauged.discard(partition)
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(str(partition))
            with contextlib.suppress(KeyError):
                self._metrics.oldest_unfinished.remove(str(partition))

    def _gauge_urgent_wait(self) -> None:
        if self.urgent_topic is None:
            return
        cores = list(self._partitions.cores.values())
        oldest = max((c.outbox.lane(True).oldest_unfinished_seconds() for c in cores), default=0)
        self._metrics.urgent_oldest_waiting.set(oldest)

    async def _gauge_lanes(self, consumer: AIOKafkaConsumer) -> None:
        """Each lane's backlog: behind its partitions' ends, plus read and not finished."""
        lanes = [("bulk", self._input_topic, False)]
        if self.urgent_topic is not None:
            lanes.append(("urgent", self.urgent_topic, True))
        for lane, topic, urgent in lanes:
            backlog = 0
            for p, core in list(self._partitions.cores.items()):
                tp = TopicPartition(topic, p)
                high = consumer.highwater(tp)
                try:
                    position = await consumer.position(tp) if high is not None else None
                except Exception:  # noqa: BLE001 - the partition may have just moved
                    position = None
                behind = high - position if high is not None and position is not None else 0
                backlog += max(0, behind) + core.outbox.lane(urgent).unfinished
            self._metrics.lane_backlog.labels(lane=lane).set(backlog)

    def _gauge_watches(self) -> None:
        now_ms = int(time.time() * 1000)
        watched = near = 0
        overdue_ms = 0
        for core in self._partitions.cores.values():
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
