"""The local Apache Kafka broker really works: produce, consume, transactions, restarts."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from tests.fixtures.kafka import Topics
from tests.support.kafka_broker import KafkaBroker, create_topics
from tests.support.waiting import wait_until


@asynccontextmanager
async def consumer_of(
    bootstrap: str, topic: str, *, isolation_level: str = "read_uncommitted"
) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def read_values(consumer: AIOKafkaConsumer, until: set[bytes], timeout: float) -> list[bytes]:
    """Consume until every value in ``until`` was seen; return all values in arrival order."""
    seen: list[bytes] = []

    async def got_all() -> bool:
        batches = await consumer.getmany(timeout_ms=200)
        for records in batches.values():
            seen.extend(r.value for r in records if r.value is not None)
        return until <= set(seen)

    await wait_until(got_all, timeout, f"values {sorted(until)} (seen so far: {seen})")
    return seen


async def test_produce_and_consume_roundtrip(kafka_broker: KafkaBroker, topics: Topics) -> None:
    bootstrap = kafka_broker.bootstrap
    sent = {f"event-{i}".encode() for i in range(30)}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i, value in enumerate(sorted(sent)):
            await producer.send_and_wait(
                topics.device_swapped, value, key=f"device-{i % 7}".encode()
            )
    finally:
        await producer.stop()

    async with consumer_of(bootstrap, topics.device_swapped) as consumer:
        partitions = consumer.partitions_for_topic(topics.device_swapped)
        assert partitions == {0, 1, 2}
        received = await read_values(consumer, sent, timeout=30)
    assert sorted(received) == sorted(sent)  # each exactly once


async def test_read_committed_sees_committed_not_aborted(
    kafka_broker: KafkaBroker, topics: Topics
) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = topics.credential_updated
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"txn-{uuid.uuid4().hex[:8]}"
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, b"committed-1", key=b"k", partition=0)
            await producer.send(topic, b"committed-2", key=b"k", partition=0)

        await producer.begin_transaction()
        await producer.send(topic, b"aborted-1", key=b"k", partition=0)
        await producer.send(topic, b"aborted-2", key=b"k", partition=0)
        await producer.abort_transaction()

        async with producer.transaction():
            await producer.send(topic, b"committed-3", key=b"k", partition=0)
    finally:
        await producer.stop()

    committed = [b"committed-1", b"committed-2", b"committed-3"]
    async with consumer_of(bootstrap, topic, isolation_level="read_committed") as consumer:
        seen = await read_values(consumer, set(committed), timeout=30)
    assert seen == committed

    # The aborted records are in the log: a read_uncommitted consumer does see them.
    async with consumer_of(bootstrap, topic) as consumer:
        seen_all = await read_values(consumer, {b"aborted-2", b"committed-3"}, timeout=30)
    assert seen_all == [b"committed-1", b"committed-2", b"aborted-1", b"aborted-2", b"committed-3"]


async def test_restart_keeps_data_and_address(tmp_path: Path) -> None:
    """Clean restart and SIGKILL+start keep port, topics, records and committed offsets."""
    broker = KafkaBroker(tmp_path / "kafka")
    await broker.astart()
    try:
        bootstrap = broker.bootstrap
        topic = f"restart-{uuid.uuid4().hex[:8]}"
        await create_topics(bootstrap, [topic], partitions=2)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(10):
                await producer.send_and_wait(topic, f"before-{i}".encode(), partition=i % 2)
        finally:
            await producer.stop()

        group = "restart-group"
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            await read_values(consumer, {f"before-{i}".encode() for i in range(10)}, timeout=30)
            await consumer.commit()
        finally:
            await consumer.stop()

        await broker.arestart()
        assert broker.bootstrap == bootstrap
        await broker.await_ready(deadline=10)  # already ready: returns at once
        await _assert_survived(bootstrap, topic, group)

        await broker.arestart(hard=True)  # SIGKILL: no clean shutdown, log recovery on start
        assert broker.bootstrap == bootstrap
        await _assert_survived(bootstrap, topic, group)
    finally:
        await broker.astop()
    assert not broker.is_running()


async def _assert_survived(bootstrap: str, topic: str, group: str) -> None:
    before = {f"before-{i}".encode() for i in range(10)}
    async with consumer_of(bootstrap, topic) as fresh:
        assert sorted(await read_values(fresh, before, timeout=60)) == sorted(before)

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        committed = {p: await consumer.committed(TopicPartition(topic, p)) for p in range(2)}
    finally:
        await consumer.stop()
    assert committed == {0: 5, 1: 5}
