"""``device-rebind replay``: send dead letters or failed swaps through the service again.

After an operator fixed what made swaps fail (seeded a missing device, authorized an
application, fixed an upstream producer), ``replay`` reads the dead-letter topic or the
rebind-failed topic, keeps the records matching the filters, and produces the swaps they stand for
into the input topic.

* A failed swap is replayed from its original input record (found through the outcome's
  ``rebind-source-*`` headers) when the input topic still holds it, else rebuilt from the
  outcome's data (``verifyCode`` then defaults to the nodeId again).
* A replayed swap gets a new event id derived from the failure it answers
  (``uuid5(failure id)``): the service's duplicate memory sees the same id when the same failure
  is replayed twice, so the platform is called once. A new failure of the replayed swap has a
  new id, and can be replayed in turn.
* A dead letter is replayed as it was (same key, value and headers, minus the reason headers):
  if it is readable now, its own event id protects against double replays the same way.

* ``--fresh-time`` (failed swaps only) sends each swap with the time of the replay as its
  CloudEvent ``time`` and record timestamp, and says so in the plan. The service orders a
  device's swaps by that time, so the operator states on purpose that the swap is the device's
  latest: for a swap answered ``SWAP_TOO_OLD`` (older than the ledger's retention), which a
  replay with its own time would only get answered ``SWAP_TOO_OLD`` again.

* A swap keeps its lane: one that came by the urgent lane (``REBIND_TOPICS__DEVICE_SWAPPED_URGENT``:
  its outcome's or dead letter's origin names that topic) is read back from it and sent to it
  again, since a person was waiting on it; the rest go to the input topic. With no urgent lane
  configured, or its topic gone, an urgent swap goes to the input topic, and the plan says so.

``--dry-run`` prints what would be sent and how many, and sends nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.config import KafkaOnlySettings, KafkaSettings
from service.events import (
    DLQ_DETAIL_HEADER,
    DLQ_REASON_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
    RebindFailedEvent,
    parse_outcome,
)
from service.kafka import kafka_client_options, partition_counts
from service.kafka_connection import check_connection
from service.partitioner import partition_for
from service.platform.errors import SWAP_TOO_OLD

REPLAY_NAMESPACE = uuid.UUID("2f7d4c1e-5b8a-4f63-9a0e-7c1d2b3a4e5f")
REPLAY_OF_HEADER = "rebind-replay-of"
_DLQ_ONLY_HEADERS = frozenset(
    {
        DLQ_REASON_HEADER,
        DLQ_DETAIL_HEADER,
        SOURCE_TOPIC_HEADER,
        SOURCE_PARTITION_HEADER,
        SOURCE_OFFSET_HEADER,
    }
)

Source = Literal["dlq", "rebind-failed"]


@dataclass(frozen=True)
class Filters:
    error_codes: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None


@dataclass(frozen=True)
class Planned:
    """One record to produce into the input topic, and why."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    device: str
    code: str
    origin: str
    note: str
    timestamp_ms: int | None = None
    """The original record's timestamp, kept: a swap without a ``time`` attribute is ordered by
    it, so a replayed old swap never counts as newer than the swaps that came after it."""
    urgent: bool = False
    """It came by the urgent lane, and goes back to it (:func:`send`)."""


def replay_id(failure_id: str) -> str:
    return str(uuid.uuid5(REPLAY_NAMESPACE, failure_id))


def _in_range(timestamp_ms: int, filters: Filters) -> bool:
    at = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    if filters.since is not None and at < filters.since:
        return False
    return not (filters.until is not None and at >= filters.until)


async def _read_all(consumer: AIOKafkaConsumer, topic: str, settings: KafkaSettings) -> list[Any]:
    """Every committed record of ``topic`` up to its end when the replay started."""
    count = (await partition_counts(settings, [topic])).get(topic, 0)
    tps = [TopicPartition(topic, p) for p in range(count)]
    if not tps:
        raise SystemExit(f"device-rebind replay: topic {topic} does not exist")
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    ends = await consumer.end_offsets(tps)
    records: list[Any] = []
    remaining = {tp for tp in tps if ends[tp] > 0}
    while remaining:
        batch = await consumer.getmany(*remaining, timeout_ms=1000)
        for tp, msgs in batch.items():
            records.extend(m for m in msgs if m.offset < ends[tp])
        remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
    return records


async def _original(
    consumer: AIOKafkaConsumer, headers: dict[str, bytes], lanes: frozenset[str]
) -> Any | None:
    """The input record an outcome answers, if its headers say where and Kafka still has it.
    ``lanes``: the input topics that exist (a consumer assigned to a deleted one would have a
    broker that creates topics on demand create it again)."""
    try:
        topic = headers[SOURCE_TOPIC_HEADER].decode()
        partition = int(headers[SOURCE_PARTITION_HEADER])
        offset = int(headers[SOURCE_OFFSET_HEADER])
    except (KeyError, ValueError):
        return None
    if topic not in lanes:
        return None  # e.g. a retry-topic origin rewritten: rebuild from the outcome instead
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    consumer.seek(tp, offset)
    batch = await consumer.getmany(tp, timeout_ms=3000, max_records=1)
    for record in batch.get(tp, ()):
        return record if record.offset == offset else None
    return None


def _lanes(settings: KafkaOnlySettings) -> tuple[str, ...]:
    """The input topics a swap may come by: the input, and the urgent lane when configured."""
    topics = settings.topics
    urgent = topics.device_swapped_urgent
    return (topics.device_swapped, urgent) if urgent else (topics.device_swapped,)


def _came_urgent(headers: list[tuple[str, bytes]], settings: KafkaOnlySettings) -> bool:
    """The outcome or dead letter answers a swap of the urgent lane (its origin header says)."""
    urgent = settings.topics.device_swapped_urgent
    origin = dict(headers).get(SOURCE_TOPIC_HEADER)
    return bool(urgent) and origin is not None and origin.decode(errors="replace") == urgent


def _with_id(
    value: bytes | None, headers: list[tuple[str, bytes]], new_id: str, old_id: str
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The same swap under another event id, in whichever CloudEvents mode it was written."""
    kept = [(k, v) for k, v in headers if k not in (REPLAY_OF_HEADER, "ce_id")]
    kept.append((REPLAY_OF_HEADER, old_id.encode()))
    if any(k == "ce_id" for k, _ in headers):  # binary mode: the id is a header
        return value, [*kept, ("ce_id", new_id.encode())]
    body = orjson.loads(value or b"{}")
    body["id"] = new_id
    return orjson.dumps(body), kept


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _with_time(
    value: bytes | None, headers: list[tuple[str, bytes]], time: str
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The same swap with another CloudEvent ``time``, in whichever mode it was written."""
    if any(k == "ce_time" for k, _ in headers):  # binary mode: the time is a header
        return value, [(k, time.encode() if k == "ce_time" else v) for k, v in headers]
    body = orjson.loads(value or b"{}")
    body["time"] = time
    return orjson.dumps(body), headers


def _rebuilt(event: RebindFailedEvent, new_id: str) -> bytes:
    d = event.data
    data: dict[str, Any] = {**d.context, "deviceId": d.device_id, "nodeId": d.node_id}
    if d.app_id is not None:
        data["appId"] = d.app_id
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": new_id,
            "source": "/device-rebind/replay",
            "type": "com.iot.asset.device.swapped.v1",
            # The failure's own time: the original swap is gone, and a replay must not count
            # as newer than the swaps that came after the failure.
            "time": _rfc3339(event.time),
            "subject": d.device_id,
            "datacontenttype": "application/json",
            "data": data,
        }
    )


async def plan(
    settings: KafkaOnlySettings,
    source: Source,
    filters: Filters,
    *,
    fresh_time: datetime | None = None,
) -> list[Planned]:
    topic = settings.topics.dead_letter if source == "dlq" else settings.topics.rebind_failed
    counts = await partition_counts(settings.kafka, _lanes(settings))
    lanes = frozenset(name for name, count in counts.items() if count)
    consumer = AIOKafkaConsumer(
        **kafka_client_options(settings.kafka),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    planned: list[Planned] = []
    try:
        await consumer.start()
        for record in await _read_all(consumer, topic, settings.kafka):
            if filters.limit is not None and len(planned) >= filters.limit:
                break
            if not _in_range(record.timestamp, filters):
                continue
            headers = list(record.headers or ())
            item = (
                _plan_dead_letter(record, headers, filters, _came_urgent(headers, settings))
                if source == "dlq"
                else await _plan_failure(
                    consumer, record, headers, filters, settings, lanes=lanes, fresh_time=fresh_time
                )
            )
            if item is not None:
                planned.append(item)
    finally:
        await consumer.stop()
    return planned


def _plan_dead_letter(
    record: Any, headers: list[tuple[str, bytes]], filters: Filters, urgent: bool
) -> Planned | None:
    found = dict(headers)
    reason = found.get(DLQ_REASON_HEADER, b"").decode(errors="replace")
    if filters.error_codes and reason not in filters.error_codes:
        return None
    if filters.categories:
        return None  # dead letters have a reason, not a category
    origin = "{}:{}:{}".format(
        *(
            found.get(h, b"?").decode(errors="replace")
            for h in (SOURCE_TOPIC_HEADER, SOURCE_PARTITION_HEADER, SOURCE_OFFSET_HEADER)
        )
    )
    return Planned(
        record.key,
        record.value,
        [(k, v) for k, v in headers if k not in _DLQ_ONLY_HEADERS],
        (record.key or b"").decode(errors="replace"),
        reason,
        origin,
        "as it was, to the urgent lane" if urgent else "as it was",
        record.timestamp,
        urgent,
    )


async def _plan_failure(
    consumer: AIOKafkaConsumer,
    record: Any,
    headers: list[tuple[str, bytes]],
    filters: Filters,
    settings: KafkaOnlySettings,
    *,
    lanes: frozenset[str],
    fresh_time: datetime | None = None,
) -> Planned | None:
    try:
        event = parse_outcome(record.value or b"")
    except ValueError:
        return None
    if not isinstance(event, RebindFailedEvent):
        return None
    d = event.data
    if filters.error_codes and d.error_code not in filters.error_codes:
        return None
    if filters.categories and d.category not in filters.categories:
        return None
    new_id = replay_id(event.id)
    original = await _original(consumer, dict(headers), lanes)
    if original is not None:
        value, out_headers = _with_id(
            original.value, list(original.headers or ()), new_id, d.swap_event_id
        )
        note = "original event"
        timestamp_ms = original.timestamp
    else:
        value = _rebuilt(event, new_id)
        out_headers = [(REPLAY_OF_HEADER, d.swap_event_id.encode())]
        note = "rebuilt from the outcome"
        timestamp_ms = record.timestamp
    if fresh_time is not None:
        value, out_headers = _with_time(value, out_headers, _rfc3339(fresh_time))
        note += f", fresh time {_rfc3339(fresh_time)}: sent as the device's latest swap"
        timestamp_ms = int(fresh_time.timestamp() * 1000)
    elif d.error_code == SWAP_TOO_OLD:
        note += ", its own time: SWAP_TOO_OLD again (--fresh-time to send it as the latest)"
    urgent = _came_urgent(headers, settings)
    if urgent:
        note += ", to the urgent lane"
    return Planned(
        d.device_id.encode(),
        value,
        out_headers,
        d.device_id,
        d.error_code,
        f"{record.topic}:{record.partition}:{record.offset}",
        note,
        timestamp_ms,
        urgent,
    )


async def lanes_for(
    settings: KafkaOnlySettings, planned: Sequence[Planned]
) -> tuple[list[Planned], dict[str, int]]:
    """The plan with each swap's topic settled, and the partition count of each topic: a swap of
    the urgent lane whose topic is not configured or does not exist goes to the input topic
    (said in its note)."""
    bulk, urgent = settings.topics.device_swapped, settings.topics.device_swapped_urgent
    names = [bulk, urgent] if urgent and any(p.urgent for p in planned) else [bulk]
    counts = await partition_counts(settings.kafka, names)
    if urgent and counts.get(urgent):
        return list(planned), counts
    settled = [
        dataclasses.replace(p, urgent=False, note=f"{p.note} (no urgent lane: to the input topic)")
        if p.urgent
        else p
        for p in planned
    ]
    return settled, counts


async def send(
    settings: KafkaOnlySettings, planned: Sequence[Planned], counts: dict[str, int]
) -> None:
    """Produce the planned swaps, each to its lane's topic (:func:`lanes_for`), to the partition
    ``REBIND_KAFKA__PARTITIONER`` names for their key (where the service's owner of the device's
    ledger reads them; the urgent lane is co-partitioned with the input)."""
    producer = AIOKafkaProducer(
        **kafka_client_options(settings.kafka), enable_idempotence=True, acks="all"
    )
    try:
        await producer.start()
        futures = []
        for p in planned:
            topic = settings.topics.device_swapped_urgent if p.urgent else None
            topic = topic or settings.topics.device_swapped
            partitions = counts.get(topic, 0)
            futures.append(
                await producer.send(
                    topic,
                    p.value,
                    key=p.key,
                    headers=p.headers,
                    timestamp_ms=p.timestamp_ms,
                    partition=(
                        partition_for(p.key, partitions, settings.kafka.partitioner)
                        if p.key and partitions
                        else None
                    ),
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def print_plan(planned: Sequence[Planned], out: TextIO, *, dry_run: bool) -> None:
    for p in planned:
        print(f"{p.origin}\tdevice={p.device}\tcode={p.code}\t{p.note}", file=out)
    verb = "would replay" if dry_run else "replayed"
    print(f"{verb} {len(planned)} record(s)", file=out)


async def replay(
    settings: KafkaOnlySettings,
    source: Source,
    filters: Filters,
    *,
    dry_run: bool,
    out: TextIO,
    fresh_time: datetime | None = None,
) -> int:
    await check_connection(settings.kafka)  # a TLS or SASL refusal in one line, naming it
    planned, counts = await lanes_for(
        settings, await plan(settings, source, filters, fresh_time=fresh_time)
    )
    if not dry_run and planned:
        await send(settings, planned, counts)
    print_plan(planned, out, dry_run=dry_run)
    return len(planned)
