"""PlatformClient's bind-watch calls against httpx.MockTransport: the activation query and the
bindDevice subscription.

Both go the way of every call: one grant of the budget at the caller's priority, the shared token
(one re-login and one repeat on 1010005), the error table, and one count in
``rebind_platform_requests_total`` under their own operation label.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from pydantic import SecretStr

from service.config import PlatformSettings
from service.metrics import OPERATIONS, Metrics
from service.platform import (
    PRIORITY_DEFERRED,
    PRIORITY_FRESH,
    PRIORITY_POLL,
    PRIORITY_URGENT,
    Action,
    ActivationQuery,
    Category,
    PlatformClient,
    RateBudget,
)
from service.platform.budget import Grant
from service.platform.errors import HTTP_ERROR, TIMEOUT

OWN_APP = "app-1"
ACTIVATION = "/iocm/app/reg/v1.1.0/deviceCredentials/"
SUBSCRIPTIONS = "/iocm/app/sub/v1.2.0/subscriptions"
CALLBACK = "https://rebind.example.com:8443/bind/s3cr3t"
Respond = Callable[[httpx.Request], httpx.Response]


class RecordingBudget(RateBudget):
    """The real budget, noting the priority of every grant and every penalty."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(100_000, metrics=metrics)
        self.priorities: list[int] = []
        self.penalties = 0

    async def acquire_grant(self, priority: int = PRIORITY_FRESH) -> Grant:
        self.priorities.append(priority)
        return await super().acquire_grant(priority)

    def penalize(self, seconds: float | None = None) -> None:
        self.penalties += 1
        super().penalize(seconds)


@dataclass
class Tokens:
    """A token source that hands out a new token after each invalidation."""

    current: str = "token-1"
    invalidations: list[str] = field(default_factory=list)

    async def get(self) -> str:
        return self.current

    async def invalidated(self, token: str) -> str:
        self.invalidations.append(token)
        self.current = f"token-{len(self.invalidations) + 1}"
        return self.current

    def release(self, token: str, *, refused: bool = False, sent: bool = True) -> None:
        return None


@dataclass
class Made:
    client: PlatformClient
    budget: RecordingBudget
    metrics: Metrics
    tokens: Tokens
    seen: list[httpx.Request]


@pytest.fixture
async def make() -> AsyncIterator[Callable[[Respond], Made]]:
    made: list[Made] = []

    def factory(respond: Respond) -> Made:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return respond(request)

        settings = PlatformSettings(
            base_url="https://iot.example.com:8743", app_id=OWN_APP, secret=SecretStr("s" * 16)
        )
        metrics = Metrics()
        budget = RecordingBudget(metrics)
        tokens = Tokens()
        client = PlatformClient(
            settings, metrics, budget, transport=httpx.MockTransport(handler), tokens=tokens
        )
        one = Made(client, budget, metrics, tokens, seen)
        made.append(one)
        return one

    yield factory
    for one in made:
        await one.client.aclose()
        await one.budget.aclose()


def counted(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for metric in metrics.registry.collect():
        if metric.name != "rebind_platform_requests":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                labels = sample.labels
                out[(labels["operation"], labels["http_status"], labels["error_code"])] = (
                    sample.value
                )
    return out


def throttled(metrics: Metrics, operation: str) -> float | None:
    return metrics.registry.get_sample_value(
        "rebind_platform_throttle_rejections_total", {"operation": operation}
    )


def activation(device_id: str, activated: object) -> httpx.Response:
    return httpx.Response(
        200, json={"deviceId": device_id, "activated": activated, "name": f"meter {device_id}"}
    )


# ------------------------------------------------------------------ the priority constant


def test_poll_is_the_lowest_priority_class() -> None:
    assert PRIORITY_POLL == 2
    assert PRIORITY_URGENT < PRIORITY_FRESH < PRIORITY_DEFERRED < PRIORITY_POLL


def test_both_operations_exist_at_zero() -> None:
    metrics = Metrics()
    for operation in ("query_activation", "subscribe"):
        assert operation in OPERATIONS
        assert throttled(metrics, operation) == 0


# ------------------------------------------------------------------ query_activation


@pytest.mark.parametrize("activated", [True, False])
async def test_query_activation_reads_the_activation_status(
    make: Callable[[Respond], Made], activated: bool
) -> None:
    m = make(lambda r: activation("dev/1 ä", activated))
    answer = await m.client.query_activation("dev/1 ä", None, priority=PRIORITY_POLL)
    assert isinstance(answer, ActivationQuery)
    assert answer.ok
    assert answer.activated is activated
    assert answer.result.http_status == 200
    [request] = m.seen
    assert request.method == "GET"
    assert request.url.raw_path == f"{ACTIVATION}dev%2F1%20%C3%A4".encode()  # one segment
    assert request.url.query == b""  # own application: no appId
    assert request.headers["app_key"] == OWN_APP
    assert request.headers["Authorization"] == "Bearer token-1"
    assert m.budget.priorities == [PRIORITY_POLL]
    assert counted(m.metrics) == {("query_activation", "200", "none"): 1.0}


async def test_query_activation_names_an_authorized_application_only(
    make: Callable[[Respond], Made],
) -> None:
    m = make(lambda r: activation("d1", True))
    await m.client.query_activation("d1", "partner-app", priority=PRIORITY_FRESH)
    await m.client.query_activation("d1", OWN_APP, priority=PRIORITY_FRESH)
    assert [dict(r.url.params) for r in m.seen] == [{"appId": "partner-app"}, {}]
    assert m.budget.priorities == [PRIORITY_FRESH, PRIORITY_FRESH]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"deviceId": "d1", "name": "x"}, id="missing"),
        pytest.param({"deviceId": "d1", "activated": "true"}, id="string"),
        pytest.param({"deviceId": "d1", "activated": 1}, id="number"),
        pytest.param({"deviceId": "d1", "activated": None}, id="null"),
        pytest.param([], id="array"),
    ],
)
async def test_a_2xx_without_a_boolean_activated_concludes_nothing(
    make: Callable[[Respond], Made], body: object
) -> None:
    m = make(lambda r: httpx.Response(200, json=body))
    answer = await m.client.query_activation("d1", None, priority=PRIORITY_POLL)
    assert not answer.ok
    assert answer.activated is None
    assert answer.result.http_status == 200
    assert answer.result.spec is not None
    assert answer.result.spec.code == HTTP_ERROR
    assert answer.result.spec.category == Category.PLATFORM_ERROR
    assert answer.result.error_desc == "no boolean activated"
    assert counted(m.metrics) == {("query_activation", "200", "none"): 1.0}


async def test_query_activation_errors_are_classified_by_the_table(
    make: Callable[[Respond], Made],
) -> None:
    answers = iter(
        [
            httpx.Response(404, json={"error_code": "100403", "error_desc": "no device"}),
            httpx.Response(500, json={"error_code": "50252", "error_desc": "internal"}),
            httpx.Response(403, json={"resultcode": "1010009", "resultmsg": "throttle"}),
        ]
    )
    m = make(lambda r: next(answers))
    gone = await m.client.query_activation("d1", None, priority=PRIORITY_POLL)
    assert (gone.ok, gone.activated, gone.result.error_code) == (False, None, "100403")
    assert gone.result.spec is not None
    assert gone.result.spec.category == Category.NOT_FOUND
    assert gone.result.spec.action is Action.FAIL
    fault = await m.client.query_activation("d1", None, priority=PRIORITY_POLL)
    assert fault.result.spec is not None
    assert fault.result.spec.action is Action.RETRY
    flow = await m.client.query_activation("d1", None, priority=PRIORITY_POLL)
    assert flow.result.spec is not None
    assert flow.result.spec.action is Action.THROTTLED
    assert m.budget.penalties == 1
    assert throttled(m.metrics, "query_activation") == 1
    assert counted(m.metrics) == {
        ("query_activation", "404", "100403"): 1.0,
        ("query_activation", "500", "50252"): 1.0,
        ("query_activation", "403", "1010009"): 1.0,
    }
    assert m.budget.priorities == [PRIORITY_POLL] * 3


async def test_query_activation_logs_in_again_once_on_1010005(
    make: Callable[[Respond], Made],
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer token-1":
            return httpx.Response(403, json={"resultcode": "1010005", "resultmsg": "token"})
        return activation("d1", True)

    m = make(respond)
    answer = await m.client.query_activation("d1", None, priority=PRIORITY_POLL)
    assert answer.ok
    assert answer.activated is True
    assert m.tokens.invalidations == ["token-1"]
    assert m.budget.priorities == [PRIORITY_POLL, PRIORITY_POLL]  # the repeat is a call too
    assert counted(m.metrics) == {
        ("query_activation", "403", "1010005"): 1.0,
        ("query_activation", "200", "none"): 1.0,
    }


async def test_query_activation_without_an_answer(make: Callable[[Respond], Made]) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    m = make(respond)
    answer = await m.client.query_activation("d1", None, priority=PRIORITY_POLL)
    assert not answer.ok
    assert answer.activated is None
    assert answer.result.error_code == TIMEOUT
    assert counted(m.metrics) == {("query_activation", "none", TIMEOUT): 1.0}


# ------------------------------------------------------------------ subscribe


async def test_subscribe_sends_the_documented_call(make: Callable[[Respond], Made]) -> None:
    created = {"subscriptionId": "sub-1", "notifyType": "bindDevice", "callbackUrl": CALLBACK}
    m = make(lambda r: httpx.Response(201, json=created))
    result = await m.client.subscribe("bindDevice", CALLBACK, None, priority=PRIORITY_URGENT)
    assert result.ok
    assert result.http_status == 201
    assert result.body == created
    [request] = m.seen
    assert request.method == "POST"
    assert request.url.path == SUBSCRIPTIONS
    assert request.url.query == b""  # ownerFlag left out when not given
    assert request.headers["content-type"] == "application/json"
    assert request.headers["app_key"] == OWN_APP
    assert request.headers["Authorization"] == "Bearer token-1"
    assert json.loads(request.content) == {"notifyType": "bindDevice", "callbackUrl": CALLBACK}
    assert m.budget.priorities == [PRIORITY_URGENT]
    assert counted(m.metrics) == {("subscribe", "201", "none"): 1.0}


async def test_subscribe_owner_flag_and_authorized_application(
    make: Callable[[Respond], Made],
) -> None:
    m = make(lambda r: httpx.Response(201, json={"subscriptionId": "s"}))
    await m.client.subscribe("bindDevice", CALLBACK, "partner-app", owner_flag=True, priority=0)
    await m.client.subscribe("bindDevice", CALLBACK, OWN_APP, owner_flag=False, priority=0)
    first, second = m.seen
    assert dict(first.url.params) == {"ownerFlag": "true"}
    assert json.loads(first.content) == {
        "notifyType": "bindDevice",
        "callbackUrl": CALLBACK,
        "appId": "partner-app",
    }
    assert dict(second.url.params) == {"ownerFlag": "false"}
    assert "appId" not in json.loads(second.content)  # our own application is never named


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(httpx.Response(200, json={"subscriptionId": "s"}), id="200"),
        pytest.param(httpx.Response(204), id="204-no-body"),
        pytest.param(httpx.Response(202, text="accepted"), id="202-text"),
    ],
)
async def test_subscribe_succeeds_on_any_2xx(
    make: Callable[[Respond], Made], answer: httpx.Response
) -> None:
    m = make(lambda r: answer)
    result = await m.client.subscribe("bindDevice", CALLBACK, None, priority=PRIORITY_FRESH)
    assert result.ok
    assert result.error_code is None
    assert counted(m.metrics) == {("subscribe", str(answer.status_code), "none"): 1.0}


async def test_subscribe_invalid_callback_url_is_terminal(
    make: Callable[[Respond], Made],
) -> None:
    m = make(
        lambda r: httpx.Response(
            400, json={"error_code": "100222", "error_desc": "The callback url is invalid."}
        )
    )
    result = await m.client.subscribe("bindDevice", "http://no-port/x", None, priority=0)
    assert not result.ok
    assert (result.http_status, result.error_code) == (400, "100222")
    assert result.error_desc == "The callback url is invalid."
    spec = result.spec
    assert spec is not None
    assert (spec.code, spec.operation, spec.category) == ("100222", "subscribe", "invalid_request")
    assert spec.action is Action.FAIL
    assert spec.terminal
    assert "port" in spec.recommended_handling
    assert counted(m.metrics) == {("subscribe", "400", "100222"): 1.0}


async def test_subscribe_flow_control_and_token_as_for_every_call(
    make: Callable[[Respond], Made],
) -> None:
    answers = iter(
        [
            httpx.Response(403, json={"resultcode": "1010005", "resultmsg": "token"}),
            httpx.Response(201, json={"subscriptionId": "s"}),
            httpx.Response(403, json={"resultcode": "1010009", "resultmsg": "throttle"}),
        ]
    )
    m = make(lambda r: next(answers))
    again = await m.client.subscribe("bindDevice", CALLBACK, None, priority=PRIORITY_FRESH)
    assert again.ok  # 1010005: one re-login, the call repeated once
    assert m.tokens.invalidations == ["token-1"]
    # last: after a 1010009 the budget grants nothing until its window frees
    flow = await m.client.subscribe("bindDevice", CALLBACK, None, priority=PRIORITY_FRESH)
    assert not flow.ok
    assert flow.spec is not None
    assert flow.spec.action is Action.THROTTLED
    assert m.budget.penalties == 1
    assert throttled(m.metrics, "subscribe") == 1
    assert m.budget.priorities == [PRIORITY_FRESH] * 3
    assert counted(m.metrics) == {
        ("subscribe", "403", "1010005"): 1.0,
        ("subscribe", "201", "none"): 1.0,
        ("subscribe", "403", "1010009"): 1.0,
    }


async def test_subscribe_other_codes_follow_the_common_table(
    make: Callable[[Respond], Made],
) -> None:
    answers = iter(
        [
            httpx.Response(403, json={"error_code": "100203", "error_desc": "no app"}),
            httpx.Response(500, json={"error_code": "50252", "error_desc": "internal"}),
            httpx.Response(400, json={"error_code": "777777", "error_desc": "new"}),
        ]
    )
    m = make(lambda r: next(answers))
    app_missing = await m.client.subscribe("bindDevice", CALLBACK, "ghost", priority=0)
    assert app_missing.spec is not None
    assert (app_missing.spec.category, app_missing.spec.action) == (Category.AUTH, Action.FAIL)
    internal = await m.client.subscribe("bindDevice", CALLBACK, None, priority=0)
    assert internal.spec is not None
    assert internal.spec.action is Action.RETRY
    unlisted = await m.client.subscribe("bindDevice", CALLBACK, None, priority=0)
    assert unlisted.spec is not None
    assert (unlisted.spec.category, unlisted.spec.action) == (
        Category.INVALID_REQUEST,
        Action.FAIL,
    )
    assert counted(m.metrics)[("subscribe", "400", "other")] == 1.0
