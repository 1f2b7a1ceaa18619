"""Issue 3, end to end (service + real broker + simulator): retries, deterministic requests,
reconciliation of ambiguous answers, and two-way TLS."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from service.config import load_settings
from service.platform import ERROR_TABLE
from tests.fixtures.kafka import INPUT_PARTITIONS, Topics
from tests.fixtures.service import Harness
from tests.fixtures.simulator import SimulatorHandle
from tests.support.events import Received, swap_event
from tests.support.kafka_broker import KafkaBroker
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def _spec(code: str, status: int) -> Any:
    return next(
        s
        for s in ERROR_TABLE
        if s.operation == "refresh_device_key" and s.code == code and s.http_status == status
    )


def _only(outs: list[Received], device: str) -> Received:
    mine = [o for o in outs if o.data["deviceId"] == device]
    assert len(mine) == 1, mine
    return mine[0]


# ------------------------------------------------------------------------------------ retries


@pytest.mark.parametrize(
    ("fault", "error_code", "http_status", "category"),
    [
        pytest.param({"status": 500, "code": "50252"}, "50252", 500, "platform_error", id="50252"),
        pytest.param(
            {"status": 500, "code": None},
            "ATTEMPTS_EXHAUSTED",
            500,
            "platform_error",
            id="500-html",
        ),
        pytest.param({"action": "refuse"}, "CONNECTION_ERROR", None, "transport", id="refused"),
    ],
)
async def test_transient_errors_are_retried_within_max_attempts_then_fail_with_the_last_error(
    harness: Harness,
    fault: dict[str, Any],
    error_code: str,
    http_status: int | None,
    category: str,
) -> None:
    control = harness.sim.control
    await control.seed_device("dev-t", "old-t")
    action = fault.get("action", "html" if fault.get("code") is None else "error")
    await control.inject_fault(
        action,
        operation="refresh_key",
        device_id="dev-t",
        times=-1,
        status=fault.get("status", 500),
        code=fault.get("code"),
    )
    await harness.start_service(max_attempts=3)
    await harness.produce([(b"dev-t", swap_event("dev-t", "new-t"))])

    [out] = await harness.read(1)

    assert out.topic == harness.topics.rebind_failed
    assert out.data["errorCode"] == error_code
    assert out.data["httpStatus"] == http_status
    assert out.data["category"] == category
    assert out.data["attempts"] == 3
    assert out.data["recommendedHandling"]
    assert out.data["firstAttemptAt"] < out.data["lastAttemptAt"]
    puts = await control.calls(operation="refresh_key", device_id="dev-t")
    assert len(puts) == 3  # never more than max_attempts
    assert (await control.device("dev-t"))["node_id"] == "old-t"


async def test_timeouts_are_retried_then_fail_with_timeout(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-slow", "old-slow")
    # The platform never answers in time, and neither does the reconciling query, so the
    # service can never tell whether the change was applied: it retries, then reports TIMEOUT.
    await control.inject_latency(5.0, device_id="dev-slow", times=-1)
    await harness.start_service(max_attempts=2, request_timeout_seconds=0.3)
    await harness.produce([(b"dev-slow", swap_event("dev-slow", "new-slow"))])

    [out] = await harness.read(1)

    assert out.topic == harness.topics.rebind_failed
    assert out.data["errorCode"] == "TIMEOUT"
    assert out.data["httpStatus"] is None
    assert out.data["category"] == "transport"
    assert out.data["attempts"] == 2
    assert len(await control.calls(operation="refresh_key", device_id="dev-slow")) == 2
    await control.clear_faults()


async def test_a_timeout_that_was_applied_later_gives_one_credential(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-late", "old-late")
    # The first PUT is answered (and applied) only after the client gave up on it.
    await control.inject_latency(1.0, operation="refresh_key", device_id="dev-late")
    await harness.start_service(request_timeout_seconds=0.3)
    await harness.produce([(b"dev-late", swap_event("dev-late", "new-late"))])

    [out] = await harness.read(1)

    assert out.topic == harness.topics.credential_updated
    assert out.data["attempts"] >= 2

    async def both_applied() -> bool:
        return len((await control.device("dev-late"))["history"]) == 2

    await wait_until(both_applied, timeout=10, what="the late first PUT applied too")
    device = await control.device("dev-late")
    assert device["applied_pairs"] == [["new-late", "new-late"]]  # one credential, twice


async def test_terminal_codes_fail_at_once(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-inactive", "old-i", status="INACTIVE")
    await harness.start_service(max_attempts=5)
    await harness.produce([(b"dev-inactive", swap_event("dev-inactive", "new-i"))])

    [out] = await harness.read(1)

    spec = _spec("100610", 400)
    assert out.topic == harness.topics.rebind_failed
    assert out.data["errorCode"] == "100610"
    assert out.data["category"] == spec.category
    assert out.data["recommendedHandling"] == spec.recommended_handling
    assert out.data["attempts"] == 1
    assert len(await control.calls(operation="refresh_key", device_id="dev-inactive")) == 1


async def test_a_device_with_a_failing_platform_path_never_holds_up_other_devices(
    harness: Harness,
) -> None:
    """The stuck device's retries never delay the platform calls of other devices, nor the
    outcomes of other partitions. Outcomes of the stuck device's own partition are committed
    behind it (offsets advance only over finished work: promise 1), so they are not awaited
    early here."""
    control = harness.sim.control
    others = [f"dev-fast-{i}" for i in range(20)]
    await control.seed_devices(
        [{"device_id": d, "node_id": f"old-{d}"} for d in [*others, "dev-stuck"]]
    )
    await control.inject_latency(3.0, device_id="dev-stuck", times=-1)
    # The stuck device takes max_attempts x (timeout + query timeout) ~ 4 x 2 x 1 s.
    await harness.start_service(max_attempts=4, request_timeout_seconds=1.0)
    # The stuck device first, ahead of the others in its partition's queue.
    await harness.produce(
        [(b"dev-stuck", swap_event("dev-stuck", "new-stuck"))]
        + [(d.encode(), swap_event(d, f"new-{d}")) for d in others]
    )

    async def others_applied() -> bool:
        devices = {d["device_id"]: d for d in await control.devices()}
        return all(devices[d]["node_id"] == f"new-{d}" for d in others)

    await wait_until(others_applied, timeout=4, what="the 20 other devices refreshed")
    stuck_puts = await control.calls(operation="refresh_key", device_id="dev-stuck")
    assert len(stuck_puts) < 4, "the stuck device is still being retried"
    partitioner = DefaultPartitioner()
    parts = list(range(INPUT_PARTITIONS))
    stuck_partition = partitioner(b"dev-stuck", parts, parts)
    elsewhere = {d for d in others if partitioner(d.encode(), parts, parts) != stuck_partition}
    assert elsewhere
    early = await harness.read(len(elsewhere), timeout=5)
    assert elsewhere <= {o.data["deviceId"] for o in early}
    assert "dev-stuck" not in {o.data["deviceId"] for o in early}

    outs = await harness.read(21, timeout=60)
    for d in others:
        assert _only(outs, d).topic == harness.topics.credential_updated
    stuck = _only(outs, "dev-stuck")
    assert stuck.topic == harness.topics.rebind_failed
    assert stuck.data["errorCode"] == "TIMEOUT"
    assert stuck.data["attempts"] == 4
    await control.clear_faults()


# ------------------------------------------------------------------- deterministic requests


async def test_requests_are_deterministic(harness: Harness) -> None:
    control = harness.sim.control
    for d in ("dev-d1", "dev-d2", "dev-d3"):
        await control.seed_device(d, f"old-{d}")
    await harness.start_service()
    await harness.produce(
        [
            (b"dev-d1", swap_event("dev-d1", "n1")),
            (b"dev-d2", swap_event("dev-d2", "n2", verifyCode="VC-2", timeout=300)),
            (b"dev-d3", swap_event("dev-d3", "n3", verifyCode=None, timeout=None)),
        ]
    )

    outs = await harness.read(3)

    bodies = {
        d: [c["body"] for c in await control.calls(operation="refresh_key", device_id=d)]
        for d in ("dev-d1", "dev-d2", "dev-d3")
    }
    assert bodies == {
        "dev-d1": [{"nodeId": "n1", "verifyCode": "n1", "timeout": 0}],
        "dev-d2": [{"nodeId": "n2", "verifyCode": "VC-2", "timeout": 300}],
        "dev-d3": [{"nodeId": "n3", "verifyCode": "n3", "timeout": 0}],
    }
    assert _only(outs, "dev-d2").data["verifyCode"] == "VC-2"
    assert _only(outs, "dev-d2").data["timeout"] == 300
    assert _only(outs, "dev-d1").data["timeout"] == 0


async def test_the_configured_default_timeout_is_sent(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REBIND_PLATFORM__BASE_URL", harness.sim.url)
    monkeypatch.setenv("REBIND_PLATFORM__APP_ID", harness.sim.app_id)
    monkeypatch.setenv("REBIND_PLATFORM__SECRET", harness.sim.secret)
    monkeypatch.setenv("REBIND_PLATFORM__DEFAULT_TIMEOUT", "600")
    from_env = load_settings().platform.default_timeout
    assert from_env == 600
    control = harness.sim.control
    await control.seed_device("dev-dt", "old-dt")
    await control.seed_device("dev-dt0", "old-dt0")
    await harness.start_service(default_timeout=from_env)
    await harness.produce(
        [
            (b"dev-dt", swap_event("dev-dt", "n-dt")),
            (b"dev-dt0", swap_event("dev-dt0", "n-dt0", timeout=0)),  # the event's 0 wins
        ]
    )

    outs = await harness.read(2)

    [put] = await control.calls(operation="refresh_key", device_id="dev-dt")
    assert put["body"]["timeout"] == 600
    assert _only(outs, "dev-dt").data["timeout"] == 600
    [put0] = await control.calls(operation="refresh_key", device_id="dev-dt0")
    assert put0["body"]["timeout"] == 0


async def test_app_id_is_sent_only_for_an_authorized_partner_app(harness: Harness) -> None:
    sim = harness.sim
    control = sim.control
    await control.seed_device("dev-home", "old-home")
    await control.seed_device("dev-home2", "old-home2")
    await control.seed_device("dev-partner", "old-partner", app_id=sim.partner_app_id)
    await control.seed_device("dev-other", "old-other", app_id=sim.other_app_id)
    await harness.start_service()
    await harness.produce(
        [
            (b"dev-home", swap_event("dev-home", "n-home")),
            (b"dev-home2", swap_event("dev-home2", "n-home2", appId=sim.app_id)),
            (b"dev-partner", swap_event("dev-partner", "n-partner", appId=sim.partner_app_id)),
            (b"dev-other", swap_event("dev-other", "n-other", appId=sim.other_app_id)),
        ]
    )

    outs = await harness.read(4)

    queries = {
        c["device_id"]: c["app_id_query"] for c in await control.calls(operation="refresh_key")
    }
    assert queries == {
        "dev-home": None,
        "dev-home2": None,  # the home app itself: no appId
        "dev-partner": sim.partner_app_id,
        "dev-other": sim.other_app_id,
    }
    for d in ("dev-home", "dev-home2", "dev-partner"):
        assert _only(outs, d).topic == harness.topics.credential_updated
    assert _only(outs, "dev-partner").data["appId"] == sim.partner_app_id
    failed = _only(outs, "dev-other")
    assert failed.topic == harness.topics.rebind_failed
    assert failed.data["errorCode"] == "100217"
    assert failed.data["httpStatus"] == 200  # the error inside a 200
    assert failed.data["category"] == "auth"
    assert failed.data["recommendedHandling"] == _spec("100217", 200).recommended_handling
    assert failed.data["attempts"] == 1
    assert (await control.device("dev-other"))["node_id"] == "old-other"


# ---------------------------------------------------------------------------- reconciliation


async def test_applied_then_dropped_connection_is_reconciled_as_success(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-r1", "old-r1")
    await control.inject_drop_after_apply(device_id="dev-r1")
    await harness.start_service()
    await harness.produce([(b"dev-r1", swap_event("dev-r1", "new-r1"))])

    [out] = await harness.read(1)

    assert out.topic == harness.topics.credential_updated
    device = await control.device("dev-r1")
    assert device["applied_pairs"] == [["new-r1", "new-r1"]]
    assert len(await control.calls(operation="refresh_key", device_id="dev-r1")) == 1
    assert len(await control.calls(operation="get_device", device_id="dev-r1")) == 1


@pytest.mark.parametrize("repeat_answer", ["100611", "100426"])
async def test_a_repeat_after_an_applied_call_is_reconciled_as_success(
    harness: Harness, repeat_answer: str
) -> None:
    """The first PUT is applied but its answer is lost, and the query that should settle it
    fails once, so the same call is repeated. The repeat meets 100611 (the new hardware came
    online at once) or 100426 (the platform answers a repeated nodeId so): both mean done."""
    control = harness.sim.control
    device = f"dev-rep-{repeat_answer}"
    await control.seed_device(
        device,
        "old-rep",
        repeat_put_mode="duplicate" if repeat_answer == "100426" else None,
    )
    if repeat_answer == "100611":
        await control.go_online_after_success(device, 0.0)
    await control.inject_drop_after_apply(device_id=device)
    await control.inject_error(500, "50252", operation="get_device", device_id=device)
    await harness.start_service()
    await harness.produce([(device.encode(), swap_event(device, "new-rep"))])

    [out] = await harness.read(1)

    assert out.topic == harness.topics.credential_updated, out.data
    puts = await control.calls(operation="refresh_key", device_id=device)
    assert [p["error_code"] for p in puts] == [None, repeat_answer]
    state = await control.device(device)
    assert state["applied_pairs"] == [["new-rep", "new-rep"]]
    assert state["node_id"] == "new-rep"


async def test_a_genuine_node_id_conflict_fails_as_conflict(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-c1", "old-c1")
    await control.seed_device("dev-c2", "taken-node")
    await harness.start_service()
    await harness.produce([(b"dev-c1", swap_event("dev-c1", "taken-node"))])

    [out] = await harness.read(1)

    assert out.topic == harness.topics.rebind_failed
    assert out.data["errorCode"] == "100426"
    assert out.data["category"] == "conflict"
    assert (await control.device("dev-c1"))["node_id"] == "old-c1"


# ------------------------------------------------------------------------------ two-way TLS


async def test_two_way_tls_with_a_client_certificate(
    kafka_broker: KafkaBroker, topics: Topics, tls_sim: SimulatorHandle
) -> None:
    certs = tls_sim.certs
    assert certs is not None
    h = Harness(kafka_broker.bootstrap, topics, tls_sim)
    try:
        await tls_sim.control.seed_device("dev-tls", "old-tls")
        service = await h.start_service(
            client_cert=certs.client_cert, client_key=certs.client_key, ca_bundle=certs.ca
        )
        await h.produce([(b"dev-tls", swap_event("dev-tls", "new-tls"))])

        [out] = await h.read(1)

        assert out.topic == h.topics.credential_updated
        assert (await tls_sim.control.device("dev-tls"))["node_id"] == "new-tls"
        assert service.readiness()[0]
    finally:
        await h.stop_all()


async def test_without_the_client_certificate_the_swap_fails_as_a_transport_error(
    kafka_broker: KafkaBroker, topics: Topics, tls_sim: SimulatorHandle
) -> None:
    certs = tls_sim.certs
    assert certs is not None
    h = Harness(kafka_broker.bootstrap, topics, tls_sim)
    try:
        await tls_sim.control.seed_device("dev-notls", "old-notls")
        service = await h.start_service(ca_bundle=certs.ca, max_attempts=2)
        await h.produce([(b"dev-notls", swap_event("dev-notls", "new-notls"))])

        [out] = await h.read(1)

        assert out.topic == h.topics.rebind_failed
        assert out.data["errorCode"] == "CONNECTION_ERROR"
        assert out.data["attempts"] == 2  # retried as a transient error, within max_attempts
        assert out.data["category"] == "transport"
        assert out.data["httpStatus"] is None
        assert "login" in out.data["errorDesc"]
        # The platform never saw a call: the handshake failed before any request.
        assert await tls_sim.control.calls() == []
        assert (await tls_sim.control.device("dev-notls"))["node_id"] == "old-notls"
        ready, reason = service.readiness()
        print(f"\nreadiness without a client certificate: {ready} ({reason})")
    finally:
        await h.stop_all()
