"""The commit loop: every commit interval (or at once when a batch is full) one transaction per
open partition, all partitions at the same time (:class:`PartitionCommitter`).

A partition fenced by a newer owner is paused and dropped, and the group is asked to hand the
partitions out again. A transaction that fails is retried with the next commit; after
``_MAX_COMMIT_FAILURES`` failures in a row the instance stops (:class:`FatalPipelineError`). A
final commit (revocation, shutdown) that fails leaves its work to be redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from aiokafka import AIOKafkaConsumer

from service.kafka import FatalPipelineError
from service.metrics import Metrics
from service.pipeline.committer import PartitionFencedError
from service.pipeline.open_partitions import OpenPartitions

log = structlog.get_logger(__name__)

_MAX_COMMIT_FAILURES = 30


class CommitLoop:
    """Commits the open partitions' decided outputs and offsets, one transaction each."""

    def __init__(
        self,
        input_topic: str,
        partitions: OpenPartitions,
        metrics: Metrics,
        *,
        interval_seconds: float,
        flush_now: asyncio.Event,
        consumer: Callable[[], AIOKafkaConsumer | None],
        drop: Callable[[int], Awaitable[None]],
        fail: Callable[[FatalPipelineError], None],
    ) -> None:
        self._input_topic = input_topic
        self._partitions = partitions
        self._metrics = metrics
        self._interval = interval_seconds
        self._flush_now = flush_now
        self._consumer = consumer
        self._drop = drop
        self._fail = fail

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), self._interval)
            self._flush_now.clear()
            await self.commit_all()

    async def commit_all(self, *, final: bool = False) -> None:
        committers = list(self._partitions.committers.items())
        results = await asyncio.gather(*(c.commit() for _, c in committers), return_exceptions=True)
        for (partition, committer), result in zip(committers, results, strict=True):
            if isinstance(result, PartitionFencedError):
                log.warning("partition_fenced", action="dropping it", partition=partition)
                consumer = self._consumer()
                if consumer is not None:
                    with contextlib.suppress(Exception):  # read nothing more of it until rejoined
                        # Every topic of the number: the input, the urgent lane, bind-notify.
                        mine = [tp for tp in consumer.assignment() if tp.partition == partition]
                        consumer.pause(*mine)
                await self._drop(partition)
                self._rejoin()
            elif isinstance(result, BaseException):
                if committer.failures >= _MAX_COMMIT_FAILURES or final:
                    message = f"{committer.failures} transactions in a row failed: {result}"
                    if final:
                        log.error(
                            "final_commit_failed", action="uncommitted work will be redelivered"
                        )
                    else:
                        self._fail(FatalPipelineError(message))
                else:
                    log.warning(
                        "transaction_failed",
                        action="retrying with the next commit",
                        partition=partition,
                        error=repr(result),
                    )
        self._metrics.inflight_events.set(self._partitions.inflight())

    def _rejoin(self) -> None:
        """Ask the group to hand the partitions out again: a partition fenced without a
        rebalance (``device-rebind ledger clear``) would otherwise stay dropped and paused until
        the next one. Its next owner (maybe this member) reloads its state from Kafka."""
        coordinator = getattr(self._consumer(), "_coordinator", None)
        if coordinator is not None:
            with contextlib.suppress(Exception):
                coordinator.request_rejoin()
