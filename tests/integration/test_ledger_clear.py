"""`device-rebind ledger clear`: an operator frees a device blocked by a swap dated ahead.

Against the real broker, with the service running: the CLI (a subprocess, as an operator runs
it) finds the entry, writes nothing with ``--dry-run``, and otherwise writes the tombstone with
the partition's transactional id, which fences the running owner; the device's next swap is
then worked on instead of being answered SUPERSEDED.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from service.app import Service
from service.partitioner import partition_for
from tests.fixtures.kafka import INPUT_PARTITIONS
from tests.fixtures.service import Harness
from tests.support.events import swap_event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

DEVICE = "dev-ahead"


def _at(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


async def _cli(harness: Harness, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBIND_")}
    env |= {
        "REBIND_KAFKA__BOOTSTRAP_SERVERS": harness.bootstrap,
        "REBIND_KAFKA__GROUP_ID": harness.group_id,
        "REBIND_TOPICS__DEVICE_SWAPPED": harness.topics.device_swapped,
        "REBIND_TOPICS__LEDGER": harness.topics.ledger,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _ledger_records(harness: Harness, partition: int) -> list[tuple[bytes | None, bool]]:
    """(key, is a tombstone) of every committed record of the ledger partition."""
    tp = TopicPartition(harness.topics.ledger, partition)
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
        out: list[tuple[bytes | None, bool]] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=500)
            out.extend((m.key, m.value is None) for m in batch.get(tp, ()))
        return out
    finally:
        await consumer.stop()


async def test_ledger_clear_frees_a_device_blocked_by_a_swap_dated_ahead(harness: Harness) -> None:
    await harness.sim.control.seed_device(DEVICE, "n-0")
    # A bound wide enough (a week) to let a swap dated five days ahead in, as before the bound.
    settings = harness.settings()
    kafka = settings.kafka.model_copy(update={"max_clock_skew_seconds": 604_800.0})
    service = Service(settings.model_copy(update={"kafka": kafka}))
    task = asyncio.create_task(service.run())
    harness._services.append((service, task))
    await wait_until(lambda: service.readiness()[0] or task.done(), timeout=60, what="ready")

    now = datetime.now(UTC)
    await harness.produce(
        [
            (
                DEVICE.encode(),
                swap_event(
                    DEVICE, "n-ahead", event_id="evt-ahead", ce_time=_at(now + timedelta(days=5))
                ),
            )
        ]
    )
    [first] = await harness.read(1)
    assert first.topic == harness.topics.credential_updated
    await harness.produce(
        [(DEVICE.encode(), swap_event(DEVICE, "n-real", event_id="evt-real", ce_time=_at(now)))]
    )
    outs = await harness.read(2)
    [blocked] = [o for o in outs if o.data["swapEventId"] == "evt-real"]
    assert blocked.data["errorCode"] == "SUPERSEDED"  # the device is blocked

    partition = partition_for(DEVICE.encode(), INPUT_PARTITIONS, "murmur2")
    before = await _ledger_records(harness, partition)

    code, out, err = await _cli(harness, "ledger", "clear", DEVICE, "--dry-run")
    print(out, err)
    assert code == 0, err
    assert f"input partition {partition}" in out
    assert "event_id=evt-ahead" in out
    assert "nothing written" in out
    assert await _ledger_records(harness, partition) == before

    code, out, err = await _cli(harness, "ledger", "clear", DEVICE)
    print(out, err)
    assert code == 0, err
    assert "cleared: tombstone written" in out
    assert f"-{harness.topics.device_swapped}-{partition}" in out  # the partition's txn id
    after = await _ledger_records(harness, partition)
    assert after[-1] == (DEVICE.encode(), True)

    # The running owner was fenced: its stale ledger cannot answer the next swap; the
    # partition's next owner reloads the ledger without the entry and works on it.
    await harness.produce(
        [
            (
                DEVICE.encode(),
                swap_event(
                    DEVICE, "n-fixed", event_id="evt-fixed", ce_time=_at(now + timedelta(seconds=1))
                ),
            )
        ]
    )
    outs = await harness.read(3, timeout=90)
    fixed = [o for o in outs if o.data["swapEventId"] == "evt-fixed"]
    assert [o.topic for o in fixed] == [harness.topics.credential_updated], fixed
    assert len(outs) == 3
    print(
        f"ledger clear: dry run wrote 0 records; clear wrote 1 tombstone; next swap "
        f"{fixed[0].topic.split('.')[1]}"
    )
