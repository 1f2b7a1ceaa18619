"""A partition taken over works while its ledger is still read (issue 20, item 4).

The new owner reads the ledger from its end back (service/pipeline/takeover.py). A swap of a
device whose entry is among the newest records is answered long before the read ends; a swap of
a device whose only entry is the ledger's oldest record waits for it, and is answered as that
entry says: older than the device's latest swap, so ``SUPERSEDED`` without a call (had it not
waited, the service would have judged it a first swap and called the platform).
"""

from __future__ import annotations

import itertools
import time
import uuid
from datetime import UTC, datetime

import orjson
import pytest

from tests.faults.conftest import FaultKit
from tests.fixtures.kafka import INPUT_PARTITIONS
from tests.support.accounting import produce_inputs
from tests.support.events import swap_event
from tests.support.ledger_fill import done_record, filler, write_ledger
from tests.support.partitioning import device_on
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FILLER = 300_000
"""Ledger records between the two devices' entries: a read of a few seconds."""
HOUR_MS = 3_600_000


def _at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@pytest.mark.timeout(300)
async def test_a_partition_taken_over_answers_known_devices_before_its_ledger_is_read(
    fault_kit: FaultKit, process_logs: None
) -> None:
    harness = fault_kit.harness
    early = device_on(0, INPUT_PARTITIONS, f"early-{uuid.uuid4().hex[:6]}")  # oldest record
    late = device_on(0, INPUT_PARTITIONS, f"late-{uuid.uuid4().hex[:6]}")  # newest record
    await fault_kit.control.configure(rate_limit_per_minute=1_000_000)
    await fault_kit.control.seed_devices(
        [{"device_id": d, "node_id": f"old-{d}"} for d in (early, late)]
    )
    now_ms = int(time.time() * 1000)
    # The early device's latest swap (an hour ago) is the ledger's first record; the late
    # device's (two hours ago) its last one, after FILLER other devices.
    written = await write_ledger(
        harness.bootstrap,
        harness.topics.ledger,
        0,
        itertools.chain(
            [done_record(early, event_id="early-latest", time_ms=now_ms - HOUR_MS)],
            filler(FILLER, time_ms=now_ms - HOUR_MS),
            [done_record(late, time_ms=now_ms - 2 * HOUR_MS)],
        ),
    )
    assert written == FILLER + 2
    # A fresh swap of the late device (applied), and a swap of the early device dated before
    # its latest one (superseded), both waiting on the input before the member starts.
    swaps = {
        late: (str(uuid.uuid4()), now_ms),
        early: (str(uuid.uuid4()), now_ms - 2 * HOUR_MS),
    }
    inputs = await produce_inputs(
        harness.bootstrap,
        harness.topics.device_swapped,
        [
            (
                d.encode(),
                swap_event(d, f"new-{d}", event_id=event_id, ce_time=_iso(at)),
                [],
                (event_id, d, f"new-{d}"),
            )
            for d, (event_id, at) in swaps.items()
        ],
    )
    assert {r.partition for r in inputs.records} == {0}
    reader = await fault_kit.start_reader()
    member = fault_kit.process(instance="t0")
    await member.start_ready()
    await reader.wait_for(2, timeout=120, what="both swaps answered")
    await wait_until(
        lambda: member.log_events("partition_ledger_loaded"), 60, "the ledger read to its end"
    )
    loaded = next(r for r in member.log_events("partition_ledger_loaded") if r["partition"] == 0)
    answers = {orjson.loads(r.value or b"")["subject"]: r for r in reader.records}
    late_answer, early_answer = answers[late].json(), answers[early].json()
    print(
        f"\nledger read: {loaded}\nlate device answered at {late_answer['time']} "
        f"({answers[late].topic}); early device at {early_answer['time']} "
        f"({answers[early].topic}, {early_answer['data'].get('errorCode')})"
    )
    assert loaded["ledger_records"] == FILLER + 2
    # The late device's swap was answered before the read ended ...
    assert answers[late].topic == harness.topics.credential_updated
    assert _at(late_answer["time"]) < _at(loaded["timestamp"])
    # ... the early device's waited for its entry, the ledger's oldest record, and lost to it.
    assert answers[early].topic == harness.topics.rebind_failed
    assert early_answer["data"]["errorCode"] == "SUPERSEDED"
    # (Without the wait it was answered credential-updated, with a call, at once.)
    assert _at(early_answer["time"]) > _at(late_answer["time"])
    refreshes = await fault_kit.control.calls(operation="refresh_key", device_id=early)
    assert refreshes == []
    assert (await fault_kit.control.device(early))["node_id"] == f"old-{early}"
    # Loading never cost the member its place in the group: assigned once, never revoked.
    assert len(member.log_events("partitions_assigned")) == 1
    assert member.log_events("partitions_revoked") == []
    accounting = await fault_kit.finish("take-over", inputs, check_devices=False)
    accounting.assert_clean()
