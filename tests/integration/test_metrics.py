"""The service's real /metrics, /healthz and /readyz, read over HTTP while it works.

Each counter and gauge of the contract moves when its event happens; labels stay bounded.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service import __version__
from service.app import Service
from service.metrics import OPERATIONS, OUTCOMES
from service.pipeline.ledger import Entry, State, encode_entry
from tests.fixtures.kafka import INPUT_PARTITIONS
from tests.fixtures.service import Harness
from tests.support.events import swap_event
from tests.support.exposition import Exposition, get, scrape
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

ALLOWED_LABELS = {
    "topic",
    "outcome",
    "operation",
    "http_status",
    "error_code",
    "partition",
    "lane",  # bulk or urgent (issue 23)
    "version",
    "result",
    "le",
}
LAG_DEADLINE = 20.0  # the lag gauge is refreshed every 5 s


async def scrape_until(
    port: int, check: Callable[[Exposition], bool], timeout: float, what: str
) -> Exposition:
    """Scrape /metrics until ``check`` holds (deadline ``timeout``); return that exposition."""
    seen: list[Exposition] = []

    async def condition() -> bool:
        seen.append(await scrape(port))
        return check(seen[-1])

    await wait_until(condition, timeout, what)
    return seen[-1]


async def test_every_metric_moves_with_its_event(harness: Harness) -> None:
    control = harness.sim.control
    topics = harness.topics
    await control.seed_device("dev-metrics-ok-5e1", "node-metrics-old-5e1")
    await control.seed_device("dev-metrics-online-5e2", "node-metrics-old-5e2", status="ONLINE")
    service = await harness.start_service(
        online_retry_initial_seconds=2.0, online_retry_max_seconds=2.0
    )
    port = service.ops.port

    before = await scrape(port)
    for outcome in OUTCOMES:  # pre-created at zero, so rate() works from the first scrape
        assert before.value("rebind_outcomes_total", outcome=outcome) == 0
    for operation in OPERATIONS:
        assert before.value("rebind_platform_throttle_rejections_total", operation=operation) == 0
    assert before.value("rebind_platform_device_online_rejections_total") == 0
    assert before.value("rebind_build_info", version=__version__) == 1
    assert before.value("rebind_ready") == 1
    assert before.value("rebind_rate_limit_per_minute") == 100_000  # one replica: all of it

    await harness.produce(
        [
            (
                b"dev-metrics-ok-5e1",
                swap_event("dev-metrics-ok-5e1", "node-metrics-new-5e1", event_id="evt-metrics-1"),
            ),
            (
                b"dev-metrics-ghost-5e3",
                swap_event("dev-metrics-ghost-5e3", "node-metrics-5e3", event_id="evt-metrics-3"),
            ),
            (b"dev-metrics-bad-5e4", b"{not json evt-metrics-4"),
            (
                b"dev-metrics-online-5e2",
                swap_event(
                    "dev-metrics-online-5e2", "node-metrics-new-5e2", event_id="evt-metrics-2"
                ),
            ),
        ]
    )
    outs = await harness.read(3)
    assert sorted(o.topic for o in outs) == sorted(
        [topics.credential_updated, topics.rebind_failed, topics.dead_letter]
    )
    # the online device's swap waits (100611 -> deferred), then goes through once it is offline
    waiting = await scrape_until(
        port,
        lambda e: e.value("rebind_deferred_events") == 1,
        30,
        "a swap deferred while its device is online",
    )
    rejected = waiting.value("rebind_platform_device_online_rejections_total")
    assert rejected is not None
    assert rejected >= 1
    await control.set_status("dev-metrics-online-5e2", "OFFLINE")
    outs = await harness.read(4)
    assert sum(o.topic == topics.credential_updated for o in outs) == 2

    def settled(e: Exposition) -> bool:
        return (
            e.value("rebind_outcomes_total", outcome="credential_updated") == 2
            and e.value("rebind_inflight_events") == 0
            and e.value("rebind_deferred_events") == 0
        )

    after = await scrape_until(port, settled, 30, "outcomes committed, nothing in flight")

    # outcomes
    deferrals = after.value("rebind_outcomes_total", outcome="deferred")
    assert deferrals is not None
    assert deferrals >= 1
    assert after.value("rebind_outcomes_total", outcome="credential_updated") == 2
    assert after.value("rebind_outcomes_total", outcome="rebind_failed") == 1
    assert after.value("rebind_outcomes_total", outcome="dead_lettered") == 1
    assert after.value("rebind_outcomes_total", outcome="duplicate") == 0
    # consumed, by topic: the four inputs (deferred swaps wait in the ledger, not in a topic)
    assert after.value("rebind_events_consumed_total", topic=topics.device_swapped) == 4
    assert after.value("rebind_events_consumed_total", topic=topics.retry) is None
    # every 100611 answer is counted, and each one deferred the swap
    assert after.value("rebind_platform_device_online_rejections_total") == deferrals
    assert (
        after.value(
            "rebind_platform_requests_total",
            operation="refresh_device_key",
            http_status="400",
            error_code="100611",
        )
        == deferrals
    )
    # platform calls, by operation, status and code
    req = "rebind_platform_requests_total"
    assert after.value(req, operation="login", http_status="200", error_code="none") == 1
    assert (
        after.value(req, operation="refresh_device_key", http_status="200", error_code="none") == 2
    )
    assert (
        after.value(req, operation="refresh_device_key", http_status="404", error_code="100403")
        == 1
    )
    calls = after.value(req)
    assert calls is not None
    assert calls >= 4
    # latency histogram: one observation per call
    duration = "rebind_platform_request_duration_seconds_count"
    assert after.value(duration) == calls
    assert after.value(duration, operation="refresh_device_key") == after.value(
        req, operation="refresh_device_key"
    )
    # every call waited for the budget, even if for no time at all
    waits = after.value("rebind_rate_limiter_wait_seconds_count")
    assert waits is not None
    assert waits >= calls
    # transactions and end-to-end latency
    committed = after.value("rebind_kafka_transactions_total", result="committed")
    assert committed is not None
    assert committed >= 1
    latency = after.value("rebind_event_latency_seconds_count")
    assert latency is not None
    assert latency == 4  # per input record, when it is finished
    assert after.value("rebind_platform_token_valid") == 1
    assert after.value("rebind_build_info", version=__version__) == 1

    # consumer lag, per input partition, refreshed every 5 s: wait with a deadline
    def lag_everywhere(e: Exposition) -> bool:
        partitions = {labels["partition"] for labels, _ in e.samples("rebind_consumer_lag")}
        return partitions == {str(p) for p in range(INPUT_PARTITIONS)}

    lagged = await scrape_until(port, lag_everywhere, LAG_DEADLINE, "lag of every partition")
    assert all(v == 0 for _, v in lagged.samples("rebind_consumer_lag"))

    assert_bounded(
        lagged,
        forbidden=[
            "dev-metrics",
            "node-metrics",
            "evt-metrics",
            # with their dash: a topic's random hex suffix may hold "5e4" itself
            "-5e1",
            "-5e2",
            "-5e3",
            "-5e4",
        ],
    )
    print("\n--- /metrics after the scenario ---\n" + lagged.text)


def assert_bounded(exposition: Exposition, forbidden: list[str]) -> None:
    """No device id, node id or event id anywhere in the exposition; only known label names."""
    for text in forbidden:
        assert text not in exposition.text, f"{text!r} leaked into /metrics"
    assert exposition.label_names() <= ALLOWED_LABELS


THROTTLE_WINDOW_SECONDS = 5.0
"""The service's flow-control window in the throttle test: after a 1010009 the budget pauses until
its oldest call leaves the window, and the test waits for the retry, so a short window ends it in
seconds instead of the production platform's minute (the counters do not depend on it)."""


async def test_a_throttle_rejection_is_counted_by_operation(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-throttle-7a1", "node-throttle-old")
    service = await harness.start_service(rate_window_seconds=THROTTLE_WINDOW_SECONDS)
    port = service.ops.port
    await control.inject_error(403, "1010009", operation="refresh_key", times=1)

    await harness.produce(
        [(b"dev-throttle-7a1", swap_event("dev-throttle-7a1", "node-throttle-new"))]
    )

    def throttled(e: Exposition) -> bool:
        return e.value("rebind_platform_throttle_rejections_total") == 1

    after = await scrape_until(port, throttled, 30, "one throttle rejection counted")
    assert (
        after.value("rebind_platform_throttle_rejections_total", operation="refresh_device_key")
        == 1
    )
    assert (
        after.value(
            "rebind_platform_requests_total",
            operation="refresh_device_key",
            http_status="403",
            error_code="1010009",
        )
        == 1
    )
    assert after.value("rebind_platform_throttle_rejections_total", operation="login") == 0
    # the throttled call is retried once the budget allows (it pauses after a 1010009)
    [out] = await harness.read(1, timeout=90)
    assert out.topic == harness.topics.credential_updated
    assert_bounded(await scrape(port), forbidden=["dev-throttle", "node-throttle"])


async def test_health_endpoints_and_unknown_paths(harness: Harness) -> None:
    service = await harness.start_service()
    port = service.ops.port

    healthz = await get(port, "/healthz")
    assert (healthz.status_code, healthz.text) == (200, "ok\n")
    readyz = await get(port, "/readyz")
    assert (readyz.status_code, readyz.text) == (200, "ready\n")
    assert (await get(port, "/readyz?verbose=1")).status_code == 200
    head = await get(port, "/metrics", method="HEAD")
    assert head.status_code == 200
    assert head.content == b""
    assert (await get(port, "/nope")).status_code == 404
    assert (await get(port, "/metrics/extra")).status_code == 404
    assert (await get(port, "/metrics", method="POST")).status_code == 405


async def test_readyz_is_503_until_the_service_is_connected(harness: Harness) -> None:
    service = Service(harness.settings())
    try:
        ok, why = service.readiness()
        assert not ok
        assert why == "kafka: not connected yet"
        # the ops port up, the pipeline not started: what a probe sees during start-up
        await service.ops.start()
        port = service.ops.port
        readyz = await get(port, "/readyz")
        assert readyz.status_code == 503
        assert readyz.text == "kafka: not connected yet\n"
        assert (await get(port, "/healthz")).status_code == 200
        assert (await scrape(port)).value("rebind_ready") == 0
    finally:
        await service.ops.stop()
        await service.client.aclose()
        await service.budget.aclose()


async def test_expiry_is_counted(harness: Harness) -> None:
    """A ``done`` ledger entry older than the retention is tombstoned by the sweep and counted;
    a swap older than the retention is answered SWAP_TOO_OLD and counted."""
    old_ms = 1_262_304_000_000  # 2010-01-01: older than the tests' ten-year retention
    done = Entry("evt-expired", "/inventory/test", (old_ms, 0), "n-done", State.DONE)
    done.outcome = "credential_updated"
    await harness.produce([(b"dev-expired-9c1", encode_entry(done))], topic=harness.topics.ledger)
    await harness.sim.control.seed_device("dev-too-old-9c2", "n-before")
    service = await harness.start_service()
    port = service.ops.port
    before = await scrape(port)
    assert before.value("rebind_swaps_too_old_total") is not None
    old = swap_event(
        "dev-too-old-9c2", "n-after", event_id="evt-too-old", ce_time="2010-01-01T00:00:00Z"
    )
    await harness.produce([(b"dev-too-old-9c2", old)])
    [failed] = await harness.read(1)
    assert failed.data["errorCode"] == "SWAP_TOO_OLD"
    after = await scrape_until(
        port,
        lambda e: (
            e.value("rebind_swaps_too_old_total") == 1
            and e.value("rebind_ledger_entries_expired_total") == 1
        ),
        30,
        "the stale swap and the expired entry counted",
    )
    assert after.value("rebind_swaps_too_old_total") == 1
