"""A member paused past its session timeout must not commit anything when it wakes up (issue 10).

The first replica works a backlog with a slow commit (3 s between transactions, no early commit),
so it always holds finished work not yet committed. It is frozen (SIGSTOP) while it does; after
its session timeout (6 s) the group drops it and a second replica (another instance id, so
another transactional id today) takes every partition and redoes that work. Then the first is
woken (SIGCONT): whatever it still wanted to commit (outcomes, offsets) must not become visible.
Counted twice: by input (the accounting) and by outcome event id.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.request

import pytest

from tests.faults.conftest import FaultKit, ServiceProcess
from tests.fixtures.service import Harness
from tests.support import clock
from tests.support.accounting import Produced, duplicate_outcome_ids
from tests.support.group import committed_offsets, stable_with
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SWAPS = 900
LATENCY = 0.25
CONCURRENCY = 8
SLOW_COMMIT = {
    "REBIND_KAFKA__COMMIT_INTERVAL_MS": "3000",
    "REBIND_KAFKA__COMMIT_BATCH_SIZE": "100000",
    "REBIND_KAFKA__SESSION_TIMEOUT_MS": "6000",
}


@pytest.fixture(autouse=True)
async def platform_clock(harness: Harness) -> float:
    """The successor waits one window for the frozen member's share to age out before it calls;
    nothing here measures the window, so in CI it is the short one
    (``clock.WAIT_WINDOW_SECONDS``), 60 s under soak."""
    return await clock.apply(harness, clock.window(clock.WAIT_WINDOW_SECONDS))


@pytest.mark.timeout(300)
async def test_a_member_paused_past_its_session_timeout_duplicates_nothing(
    fault_kit: FaultKit, process_logs: None
) -> None:
    control = fault_kit.control
    harness = fault_kit.harness
    devices = await fault_kit.seed(SWAPS, prefix="zc")
    await control.inject_latency(LATENCY, operation="refresh_key", times=-1)
    zombie = fault_kit.process(instance="zc0", max_concurrency=CONCURRENCY)
    successor = fault_kit.process(instance="zc1", max_concurrency=CONCURRENCY)
    zombie.env.update(SLOW_COMMIT)
    reader = await fault_kit.start_reader()
    await zombie.start_ready()
    inputs = await fault_kit.produce_swaps(devices)

    async def applied() -> set[str]:
        """Devices whose key refresh the platform answered with success."""
        return {
            c["device_id"]
            for c in await control.calls(operation="refresh_key")
            if c["status"] == 200 and c["error_code"] is None
        }

    async def held() -> list[Produced]:
        """Inputs the platform answered whose offset the group has not committed yet."""
        done = await applied()
        offsets = await committed_offsets(
            harness.bootstrap, harness.group_id, harness.topics.device_swapped
        )
        return [
            r
            for r in inputs.records
            if r.device_id in done and r.offset >= offsets.get(r.partition, 0)
        ]

    # Frozen while it holds finished work: after its first commit, with swaps answered by the
    # platform whose offsets are not committed. (A fresh swap's claim commits before its call,
    # so at most about CONCURRENCY answered swaps are ever uncommitted.) A commit can slip in
    # between the check and the signal: then it is woken and frozen again at the next chance.
    holding: list[Produced] = []
    before = 0.0
    for _ in range(5):

        async def holding_finished_work() -> bool:
            return reader.count > 0 and len(await held()) >= 3

        await wait_until(holding_finished_work, 60, "the first replica holding finished work")
        before = await asyncio.to_thread(committed_by, zombie)
        zombie.signal(signal.SIGSTOP)
        holding = await held()
        if len(holding) >= 2:
            break
        zombie.signal(signal.SIGCONT)
    assert len(holding) >= 2, f"never frozen with finished work held ({len(holding)})"
    frozen_seq = max(c["seq"] for c in await control.calls())
    frozen_committed = reader.count

    await successor.start_ready()

    await wait_until(
        lambda: stable_with(harness.bootstrap, harness.group_id, 1),
        60,
        "the group without the frozen member",
    )

    # The successor redoes the frozen member's uncommitted work (a call for each of those
    # devices after the freeze) and goes on.
    async def redone_by_successor() -> bool:
        again = {c["device_id"] for c in await control.calls(since=frozen_seq)}
        return all(r.device_id in again for r in holding)

    await wait_until(redone_by_successor, 120, f"the {len(holding)} held swaps redone")
    redone = len(holding)
    zombie.signal(signal.SIGCONT)

    async def zombie_settled() -> bool:
        if not zombie.running():
            return True
        return await stable_with(harness.bootstrap, harness.group_id, 2)

    await wait_until(zombie_settled, 60, "the woken member to exit or rejoin")
    after = await asyncio.to_thread(committed_by, zombie) if zombie.running() else None
    woken = "running" if zombie.running() else f"exited ({zombie.proc and zombie.proc.returncode})"
    print(
        f"\nzombie: frozen holding {len(holding)} answered, uncommitted swaps; woken, it is {woken}"
    )
    await reader.wait_answered(inputs, timeout=120)
    accounting = await fault_kit.finish("zombie-commit", inputs)
    dup_ids = duplicate_outcome_ids(
        r for r in reader.records if r.topic != harness.topics.dead_letter
    )
    print(
        accounting.line_with(
            duplicated_outcome_ids=len(dup_ids),
            held_at_freeze=redone,
            committed_at_freeze=frozen_committed,
            zombie_log_fenced=zombie.log_text().count("fenced"),
            zombie_outcomes_committed_after_wake="?" if after is None else after - before,
        ),
        flush=True,
    )
    assert not dup_ids, f"outcome ids committed twice: {dup_ids[:10]}"
    accounting.assert_clean()


def committed_by(proc: ServiceProcess) -> float:
    """Outcomes a running instance says it committed (``rebind_outcomes_total``, all kinds)."""
    url = f"http://127.0.0.1:{proc.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rebind_outcomes_total{")
    )
