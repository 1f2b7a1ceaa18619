"""A device's swaps meet in one place whatever client produced them (issue 19, item 4).

A swap produced to another partition than its key hashes to (a librdkafka client's CRC32, an
explicit partition) is forwarded to its key's partition in the transaction that finishes it, so
the device's ledger sees it: against a newer swap of the same device in the right partition, the
misrouted older one is answered SUPERSEDED and the newer one stands. Real broker, real service.
"""

from __future__ import annotations

import io

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import SecretStr

from service.bind.listener import BindListener
from service.config import BindSettings, KafkaOnlySettings
from service.metrics import Metrics
from service.partitioner import partition_for
from service.replay import Filters, replay
from tests.fixtures.kafka import INPUT_PARTITIONS
from tests.fixtures.service import Harness
from tests.support.events import swap_event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

DEVICE = "dev-misrouted"
FORWARDED_FROM = "rebind-forwarded-from"


async def _produce_to(harness: Harness, partition: int, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=harness.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            harness.topics.device_swapped, value, key=key, partition=partition
        )
    finally:
        await producer.stop()


async def _input_records(harness: Harness) -> list[tuple[int, list[tuple[str, bytes]]]]:
    """(partition, headers) of every committed record of the input topic."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=harness.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        tps = [TopicPartition(harness.topics.device_swapped, p) for p in range(INPUT_PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[tuple[int, list[tuple[str, bytes]]]] = []
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, msgs in batch.items():
                out.extend((tp.partition, list(m.headers or ())) for m in msgs)
            remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
        return out
    finally:
        await consumer.stop()


async def test_a_misrouted_older_swap_is_forwarded_and_loses_to_the_newer_one(
    harness: Harness,
) -> None:
    await harness.sim.control.seed_device(DEVICE, "n-0")
    service = await harness.start_service()
    key = DEVICE.encode()
    right = partition_for(key, INPUT_PARTITIONS, "murmur2")
    wrong = (right + 1) % INPUT_PARTITIONS

    newer = swap_event(DEVICE, "n-new", event_id="evt-new", ce_time="2026-11-25T10:00:00Z")
    await _produce_to(harness, right, key, newer)
    [first] = await harness.read(1)
    assert first.topic == harness.topics.credential_updated

    older = swap_event(DEVICE, "n-old", event_id="evt-old", ce_time="2026-11-25T09:00:00Z")
    await _produce_to(harness, wrong, key, older)
    outs = await harness.read(2)
    answers = {o.data["swapEventId"]: o for o in outs}
    assert sorted(answers) == ["evt-new", "evt-old"], outs  # exactly one outcome each
    assert len(outs) == 2, outs
    assert answers["evt-old"].topic == harness.topics.rebind_failed
    assert answers["evt-old"].data["errorCode"] == "SUPERSEDED"
    assert (await harness.sim.control.device(DEVICE))["node_id"] == "n-new"

    # The forwarded copy sits in the right partition, saying where it came from.
    records = await _input_records(harness)
    forwarded = [(p, dict(h)) for p, h in records if any(k == FORWARDED_FROM for k, _ in h)]
    assert [p for p, _ in forwarded] == [right]
    assert forwarded[0][1][FORWARDED_FROM].decode().endswith(f"/{wrong}/0")

    await wait_until(
        lambda: "rebind_misrouted_records_total 1.0" in service.metrics.render().decode(),
        timeout=10,
        what="the misrouted record counted",
    )
    print(
        f"misrouted: 1 record forwarded from partition {wrong} to {right}; outcomes: "
        + ", ".join(
            f"{k}={v.data.get('errorCode', 'credential-updated')}"
            for k, v in sorted(answers.items())
        )
    )


async def _partitions_of(harness: Harness, topic: str, partitions: int) -> list[int]:
    """The partition of every committed record of ``topic``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=harness.bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        found: list[int] = []
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, msgs in batch.items():
                found.extend(tp.partition for _ in msgs)
            remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
        return found
    finally:
        await consumer.stop()


def _disagreeing_device() -> str:
    """A deviceId that murmur2 and crc32 place on different partitions."""
    n = 0
    while partition_for(f"dev-c-{n}".encode(), INPUT_PARTITIONS, "murmur2") == partition_for(
        f"dev-c-{n}".encode(), INPUT_PARTITIONS, "crc32"
    ):
        n += 1
    return f"dev-c-{n}"


async def test_replay_writes_to_the_partition_the_setting_names(harness: Harness) -> None:
    device = _disagreeing_device()
    producer = AIOKafkaProducer(bootstrap_servers=harness.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            harness.topics.dead_letter,
            swap_event(device, "n-1"),
            key=device.encode(),
            headers=[("rebind-error-reason", b"invalid_data")],
        )
    finally:
        await producer.stop()
    settings = harness.settings()
    crc = KafkaOnlySettings(
        kafka=settings.kafka.model_copy(update={"partitioner": "crc32"}), topics=settings.topics
    )
    assert await replay(crc, "dlq", Filters(), dry_run=False, out=io.StringIO()) == 1
    found = await _partitions_of(harness, harness.topics.device_swapped, INPUT_PARTITIONS)
    assert found == [partition_for(device.encode(), INPUT_PARTITIONS, "crc32")]


async def test_the_bind_listener_writes_pushes_to_the_partition_the_setting_names(
    harness: Harness,
) -> None:
    device = _disagreeing_device()
    bind = BindSettings(
        callback_url="http://127.0.0.1:1/platform/bind",
        host="127.0.0.1",
        port=0,
        path_secret=SecretStr("Zr4r2m0d3f7pQx9sK1vB8w"),
        allow_plain_http=True,
    )
    listener = BindListener(
        bind,
        harness.topics.bind_notify,
        {"bootstrap_servers": harness.bootstrap},
        Metrics(),
        "crc32",
    )
    await listener.start()
    try:
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"http://127.0.0.1:{listener.port}/platform/bind/Zr4r2m0d3f7pQx9sK1vB8w",
                json={"notifyType": "bindDevice", "deviceId": device, "resultCode": "succeeded"},
            )
        assert answer.status_code == 200
    finally:
        await listener.stop()
    found = await _partitions_of(harness, harness.topics.bind_notify, INPUT_PARTITIONS)
    assert found == [partition_for(device.encode(), INPUT_PARTITIONS, "crc32")]
