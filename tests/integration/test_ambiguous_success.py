"""A 2xx that is not a JSON object carrying ``verifyCode`` is settled by asking (issue 11, item 5).

Against the platform simulator: a proxy (or WAF) answers for the platform with an HTML page, a 204
without a body, ``[]`` or ``{}``, either after the platform applied the PUT (``answer_after_apply``)
or instead of forwarding it (``html`` with status 200). The swap must query the device: applied
means success (reconciled), not applied means the same call again; never a success on the proxy's
word alone.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from pydantic import SecretStr

from service.config import PlatformSettings
from service.metrics import Metrics
from service.platform import (
    PlatformClient,
    RateBudget,
    RebindPolicy,
    Succeeded,
    build_request,
    rebind,
)
from service.platform.errors import BAD_SUCCESS_BODY
from tests.fixtures.simulator import SimulatorHandle

pytestmark = pytest.mark.integration

FAST = RebindPolicy(max_attempts=4, backoff_initial_seconds=0.01, backoff_max_seconds=0.05)


@pytest.fixture
async def client(sim: SimulatorHandle) -> AsyncIterator[PlatformClient]:
    settings = PlatformSettings(
        base_url=sim.url,
        app_id=sim.app_id,
        secret=SecretStr(sim.secret),
        request_timeout_seconds=5.0,
    )
    metrics = Metrics()
    budget = RateBudget(10_000, metrics=metrics)
    platform = PlatformClient(settings, metrics, budget)
    try:
        yield platform
    finally:
        await platform.aclose()
        await budget.aclose()
        await sim.control.aclose()


def ambiguous_count(client: PlatformClient, status: int) -> float:
    value = client._metrics.registry.get_sample_value(
        "rebind_platform_requests_total",
        {
            "operation": "refresh_device_key",
            "http_status": str(status),
            "error_code": BAD_SUCCESS_BODY,
        },
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(200, "<html><body><h1>Request accepted</h1></body></html>", id="html-200"),
        pytest.param(204, "", id="204-no-body"),
        pytest.param(200, "[]", id="json-array"),
        pytest.param(200, "{}", id="empty-object"),
    ],
)
async def test_applied_behind_a_proxy_is_reconciled_by_a_query(
    sim: SimulatorHandle, client: PlatformClient, status: int, body: str
) -> None:
    await sim.control.seed_device("amb-1", "OLD-1")
    await sim.control.inject_answer_after_apply(status, body, device_id="amb-1")
    req = build_request("amb-1", "NEW-1", None, None, None, 0)
    res = await rebind(req, client, FAST, is_repeat=False, deadline=time.monotonic() + 30)
    assert res == Succeeded(verify_code="NEW-1", timeout=0, attempts=1, reconciled=True)
    calls = await sim.control.calls()
    assert [(c["operation"], c["status"]) for c in calls] == [
        ("login", 200),
        ("refresh_key", status),
        ("get_device", 200),
    ]
    assert calls[1]["fault"] == "answer_after_apply"
    device = await sim.control.device("amb-1")
    assert device["node_id"] == "NEW-1"
    assert device["applied_pairs"] == [["NEW-1", "NEW-1"]]  # one key, applied once
    assert ambiguous_count(client, status) == 1


async def test_a_proxy_page_instead_of_the_platform_is_repeated(
    sim: SimulatorHandle, client: PlatformClient
) -> None:
    await sim.control.seed_device("amb-2", "OLD-2")
    await sim.control.inject_html(200, operation="refresh_key", device_id="amb-2")  # not applied
    req = build_request("amb-2", "NEW-2", None, None, None, 0)
    res = await rebind(req, client, FAST, is_repeat=False, deadline=time.monotonic() + 30)
    assert res == Succeeded(verify_code="NEW-2", timeout=0, attempts=2, reconciled=False)
    calls = await sim.control.calls()
    assert [c["operation"] for c in calls] == ["login", "refresh_key", "get_device", "refresh_key"]
    assert (await sim.control.device("amb-2"))["node_id"] == "NEW-2"
    assert ambiguous_count(client, 200) == 1
