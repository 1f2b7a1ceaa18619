"""Recognising an input event seen before, across restarts and rebalances.

Where the memory lives: a compacted topic (``REBIND_TOPICS__DEDUPE``), co-partitioned with the
input topic. When an event's outcome is committed, a record keyed by the event's CloudEvent ``id``
is written to the same partition number in the same Kafka transaction; its value is the outcome
record itself (topic and key in headers). A swap that was deferred gets a marker record instead,
replaced by the outcome when it ends.

In memory, each assigned partition keeps an index ``hash64(event id) -> offset`` of its last
``max_entries`` records (loaded from the topic's tail when the partition is assigned, extended
as outcomes are committed), so memory is bounded whatever the backlog. A duplicate is answered
by reading its stored outcome back and publishing it again (same bytes, same deterministic id),
without calling the platform.

How long duplicates are recognised: the last ``max_entries`` events of each partition, within
the topic's retention (``retention.ms`` with ``cleanup.policy=compact,delete``; 7 days in the
shipped manifests).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from service.pipeline.tracker import Output

log = structlog.get_logger(__name__)

OUTCOME_TOPIC_HEADER: Final = "rebind-outcome-topic"
OUTCOME_KEY_HEADER: Final = "rebind-outcome-key"
DEFERRED_MARKER: Final = "deferred"


def id_hash(event_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Seen:
    """What is known of an event id seen before."""

    offset: int | None  # its record in the dedupe topic, None while not yet committed
    pending: tuple[Output, ...]  # its outcome, while not yet committed


class _PartitionIndex:
    __slots__ = ("committed", "max_entries", "order", "pending")

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.committed: dict[int, int] = {}
        self.order: deque[int] = deque()
        self.pending: dict[int, tuple[Output, ...]] = {}

    def add(self, key: int, offset: int) -> None:
        if key not in self.committed:
            self.order.append(key)
        self.committed[key] = offset
        while len(self.order) > self.max_entries:
            self.committed.pop(self.order.popleft(), None)


class DedupeStore:
    def __init__(self, topic: str, max_entries: int, client_options: dict[str, Any]) -> None:
        self.topic = topic
        self._max_entries = max_entries
        self._options = client_options
        self._index: dict[int, _PartitionIndex] = {}
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

    def partitions(self) -> int | None:
        assert self._reader is not None
        found = self._reader.partitions_for_topic(self.topic)
        return None if found is None else len(found)

    async def load(self, partitions: list[int]) -> int:
        """Index the tail of each partition, all in one pass; return how many records were read."""
        async with self._reading:
            return await self._load(partitions)

    async def _load(self, partitions: list[int]) -> int:
        reader = self._reader
        assert reader is not None
        tps = [TopicPartition(self.topic, p) for p in partitions]
        if not tps:
            return 0
        indexes = {tp: _PartitionIndex(self._max_entries) for tp in tps}
        reader.assign(tps)
        starts = await reader.beginning_offsets(tps)
        ends = await reader.end_offsets(tps)
        for tp in tps:
            reader.seek(tp, max(starts[tp], ends[tp] - self._max_entries))
        loaded = 0
        remaining = {tp for tp in tps if ends[tp] > starts[tp]}
        while remaining:
            batch = await reader.getmany(*remaining, timeout_ms=500, max_records=5000)
            for tp, records in batch.items():
                for record in records:
                    if record.key is not None:
                        indexes[tp].add(
                            id_hash(record.key.decode("utf-8", "replace")), record.offset
                        )
                        loaded += 1
            remaining = {tp for tp in remaining if await reader.position(tp) < ends[tp]}
        for tp, index in indexes.items():
            self._index[tp.partition] = index
        return loaded

    def drop(self, partition: int) -> None:
        self._index.pop(partition, None)

    def seen(self, partition: int, event_id: str) -> Seen | None:
        index = self._index.get(partition)
        if index is None:
            return None
        key = id_hash(event_id)
        pending = index.pending.get(key)
        if pending is not None:
            return Seen(None, pending)
        offset = index.committed.get(key)
        return None if offset is None else Seen(offset, ())

    def record(self, partition: int, event_id: str, outputs: list[Output]) -> Output:
        """The dedupe record for an event's outcome (or deferral); remembered as pending."""
        index = self._index.get(partition)
        final = [o for o in outputs if o.outcome in ("credential_updated", "rebind_failed")]
        if final:
            out = final[0]
            headers = [
                (OUTCOME_TOPIC_HEADER, out.topic.encode()),
                (OUTCOME_KEY_HEADER, out.key or b""),
                *out.headers,
            ]
            value = out.value
            if index is not None:
                index.pending[id_hash(event_id)] = (out,)
        else:
            headers = [(OUTCOME_TOPIC_HEADER, DEFERRED_MARKER.encode())]
            value = b""
            if index is not None:
                index.pending[id_hash(event_id)] = ()
        return Output(self.topic, event_id.encode(), value, headers, partition=partition)

    def committed(self, partition: int, event_id: str, offset: int) -> None:
        index = self._index.get(partition)
        if index is None:
            return
        key = id_hash(event_id)
        index.pending.pop(key, None)
        index.add(key, offset)

    def forget_pending(self, partition: int, event_id: str) -> None:
        index = self._index.get(partition)
        if index is not None:
            index.pending.pop(id_hash(event_id), None)

    async def fetch(self, partition: int, offset: int) -> Output | None:
        """The outcome stored at ``offset``; None for a deferral marker or a compacted record."""
        async with self._reading:
            return await self._fetch(partition, offset)

    async def _fetch(self, partition: int, offset: int) -> Output | None:
        reader = self._reader
        assert reader is not None
        tp = TopicPartition(self.topic, partition)
        reader.assign([tp])
        reader.seek(tp, offset)
        batch = await reader.getmany(tp, timeout_ms=5000, max_records=1)
        for record in batch.get(tp, ()):
            if record.offset != offset:
                return None  # compacted away: a newer record of the key replaced it
            headers = dict(record.headers or ())
            topic = headers.get(OUTCOME_TOPIC_HEADER, b"").decode()
            if topic in ("", DEFERRED_MARKER):
                return None
            return Output(
                topic,
                headers.get(OUTCOME_KEY_HEADER) or None,
                record.value,
                [
                    (k, v)
                    for k, v in (record.headers or ())
                    if k not in (OUTCOME_TOPIC_HEADER, OUTCOME_KEY_HEADER)
                ],
                outcome="duplicate",
            )
        return None
