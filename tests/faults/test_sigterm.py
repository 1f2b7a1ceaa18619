"""SIGTERM with a full in-flight window drains, commits and exits well within 30 s; a second
signal exits at once. The run then completes with nothing lost or doubled."""

from __future__ import annotations

import signal
import time

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.faults.conftest import FaultKit
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SWAPS = 3000


async def _committed_total(fault_kit: FaultKit) -> int:
    """Sum of the group's committed input offsets: the inputs answered (one record each)."""
    h = fault_kit.harness
    consumer = AIOKafkaConsumer(
        bootstrap_servers=h.bootstrap, group_id=h.group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        total = 0
        for p in range(3):
            total += await consumer.committed(TopicPartition(h.topics.device_swapped, p)) or 0
        return total
    finally:
        await consumer.stop()


@pytest.mark.timeout(300)
async def test_sigterm_drains_commits_and_exits_and_a_second_signal_exits_at_once(
    fault_kit: FaultKit, process_logs: None
) -> None:
    control = fault_kit.control
    devices = await fault_kit.seed(SWAPS)
    await control.inject_latency(0.5, operation="refresh_key", times=-1)
    service = fault_kit.process(instance="t0", max_concurrency=64)
    reader = await fault_kit.start_reader()
    inputs = await fault_kit.produce_swaps(devices)  # a backlog: the window fills at once
    await service.start_ready()

    async def window_full() -> bool:
        return len(await control.calls(operation="refresh_key")) >= 64

    await wait_until(window_full, 30, "64 PUTs in flight")
    code, took = await service.terminate(timeout=30)
    print(f"\nsigterm: exit code {code} after {took:.1f}s (drain bound 20 s)")
    assert code == 0, service.log_tail()
    assert took < 30
    assert '"stopped"' in service.log_text()
    # Drained work is committed, and only drained work: offsets and outcomes agree.
    await reader.read_to_end()
    committed = await _committed_total(fault_kit)
    print(f"sigterm: {committed} inputs committed, {reader.count} outcomes")
    assert committed == reader.count > 0

    await fault_kit.start_reader()  # the reader above was stopped by read_to_end
    # Slow calls now, so the drain of the first signal is still going when the second comes.
    await control.clear_faults()
    await control.inject_latency(8, operation="refresh_key", times=-1)
    before = len(await control.calls(operation="refresh_key"))
    await service.start_ready()

    async def slow_calls_in_flight() -> bool:
        return len(await control.calls(operation="refresh_key")) >= before + 8

    await wait_until(slow_calls_in_flight, 30, "slow PUTs in flight")
    service.signal(signal.SIGTERM)
    # The second signal once the first is handled (two signals sent back to back can reach the
    # process as one: the kernel does not queue standard signals).
    await wait_until(
        lambda: service.log_text().count('"stopping_draining"') >= 2,
        10,
        "the first SIGTERM handled",
    )
    started = time.monotonic()
    service.signal(signal.SIGTERM)
    code = await service.wait_exit(10)
    took = time.monotonic() - started
    print(f"sigterm: second signal: exit code {code} after {took:.2f}s")
    assert code == 130
    assert took < 3

    await control.clear_faults()
    await service.start_ready()
    assert fault_kit.reader is not None
    await fault_kit.reader.wait_for(len(inputs), timeout=120)
    accounting = await fault_kit.finish("sigterm", inputs)
    accounting.assert_clean()
