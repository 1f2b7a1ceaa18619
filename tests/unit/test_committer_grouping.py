"""PartitionCommitter.durable: claims share transactions instead of each running one (issue 24).

The transactions themselves are replaced by a stand-in that holds each one open until the test
lets it end, so the test decides the interleaving; what happens on a real broker is covered by
the integration and fault tests and measured by ``make bench``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from service.config import KafkaSettings
from service.metrics import Metrics
from service.pipeline.committer import PartitionCommitter
from service.pipeline.partition import Commit
from service.pipeline.records import Output


@dataclass
class FakeCore:
    """The part of PartitionCore the committer uses: pending outputs, taken per transaction."""

    pending: list[Output] = field(default_factory=list)
    closed: bool = False
    closing: bool = False
    committed_batches: list[list[str]] = field(default_factory=list)

    def note(self, name: str) -> None:
        self.pending.append(Output(topic="t", key=name.encode(), value=b"v", partition=0))

    def take_commit(self) -> Commit | None:
        if not self.pending:
            return None
        commit = Commit(self.pending, None, "")
        self.pending = []
        return commit

    def restore(self, commit: Commit) -> None:
        self.pending = commit.outputs + self.pending

    def committed(self, commit: Commit, written: list[int]) -> None:
        self.committed_batches.append([(o.key or b"").decode() for o in commit.outputs])


class HeldTransactions:
    """Stands in for PartitionCommitter._transact: each transaction waits for ``release``."""

    def __init__(self) -> None:
        self.started: list[list[str]] = []
        self._gates: list[asyncio.Event] = []
        self._begun = asyncio.Event()
        self.fail_next = False

    async def __call__(self, commit: Commit) -> list[int]:
        self.started.append([(o.key or b"").decode() for o in commit.outputs])
        gate = asyncio.Event()
        self._gates.append(gate)
        self._begun.set()
        await gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("broker hiccup")
        return list(range(len(commit.outputs)))

    async def release(self, count: int) -> None:
        """Let the ``count``-th transaction end (waiting until it has begun)."""
        async with asyncio.timeout(5):
            while len(self._gates) < count:
                self._begun.clear()
                await self._begun.wait()
        self._gates[count - 1].set()


@pytest.fixture
async def setup() -> tuple[PartitionCommitter, FakeCore, HeldTransactions]:
    committer = PartitionCommitter(KafkaSettings(), "in", 0, Metrics())
    core = FakeCore()
    committer.core = core  # type: ignore[assignment]
    held = HeldTransactions()
    committer._transact = held  # type: ignore[method-assign]
    return committer, core, held


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_claims_noted_during_a_transaction_share_the_next_one(
    setup: tuple[PartitionCommitter, FakeCore, HeldTransactions],
) -> None:
    committer, core, held = setup
    core.note("a")
    first = asyncio.ensure_future(committer.durable())
    await _settle()
    assert held.started == [["a"]]
    # 20 jobs claim while the first transaction runs: none starts a transaction of its own
    waiters = []
    for i in range(20):
        core.note(f"c{i}")
        waiters.append(asyncio.ensure_future(committer.durable()))
    await _settle()
    assert len(held.started) == 1
    await held.release(1)
    assert await first
    await held.release(2)  # the one transaction that carries all 20 claims
    assert all(await asyncio.gather(*waiters))
    assert held.started == [["a"], [f"c{i}" for i in range(20)]]
    assert core.committed_batches == held.started


async def test_a_waiting_commit_loop_does_not_make_a_convoy(
    setup: tuple[PartitionCommitter, FakeCore, HeldTransactions],
) -> None:
    """The commit loop waits for the lock while a transaction runs; claims noted meanwhile wait
    for the loop's transaction. They do not queue behind it on the lock, where each would run
    a transaction of its own for whatever was decided since (one claim per transaction)."""
    committer, core, held = setup
    core.note("a")
    running = asyncio.ensure_future(committer.commit())
    await _settle()
    loop_commit = asyncio.ensure_future(committer.commit())  # queued on the lock
    waiters = []
    for i in range(10):
        core.note(f"c{i}")
        waiters.append(asyncio.ensure_future(committer.durable()))
    await _settle()
    await held.release(1)
    await running
    await _settle()
    core.note("decided-meanwhile")  # an outcome decided while the loop's transaction runs
    await held.release(2)  # the loop's transaction carries the claims
    await loop_commit
    async with asyncio.timeout(5):
        assert all(await asyncio.gather(*waiters))
    assert held.started == [["a"], [f"c{i}" for i in range(10)]]  # no third one for them
    assert core.pending  # the outcome waits for the next commit (the loop's next tick)


async def test_a_claim_noted_after_a_transaction_began_waits_for_the_next(
    setup: tuple[PartitionCommitter, FakeCore, HeldTransactions],
) -> None:
    committer, core, held = setup
    core.note("a")
    running = asyncio.ensure_future(committer.commit())
    await _settle()
    core.note("late")
    late = asyncio.ensure_future(committer.durable())
    await held.release(1)
    await running
    await _settle()
    assert not late.done()  # "a"'s transaction did not carry it
    await held.release(2)
    assert await late
    assert held.started == [["a"], ["late"]]


async def test_a_failed_transaction_is_not_durable_and_the_claim_goes_into_the_next(
    setup: tuple[PartitionCommitter, FakeCore, HeldTransactions],
) -> None:
    committer, core, held = setup
    core.note("a")
    held.fail_next = True
    claim = asyncio.ensure_future(committer.durable())
    await held.release(1)
    with pytest.raises(RuntimeError, match="hiccup"):
        await claim  # the caller retries (Pipeline._claim_durably)
    assert core.pending  # restored for the next transaction
    again = asyncio.ensure_future(committer.durable())
    await held.release(2)
    assert await again
    assert core.committed_batches == [["a"]]


async def test_nothing_noted_means_no_transaction(
    setup: tuple[PartitionCommitter, FakeCore, HeldTransactions],
) -> None:
    committer, _, held = setup
    assert await committer.durable()
    assert held.started == []


async def test_a_partition_being_revoked_stops_the_wait(
    setup: tuple[PartitionCommitter, FakeCore, HeldTransactions],
) -> None:
    committer, core, held = setup
    core.note("a")
    running = asyncio.ensure_future(committer.commit())
    await _settle()
    core.note("b")
    waiting = asyncio.ensure_future(committer.durable())
    await _settle()
    core.closing = True
    await held.release(1)
    await running
    assert await waiting is False
    assert held.started == [["a"]]
