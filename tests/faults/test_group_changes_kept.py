"""A rebalance that leaves a member its partitions re-reads none of their ledger.

The group's assignment is sticky (service/assignor.py), and a partition revoked and assigned back
to the same member in the next generation keeps its ledger in memory, put back to its committed
state (OpenPartitions.park, PartitionCore.keep_ledger), also under a backlog: only the ledger's
records after the last one the member saw are read, and its transactional producer is reused. A
partition that moves is loaded in full by its new owner; the accounting shows nothing lost or
doubled across both rebalances.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults.conftest import FaultKit, ServiceProcess
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DEVICES = 300
BACKLOG = 1500
"""Swaps waiting when the first member starts: at 8 calls in flight of 50 ms each, ~10 s of
work, so the second member joins in the middle of it."""


def _loads(proc: ServiceProcess, event: str = "partition_state_loaded") -> list[dict[str, Any]]:
    """The member's "partition_state_loaded" log lines (or ``event``'s), in order. A partition
    taken over reads its ledger after it opens: "partition_ledger_loaded" says when it ended."""
    return proc.log_events(event)


@pytest.mark.timeout(300)
async def test_a_rebalance_that_keeps_partitions_rereads_no_ledger_record(
    fault_kit: FaultKit, process_logs: None
) -> None:
    devices = await fault_kit.seed(2 * DEVICES)
    first_batch, second_batch = devices[:DEVICES], devices[DEVICES:]
    reader = await fault_kit.start_reader()
    first = fault_kit.process(instance="k0", max_concurrency=8)
    await first.start_ready()
    inputs = await fault_kit.produce_swaps(first_batch)
    await reader.wait_for(len(inputs), timeout=120)
    [opened] = _loads(first)
    assert opened["partitions"] == [0, 1, 2]
    assert opened["ledger_records"] == 0  # a fresh group: an empty ledger

    # A second member joins: it takes one partition; the first keeps two and reads nothing.
    second = fault_kit.process(instance="k1", max_concurrency=8)
    await second.start_ready()
    await wait_until(lambda: len(_loads(first)) >= 2, 60, "the first member opened again")
    kept = _loads(first)[1]
    [moved] = _loads(second)
    await wait_until(
        lambda: _loads(second, "partition_ledger_loaded"), 60, "the second read its ledger"
    )
    [moved_ledger] = _loads(second, "partition_ledger_loaded")
    print(f"\nkept: first member {kept}; second member {moved}, {moved_ledger}")
    assert len(kept["partitions"]) == 2
    assert kept["kept"] == kept["partitions"]
    assert kept["ledger_records"] == 0
    assert not _loads(first, "partition_ledger_loaded")  # nothing taken over: nothing read
    assert len(moved["partitions"]) == 1
    assert not set(moved["partitions"]) & set(kept["partitions"])
    assert moved["loading"] == moved["partitions"]
    assert moved_ledger["partition"] == moved["partitions"][0]
    assert moved_ledger["ledger_records"] > 0  # it took the partition over: its whole ledger

    # Work while the group has two members, then the second leaves: the first takes its
    # partition back, loading it in full (the other member wrote to it), and keeps its two.
    more = await fault_kit.produce_swaps(second_batch)
    await reader.wait_for(len(inputs) + len(more), timeout=120)
    code, _ = await second.terminate()
    assert code == 0
    await wait_until(lambda: len(_loads(first)) >= 3, 60, "the first member took all back")
    back = _loads(first)[2]
    await wait_until(
        lambda: _loads(first, "partition_ledger_loaded"), 60, "the first read the returned ledger"
    )
    [back_ledger] = _loads(first, "partition_ledger_loaded")
    print(f"back: first member {back}, {back_ledger}")
    assert back["partitions"] == [0, 1, 2]
    assert back["kept"] == kept["partitions"]
    assert back["ledger_records"] == 0  # the kept two: nobody else wrote to them
    assert back["loading"] == moved["partitions"]  # the returned one only, read in full
    assert back_ledger["ledger_records"] >= moved_ledger["ledger_records"]

    inputs.records.extend(more.records)
    accounting = await fault_kit.finish("kept-partitions", inputs)
    accounting.assert_clean()


@pytest.mark.timeout(300)
async def test_a_member_keeps_its_partitions_through_a_rebalance_under_a_backlog(
    fault_kit: FaultKit, process_logs: None
) -> None:
    """A second member joins while the first works a backlog: at the revocation the first has
    swaps read and not decided in every partition. Their admissions are undone
    (PartitionCore.keep_ledger), so it keeps the two partitions it is given back without
    reading a ledger record, and reads those swaps again from the committed offset: every swap
    gets its one outcome."""
    devices = await fault_kit.seed(BACKLOG, prefix="kb")
    await fault_kit.control.inject_latency(0.05, operation="refresh_key", times=-1)
    inputs = await fault_kit.produce_swaps(devices)  # the backlog is there before the service
    reader = await fault_kit.start_reader()
    first = fault_kit.process(instance="kb0", max_concurrency=8)
    await first.start_ready()
    await reader.wait_for(50, timeout=60, what="the first member at work")
    second = fault_kit.process(instance="kb1", max_concurrency=8)
    await second.start_ready()
    await wait_until(lambda: len(_loads(first)) >= 2, 60, "the first member opened again")
    answered_at_join = reader.count
    kept = _loads(first)[1]
    [moved] = _loads(second)
    print(
        f"\nunder a backlog ({answered_at_join} of {BACKLOG} answered): kept {kept}; moved {moved}"
    )
    assert answered_at_join < BACKLOG, "the backlog ran out before the rebalance"
    assert len(kept["partitions"]) == 2
    assert kept["kept"] == kept["partitions"]  # kept, though they had work in hand
    assert kept["ledger_records"] == 0
    assert not _loads(first, "partition_ledger_loaded")  # nothing taken over: nothing read
    await reader.wait_for(len(inputs), timeout=180)
    accounting = await fault_kit.finish("kept-under-backlog", inputs)
    print(accounting.line())
    accounting.assert_clean()
