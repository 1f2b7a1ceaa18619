"""The bulk lane's buffer bound (:class:`service.pipeline.lanes.Lanes`), with a consumer that only
records what is paused: the whole lane at the bound, resumed at half; and, once the buffer is
contested (half full), a partition holding its share of it paused until down to half its share,
so a backlog read a partition at a time is not worked a partition at a time."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition

from service.pipeline.lanes import Lanes
from service.pipeline.partition_core import PartitionCore

BULK = "in"
BOUND = 600  # six partitions: a share of 100 each


class Recorder:
    """The pause state of each partition, as a consumer keeps it."""

    def __init__(self) -> None:
        self.paused: set[TopicPartition] = set()
        self.resumes = 0

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.resumes += 1
        self.paused.difference_update(tps)

    def bulk(self) -> list[int]:
        return sorted(tp.partition for tp in self.paused if tp.topic == BULK)


def cores(unfinished: dict[int, int]) -> dict[int, PartitionCore]:
    return {
        p: cast(PartitionCore, SimpleNamespace(progress=SimpleNamespace(unfinished=n)))
        for p, n in unfinished.items()
    }


def step(lanes: Lanes, consumer: Recorder, unfinished: dict[int, int]) -> list[int]:
    lanes.backpressure(cast(AIOKafkaConsumer, cast(Any, consumer)), cores(unfinished), held=False)
    return consumer.bulk()


def test_a_partition_holding_its_share_of_a_contested_buffer_waits_for_the_others() -> None:
    lanes, consumer = Lanes(BULK, None, BOUND, share_reads=True), Recorder()
    empty = dict.fromkeys(range(6), 0)
    # One partition alone fills half the buffer before anything is paused.
    assert step(lanes, consumer, {**empty, 0: 299}) == []
    # Half full: the partition holding its share (100) or more waits; the others are read.
    assert step(lanes, consumer, {**empty, 0: 300}) == [0]
    assert step(lanes, consumer, {**empty, 0: 300, 3: 120}) == [0, 3]
    # It stays paused until down to half its share, then is read again.
    assert step(lanes, consumer, {**empty, 0: 51, 3: 120, 4: 60}) == [0, 3]
    assert step(lanes, consumer, {**empty, 0: 50, 3: 120, 4: 60}) == [3]
    # The whole lane at the bound, whatever the shares; resumed at half, the shares still held.
    full = {0: 100, 1: 100, 2: 100, 3: 100, 4: 100, 5: 100}
    assert step(lanes, consumer, full) == [0, 1, 2, 3, 4, 5]
    assert step(lanes, consumer, {0: 90, 1: 90, 2: 90, 3: 90, 4: 40, 5: 40}) == [0, 1, 2, 3, 4, 5]
    assert step(lanes, consumer, {0: 80, 1: 80, 2: 80, 3: 30, 4: 20, 5: 10}) == [0, 1, 2]
    # A buffer down to a quarter is not contested: everything is read.
    assert step(lanes, consumer, {**empty, 0: 75, 1: 75}) == []


def test_the_input_hold_released_resumes_only_what_the_bound_leaves_readable() -> None:
    lanes, consumer = Lanes(BULK, None, BOUND, share_reads=True), Recorder()
    assert step(lanes, consumer, {0: 300, 1: 0}) == [0]
    held = cores({0: 300, 1: 0})
    lanes.backpressure(cast(AIOKafkaConsumer, cast(Any, consumer)), held, held=True)
    assert consumer.bulk() == [0, 1]
    lanes.resume(cast(AIOKafkaConsumer, cast(Any, consumer)), [0, 1])
    assert consumer.bulk() == [0]
    lanes.resumed()  # a new assignment: every partition was resumed
    assert lanes.bulk_full == set()


def test_one_read_takes_at_most_a_partitions_share_of_the_buffer() -> None:
    lanes = Lanes(BULK, None, 300, share_reads=True)
    assert lanes.batch(6, 500) == 50  # not 500 records of one partition against a bound of 300
    assert lanes.batch(1, 500) == 300
    assert lanes.batch(0, 500) == 300
    assert lanes.batch(6, 20) == 20  # REBIND_KAFKA__MAX_POLL_RECORDS still bounds it
    assert Lanes(BULK, None, 4, share_reads=True).batch(6, 500) == 1
    # A buffer not bound by the budget turns over fast: whole reads are cheaper per event.
    assert Lanes(BULK, None, 300, share_reads=False).batch(6, 500) == 500


def test_a_new_assignment_that_resumed_everything_is_paused_again() -> None:
    """aiokafka gives every partition of a new assignment a fresh, unpaused state, kept ones
    too, and a rebalance that only keeps partitions does not reset the lanes: the next pass
    pauses again what the bound holds back."""
    lanes, consumer = Lanes(BULK, None, BOUND, share_reads=True), Recorder()
    assert step(lanes, consumer, {0: 300, 1: 0}) == [0]
    consumer.paused.clear()  # the rebalance
    assert step(lanes, consumer, {0: 300, 1: 0}) == [0]
    assert step(lanes, consumer, dict.fromkeys(range(6), 100)) == [0, 1, 2, 3, 4, 5]
    consumer.paused.clear()
    assert step(lanes, consumer, dict.fromkeys(range(6), 100)) == [0, 1, 2, 3, 4, 5]
