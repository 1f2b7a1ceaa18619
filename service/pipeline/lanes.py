"""The topics a member reads for each partition number it owns, and how each is held back.

Partition p of the bulk input, of the urgent lane (when it is on) and of the bind-notify topic go
to one member (:mod:`service.assignor`) and to one :class:`PartitionCore`: a device's bulk and
urgent swaps meet in one ledger, so the latest swap wins across lanes, and both lanes' offsets
commit in the partition's transactions. Each lane has a buffer bound of its own: the bulk
backlog pauses the bulk partitions only, so an urgent swap is always read at once (it waits
behind nothing but the urgent swaps read before it, and the input hold).

The bulk buffer is shared fairly by the partitions once it is contested: while it is at least
half full, a partition holding its share of it (the bound over the partitions owned) or more is
paused until it is down to half its share (or the buffer to a quarter), so the others' records
are read too. Without that the buffer filled from whichever partition's fetch came first, and a
backlog was worked one partition at a time (500 swaps of one, then 420 of the next, in bench
16): the other partitions' devices waited a minute, and every bind watch fell in the one lane
of the poll grid (``service.bind.schedule``) of its partition, polled at a sixth of the poll
share. A partition alone with a backlog still fills half the buffer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from service.metrics import Metrics
from service.pipeline.partition_core import PartitionCore
from service.pipeline.records import ConsumedRecord

log = structlog.get_logger(__name__)


class Lanes:
    """The input lanes of one member: their topics, and whether each is paused for its buffer."""

    def __init__(
        self, bulk: str, notify: str | None, max_buffered: int, *, share_reads: bool = False
    ) -> None:
        self.bulk = bulk
        self.urgent: str | None = None  # set at start once the topic is known to exist
        self.notify = notify
        self._max_buffered = max_buffered
        self._share_reads = share_reads
        self.bulk_paused = False  # the whole bulk lane: its buffer is full
        self.bulk_full: set[int] = set()  # bulk partitions paused for holding their share
        self.urgent_paused = False

    def subscribed(self) -> list[str]:
        return [t for t in (self.bulk, self.urgent, self.notify) if t is not None]

    def inputs(self, partitions: Iterable[int]) -> list[TopicPartition]:
        """The input partitions (both lanes) of these numbers."""
        topics = [t for t in (self.bulk, self.urgent) if t is not None]
        return [TopicPartition(t, p) for p in partitions for t in topics]

    def of(self, partitions: Iterable[int], urgent: bool) -> list[TopicPartition]:
        topic = self.urgent if urgent else self.bulk
        return [] if topic is None else [TopicPartition(topic, p) for p in partitions]

    def resumed(self) -> None:
        """Every input partition was resumed (a new assignment)."""
        self.bulk_paused = self.urgent_paused = False
        self.bulk_full.clear()

    def resume(self, consumer: AIOKafkaConsumer, partitions: Sequence[int]) -> None:
        """Resume the lanes whose buffer is not full (the input hold was released)."""
        if not self.bulk_paused:
            consumer.resume(*self.of((p for p in partitions if p not in self.bulk_full), False))
        if not self.urgent_paused:
            consumer.resume(*self.of(partitions, urgent=True))

    def backpressure(
        self,
        consumer: AIOKafkaConsumer,
        cores: dict[int, PartitionCore],
        held: bool,
        waiting: float = 0.0,
    ) -> None:
        """Pause a lane whose records read and not finished reach the bound, resume it at half;
        the bulk lane also while ``waiting`` (decided outputs waiting for their transactions,
        against their bound) is 1 or more, so a broker that falls behind holds the bulk input
        instead of letting the backlog pile up in memory; held: every lane paused."""
        if held:
            consumer.pause(*self.inputs(cores))
            return
        unfinished = {p: core.progress.unfinished for p, core in cores.items()}
        bulk = max(sum(unfinished.values()) / self._max_buffered, waiting)
        was = set(cores) if self.bulk_paused else self.bulk_full & set(cores)
        self.bulk_paused = _paused(bulk, self.bulk_paused)
        self.bulk_full = self._full(unfinished, bulk)
        now = set(cores) if self.bulk_paused else self.bulk_full
        if now:  # every time: a new assignment (even of kept partitions) resumes them all
            consumer.pause(*self.of(sorted(now), urgent=False))
        if was - now:
            consumer.resume(*self.of(sorted(was - now), urgent=False))
        if self.urgent is not None:
            urgent = sum(core.outbox.lane(True).unfinished for core in cores.values())
            load = urgent / self._max_buffered
            self.urgent_paused = self._one(consumer, cores, load, self.urgent_paused, urgent=True)

    def batch(self, partitions: int, max_poll_records: int) -> int:
        """Records to take in one read. With ``share_reads`` (the buffer is bound by the budget:
        its records wait long in it, and reads are few) at most a partition's share of the bulk
        buffer, so one read of one partition's fetch cannot fill it (or overrun it: 500 records
        against a bound of 300 at 300 calls a minute before); else ``max_poll_records`` (the
        buffer turns over in well under a second, and reads of a share cost section 1 of
        ``make bench`` a fifth of its throughput)."""
        if not self._share_reads:
            return max_poll_records
        return min(max_poll_records, self._share(partitions))

    def _share(self, partitions: int) -> int:
        """A partition's share of the bulk buffer."""
        return max(1, math.ceil(self._max_buffered / max(1, partitions)))

    def _full(self, unfinished: dict[int, int], load: float) -> set[int]:
        """The bulk partitions to pause for their share: holding it or more while the buffer is
        at least half full; kept paused until down to half of it, or the buffer to a quarter."""
        if load <= 0.25 or not unfinished:
            return set()
        share = self._share(len(unfinished))
        return {
            p
            for p, n in unfinished.items()
            if (load >= 0.5 and n >= share) or (p in self.bulk_full and n > share / 2)
        }

    def _one(
        self,
        consumer: AIOKafkaConsumer,
        cores: dict[int, PartitionCore],
        load: float,
        paused: bool,
        *,
        urgent: bool,
    ) -> bool:
        """``load``: how full the lane's bound is (1: full); paused at 1, resumed at half."""
        now = _paused(load, paused)
        if now:  # every time, as the bulk lane's
            consumer.pause(*self.of(cores, urgent))
        elif paused and not now:
            consumer.resume(*self.of(cores, urgent))
        return now

    def urgent_backlog(self, cores: dict[int, PartitionCore]) -> int:
        """Urgent swaps read and not finished."""
        if self.urgent is None:
            return 0
        return sum(core.outbox.lane(True).unfinished for core in cores.values())


def _paused(load: float, paused: bool) -> bool:
    """A lane's pause for its bound (``load`` 1: full): from full until down to half."""
    return load >= 1 or (paused and load > 0.5)


def accept_pushes(core: PartitionCore, records: Sequence[ConsumedRecord], metrics: Metrics) -> None:
    """bindDevice pushes read back from the bind-notify topic, for the partition's watches."""
    watches = core.watches
    duplicates, unproven = watches.duplicate_pushes, watches.unproven_pushes
    for record in records:
        core.notify(record)
    if watches.duplicate_pushes > duplicates:
        metrics.bind_notifications.labels(result="duplicate").inc(
            watches.duplicate_pushes - duplicates
        )
    if watches.unproven_pushes > unproven:
        metrics.bind_notifications.labels(result="unproven").inc(watches.unproven_pushes - unproven)
