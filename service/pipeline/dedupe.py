"""Recognising an input event seen before (same CloudEvent ``source`` and ``id``), across restarts
and rebalances.

Where the memory lives: a compacted topic (``REBIND_TOPICS__DEDUPE``), co-partitioned with the
input topic. When an event's final outcome is published, a record keyed by the event's
``source`` and ``id`` is written to the same partition number in the same Kafka transaction; its
value is the outcome record itself (topic, key and the input offset it answers in headers).

In memory, each assigned partition keeps an index ``hash64(source, id) -> offset`` of its last
``max_entries`` records (loaded from the topic's tail when the partition is assigned, extended
as outcomes are committed), so memory is bounded whatever the backlog. A duplicate is answered
by reading its stored outcome back and publishing it again (same bytes, same deterministic id),
without calling the platform.

How long duplicates are recognised: the last ``max_entries`` events of each partition, within
the topic's retention (``retention.ms`` with ``cleanup.policy=compact,delete``; 7 days in the
shipped manifests). Past that, the per-device ledger still answers a duplicate of a device's
latest swap without a call, and never lets an older swap roll a device back.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from service.pipeline.records import OutcomeKind, Output

log = structlog.get_logger(__name__)

OUTCOME_TOPIC_HEADER: Final = "rebind-outcome-topic"
OUTCOME_KEY_HEADER: Final = "rebind-outcome-key"
ORIGIN_OFFSET_HEADER: Final = "rebind-origin-offset"
_SERVICE_HEADERS: Final = frozenset(
    (OUTCOME_TOPIC_HEADER, OUTCOME_KEY_HEADER, ORIGIN_OFFSET_HEADER)
)


def dedupe_key(source: str, event_id: str) -> str:
    """CloudEvents identify an event by ``source`` and ``id`` together."""
    return f"{source}\x1f{event_id}"


def id_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Seen:
    """What is known of an event seen before."""

    offset: int | None  # its record in the dedupe topic, None while not yet committed
    pending: Output | None  # its outcome, while not yet committed


class DedupeIndex:
    """The memory of one partition (pure: no I/O)."""

    __slots__ = ("committed_offsets", "max_entries", "order", "partition", "pending", "topic")

    def __init__(self, topic: str, partition: int, max_entries: int) -> None:
        self.topic = topic
        self.partition = partition
        self.max_entries = max_entries
        self.committed_offsets: dict[int, int] = {}
        self.order: deque[int] = deque()
        self.pending: dict[int, Output] = {}

    def add(self, key: int, offset: int) -> None:
        if key not in self.committed_offsets:
            self.order.append(key)
        self.committed_offsets[key] = offset
        while len(self.order) > self.max_entries:
            self.committed_offsets.pop(self.order.popleft(), None)

    def seen(self, source: str, event_id: str) -> Seen | None:
        key = id_hash(dedupe_key(source, event_id))
        pending = self.pending.get(key)
        if pending is not None:
            return Seen(None, pending)
        offset = self.committed_offsets.get(key)
        return None if offset is None else Seen(offset, None)

    def record(self, source: str, event_id: str, outcome: Output, origin_offset: int) -> Output:
        """The dedupe record of an event's final outcome; remembered as pending until committed."""
        key = dedupe_key(source, event_id)
        self.pending[id_hash(key)] = outcome
        headers = [
            (OUTCOME_TOPIC_HEADER, outcome.topic.encode()),
            (OUTCOME_KEY_HEADER, outcome.key or b""),
            (ORIGIN_OFFSET_HEADER, str(origin_offset).encode()),
            *outcome.headers,
        ]
        return Output(self.topic, key.encode(), outcome.value, headers, partition=self.partition)

    def committed(self, key: bytes, offset: int) -> None:
        hashed = id_hash(key.decode("utf-8", "replace"))
        self.pending.pop(hashed, None)
        self.add(hashed, offset)

    def forget_pending(self, key: bytes) -> None:
        self.pending.pop(id_hash(key.decode("utf-8", "replace")), None)


class DedupeReader:
    """Loads a partition's tail into a :class:`DedupeIndex`; fetches a stored outcome."""

    def __init__(self, topic: str, max_entries: int, client_options: dict[str, Any]) -> None:
        self.topic = topic
        self._max_entries = max_entries
        self._options = client_options
        self._reader: AIOKafkaConsumer | None = None
        self._reading = asyncio.Lock()  # one reader, used by one caller at a time

    async def start(self) -> None:
        self._reader = AIOKafkaConsumer(
            **self._options,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await self._reader.start()

    async def stop(self) -> None:
        if self._reader is not None:
            await self._reader.stop()

    async def load(self, partitions: list[int]) -> dict[int, DedupeIndex]:
        """Index the tail of each partition, all in one pass."""
        async with self._reading:
            return await self._load(partitions)

    async def _load(self, partitions: list[int]) -> dict[int, DedupeIndex]:
        reader = self._reader
        assert reader is not None
        indexes = {p: DedupeIndex(self.topic, p, self._max_entries) for p in partitions}
        tps = [TopicPartition(self.topic, p) for p in partitions]
        if not tps:
            return indexes
        reader.assign(tps)
        starts = await reader.beginning_offsets(tps)
        ends = await reader.end_offsets(tps)
        for tp in tps:
            reader.seek(tp, max(starts[tp], ends[tp] - self._max_entries))
        remaining = {tp for tp in tps if ends[tp] > starts[tp]}
        while remaining:
            batch = await reader.getmany(*remaining, timeout_ms=500, max_records=5000)
            for tp, records in batch.items():
                index = indexes[tp.partition]
                for record in records:
                    if record.key is not None:
                        index.add(id_hash(record.key.decode("utf-8", "replace")), record.offset)
            remaining = {tp for tp in remaining if await reader.position(tp) < ends[tp]}
        return indexes

    async def fetch(self, partition: int, offset: int) -> tuple[Output, int | None] | None:
        """The outcome stored at ``offset`` and the input offset it answered; None when it was
        compacted away."""
        async with self._reading:
            reader = self._reader
            assert reader is not None
            tp = TopicPartition(self.topic, partition)
            reader.assign([tp])
            reader.seek(tp, offset)
            batch = await reader.getmany(tp, timeout_ms=5000, max_records=1)
            if not batch.get(tp):
                first = (await reader.beginning_offsets([tp]))[tp]
                if offset < first:
                    return None  # deleted by retention
                # Nothing came back in time (a slow or moving broker): not "compacted away",
                # which would answer the duplicate without its outcome. Read it again later.
                raise KafkaTimeoutError(f"no record fetched at {self.topic}:{partition}@{offset}")
        for record in batch.get(tp, ()):
            if record.offset != offset:
                return None  # compacted away: a newer record of the key replaced it
            headers = dict(record.headers or ())
            topic = headers.get(OUTCOME_TOPIC_HEADER, b"").decode()
            if not topic or record.value is None:
                return None
            origin = headers.get(ORIGIN_OFFSET_HEADER)
            output = Output(
                topic,
                headers.get(OUTCOME_KEY_HEADER) or None,
                record.value,
                [(k, v) for k, v in (record.headers or ()) if k not in _SERVICE_HEADERS],
                outcome=OutcomeKind.DUPLICATE,
            )
            return output, (int(origin) if origin else None)
        return None
