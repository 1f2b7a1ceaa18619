"""BudgetExchange against the real broker: the topic is created, records travel, and a replica's
allowance after a rebalance counts the other replicas' calls (docs/budget.md)."""

from __future__ import annotations

import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from service.platform.budget import RateBudget
from service.shared.budget_exchange import BudgetExchange, BudgetRecord, encode_record
from tests.support.kafka_broker import KafkaBroker
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

N = 100
SCOPE = "group-t/app-t"
LEASE = 6.0
JOIN_SECONDS = 0.2
"""A rebalance's join and sync: more than the two replicas' clocks can differ (a round trip)."""


@pytest.fixture
async def budget_topic(kafka_broker: KafkaBroker) -> str:
    """A name only: the exchange creates the topic."""
    if not kafka_broker.is_running():
        await kafka_broker.astart()
    return f"device-rebind.budget.v1.t-{uuid.uuid4().hex[:10]}"


def _exchange(broker: KafkaBroker, topic: str, instance: str) -> BudgetExchange:
    return BudgetExchange(
        {"bootstrap_servers": broker.bootstrap},
        topic,
        instance,
        RateBudget(N),
        scope=SCOPE,
        lease_seconds=LEASE,
    )


def _grant(budget: RateBudget, n: int) -> None:
    for _ in range(n):
        assert budget.try_acquire()


async def _put(broker: KafkaBroker, topic: str, record: BudgetRecord) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        key = f"{record.scope}/{record.instance}".encode()
        await producer.send_and_wait(topic, encode_record(record), key=key, partition=0)
    finally:
        await producer.stop()


async def test_the_topic_is_created_compacted_with_one_partition(
    kafka_broker: KafkaBroker, budget_topic: str
) -> None:
    a = _exchange(kafka_broker, budget_topic, "a")
    await a.start()
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics([budget_topic])
            configs = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, budget_topic)]
            )
        finally:
            await admin.close()
        assert len(described[0]["partitions"]) == 1
        entries = {c[0]: c[1] for c in configs[0].resources[0][4]}
        assert entries["cleanup.policy"] == "compact"
        # the broker stamps the records: the replicas' epoch is the broker's (docs/budget.md)
        assert entries["message.timestamp.type"] == "LogAppendTime"
        assert a.broker_time
        # a held record (nothing is granted before the first assignment) is on the topic
        consumer = AIOKafkaConsumer(
            budget_topic, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            batch = await consumer.getmany(timeout_ms=10_000)
        finally:
            await consumer.stop()
        values = [m.value for msgs in batch.values() for m in msgs]
        assert len(values) == 1
        assert b'"held":true' in (values[0] or b"")
        assert a.budget.frozen
    finally:
        await a.stop()


async def test_a_second_replica_counts_the_first_ones_calls(
    kafka_broker: KafkaBroker, budget_topic: str
) -> None:
    a = _exchange(kafka_broker, budget_topic, "a")
    b = _exchange(kafka_broker, budget_topic, "b")
    await a.start()
    try:
        await a.on_assigned(1.0)
        _grant(a.budget, 50)
        await a.publish()
        await b.start()
        # the rebalance: both revoke (a publishes its 50 calls), then both are assigned half
        await a.on_revoked()
        await b.on_revoked()
        # The group's join and sync lie between the revocations and the assignments. Each
        # replica's clock is anchored to the broker's append times, a round trip apart at most:
        # with no time between them, one replica's assignment could look older than the other's
        # revocation, and its record incomplete (phantom calls; seen once in CI).
        revoked = max(a.budget.wall_now(), b.budget.wall_now())
        await wait_until(
            lambda: min(a.budget.wall_now(), b.budget.wall_now()) > revoked + JOIN_SECONDS,
            5,
            "both replicas' clocks past the revocations by a join's time",
        )
        await b.on_assigned(0.5)
        await a.on_assigned(0.5)
        for replica in (a, b):
            assert replica.budget.limit == 50
            assert replica.last_log is not None
            assert replica.last_log.logged == 50
            assert replica.last_log.phantom == 0
            # 50 calls, each weighing a half: 25 of the 50 are left until they age out
            assert replica.budget.allowance() == pytest.approx(25.0, abs=0.01)
        _grant(b.budget, 25)
        assert not b.budget.try_acquire()
    finally:
        await a.stop()
        await b.stop()


async def test_a_dead_replicas_stale_record_adds_slack(
    kafka_broker: KafkaBroker, budget_topic: str
) -> None:
    now = time.time()
    # "c" published 15 s ago (10 calls, 20 s old), was not at this rebalance: it may have called
    # after publishing, up to its limit of 40 minus the 10 that still counted then.
    dead = BudgetRecord(
        instance="c",
        scope=SCOPE,
        published_at=now - 15.0,
        limit=40,
        grants=(now - 20.0,) * 10,
        held=False,
        final=False,
        assigned_at=now - 100.0,
        counted_since=now - 100.0,
    )
    a = _exchange(kafka_broker, budget_topic, "a")
    await a.start()  # creates the topic
    try:
        await _put(kafka_broker, budget_topic, dead)
        await a.on_revoked()
        await a.on_assigned(0.5)
        assert a.last_log is not None
        assert a.last_log.stale == ("c",)
        assert a.last_log.logged == 10
        assert a.last_log.phantom == 30
        assert a.budget.allowance() == pytest.approx(50 - 0.5 * 40, abs=0.01)
    finally:
        await a.stop()


async def test_a_restarted_process_counts_its_killed_predecessors_calls(
    kafka_broker: KafkaBroker, budget_topic: str
) -> None:
    first = _exchange(kafka_broker, budget_topic, "a")
    await first.start()
    await first.on_assigned(1.0)
    _grant(first.budget, 80)
    await first.publish()
    # SIGKILL: no final record; the clients just go away
    assert first._publisher is not None
    first._publisher.cancel()
    second = _exchange(kafka_broker, budget_topic, "a")
    await second.start()
    try:
        await second.on_revoked()
        await second.on_assigned(1.0)
        # 80 calls it did not make itself, plus what the predecessor could have made unseen
        assert second.budget.allowance() <= N - 80 + 0.01
    finally:
        await second.stop()
        first.budget.freeze()
        await first.stop()
