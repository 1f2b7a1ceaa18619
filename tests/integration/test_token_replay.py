"""A captured token record replayed into the token topic changes nothing (issue 11, item 2).

Three replicas share one token (docs/tokens.md). Someone able to write to the token topic
captures a record, waits until the holder has a newer token, and writes the old record again.
The followers must keep the newer token: no 1010005 on the old one, no takeover, no login.
Real broker, simulator, three in-process services.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from service.app import Service
from tests.fixtures.service import Harness
from tests.support.events import swap_event
from tests.support.partitioning import device_on
from tests.support.token_topic import start_service, token_records, token_topic
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

REPLICAS = 3


async def _swaps(harness: Harness, prefix: str, count: int) -> list[str]:
    """``count`` swaps spread over the three input partitions (so every replica calls)."""
    devices = [device_on(n % REPLICAS, REPLICAS, f"{prefix}-{n:03d}") for n in range(count)]
    await harness.sim.control.seed_devices(
        [{"device_id": d, "node_id": f"old-{d}"} for d in devices]
    )
    producer = AIOKafkaProducer(bootstrap_servers=harness.bootstrap)
    await producer.start()
    try:
        for n, device in enumerate(devices):
            await producer.send_and_wait(
                harness.topics.device_swapped,
                swap_event(device, f"new-{device}", event_id=f"evt-{device}"),
                key=device.encode(),
                partition=n % REPLICAS,
            )
    finally:
        await producer.stop()
    return devices


def _current(services: list[Service]) -> set[str]:
    """The token each replica would use now: the holder's own, the followers' shared one."""
    tokens: set[str] = set()
    for service in services:
        provider = service.tokens
        if provider.is_holder:
            held = provider.manager.current()
            tokens.add(held.access if held is not None else "")
        else:
            tokens.add(provider.latest.access if provider.latest is not None else "")
    return tokens


async def test_a_replayed_old_token_record_is_ignored_by_the_followers(
    harness: Harness,
) -> None:
    control = harness.sim.control
    await control.configure(rate_limit_per_minute=100_000)
    topic = await token_topic(harness)
    services = list(
        await asyncio.gather(
            *(
                start_service(harness, f"i{n}", topic, token_takeover_seconds=2)
                for n in range(REPLICAS)
            )
        )
    )
    await wait_until(
        lambda: (
            sum(s.tokens.elected for s in services) == 1
            and all(s.pipeline.assigned() for s in services)
        ),
        timeout=60,
        what="one token holder, every replica with partitions",
    )
    # a first token, used by every replica
    first = await _swaps(harness, "first", 9)
    await harness.read(len(first), timeout=60)
    [(old_offset, key, old_value)] = [
        r for r in await token_records(harness, topic) if not r[1].endswith((b"/need", b"/refused"))
    ][:1]

    # a newer token: the platform drops the first, the next call gets 1010005, the holder logs in
    await control.expire_token(harness.sim.app_id)
    second = await _swaps(harness, "second", 9)
    await harness.read(len(first) + len(second), timeout=60)
    await wait_until(
        lambda: len(_current(services)) == 1, timeout=30, what="every replica on the new token"
    )
    newer = _current(services)
    before = await control.stats()
    takeovers = sum(s.tokens.takeovers for s in services)

    # the attacker writes the captured record again
    producer = AIOKafkaProducer(bootstrap_servers=harness.bootstrap, acks="all")
    await producer.start()
    try:
        replayed = await producer.send_and_wait(topic, old_value, key=key, partition=0)
    finally:
        await producer.stop()
    assert replayed.offset > old_offset
    await wait_until(
        lambda: all(s.tokens.read_position > replayed.offset for s in services),
        timeout=30,
        what="every replica read the replayed record",
    )
    third = await _swaps(harness, "third", 30)
    outs = await harness.read(len(first) + len(second) + len(third), timeout=60)

    assert {o.topic for o in outs} == {harness.topics.credential_updated}
    after = await control.stats()
    refused = int(after["calls_by_result"].get("1010005", 0)) - int(
        before["calls_by_result"].get("1010005", 0)
    )
    logins = int(after["logins"]) - int(before["logins"])
    print(
        f"\nreplayed token record at offset {replayed.offset}: 1010005={refused} "
        f"logins={logins} takeovers={sum(s.tokens.takeovers for s in services) - takeovers}"
    )
    assert _current(services) == newer  # every replica kept the newer token
    assert refused == 0  # no call on the old token
    assert logins == 0
    assert sum(s.tokens.takeovers for s in services) == takeovers
