"""``device-rebind ledger clear DEVICE_ID``: an operator removes a device's ledger entry.

The ledger decides which swap of a device is the latest. An entry that should not be there (a
swap dated far ahead, accepted before ``REBIND_KAFKA__MAX_CLOCK_SKEW_SECONDS`` existed or with a
bound set too wide) makes every later swap of the device ``SUPERSEDED``; clearing it frees the
device.

The tombstone goes to the ledger partition the device's input partition maps to (co-partitioned:
the same number), in a transaction of that input partition's transactional id
(:func:`service.pipeline.committer.transactional_id`). Initialising that id fences the
partition's current owner exactly as a new owner would: its next transaction fails, it drops the
partition and the group hands it out again, and the next owner reloads a ledger without the
entry. ``--dry-run`` prints what it found and what it would do, and writes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.config import KafkaOnlySettings
from service.kafka import client_options, partition_counts, read_to_end
from service.kafka_connection import check_connection
from service.partitioner import partition_for
from service.pipeline.committer import transactional_id
from service.pipeline.ledger import decode_entry


class LedgerToolError(Exception):
    """The command cannot do what was asked (a topic missing, not co-partitioned)."""


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


async def clear(settings: KafkaOnlySettings, device: str, *, dry_run: bool, out: TextIO) -> bool:
    """Clear ``device``'s ledger entry; True when there was one (and, unless ``dry_run``, it
    is cleared now)."""
    kafka, topics = settings.kafka, settings.topics
    await check_connection(kafka)
    counts = await partition_counts(kafka, [topics.device_swapped, topics.ledger])
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise LedgerToolError(f"topics missing: {', '.join(missing)}")
    if counts[topics.device_swapped] != counts[topics.ledger]:
        raise LedgerToolError(f"the input and ledger topics are not co-partitioned: {counts}")
    key = device.encode()
    partition = partition_for(key, counts[topics.device_swapped], kafka.partitioner)
    tid = transactional_id(kafka, topics.device_swapped, partition)
    found: list[Any] = []
    consumer = AIOKafkaConsumer(
        **client_options(kafka),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        tp = TopicPartition(topics.ledger, partition)
        await read_to_end(
            consumer, [tp], lambda _, record: found.append(record) if record.key == key else None
        )
    finally:
        await consumer.stop()
    print(
        f"device {device}: input partition {partition} ({kafka.partitioner} partitioner), "
        f"ledger {topics.ledger} partition {partition}",
        file=out,
    )
    last = found[-1] if found else None
    entry = decode_entry(last.value) if last is not None and last.value is not None else None
    if last is None or entry is None:
        print("no ledger entry: nothing to clear", file=out)
        return False
    print(
        f"found at offset {last.offset}: state={entry.state.value} event_id={entry.event_id} "
        f"source={entry.source} node_id={entry.node_id} time={_when(entry.order[0])} "
        f"input_offset={entry.order[1]}" + (f" outcome={entry.outcome}" if entry.outcome else ""),
        file=out,
    )
    if dry_run:
        print(
            f"dry run: would write a tombstone for {device} to {topics.ledger} partition "
            f"{partition} with transactional id {tid} (fencing the partition's owner); "
            "nothing written",
            file=out,
        )
        return True
    producer = AIOKafkaProducer(
        **client_options(kafka), transactional_id=tid, enable_idempotence=True, acks="all"
    )
    await producer.start()  # initialises the id: the partition's owner is fenced from here on
    try:
        async with producer.transaction():
            sent = await producer.send(topics.ledger, None, key=key, partition=partition)
        written = await sent
    finally:
        await producer.stop()
    print(
        f"cleared: tombstone written at offset {written.offset} with transactional id {tid}; "
        "the partition's owner is fenced and its next owner reloads the ledger without the "
        "entry",
        file=out,
    )
    return True
