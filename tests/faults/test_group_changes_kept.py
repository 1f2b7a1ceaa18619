"""A rebalance that leaves a member its partitions re-reads none of their ledger.

The group's assignment is sticky (service/assignor.py), and a partition revoked and assigned back
to the same member in the next generation keeps its ledger in memory when its state was settled
(OpenPartitions.park): only the ledger's records after the last one the member saw are read, and
its transactional producer is reused. A partition that moves is loaded in full by its new owner;
the accounting shows nothing lost or doubled across both rebalances.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.faults.conftest import FaultKit, ServiceProcess
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DEVICES = 300


def _loads(proc: ServiceProcess) -> list[dict[str, Any]]:
    """The member's "partition_state_loaded" log lines, in order."""
    found = []
    for line in proc.log_text().splitlines():
        if '"partition_state_loaded"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == "partition_state_loaded":
            found.append(rec)
    return found


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
    print(f"\nkept: first member {kept}; second member {moved}")
    assert len(kept["partitions"]) == 2
    assert kept["kept"] == kept["partitions"]
    assert kept["ledger_records"] == 0
    assert len(moved["partitions"]) == 1
    assert not set(moved["partitions"]) & set(kept["partitions"])
    assert moved["ledger_records"] > 0  # it took the partition over: its whole ledger

    # Work while the group has two members, then the second leaves: the first takes its
    # partition back, loading it in full (the other member wrote to it), and keeps its two.
    more = await fault_kit.produce_swaps(second_batch)
    await reader.wait_for(len(inputs) + len(more), timeout=120)
    code, _ = await second.terminate()
    assert code == 0
    await wait_until(lambda: len(_loads(first)) >= 3, 60, "the first member took all back")
    back = _loads(first)[2]
    print(f"back: first member {back}")
    assert back["partitions"] == [0, 1, 2]
    assert back["kept"] == kept["partitions"]
    assert back["ledger_records"] >= moved["ledger_records"]  # the returned partition only

    inputs.records.extend(more.records)
    accounting = await fault_kit.finish("kept-partitions", inputs)
    accounting.assert_clean()
