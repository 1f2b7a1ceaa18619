"""PlatformClient + TokenManager + RateBudget + rebind() against the platform simulator."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import structlog
from pydantic import SecretStr

from service.config import PlatformSettings
from service.metrics import Metrics
from service.platform import (
    CONNECTION_ERROR,
    PRIORITY_FRESH,
    PRIORITY_POLL,
    TIMEOUT,
    Deferred,
    Failed,
    PlatformClient,
    RateBudget,
    RebindPolicy,
    RebindResult,
    Succeeded,
    TokenManager,
    build_request,
    rebind,
)
from tests.fixtures.simulator import SimulatorHandle
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

FAST = RebindPolicy(max_attempts=4, backoff_initial_seconds=0.01, backoff_max_seconds=0.05)


@dataclass
class Harness:
    sim: SimulatorHandle
    settings: PlatformSettings
    metrics: Metrics
    budget: RateBudget
    client: PlatformClient

    async def swap(
        self,
        device_id: str,
        node_id: str,
        *,
        is_repeat: bool = False,
        app_id: str | None = None,
        policy: RebindPolicy = FAST,
    ) -> RebindResult:
        req = build_request(device_id, node_id, None, None, app_id, self.settings.default_timeout)
        return await rebind(
            req, self.client, policy, is_repeat=is_repeat, deadline=time.monotonic() + 30.0
        )

    def requests(self, operation: str, status: str, code: str = "none") -> float:
        value = self.metrics.registry.get_sample_value(
            "rebind_platform_requests_total",
            {"operation": operation, "http_status": status, "error_code": code},
        )
        return value or 0.0

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0


Factory = Callable[..., Awaitable[Harness]]


def make_settings(sim: SimulatorHandle, **overrides: Any) -> PlatformSettings:
    values: dict[str, Any] = {
        "base_url": sim.url,
        "app_id": sim.app_id,
        "secret": SecretStr(sim.secret),
        "rate_limit_per_minute": 100,
        "request_timeout_seconds": 2.0,
        "max_attempts": FAST.max_attempts,
        "retry_backoff_initial_seconds": FAST.backoff_initial_seconds,
        "retry_backoff_max_seconds": FAST.backoff_max_seconds,
    }
    values.update(overrides)
    return PlatformSettings(**values)


@pytest.fixture
async def make_harness(sim: SimulatorHandle) -> AsyncIterator[Factory]:
    made: list[Harness] = []

    async def factory(
        handle: SimulatorHandle | None = None, *, window_seconds: float = 60.0, **overrides: Any
    ) -> Harness:
        target = handle if handle is not None else sim
        settings = make_settings(target, **overrides)
        metrics = Metrics()
        budget = RateBudget(
            settings.rate_limit_per_minute,
            metrics=metrics,
            window_seconds=window_seconds,
            safety_margin_seconds=min(1.0, window_seconds / 10),
        )
        client = PlatformClient(settings, metrics, budget)
        harness = Harness(target, settings, metrics, budget, client)
        made.append(harness)
        return harness

    yield factory
    for h in made:
        await h.client.aclose()
        await h.budget.aclose()
    await sim.control.aclose()


@pytest.fixture
async def h(make_harness: Factory) -> Harness:
    return await make_harness()


# --------------------------------------------------------------------------- happy path


async def test_login_and_refresh_happy_path(h: Harness) -> None:
    await h.sim.control.seed_device("dev-1", "OLD-1")
    res = await h.swap("dev-1", "NEW-1")
    assert res == Succeeded(verify_code="NEW-1", timeout=0, attempts=1, reconciled=False)
    dev = await h.sim.control.device("dev-1")
    assert dev["node_id"] == "NEW-1"
    assert dev["applied_pairs"] == [["NEW-1", "NEW-1"]]
    calls = await h.sim.control.calls()
    assert [c["operation"] for c in calls] == ["login", "refresh_key"]
    put = calls[1]
    assert put["app_key"] == h.sim.app_id
    assert put["app_id_query"] is None  # our own app: appId left out
    assert put["body"] == {"nodeId": "NEW-1", "verifyCode": "NEW-1", "timeout": 0}
    assert put["token_fp"] is not None
    assert h.requests("login", "200") == 1
    assert h.requests("refresh_device_key", "200") == 1
    assert h.sample("rebind_platform_token_valid") == 1
    assert h.sample("rebind_rate_limiter_wait_seconds_count") == 2


async def test_appid_only_for_an_authorized_application(h: Harness) -> None:
    await h.sim.control.seed_device("p-1", "OLD-P", app_id=h.sim.partner_app_id)
    await h.sim.control.seed_device("o-1", "OLD-O")
    assert isinstance(await h.swap("p-1", "NEW-P", app_id=h.sim.partner_app_id), Succeeded)
    assert isinstance(await h.swap("o-1", "NEW-O", app_id=h.sim.app_id), Succeeded)
    puts = await h.sim.control.calls(operation="refresh_key")
    assert [c["app_id_query"] for c in puts] == [h.sim.partner_app_id, None]


async def test_unauthorized_application_fails_auth(h: Harness) -> None:
    await h.sim.control.seed_device("x-1", "OLD-X", app_id=h.sim.other_app_id)
    res = await h.swap("x-1", "NEW-X", app_id=h.sim.other_app_id)
    assert isinstance(res, Failed)
    assert (res.error_code, res.http_status, res.category) == ("100217", 200, "auth")


# --------------------------------------------------------------------------- tokens


async def test_invalid_token_relogs_in_once_and_repeats(h: Harness) -> None:
    await h.sim.control.seed_devices(
        [{"device_id": f"t-{i}", "node_id": f"OLD-{i}"} for i in range(21)]
    )
    assert isinstance(await h.swap("t-0", "NEW-0"), Succeeded)
    await h.sim.control.expire_token(h.sim.app_id)  # the platform drops our token
    results = await asyncio.gather(*(h.swap(f"t-{i}", f"NEW-{i}") for i in range(1, 21)))
    assert all(isinstance(r, Succeeded) and r.attempts == 1 for r in results), results
    stats = await h.sim.control.stats()
    assert stats["logins"] == 2  # 20 callers met 1010005: one re-login for all of them
    assert h.requests("login", "200") == 2


async def test_token_refreshed_ahead_of_expiry(make_harness: Factory, sim: SimulatorHandle) -> None:
    await sim.control.configure(token_ttl=3)
    h = await make_harness(token_refresh_margin_seconds=1.0)
    await sim.control.seed_device("r-1", "N-0")
    stop = time.monotonic() + 7.0
    i = 0
    while time.monotonic() < stop:
        i += 1
        assert isinstance(await h.swap("r-1", f"N-{i}"), Succeeded)
        await asyncio.sleep(0.2)  # pacing the calls over several token lifetimes, not waiting
    calls = await sim.control.calls()
    assert not [c for c in calls if c["error_code"] == "1010005"]
    stats = await sim.control.stats()
    assert stats["logins"] == 1
    assert stats["token_refreshes"] >= 2
    assert h.requests("refresh_token", "200") == stats["token_refreshes"]


async def test_single_flight_login(h: Harness) -> None:
    await h.sim.control.seed_devices(
        [{"device_id": f"s-{i}", "node_id": f"OLD-{i}"} for i in range(50)]
    )
    results = await asyncio.gather(*(h.swap(f"s-{i}", f"NEW-{i}") for i in range(50)))
    assert all(isinstance(r, Succeeded) for r in results)
    assert (await h.sim.control.stats())["logins"] == 1


async def test_a_wrong_secret_makes_calls_wait_until_the_login_is_accepted(
    make_harness: Factory, sim: SimulatorHandle
) -> None:
    """A refused login (100208) fails no call: the calls wait while the login is retried with a
    capped backoff (one login at a time, never one per call), and go through once it is
    accepted (here the platform's secret is changed to the configured one)."""
    h = await make_harness(secret=SecretStr("wrong"))
    await sim.control.seed_device("w-1", "OLD")
    swaps = [asyncio.create_task(h.swap("w-1", "NEW")) for _ in range(5)]

    async def retried() -> bool:
        return len(await sim.control.calls(operation="login")) >= 3

    await wait_until(retried, timeout=10, what="the refused login retried")
    tokens = h.client.tokens
    assert isinstance(tokens, TokenManager)
    assert (tokens.gate.blocked, tokens.gate.code) == (True, "100208")
    assert h.sample("rebind_platform_auth_blocked") == 1
    assert not any(task.done() for task in swaps)  # waiting, not failed
    assert await sim.control.calls(operation="refresh_key") == []

    await sim.control.upsert_app(sim.app_id, "wrong")
    results = await asyncio.wait_for(asyncio.gather(*swaps), 30)

    assert all(isinstance(res, Succeeded) for res in results)
    assert not tokens.gate.blocked
    assert h.sample("rebind_platform_auth_blocked") == 0
    logins = await sim.control.calls(operation="login")
    assert [c["error_code"] for c in logins].count("100208") == len(logins) - 1


async def test_secret_and_tokens_never_logged(h: Harness) -> None:
    await h.sim.control.seed_device("l-1", "OLD")
    with structlog.testing.capture_logs() as logs:
        assert isinstance(await h.swap("l-1", "NEW"), Succeeded)
        await h.sim.control.expire_token(h.sim.app_id)
        await h.sim.control.inject_error(500, "50252", operation="refresh_key")
        assert isinstance(await h.swap("l-1", "NEW", is_repeat=True), Succeeded)
    tokens = h.client.tokens
    assert isinstance(tokens, TokenManager)
    token = await tokens.get()
    text = repr(logs)
    assert logs  # something was logged
    assert h.sim.secret not in text
    assert token not in text
    assert "Bearer" not in text
    assert "Authorization" not in text


# --------------------------------------------------------------------------- outcomes


async def test_device_online_defers(h: Harness) -> None:
    await h.sim.control.seed_device("on-1", "OLD", status="ONLINE")
    res = await h.swap("on-1", "NEW")
    assert isinstance(res, Deferred)
    assert (res.reason, res.last_code, res.attempts) == ("device_online", "100611", 1)
    assert h.sample("rebind_platform_device_online_rejections_total") == 1


async def test_unknown_device_fails_not_found(h: Harness) -> None:
    res = await h.swap("nope", "NEW")
    assert isinstance(res, Failed)
    assert (res.error_code, res.http_status, res.category) == ("100403", 404, "not_found")
    assert res.recommended_handling


async def test_internal_error_twice_then_ok(h: Harness) -> None:
    await h.sim.control.seed_device("e-1", "OLD")
    await h.sim.control.inject_error(500, "50252", operation="refresh_key", times=2)
    res = await h.swap("e-1", "NEW")
    assert res == Succeeded(verify_code="NEW", timeout=0, attempts=3, reconciled=False)
    assert h.requests("refresh_device_key", "500", "50252") == 2


async def test_html_502_is_retried(h: Harness) -> None:
    await h.sim.control.seed_device("g-1", "OLD")
    await h.sim.control.inject_html(502, operation="refresh_key")
    res = await h.swap("g-1", "NEW")
    assert isinstance(res, Succeeded)
    assert res.attempts == 2


async def test_transient_errors_exhaust_attempts(h: Harness) -> None:
    await h.sim.control.seed_device("x-1", "OLD")
    await h.sim.control.inject_error(500, "50252", operation="refresh_key", times=-1)
    res = await h.swap("x-1", "NEW")
    assert isinstance(res, Failed)
    assert (res.error_code, res.category, res.attempts) == ("50252", "platform_error", 4)


async def test_drop_after_apply_reconciles_to_one_key(h: Harness) -> None:
    await h.sim.control.seed_device("d-1", "OLD")
    await h.sim.control.inject_drop_after_apply(device_id="d-1")
    res = await h.swap("d-1", "NEW")
    assert res == Succeeded(verify_code="NEW", timeout=0, attempts=1, reconciled=True)
    dev = await h.sim.control.device("d-1")
    assert dev["applied_pairs"] == [["NEW", "NEW"]]
    assert len(dev["history"]) == 1
    assert [c["operation"] for c in await h.sim.control.calls(device_id="d-1")] == [
        "refresh_key",
        "get_device",
    ]


async def test_refused_connection_is_retried(h: Harness) -> None:
    await h.sim.control.seed_device("c-1", "OLD")
    await h.sim.control.inject_refuse(operation="refresh_key")
    res = await h.swap("c-1", "NEW")
    assert isinstance(res, Succeeded)
    assert len((await h.sim.control.device("c-1"))["applied_pairs"]) == 1


async def test_repeat_meeting_duplicate_reconciles(h: Harness) -> None:
    await h.sim.control.configure(repeat_put_mode="duplicate")
    await h.sim.control.seed_device("u-1", "OLD")
    first = await h.swap("u-1", "NEW")
    assert first == Succeeded(verify_code="NEW", timeout=0, attempts=1, reconciled=False)
    again = await h.swap("u-1", "NEW", is_repeat=True)
    assert again == Succeeded(verify_code="NEW", timeout=0, attempts=1, reconciled=True)
    assert (await h.sim.control.device("u-1"))["applied_pairs"] == [["NEW", "NEW"]]


async def test_repeat_meeting_online_after_success_reconciles(h: Harness) -> None:
    await h.sim.control.seed_device("v-1", "OLD")
    await h.sim.control.go_online_after_success("v-1")
    assert isinstance(await h.swap("v-1", "NEW"), Succeeded)
    again = await h.swap("v-1", "NEW", is_repeat=True)
    assert again == Succeeded(verify_code="NEW", timeout=0, attempts=1, reconciled=True)


async def test_nodeid_held_by_another_device_is_a_conflict(h: Harness) -> None:
    await h.sim.control.seed_device("a-1", "TAKEN")
    await h.sim.control.seed_device("b-1", "OLD")
    res = await h.swap("b-1", "TAKEN")
    assert isinstance(res, Failed)
    assert (res.error_code, res.category) == ("100426", "conflict")


async def test_throttle_slows_the_budget_and_does_not_count(make_harness: Factory) -> None:
    h = await make_harness(window_seconds=1.0)
    await h.sim.control.seed_device("th-1", "OLD")
    await h.sim.control.inject_error(403, "1010009", operation="refresh_key", times=2)
    res = await h.swap("th-1", "NEW")
    assert res == Succeeded(verify_code="NEW", timeout=0, attempts=1, reconciled=False)
    assert (
        h.sample("rebind_platform_throttle_rejections_total", {"operation": "refresh_device_key"})
        == 2
    )


# --------------------------------------------------------------------------- TLS


async def test_mutual_tls(make_harness: Factory, tls_sim: SimulatorHandle) -> None:
    certs = tls_sim.certs
    assert certs is not None
    h = await make_harness(
        tls_sim,
        client_cert=certs.client_cert,
        client_key=certs.client_key,
        ca_bundle=certs.ca,
    )
    await tls_sim.control.seed_device("m-1", "OLD")
    assert await h.swap("m-1", "NEW") == Succeeded("NEW", 0, attempts=1, reconciled=False)


async def test_tls_server_not_trusted_without_the_ca(
    make_harness: Factory, tls_sim: SimulatorHandle
) -> None:
    certs = tls_sim.certs
    assert certs is not None
    h = await make_harness(tls_sim, client_cert=certs.client_cert, client_key=certs.client_key)
    await tls_sim.control.seed_device("m-2", "OLD")
    res = await h.swap("m-2", "NEW", policy=RebindPolicy(max_attempts=1))
    assert isinstance(res, Failed)
    assert (res.error_code, res.category, res.http_status) == (CONNECTION_ERROR, "transport", None)
    assert (await tls_sim.control.device("m-2"))["node_id"] == "OLD"


async def test_tls_without_client_cert_is_refused(
    make_harness: Factory, tls_sim: SimulatorHandle
) -> None:
    certs = tls_sim.certs
    assert certs is not None
    h = await make_harness(tls_sim, ca_bundle=certs.ca)
    await tls_sim.control.seed_device("m-3", "OLD")
    res = await h.swap("m-3", "NEW", policy=RebindPolicy(max_attempts=1))
    assert isinstance(res, Failed)
    assert res.category == "transport"
    assert (await tls_sim.control.device("m-3"))["node_id"] == "OLD"


# --------------------------------------------------------------------------- the whole table


@dataclass(frozen=True)
class Row:
    status: int
    code: str
    kind: type
    category: str | None = None
    attempts: int = 1


REFRESH_TABLE = [
    Row(200, "100217", Failed, "auth"),
    Row(400, "100003", Failed, "invalid_request"),
    Row(400, "100007", Failed, "invalid_request"),
    Row(400, "100426", Failed, "conflict"),  # held by no one else -> the query says "not ours"
    Row(400, "100610", Failed, "invalid_request"),
    Row(400, "100611", Deferred),
    Row(400, "50400", Failed, "invalid_request"),
    Row(401, "100025", Failed, "auth"),
    Row(403, "100203", Failed, "auth"),
    Row(403, "100217", Failed, "auth"),
    Row(403, "1010009", Succeeded, attempts=1),  # throttled: waits, not an attempt
    Row(403, "1010005", Succeeded, attempts=1),  # one re-login, the call repeated once
    Row(404, "100403", Failed, "not_found"),
    Row(404, "100418", Failed, "not_found"),
    Row(500, "100203", Failed, "auth"),
    Row(500, "50252", Succeeded, attempts=2),  # transient: retried
]


@pytest.mark.parametrize("shape", ["documented", "gateway"])
@pytest.mark.parametrize("row", REFRESH_TABLE, ids=lambda r: f"{r.status}-{r.code}")
async def test_refresh_table_walk(make_harness: Factory, row: Row, shape: str) -> None:
    h = await make_harness(window_seconds=1.0)
    await h.sim.control.seed_device("walk-1", "OLD")
    await h.sim.control.inject_fault(
        "error",
        operation="refresh_key",
        status=row.status,
        code=row.code,
        shape="documented" if shape == "documented" else "gateway",
    )
    res = await h.swap("walk-1", "NEW")
    assert isinstance(res, row.kind), res
    if isinstance(res, Failed):
        assert (res.error_code, res.http_status, res.category) == (
            row.code,
            row.status,
            row.category,
        )
        assert res.attempts == 1
        assert res.recommended_handling
    elif isinstance(res, Deferred):
        assert res.last_code == row.code
    else:
        assert isinstance(res, Succeeded)
        assert res.attempts == row.attempts
        assert (await h.sim.control.device("walk-1"))["node_id"] == "NEW"
    assert h.requests("refresh_device_key", str(row.status), row.code) == 1
    if row.code == "1010005":
        assert (await h.sim.control.stats())["logins"] == 2


# --------------------------------------------------------------------------- transport


async def test_read_timeout_is_reconciled_and_the_repeat_is_the_same_call(
    make_harness: Factory, sim: SimulatorHandle
) -> None:
    h = await make_harness(request_timeout_seconds=0.3)
    await sim.control.seed_device("lat-1", "OLD")
    await sim.control.inject_latency(1.0, operation="refresh_key")
    res = await h.swap("lat-1", "NEW")
    assert isinstance(res, Succeeded)
    assert res.attempts == 2  # timed out (query: not yet applied), then the same call again
    assert h.requests("refresh_device_key", "none", "TIMEOUT") == 1

    async def both_applied() -> dict[str, Any]:  # the slow first call lands too
        dev = await sim.control.device("lat-1")
        return dev if len(dev["history"]) >= 2 else {}

    dev = await wait_until(both_applied, timeout=10, what="the slow first call applied")
    assert dev["applied_pairs"] == [["NEW", "NEW"]]  # the same pair: one credential


@pytest.mark.parametrize(
    ("exc", "code", "unknown"),
    [
        (httpx.ConnectError("refused"), CONNECTION_ERROR, False),
        (httpx.ConnectTimeout("slow connect"), TIMEOUT, False),
        (httpx.ReadTimeout("no answer"), TIMEOUT, True),
        (httpx.RemoteProtocolError("dropped"), CONNECTION_ERROR, True),
        (httpx.ReadError("reset"), CONNECTION_ERROR, True),
    ],
)
async def test_outcome_unknown_only_when_the_request_may_have_arrived(
    sim: SimulatorHandle, exc: Exception, code: str, unknown: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/login"):
            body = {"accessToken": "tok", "refreshToken": "ref", "expiresIn": 3600}
            return httpx.Response(200, json=body)
        raise exc

    settings = make_settings(sim)
    metrics = Metrics()
    budget = RateBudget(100, metrics=metrics)
    client = PlatformClient(settings, metrics, budget, transport=httpx.MockTransport(handler))
    try:
        req = build_request("dev", "NEW", None, None, None, 0)
        result = await client.refresh_device_key(req)
    finally:
        await client.aclose()
    assert not result.ok
    assert (result.http_status, result.error_code, result.outcome_unknown) == (None, code, unknown)
    assert result.spec is not None
    assert result.spec.category == "transport"


async def test_request_shape_on_the_wire(sim: SimulatorHandle) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/login"):
            body = {"accessToken": "tok-1", "refreshToken": "ref", "expiresIn": 3600}
            return httpx.Response(200, json=body)
        if request.method == "GET":
            return httpx.Response(200, json={"deviceInfo": {"nodeId": "N", "status": "OFFLINE"}})
        return httpx.Response(200, json={"verifyCode": "VC", "timeout": 300})

    settings = make_settings(sim)
    metrics = Metrics()
    client = PlatformClient(
        settings, metrics, RateBudget(100), transport=httpx.MockTransport(handler)
    )
    try:
        req = build_request("dev/1", "N", "VC", 300, "partner-app", 0)
        result = await client.refresh_device_key(req)
        query = await client.query_device("dev/1", None)
    finally:
        await client.aclose()
    assert (result.ok, result.verify_code, result.timeout) == (True, "VC", 300)
    assert (query.ok, query.node_id, query.status) == (True, "N", "OFFLINE")
    login, put, get = seen
    assert login.headers["content-type"] == "application/x-www-form-urlencoded"
    assert "authorization" not in login.headers
    assert put.method == "PUT"
    assert put.url.raw_path == b"/iocm/app/reg/v1.1.0/deviceCredentials/dev%2F1?appId=partner-app"
    assert put.headers["app_key"] == sim.app_id
    assert put.headers["authorization"] == "Bearer tok-1"
    assert put.headers["content-type"] == "application/json"
    assert json.loads(put.content) == {"nodeId": "N", "verifyCode": "VC", "timeout": 300}
    assert get.url.raw_path == b"/iocm/app/dm/v1.4.0/devices/dev%2F1"


async def test_tls_verification_off_is_loud(sim: SimulatorHandle) -> None:
    settings = make_settings(sim, verify_tls=False)
    with structlog.testing.capture_logs() as logs:
        client = PlatformClient(settings, Metrics(), RateBudget(100))
    await client.aclose()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["platform_tls_verification_disabled"]
    assert sim.secret not in repr(logs)


# --------------------------------------------------------------------------- bind watch calls


async def test_query_activation_follows_the_bind(h: Harness) -> None:
    await h.sim.control.seed_device("dev-b1", "OLD-B1")
    assert isinstance(await h.swap("dev-b1", "NEW-B1"), Succeeded)
    waiting = await h.client.query_activation("dev-b1", None, priority=PRIORITY_POLL)
    assert (waiting.ok, waiting.activated) == (True, False)
    await h.sim.control.connect("dev-b1")
    bound = await h.client.query_activation("dev-b1", None, priority=PRIORITY_POLL)
    assert (bound.ok, bound.activated) == (True, True)
    gone = await h.client.query_activation("dev-ghost", None, priority=PRIORITY_POLL)
    assert (gone.ok, gone.activated, gone.result.error_code) == (False, None, "100403")
    assert h.requests("query_activation", "200") == 2
    assert h.requests("query_activation", "404", "100403") == 1
    calls = await h.sim.control.calls(operation="query_activation")
    assert [c["device_id"] for c in calls] == ["dev-b1", "dev-b1", "dev-ghost"]


async def test_subscribe_against_the_simulator(h: Harness) -> None:
    url = "https://rebind.example.com:8443/bind/secret"
    first = await h.client.subscribe("bindDevice", url, None, priority=PRIORITY_FRESH)
    again = await h.client.subscribe("bindDevice", url, None, priority=PRIORITY_FRESH)
    assert first.ok
    assert again.ok
    assert first.http_status == 201
    assert first.body is not None
    assert first.body == again.body
    assert first.body["callbackUrl"] == url
    [stored] = await h.sim.control.subscriptions(h.sim.app_id)
    assert stored["requests"] == 2
    refused = await h.client.subscribe(
        "bindDevice", "https://rebind.example.com/bind", None, priority=PRIORITY_FRESH
    )
    assert (refused.ok, refused.http_status, refused.error_code) == (False, 400, "100222")
    assert refused.spec is not None
    assert refused.spec.terminal
    assert refused.spec.category == "invalid_request"
    assert h.requests("subscribe", "201") == 2
    assert h.requests("subscribe", "400", "100222") == 1
