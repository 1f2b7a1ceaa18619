"""The group's assignor on a real broker: co-partitioned and sticky across a member joining, and
a group with a member that knows only ``range`` (a rolling deploy) still works."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from service.config import KafkaSettings
from service.pipeline.pipeline import input_consumer
from tests.support.kafka_broker import KafkaBroker, create_topics
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

PARTITIONS = 6


class _Counting(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.revoked = 0

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        if revoked:
            self.revoked += 1

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        pass


@dataclass
class _Member:
    consumer: AIOKafkaConsumer
    task: asyncio.Task[None] | None = None
    topics: Sequence[str] = field(default_factory=list)
    listener: _Counting = field(default_factory=_Counting)

    def numbers(self) -> dict[str, set[int]]:
        by_topic: dict[str, set[int]] = {t: set() for t in self.topics}
        for tp in self.consumer.assignment():
            by_topic[tp.topic].add(tp.partition)
        return by_topic


@asynccontextmanager
async def _member(
    bootstrap: str,
    group: str,
    topics: Sequence[str],
    *,
    range_only: bool = False,
    static: str | None = None,
) -> AsyncIterator[_Member]:
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        group_id=group,
        session_timeout_ms=20_000,
        instance_id=static or "not-static",
        static_membership=static is not None,
    )
    if range_only:  # a member of the release before: range alone
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            enable_auto_commit=False,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=500,
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
    else:
        consumer = input_consumer(kafka, heartbeat_seconds=0.5)
    await consumer.start()
    member = _Member(consumer, topics=topics)
    consumer.subscribe(list(topics), listener=member.listener)

    async def poll() -> None:
        while True:
            await consumer.getmany(timeout_ms=100)

    member.task = asyncio.create_task(poll())
    try:
        yield member
    finally:
        await _stop(member)


async def _stop(member: _Member) -> None:
    if member.task is not None:
        member.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await member.task
        member.task = None
        await member.consumer.stop()


def _settled(members: Sequence[_Member], topics: Sequence[str]) -> bool:
    """Every member has partitions, and together they hold each partition of each topic once."""
    for topic in topics:
        held = [m.numbers()[topic] for m in members]
        if any(not h for h in held) or sorted(p for h in held for p in h) != list(
            range(PARTITIONS)
        ):
            return False
    return True


async def _topics(kafka_broker: KafkaBroker) -> list[str]:
    suffix = uuid.uuid4().hex[:8]
    names = [f"assign-in-{suffix}", f"assign-notify-{suffix}"]
    await create_topics(kafka_broker.bootstrap, names, PARTITIONS)
    return names


async def test_a_joining_member_takes_only_what_balance_needs_and_topics_stay_together(
    kafka_broker: KafkaBroker,
) -> None:
    topics = await _topics(kafka_broker)
    group = f"assign-{uuid.uuid4().hex[:8]}"
    bootstrap = kafka_broker.bootstrap
    async with _member(bootstrap, group, topics) as a, _member(bootstrap, group, topics) as b:
        await wait_until(lambda: _settled([a, b], topics), 60, "two members settled")
        before = {"a": a.numbers()[topics[0]], "b": b.numbers()[topics[0]]}
        assert sorted(len(ps) for ps in before.values()) == [3, 3]
        async with _member(bootstrap, group, topics) as c:
            await wait_until(lambda: _settled([a, b, c], topics), 60, "three members settled")
            for member in (a, b, c):
                numbers = member.numbers()
                assert numbers[topics[0]] == numbers[topics[1]]  # co-partitioned
                assert len(numbers[topics[0]]) == 2  # balanced
            after = {"a": a.numbers()[topics[0]], "b": b.numbers()[topics[0]]}
            # Sticky: a and b each kept two of their three; c got one from each.
            assert after["a"] <= before["a"]
            assert after["b"] <= before["b"]
            moved = len(before["a"] - after["a"]) + len(before["b"] - after["b"])
            print(f"\nassignor: before {before}, after {after}, c {c.numbers()}; moved {moved}")
            assert moved == 2


async def test_a_group_with_a_range_only_member_goes_on_with_range(
    kafka_broker: KafkaBroker,
) -> None:
    topics = await _topics(kafka_broker)
    group = f"assign-mixed-{uuid.uuid4().hex[:8]}"
    bootstrap = kafka_broker.bootstrap
    async with (
        _member(bootstrap, group, topics, range_only=True) as old,
        _member(bootstrap, group, topics) as new,
    ):
        await wait_until(lambda: _settled([old, new], topics), 60, "the mixed group settled")
        for member in (old, new):
            numbers = member.numbers()
            assert numbers[topics[0]] == numbers[topics[1]]  # range is co-partitioned too
            assert len(numbers[topics[0]]) == 3


@pytest.mark.parametrize("restarted", ["first", "second"])
async def test_a_static_member_back_within_the_session_timeout_moves_nothing(
    kafka_broker: KafkaBroker, restarted: str
) -> None:
    """The first member to join leads the group; either one restarting under its instance id
    gets its partitions back, and the other is never revoked: no rebalance."""
    topics = await _topics(kafka_broker)
    group = f"assign-static-{uuid.uuid4().hex[:8]}"
    bootstrap = kafka_broker.bootstrap
    names = {"first": "static-0", "second": "static-1"}
    stays = "second" if restarted == "first" else "first"
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            _member(bootstrap, group, topics, static=names["first"])
        )
        await wait_until(lambda: _settled([first], topics), 60, "the first member settled")
        second = await stack.enter_async_context(
            _member(bootstrap, group, topics, static=names["second"])
        )
        members = {"first": first, "second": second}
        await wait_until(lambda: _settled([first, second], topics), 60, "two members settled")
        held = {name: m.numbers() for name, m in members.items()}
        revoked_before = members[stays].listener.revoked
        # Stopped (a static member sends no LeaveGroup), then back under the same name.
        await _stop(members[restarted])
        async with _member(bootstrap, group, topics, static=names[restarted]) as again:
            await wait_until(
                lambda: again.numbers() == held[restarted], 15, "the same partitions back"
            )
        assert members[stays].numbers() == held[stays]
        assert members[stays].listener.revoked == revoked_before, "the other member was revoked"
