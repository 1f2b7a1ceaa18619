"""The broker stops and starts again (same port, same data) in the middle of a run."""

from __future__ import annotations

import random
import time

import pytest
from aiokafka import AIOKafkaProducer

from tests.faults.conftest import FaultKit
from tests.support.kafka_broker import KafkaBroker

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SWAPS = 1000


async def _broker_healthy(broker: KafkaBroker) -> None:
    """The session broker works for the tests after this one."""
    if not broker.is_running():
        await broker.astart()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, request_timeout_ms=10_000)
    await producer.start()
    try:
        await producer.send_and_wait("device-rebind.fault-health", b"ok")
    finally:
        await producer.stop()


@pytest.mark.timeout(300)
async def test_broker_restart_mid_run_loses_and_duplicates_nothing(
    fault_kit: FaultKit, kafka_broker: KafkaBroker, process_logs: None
) -> None:
    rng = random.Random()
    devices = await fault_kit.seed(SWAPS)
    await fault_kit.control.inject_latency(0.05, operation="refresh_key", times=-1)
    service = fault_kit.process(instance="b0", max_concurrency=32)
    reader = await fault_kit.start_reader()
    await service.start_ready()
    inputs = await fault_kit.produce_swaps(devices)
    try:
        moment = rng.randint(SWAPS // 5, SWAPS // 2)
        await reader.wait_for(moment, timeout=120)
        before = reader.count
        started = time.monotonic()
        await kafka_broker.arestart()
        print(
            f"\nbroker: restarted after {before} committed outcomes "
            f"in {time.monotonic() - started:.1f}s"
        )
        await reader.wait_for(len(inputs), timeout=180)
        assert service.running(), f"the service died with the broker:\n{service.log_tail()}"
        accounting = await fault_kit.finish("broker-restart", inputs)
    finally:
        await _broker_healthy(kafka_broker)
    assert before < len(inputs), "the restart came after all the work was done"
    accounting.assert_clean()
