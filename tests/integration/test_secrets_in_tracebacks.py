"""Secrets stay out of logged tracebacks (issue 11, item 1).

An exception raised while a login, a refreshToken, the PUT or the device query is on its way has,
in the frames it passes through, the app secret (the token manager's ``secret`` local), httpx's
form data ``{'secret': ...}`` and the ``Authorization: Bearer ...`` header. Here the real client
and token manager talk to the platform simulator through a transport that raises, at a chosen
call, an exception whose message also quotes the request (as some libraries do); each exception is
logged the way the pipeline logs a failed handler (``log.exception``) and, once, the way asyncio
logs an unretrieved task exception (through the standard library). Every captured line is then
searched for the secret and for every token the platform issued.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx
import orjson
import pytest
import structlog
from pydantic import SecretStr

from service.config import PlatformSettings
from service.metrics import Metrics
from service.platform import PlatformClient, RateBudget, build_request
from service.platform.tokens import LOGIN_PATH, REFRESH_TOKEN_PATH
from tests.fixtures.simulator import SimulatorHandle
from tests.support.logcapture import captured_logs

pytestmark = pytest.mark.integration

HANDLER_FAILED = "handler failed; the event stays uncommitted"  # the pipeline's line


class InjectedFaultError(RuntimeError):
    """Raised by :class:`FaultyTransport` in the middle of a platform call."""


class FaultyTransport(httpx.AsyncBaseTransport):
    """The real transport, except that the next request whose path contains ``fail_on`` raises.

    Records every access and refresh token the platform hands out.
    """

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.fail_on: str | None = None
        self.issued: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.fail_on is not None and self.fail_on in request.url.path:
            self.fail_on = None
            headers = dict(request.headers)  # a local of this frame, as in any transport
            raise InjectedFaultError(
                f"cannot send {request.method} {request.url.path}: "
                f"headers={headers} body={request.content!r}"
            )
        response = await self.inner.handle_async_request(request)
        if request.url.path in (LOGIN_PATH, REFRESH_TOKEN_PATH):
            await response.aread()
            body = orjson.loads(response.content)
            self.issued.extend(
                v for k in ("accessToken", "refreshToken") if isinstance(v := body.get(k), str)
            )
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def app_secret(sim: SimulatorHandle) -> AsyncIterator[str]:
    secret = "AppS3cret-" + secrets.token_hex(12)
    await sim.control.upsert_app(sim.app_id, secret)
    yield secret
    await sim.control.aclose()


@pytest.mark.parametrize("fmt", ["json", "console"])
async def test_exceptions_during_platform_calls_leak_no_secret_or_token(
    sim: SimulatorHandle, app_secret: str, fmt: Literal["json", "console"]
) -> None:
    settings = PlatformSettings(
        base_url=sim.url,
        app_id=sim.app_id,
        secret=SecretStr(app_secret),
        request_timeout_seconds=5.0,
    )
    metrics = Metrics()
    budget = RateBudget(1000, metrics=metrics)
    transport = FaultyTransport()
    clock = Clock()
    client = PlatformClient(settings, metrics, budget, transport=transport, clock=clock)
    await sim.control.seed_device("sec-dev-1", "OLD-1")
    req = build_request("sec-dev-1", "NEW-1", None, None, None, 0)
    log = structlog.get_logger("service.pipeline.pipeline")
    failures: dict[str, BaseException] = {}

    async def fail_during(phase: str, fragment: str, call: Any) -> None:
        transport.fail_on = fragment
        try:
            await call()
        except InjectedFaultError as exc:
            failures[phase] = exc
            log.exception(HANDLER_FAILED, phase=phase)
        assert transport.fail_on is None, f"{phase}: the fault was not met"

    try:
        with captured_logs(level="DEBUG", fmt=fmt) as cap:
            # 1. inside the login (form data with the secret)
            await fail_during("login", LOGIN_PATH, lambda: client.refresh_device_key(req))
            # 2. inside the PUT (a token held: Authorization header)
            await fail_during(
                "refresh_device_key",
                "/deviceCredentials/",
                lambda: client.refresh_device_key(req),
            )
            # 3. inside the device query
            await fail_during(
                "query_device", "/devices/", lambda: client.query_device("sec-dev-1", None)
            )
            # 4. inside refreshToken (JSON body with the secret and the refresh token): the
            #    token is due for renewal, not yet expired
            clock.now += 3600 - 100  # renew_at is 300 s before expiry
            await fail_during(
                "refresh_token", REFRESH_TOKEN_PATH, lambda: client.refresh_device_key(req)
            )
            # the next call renews and succeeds: one more token pair issued
            assert (await client.refresh_device_key(req)).ok
            # a library's (or asyncio's) report of the same failure, through the stdlib
            logging.getLogger("asyncio").error(
                "Task exception was never retrieved", exc_info=failures["refresh_device_key"]
            )
    finally:
        await client.aclose()
        await budget.aclose()
        await transport.aclose()

    assert set(failures) == {"login", "refresh_device_key", "query_device", "refresh_token"}
    assert len(transport.issued) >= 4  # the login's pair and the refreshToken's pair
    text = cap.text
    assert text.count(HANDLER_FAILED) == 4
    assert "Task exception was never retrieved" in text
    assert "InjectedFaultError" in text  # the tracebacks are there, only the secrets are not
    for value in [app_secret, *transport.issued]:
        assert value not in text, f"a secret ({value[:8]}...) appears in the {fmt} logs"
    if fmt == "json":
        lines = [line for line in cap.lines() if line["event"] == HANDLER_FAILED]
        assert len(lines) == 4
        for line in lines:
            [exc] = line["exception"]
            assert exc["exc_type"] == "InjectedFaultError"
            assert exc["frames"], line
            assert all("locals" not in frame for frame in exc["frames"])
