"""``device-rebind swap``: publish one swap by hand, for support staff who must re-key a device
without the inventory system.

The event is built and validated with the same model the service decodes input with
(:func:`service.events.decode_swap`), so what is refused here would have been dead-lettered; it
is produced to the partition ``REBIND_KAFKA__PARTITIONER`` names for the deviceId, on the input
topic, or with ``--urgent`` on the urgent lane. Its CloudEvent ``time`` is now: as the device's
latest swap, it supersedes any older one still waiting. With ``wait`` the outcome topics are read
(``read_committed``, from their ends as they were before the swap was sent) until the outcome
whose ``swapEventId`` is this event's arrives.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.config import KafkaOnlySettings
from service.events import DATA_CONTENT_TYPE, SWAPPED_TYPE, SwapEvent, decode_swap
from service.kafka import client_options, partition_counts, reader
from service.kafka_connection import check_connection
from service.partitioner import partition_for

DEFAULT_SOURCE = "/device-rebind/cli"


class SwapCommandError(Exception):
    """What stops the command, in one line (exit 1)."""


@dataclass(frozen=True)
class Sent:
    event_id: str
    topic: str
    partition: int
    offset: int


def build(
    device_id: str,
    node_id: str,
    *,
    verify_code: str | None = None,
    timeout: int | None = None,
    source: str = DEFAULT_SOURCE,
    now: datetime | None = None,
) -> tuple[bytes, SwapEvent]:
    """The swap as a structured CloudEvent, validated by the service's own model; raises
    :class:`service.events.InvalidEvent` with the reason the service would dead-letter it for."""
    data: dict[str, Any] = {"deviceId": device_id, "nodeId": node_id}
    if verify_code is not None:
        data["verifyCode"] = verify_code
    if timeout is not None:
        data["timeout"] = timeout
    when = (now or datetime.now(UTC)).astimezone(UTC)
    event = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": source,
        "type": SWAPPED_TYPE,
        "time": when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "subject": device_id,
        "datacontenttype": DATA_CONTENT_TYPE,
        "data": data,
    }
    value = orjson.dumps(event)
    return value, decode_swap(value, [])


def topic_for(settings: KafkaOnlySettings, *, urgent: bool) -> str:
    if not urgent:
        return settings.topics.device_swapped
    if not settings.topics.device_swapped_urgent:
        raise SwapCommandError(
            "--urgent: the urgent lane is off (REBIND_TOPICS__DEVICE_SWAPPED_URGENT is empty)"
        )
    return settings.topics.device_swapped_urgent


async def send_and_wait(
    settings: KafkaOnlySettings,
    value: bytes,
    swap: SwapEvent,
    *,
    urgent: bool,
    wait: float | None,
    out: TextIO,
) -> dict[str, Any] | None:
    """Produce the swap, print its event id; with ``wait`` (seconds), return its outcome event
    (None when none arrived in time)."""
    await check_connection(settings.kafka)
    topic = topic_for(settings, urgent=urgent)
    outputs = [settings.topics.credential_updated, settings.topics.rebind_failed]
    counts = await partition_counts(settings.kafka, [topic, *outputs])
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise SwapCommandError(f"topics missing: {', '.join(missing)}")
    consumer: AIOKafkaConsumer | None = None
    if wait is not None:  # the outcome topics' ends before the swap is sent: nothing is missed
        consumer = reader(settings.kafka)
        await consumer.start()
        tps = [TopicPartition(t, p) for t in outputs for p in range(counts[t])]
        consumer.assign(tps)
        for tp, end in (await consumer.end_offsets(tps)).items():
            consumer.seek(tp, end)
    try:
        sent = await _send(settings, topic, counts[topic], value, swap)
        out.write(
            f"{sent.event_id}\t{'urgent' if urgent else 'bulk'} swap of {swap.data.device_id} "
            f"sent to {sent.topic} partition {sent.partition} offset {sent.offset}\n"
        )
        out.flush()
        if consumer is None or wait is None:
            return None
        return await _outcome(consumer, sent.event_id, wait)
    finally:
        if consumer is not None:
            await consumer.stop()


async def _send(
    settings: KafkaOnlySettings, topic: str, partitions: int, value: bytes, swap: SwapEvent
) -> Sent:
    key = swap.data.device_id.encode()
    producer = AIOKafkaProducer(
        **client_options(settings.kafka), enable_idempotence=True, acks="all"
    )
    await producer.start()
    try:
        partition = partition_for(key, partitions, settings.kafka.partitioner)
        meta = await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()
    return Sent(swap.id, topic, meta.partition, meta.offset)


async def _outcome(consumer: AIOKafkaConsumer, event_id: str, wait: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        batches = await consumer.getmany(timeout_ms=int(min(left, 1.0) * 1000))
        for records in batches.values():
            for record in records:
                try:
                    event = orjson.loads(record.value or b"")
                except orjson.JSONDecodeError:
                    continue
                data = event.get("data") if isinstance(event, dict) else None
                if isinstance(data, dict) and data.get("swapEventId") == event_id:
                    return dict(event)
    return None


def describe(outcome: dict[str, Any]) -> str:
    """One line: the outcome's type and what a person needs of it."""
    data = outcome.get("data", {})
    kind = str(outcome.get("type", "")).rsplit(".", 2)[-2] if outcome.get("type") else "outcome"
    if "errorCode" in data:
        return (
            f"{kind}: {data.get('errorCode')} {data.get('errorDesc', '')} "
            f"(category {data.get('category')}; {data.get('recommendedHandling', '')})"
        ).rstrip()
    return f"{kind}: device {data.get('deviceId')} re-keyed to nodeId {data.get('nodeId')}"


def run(settings: KafkaOnlySettings, value: bytes, swap: SwapEvent, **kw: Any) -> Any:
    return asyncio.run(send_and_wait(settings, value, swap, **kw))
