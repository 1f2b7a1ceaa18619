"""Oversized input does not crash-loop the service (issue 11, item 4): real broker, simulator.

The producer of the service may send at most ``MAX_REQUEST_BYTES`` (1 MiB) per record, and every
record the service writes stays under ``REBIND_KAFKA__MAX_INPUT_BYTES`` (960 KiB by default):

* an input over the limit (here 2 MiB once decompressed: it passes the broker gzip-compressed,
  and one just under 1 MiB) is dead-lettered ``too_large`` as a record that points at its
  source, states its size and carries as much of the value as fits;
* a swap just under the limit is worked on; its outcome (and the duplicate memory's copy of it)
  carries a trimmed ``data.context`` and says so (``contextTruncated``);
* a swap too large for the ledger that must wait (device online) waits with a trimmed copy of
  itself and succeeds later, its outcome saying ``contextTruncated``;

and each partition keeps flowing: a small swap behind them gets its outcome, the service runs on.
"""

from __future__ import annotations

import gzip

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from service.config import KafkaSettings
from service.events import DLQ_REASON_HEADER, SOURCE_OFFSET_HEADER, SOURCE_PARTITION_HEADER
from service.pipeline.committer import MAX_REQUEST_BYTES
from tests.fixtures.kafka import INPUT_PARTITIONS
from tests.fixtures.service import Harness
from tests.support.events import Received, swap_event
from tests.support.partitioning import device_on

pytestmark = pytest.mark.integration

LIMIT = KafkaSettings().max_input_bytes
ORIGINAL_SIZE_HEADER = "rebind-original-size"
MiB = 1024 * 1024


def _swap_of_size(device: str, event_id: str, size: int) -> bytes:
    """A valid swap whose record (key + value) is ``size`` bytes: a big unknown data field."""
    base = len(device) + len(swap_event(device, f"new-{device}", event_id=event_id, blob=""))
    value = swap_event(device, f"new-{device}", event_id=event_id, blob="x" * (size - base))
    assert len(device) + len(value) == size
    return value


async def _produce(
    harness: Harness, records: list[tuple[str, bytes]], partition: int = 0
) -> list[RecordMetadata]:
    """Gzip-compressed, all to one partition (so the small swap queues behind the big ones)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=harness.bootstrap,
        compression_type="gzip",
        max_request_size=4 * MiB,
        acks="all",
    )
    await producer.start()
    try:
        return [
            await producer.send_and_wait(
                harness.topics.device_swapped, value, key=key.encode(), partition=partition
            )
            for key, value in records
        ]
    finally:
        await producer.stop()


def _size(out: Received) -> int:
    return (
        len(out.key or b"")
        + len(out.value or b"")
        + sum(len(k.encode()) + len(v) for k, v in out.headers)
    )


async def test_oversized_input_is_answered_and_the_partition_keeps_flowing(
    harness: Harness,
) -> None:
    control = harness.sim.control
    # keys that hash to partition 0, where they are produced (a record on another partition
    # than its key's would be forwarded there)
    d2, d1, dl, ds = (
        device_on(0, INPUT_PARTITIONS, name)
        for name in ("dev-2mib", "dev-1mib", "dev-limit", "dev-small")
    )
    devices = [d2, d1, dl, ds]
    await control.seed_devices([{"device_id": d, "node_id": f"old-{d}"} for d in devices])
    service = await harness.start_service()
    two_mib = _swap_of_size(d2, "evt-2mib", 2 * MiB)
    assert len(gzip.compress(two_mib)) < MiB  # it passes the broker compressed
    near_limit = _swap_of_size(dl, "evt-limit", LIMIT - 200)
    records = [
        (d2, two_mib),
        (d1, _swap_of_size(d1, "evt-1mib", MiB - 200)),
        (dl, near_limit),
        (ds, swap_event(ds, f"new-{ds}", event_id="evt-small")),
    ]
    landed = await _produce(harness, records)

    outs = await harness.read(4, timeout=60)

    assert len(outs) == 4
    by_offset = {int(o.header("rebind-source-offset") or -1): o for o in outs}
    assert set(by_offset) == {md.offset for md in landed}
    for (device, value), md in zip(records[:2], landed[:2], strict=True):
        dead = by_offset[md.offset]
        assert dead.topic == harness.topics.dead_letter
        assert dead.header(DLQ_REASON_HEADER) == "too_large"
        assert dead.header(SOURCE_PARTITION_HEADER) == str(md.partition)
        assert dead.header(SOURCE_OFFSET_HEADER) == str(md.offset)
        assert dead.header(ORIGINAL_SIZE_HEADER) == str(len(device) + len(value))
        assert dead.key == device.encode()
        assert dead.value is not None
        assert value.startswith(dead.value)  # as much of the value as fits
        assert LIMIT - 64 * 1024 < len(dead.value) < len(value)
        assert _size(dead) <= LIMIT
    big = by_offset[landed[2].offset]
    assert big.topic == harness.topics.credential_updated
    assert big.data["contextTruncated"] is True
    assert _size(big) <= LIMIT
    assert set(big.data["context"]) <= set(orjson.loads(near_limit)["data"]) - {"deviceId"}
    small = by_offset[landed[3].offset]
    assert small.topic == harness.topics.credential_updated
    assert "contextTruncated" not in small.data
    assert [c["device_id"] for c in await control.calls(operation="refresh_key")] == [dl, ds]

    # the duplicate memory kept a copy of the trimmed outcome: the swap sent again is answered
    # with it, without a call
    await _produce(harness, [(dl, near_limit)])
    outs = await harness.read(5, timeout=60)
    again = max((o for o in outs if o.key == dl.encode()), key=lambda o: o.offset)
    assert again.offset != big.offset
    assert again.value == big.value
    assert len(await control.calls(operation="refresh_key")) == 2
    assert all(not task.done() for _, task in harness._services)  # never stopped
    assert service.pipeline.stuck_partitions() == []


async def test_a_swap_too_large_for_the_ledger_waits_trimmed_and_succeeds(
    harness: Harness,
) -> None:
    control = harness.sim.control
    await control.seed_devices(
        [{"device_id": d, "node_id": f"old-{d}"} for d in ("dev-online", "dev-after")]
    )
    await control.inject_error(400, "100611", operation="refresh_key", device_id="dev-online")
    await harness.start_service(online_retry_initial_seconds=0.3)
    value = _swap_of_size("dev-online", "evt-online", LIMIT - 200)

    await _produce(
        harness,
        [
            ("dev-online", value),
            ("dev-after", swap_event("dev-after", "new-dev-after", event_id="evt-after")),
        ],
    )
    outs = await harness.read(2, timeout=60)

    by_device = {o.key: o for o in outs}
    done = by_device[b"dev-online"]
    assert done.topic == harness.topics.credential_updated
    assert done.data["contextTruncated"] is True
    assert _size(done) <= LIMIT
    assert by_device[b"dev-after"].topic == harness.topics.credential_updated
    assert len(await control.calls(operation="refresh_key", device_id="dev-online")) == 2
    assert (await control.device("dev-online"))["node_id"] == "new-dev-online"


def test_the_input_limit_leaves_room_below_the_producer_request_size() -> None:
    assert LIMIT <= MAX_REQUEST_BYTES - 64 * 1024
