"""A device's swaps meet in one place whatever client produced them (issue 19, item 4).

A swap produced to another partition than its key hashes to (a librdkafka client's CRC32, an
explicit partition) is forwarded to its key's partition in the transaction that finishes it, so
the device's ledger sees it: against a newer swap of the same device in the right partition, the
misrouted older one is answered SUPERSEDED and the newer one stands. Real broker, real service.
"""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.partitioner import partition_for
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
