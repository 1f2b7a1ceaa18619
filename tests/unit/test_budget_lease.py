"""The budget lease is visible (issue 19.7): a gauge, /readyz, and the exchange that renews it.

The lease stops every platform call ``lease_seconds`` after the last acknowledged budget record
(docs/budget.md, *Lease*). Before this, nothing but one log line said so.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from service.app import Service
from service.config import KafkaSettings, PlatformSettings, Settings
from service.metrics import Metrics
from service.platform.budget import RateBudget
from service.shared.budget_exchange import BudgetExchange


class Clock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _expired(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("rebind_budget_lease_expired")


def test_the_lease_gauge_is_1_exactly_while_the_lease_is_expired() -> None:
    clock, metrics = Clock(), Metrics()
    budget = RateBudget(100, clock=clock, metrics=metrics, wall_offset=0.0)
    assert _expired(metrics) == 0.0  # no lease (no exchange): never expired
    assert not budget.lease_expired()
    budget.renew_lease(clock.now + 6.0)
    clock.now += 5.9
    assert _expired(metrics) == 0.0
    clock.now += 0.1
    assert budget.lease_expired()
    assert _expired(metrics) == 1.0
    assert not budget.try_acquire()  # what the gauge reports: no grant
    budget.renew_lease(clock.now + 6.0)
    assert _expired(metrics) == 0.0


class FailingTopic:
    """A budget topic whose writes fail from ``fail`` on (the broker unreachable)."""

    def __init__(self) -> None:
        self.fail = False
        self.records: list[tuple[bytes | None, bytes | None]] = []

    async def append(self, key: bytes, value: bytes) -> None:
        if self.fail:
            raise ConnectionError("budget topic unreachable")
        self.records.append((key, value))

    def read_from(self, position: int) -> Sequence[tuple[bytes | None, bytes | None]]:
        return self.records[position:]


async def test_the_gauge_follows_the_exchange_publications() -> None:
    clock, metrics = Clock(), Metrics()
    budget = RateBudget(100, clock=clock, metrics=metrics, wall_offset=1_000_000.0)
    topic = FailingTopic()
    exchange = BudgetExchange({}, "budget", "i0", budget, metrics, publish_interval=2.0, io=topic)
    await exchange.start()
    await exchange.on_assigned(1.0)
    assert budget.try_acquire()
    topic.fail = True
    for _ in range(3):  # three periodic publications fail: the lease (6 s) runs out
        clock.now += 2.0
        assert not await exchange.publish()
    assert _expired(metrics) == 1.0
    topic.fail = False
    clock.now += 2.0
    assert await exchange.publish()
    assert _expired(metrics) == 0.0
    await budget.aclose()


def _settings() -> Settings:
    return Settings(
        kafka=KafkaSettings(instance_id="i0"),
        platform=PlatformSettings(base_url="https://iot.example.test", app_id="a", secret="s"),
    )


async def test_readyz_answers_503_naming_the_expired_lease() -> None:
    service = Service(_settings())
    try:
        service.pipeline.started.set()
        service._assigned_once = True
        service.tokens.valid = lambda: True  # type: ignore[method-assign]
        assert service.readiness() == (True, "ready")
        service.budget.renew_lease(service.budget.now() - 0.1)  # the lease ran out
        ready, reason = service.readiness()
        assert not ready
        assert "budget lease expired" in reason
        assert "REBIND_TOPICS__BUDGET" in reason
        service.budget.renew_lease(service.budget.now() + 6.0)
        assert service.readiness() == (True, "ready")
    finally:
        await service.budget.aclose()
        await service.tokens.aclose()


@pytest.mark.parametrize("lease", [None, 6.0])
def test_no_lease_or_a_live_one_is_not_expired(lease: float | None) -> None:
    clock = Clock()
    budget = RateBudget(10, clock=clock, wall_offset=0.0)
    budget.renew_lease(None if lease is None else clock.now + lease)
    assert not budget.lease_expired()
