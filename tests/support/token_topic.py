"""Helpers of the shared-token tests: a private token topic, services and providers on it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from service.app import Service
from service.metrics import Metrics
from service.platform.budget import RateBudget
from service.shared.shared_token import SharedTokenProvider
from tests.fixtures.service import Harness
from tests.support.kafka_broker import create_topics
from tests.support.waiting import wait_until


async def token_topic(harness: Harness) -> str:
    """A fresh compacted, single-partition token topic (runs never share one)."""
    name = f"device-rebind.token.v1.t-{uuid.uuid4().hex[:10]}"
    await create_topics(harness.bootstrap, [name], 1, configs={"cleanup.policy": "compact"})
    return name


async def start_service(harness: Harness, instance: str, topic: str, **platform: Any) -> Service:
    """harness.start_service with the token topic set (the fixture does not know that topic)."""
    base = harness.settings(instance=instance, **platform)
    settings = base.model_copy(update={"topics": base.topics.model_copy(update={"token": topic})})
    service = Service(settings)
    task = asyncio.create_task(service.run(), name=f"service-{instance}")
    harness._services.append((service, task))  # the fixture stops it
    await wait_until(
        lambda: service.readiness()[0] or task.done(), timeout=60, what=f"service {instance} ready"
    )
    if task.done():
        task.result()
    return service


async def start_provider(
    harness: Harness, instance: str, topic: str, **platform: Any
) -> SharedTokenProvider:
    """A SharedTokenProvider alone (no pipeline), on the real broker and the simulator."""
    settings = harness.settings(instance=instance, **platform)
    metrics = Metrics()
    budget = RateBudget(100_000, metrics=metrics)
    provider = SharedTokenProvider(settings.platform, settings.kafka, topic, metrics, budget)
    await provider.start()
    return provider


async def token_records(harness: Harness, topic: str) -> list[tuple[int, bytes, bytes]]:
    """(offset, key, value) of every committed record of the token topic."""
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=harness.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        found: list[tuple[int, bytes, bytes]] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=500)
            found.extend((m.offset, m.key, m.value) for m in batch.get(tp, ()))
        return found
    finally:
        await consumer.stop()
