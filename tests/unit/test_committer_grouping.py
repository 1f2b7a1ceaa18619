"""PartitionCommitter.durable: claims share transactions instead of each running one (issue 24).

The producer is replaced by a stand-in that holds each transaction (before its records are
acknowledged, or before it ends) until the test lets it go on, so the test decides the
interleaving; what happens on a real broker is covered by
the integration and fault tests and measured by ``make bench``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from service.config import KafkaSettings
from service.metrics import Metrics
from service.pipeline.committer import PartitionCommitter
from service.pipeline.outbox import Commit
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


@dataclass
class Acked:
    offset: int


class HeldTransactions:
    """Stands in for the partition's producer: each transaction is held at one point until the
    test releases it: before its records are acknowledged (``hold="acks"``) or before it ends
    (``hold="end"``). ``started`` holds the keys each transaction wrote, late ones included."""

    def __init__(self, hold: str) -> None:
        self.hold = hold
        self.started: list[list[str]] = []
        self._gates: list[asyncio.Event] = []
        self._begun = asyncio.Event()
        self.fail_next = False

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self.started.append([])
        gate = asyncio.Event()
        self._gates.append(gate)
        self._begun.set()
        yield
        if self.hold == "end":
            await gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("broker hiccup")

    async def send(self, topic: str, value: bytes, **kwargs: object) -> asyncio.Future[Acked]:
        written = self.started[-1]
        written.append(bytes(kwargs["key"]).decode())  # type: ignore[call-overload]
        future: asyncio.Future[Acked] = asyncio.get_running_loop().create_future()
        gate = self._gates[-1]
        if self.hold == "acks" and not gate.is_set():
            gate_task = asyncio.ensure_future(gate.wait())
            gate_task.add_done_callback(lambda _: future.set_result(Acked(len(written))))
        else:
            future.set_result(Acked(len(written)))
        return future

    async def send_offsets_to_transaction(self, offsets: object, group: str) -> None:
        return None

    async def release(self, count: int) -> None:
        """Let the ``count``-th transaction go on (waiting until it has begun)."""
        async with asyncio.timeout(5):
            while len(self._gates) < count:
                self._begun.clear()
                await self._begun.wait()
        self._gates[count - 1].set()


def _committer(hold: str) -> tuple[PartitionCommitter, FakeCore, HeldTransactions]:
    committer = PartitionCommitter(KafkaSettings(), "in", 0, Metrics())
    core = FakeCore()
    committer.core = core  # type: ignore[assignment]
    held = HeldTransactions(hold)
    committer._producer = held
    return committer, core, held


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_claims_noted_while_records_are_on_their_way_join_that_transaction() -> None:
    committer, core, held = _committer(hold="acks")
    core.note("a")
    first = asyncio.ensure_future(committer.durable())
    await _settle()
    assert held.started == [["a"]]
    # 20 jobs claim while the first transaction's records are on their way: none starts a
    # transaction of its own, the running one takes them before it ends
    waiters = []
    for i in range(20):
        core.note(f"c{i}")
        waiters.append(asyncio.ensure_future(committer.durable()))
    await _settle()
    assert len(held.started) == 1
    await held.release(1)
    async with asyncio.timeout(5):
        assert await first
        assert all(await asyncio.gather(*waiters))
    assert held.started == [["a"] + [f"c{i}" for i in range(20)]]
    assert core.committed_batches == held.started


async def test_claims_noted_after_the_late_take_share_the_next_transaction() -> None:
    committer, core, held = _committer(hold="end")
    core.note("a")
    first = asyncio.ensure_future(committer.durable())
    await _settle()
    waiters = []
    for i in range(20):
        core.note(f"c{i}")
        waiters.append(asyncio.ensure_future(committer.durable()))
    await _settle()
    assert len(held.started) == 1  # the first is ending: they wait for it, then share one
    await held.release(1)
    assert await first
    await held.release(2)
    assert all(await asyncio.gather(*waiters))
    assert held.started == [["a"], [f"c{i}" for i in range(20)]]
    assert core.committed_batches == held.started


async def test_a_waiting_commit_loop_does_not_make_a_convoy() -> None:
    """The commit loop waits for the lock while a transaction runs; claims noted meanwhile wait
    for the loop's transaction. They do not queue behind it on the lock, where each would run
    a transaction of its own for whatever was decided since (one claim per transaction)."""
    committer, core, held = _committer(hold="end")
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
    core.note("decided-meanwhile")  # an outcome decided while the loop's transaction ends
    await held.release(2)  # the loop's transaction carries the claims
    await loop_commit
    async with asyncio.timeout(5):
        assert all(await asyncio.gather(*waiters))
    assert held.started == [["a"], [f"c{i}" for i in range(10)]]  # no third one for them
    assert core.pending  # the outcome waits for the next commit (the loop's next tick)


async def test_a_failed_transaction_is_not_durable_and_the_claim_goes_into_the_next() -> None:
    committer, core, held = _committer(hold="end")
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


async def test_nothing_noted_means_no_transaction() -> None:
    committer, _, held = _committer(hold="end")
    assert await committer.durable()
    assert held.started == []


async def test_a_partition_being_revoked_stops_the_wait() -> None:
    committer, core, held = _committer(hold="end")
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


async def test_a_commit_cancelled_while_its_transaction_ends_never_sends_its_outputs_again() -> (
    None
):
    """Issue 19, item 7: a commit cancelled after EndTxn was sent used to restore its outputs,
    and a later transaction sent them again (published twice once the first one committed).
    Now the transaction runs to its end; a committed one stays committed, then the
    cancellation passes on."""
    committer, core, held = _committer(hold="end")
    core.note("a")
    commit = asyncio.ensure_future(committer.commit())
    await _settle()
    assert held.started == [["a"]]
    commit.cancel()  # e.g. a revocation's cancel_all, while EndTxn is on its way
    await _settle()
    await held.release(1)  # the broker commits the transaction
    with pytest.raises(asyncio.CancelledError):
        await commit
    assert core.committed_batches == [["a"]]
    assert core.pending == []  # not restored: nothing is sent again
    await committer.commit()
    assert held.started == [["a"]]


async def test_a_commit_cancelled_while_its_transaction_fails_keeps_its_outputs() -> None:
    committer, core, held = _committer(hold="end")
    held.fail_next = True
    core.note("a")
    commit = asyncio.ensure_future(committer.commit())
    await _settle()
    commit.cancel()
    await _settle()
    await held.release(1)  # the transaction fails (aborted)
    with pytest.raises(asyncio.CancelledError):
        await commit
    assert core.committed_batches == []
    assert [(o.key or b"").decode() for o in core.pending] == ["a"]  # for the next transaction
