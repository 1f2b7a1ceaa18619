"""PlatformClient against httpx.MockTransport: what a 2xx must carry, and bounded metric labels.

Issue 11, item 5: a 2xx refresh answer that is not a JSON object carrying ``verifyCode`` (an HTML
page from a proxy, a 204 without a body, ``[]``, ``{}``) is ambiguous, never a success: the call
result says ``BAD_SUCCESS_BODY`` with the outcome unknown, and ``rebind`` settles it by querying
the device.

Issue 11, item 8: the ``error_code`` label of ``rebind_platform_requests_total`` only takes the
codes of the error table and the service's own; anything else counts as ``other`` and is logged.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest
import structlog
from prometheus_client import generate_latest
from pydantic import SecretStr

from service.config import PlatformSettings
from service.metrics import Metrics
from service.platform import (
    ERROR_TABLE,
    SUPERSEDED,
    TIMEOUT,
    Action,
    PlatformClient,
    RateBudget,
    RebindPolicy,
    Succeeded,
    build_request,
    rebind,
)
from service.platform.errors import BAD_SUCCESS_BODY, KNOWN_CODES, OTHER_CODE, metric_code

FAST = RebindPolicy(max_attempts=3, backoff_initial_seconds=0.0, backoff_max_seconds=0.0)
Respond = Callable[[httpx.Request], httpx.Response]


class StaticTokens:
    async def get(self) -> str:
        return "unit-token"

    async def invalidated(self, token: str) -> str:
        return "unit-token"

    def release(self, token: str, *, refused: bool = False, sent: bool = True) -> None:
        return None


@dataclass
class Platform:
    """A scripted platform: one answer per PUT, a device that holds ``node_id``."""

    puts: list[httpx.Response]
    node_id: str = "OLD"
    seen: list[str] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(f"{request.method} {request.url.path}")
        if request.method == "PUT":
            return self.puts.pop(0)
        info = {"deviceId": "dev-1", "nodeId": self.node_id, "status": "OFFLINE"}
        return httpx.Response(200, json={"deviceId": "dev-1", "deviceInfo": info})


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[[Respond], PlatformClient]]:
    made: list[tuple[PlatformClient, RateBudget]] = []

    def factory(respond: Respond) -> PlatformClient:
        settings = PlatformSettings(
            base_url="https://iot.example.com:8743", app_id="app-1", secret=SecretStr("s" * 16)
        )
        metrics = Metrics()
        budget = RateBudget(100_000, metrics=metrics)
        client = PlatformClient(
            settings,
            metrics,
            budget,
            transport=httpx.MockTransport(respond),
            tokens=StaticTokens(),
        )
        made.append((client, budget))
        return client

    yield factory
    for client, budget in made:
        await client.aclose()
        await budget.aclose()


def requests_total(client: PlatformClient) -> dict[tuple[str, str, str], float]:
    registry = client._metrics.registry
    out: dict[tuple[str, str, str], float] = {}
    for metric in registry.collect():
        if metric.name != "rebind_platform_requests":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                labels = sample.labels
                key = (labels["operation"], labels["http_status"], labels["error_code"])
                out[key] = sample.value
    return out


GOOD = {"verifyCode": "NEW", "timeout": 0}
REQ = build_request("dev-1", "NEW", None, None, None, 0)

AMBIGUOUS = [
    pytest.param(
        httpx.Response(
            200, text="<html><body>Welcome</body></html>", headers={"content-type": "text/html"}
        ),
        id="html-200",
    ),
    pytest.param(httpx.Response(204), id="204-no-body"),
    pytest.param(httpx.Response(200), id="200-empty"),
    pytest.param(httpx.Response(200, json=[]), id="json-array"),
    pytest.param(httpx.Response(200, json={}), id="empty-object"),
    pytest.param(httpx.Response(200, json={"timeout": 0}), id="no-verifyCode"),
    pytest.param(httpx.Response(200, json={"verifyCode": 7}), id="verifyCode-number"),
    pytest.param(httpx.Response(200, json={"verifyCode": ""}), id="verifyCode-empty"),
    pytest.param(httpx.Response(201, text="created"), id="text-201"),
]


@pytest.mark.parametrize("answer", AMBIGUOUS)
async def test_a_2xx_without_verify_code_is_ambiguous_not_a_success(
    make_client: Callable[[Respond], PlatformClient], answer: httpx.Response
) -> None:
    client = make_client(lambda _: answer)
    res = await client.refresh_device_key(REQ)
    assert not res.ok
    assert res.outcome_unknown
    assert res.error_code == BAD_SUCCESS_BODY
    assert res.http_status == answer.status_code
    assert res.spec is not None
    assert res.spec.code == BAD_SUCCESS_BODY
    assert res.spec.category == "platform_error"
    assert res.spec.action is Action.RETRY
    assert res.error_desc
    counted = requests_total(client)
    assert counted == {("refresh_device_key", str(answer.status_code), BAD_SUCCESS_BODY): 1.0}


async def test_a_json_object_with_verify_code_is_a_success(
    make_client: Callable[[Respond], PlatformClient],
) -> None:
    client = make_client(lambda _: httpx.Response(200, json={"verifyCode": "V-1", "timeout": 30}))
    res = await client.refresh_device_key(REQ)
    assert res.ok
    assert (res.verify_code, res.timeout, res.outcome_unknown) == ("V-1", 30, False)
    assert requests_total(client) == {("refresh_device_key", "200", "none"): 1.0}


async def test_the_query_needs_no_verify_code(
    make_client: Callable[[Respond], PlatformClient],
) -> None:
    client = make_client(Platform(puts=[], node_id="N-1"))
    query = await client.query_device("dev-1", None)
    assert query.ok
    assert query.node_id == "N-1"


@pytest.mark.parametrize("answer", AMBIGUOUS[:5])
async def test_an_ambiguous_2xx_is_settled_by_querying_the_device_applied(
    make_client: Callable[[Respond], PlatformClient], answer: httpx.Response
) -> None:
    platform = Platform(puts=[answer], node_id="NEW")  # the PUT was applied behind the proxy
    client = make_client(platform)
    res = await rebind(REQ, client, FAST, is_repeat=False, deadline=time.monotonic() + 10)
    assert res == Succeeded(verify_code="NEW", timeout=0, attempts=1, reconciled=True)
    assert platform.seen == [
        "PUT /iocm/app/reg/v1.1.0/deviceCredentials/dev-1",
        "GET /iocm/app/dm/v1.4.0/devices/dev-1",
    ]


@pytest.mark.parametrize("answer", AMBIGUOUS[:5])
async def test_an_ambiguous_2xx_not_applied_is_repeated(
    make_client: Callable[[Respond], PlatformClient], answer: httpx.Response
) -> None:
    platform = Platform(puts=[answer, httpx.Response(200, json=GOOD)], node_id="OLD")
    client = make_client(platform)
    res = await rebind(REQ, client, FAST, is_repeat=False, deadline=time.monotonic() + 10)
    assert res == Succeeded(verify_code="NEW", timeout=0, attempts=2, reconciled=False)
    assert [s.split()[0] for s in platform.seen] == ["PUT", "GET", "PUT"]


# ------------------------------------------------------------------ item 8: bounded labels


def test_metric_code_keeps_known_codes_only() -> None:
    for spec in ERROR_TABLE:
        assert metric_code(spec.code) == spec.code
    for code in (TIMEOUT, SUPERSEDED, BAD_SUCCESS_BODY, "HTTP_ERROR", "CONNECTION_ERROR"):
        assert metric_code(code) == code
    assert metric_code(None) == "none"
    assert metric_code("999999") == OTHER_CODE
    assert metric_code("<script>") == OTHER_CODE
    assert OTHER_CODE not in KNOWN_CODES


async def test_unlisted_error_codes_count_as_other_and_are_logged(
    make_client: Callable[[Respond], PlatformClient],
) -> None:
    codes = iter(["100403", "weird-1", "x" * 5000, 424242, "100007", "weird-1"])

    def respond(_: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error_code": next(codes), "error_desc": "d"})

    client = make_client(respond)
    with structlog.testing.capture_logs() as captured:
        for _ in range(6):
            await client.refresh_device_key(REQ)
    assert requests_total(client) == {
        ("refresh_device_key", "400", "100403"): 1.0,
        ("refresh_device_key", "400", OTHER_CODE): 4.0,
        ("refresh_device_key", "400", "100007"): 1.0,
    }
    unlisted = [e for e in captured if e["event"] == "platform_error_code_unlisted"]
    assert [e["log_level"] for e in unlisted] == ["warning"] * 4
    raw = [e["error_code"] for e in unlisted]
    assert raw[0] == "weird-1"
    assert raw[1].startswith("xxx")
    assert len(raw[1]) <= 64  # clipped
    assert raw[2] == "424242"
    assert raw[3] == "weird-1"
    assert all(e["label"] == OTHER_CODE for e in unlisted)
    exposition = generate_latest(client._metrics.registry)
    assert b"weird" not in exposition
    assert b"xxx" not in exposition


def test_metrics_bound_the_label_whoever_calls() -> None:
    metrics = Metrics()
    with structlog.testing.capture_logs() as captured:
        metrics.platform_call("login", 401, "100208", 0.01)
        metrics.platform_call("login", 500, "not-a-code " * 20, 0.01)
        metrics.platform_call("login", None, TIMEOUT, 0.01)
        metrics.platform_call("query_device", 200, None, 0.01)
    registry = metrics.registry
    value = registry.get_sample_value
    labels = {"operation": "login", "http_status": "401", "error_code": "100208"}
    assert value("rebind_platform_requests_total", labels) == 1
    labels = {"operation": "login", "http_status": "500", "error_code": OTHER_CODE}
    assert value("rebind_platform_requests_total", labels) == 1
    labels = {"operation": "login", "http_status": "none", "error_code": TIMEOUT}
    assert value("rebind_platform_requests_total", labels) == 1
    labels = {"operation": "query_device", "http_status": "200", "error_code": "none"}
    assert value("rebind_platform_requests_total", labels) == 1
    [warning] = [e for e in captured if e["event"] == "platform_error_code_unlisted"]
    assert warning["error_code"].startswith("not-a-code")
    assert len(warning["error_code"]) <= 64
    assert b"not-a-code" not in generate_latest(registry)
