from __future__ import annotations

import pytest

from service.pipeline.tracker import Output, PartitionTracker


def out(n: int) -> Output:
    return Output("t", None, str(n).encode(), outcome="credential_updated")


def test_commits_only_the_finished_prefix() -> None:
    t = PartitionTracker()
    for offset in (10, 11, 12, 13):
        t.start(offset)
    t.finish(12, [out(12)])
    t.finish(13, [out(13)])
    assert t.take_committable() == (None, [], [])  # 10 unfinished: nothing may be committed
    t.finish(10, [out(10)])
    first, outputs, _ = t.take_committable()
    assert first == 11
    assert [o.value for o in outputs] == [b"10"]
    t.finish(11, [out(11)])
    second, outputs, _ = t.take_committable()
    assert second == 14
    assert [o.value for o in outputs] == [b"11", b"12", b"13"]
    assert len(t) == 0
    assert t.unfinished == 0


def test_gaps_in_offsets_are_fine_and_order_is_enforced() -> None:
    t = PartitionTracker()
    t.start(5, produced_at_ms=1000)
    t.start(9, produced_at_ms=2000)  # compacted or transaction markers leave gaps
    with pytest.raises(ValueError, match="not after"):
        t.start(9)
    t.finish(9)
    t.finish(5)
    assert t.take_committable() == (10, [], [1000, 2000])


def test_finishing_twice_is_a_bug() -> None:
    t = PartitionTracker()
    t.start(1)
    t.finish(1)
    with pytest.raises(ValueError, match="twice"):
        t.finish(1)


def test_counts() -> None:
    t = PartitionTracker()
    for offset in range(5):
        t.start(offset)
    t.finish(3)
    t.finish(4)
    assert (t.unfinished, t.finished_waiting, len(t)) == (3, 2, 5)
