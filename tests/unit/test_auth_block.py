"""A login refused for good holds calls instead of failing them (issue 11, item 3), without Kafka:
the secret read from its file, the gate, the retried login, the shared-token holder telling its
followers, the configuration."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest
from pydantic import SecretStr

from service import logs
from service.config import ConfigError, KafkaSettings, PlatformSettings, load_settings
from service.metrics import Metrics
from service.platform.budget import RateBudget
from service.platform.errors import AUTH_BLOCKING_CODES
from service.platform.tokens import AuthGate, SecretReader, TokenError, TokenManager
from service.shared.shared_token import SharedToken, SharedTokenProvider, TokenCodec
from tests.support.waiting import wait_until

APP = "app-1"
RIGHT = "Right-S3cret-value"


@dataclass
class Platform:
    """Logins: 200 with a numbered token when the form's secret is ``RIGHT``, else 401 100208."""

    secret: str = RIGHT
    logins: list[str] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode())
        given = form.get("secret", [""])[0]
        self.logins.append(given)
        if given != self.secret:
            return httpx.Response(
                401, json={"error_code": "100208", "error_desc": "AppId or secret is not right."}
            )
        return httpx.Response(
            200, json={"accessToken": f"access-{len(self.logins)}", "expiresIn": 3600}
        )


def _settings(secret_file: Path | None = None, secret: str = "wrong-secret-1") -> PlatformSettings:
    return PlatformSettings(
        base_url="https://iot.invalid:8743",
        app_id=APP,
        secret=SecretStr(secret),
        secret_file=secret_file,
        retry_backoff_initial_seconds=0.01,
        retry_backoff_max_seconds=0.05,
    )


@pytest.fixture
async def http() -> AsyncIterator[tuple[Platform, httpx.AsyncClient]]:
    platform = Platform()
    client = httpx.AsyncClient(
        base_url="https://iot.invalid:8743", transport=httpx.MockTransport(platform.handler)
    )
    yield platform, client
    await client.aclose()


# ---------------------------------------------------------------------- the secret and its file
def test_the_secret_file_wins_is_stripped_and_read_again(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("  first-secret-value\n")
    settings = _settings(path, secret="from-the-environment")
    assert settings.secret.get_secret_value() == "first-secret-value"
    reader = SecretReader(settings)
    assert reader.current() == "first-secret-value"
    path.write_text("second-secret-value\n")
    assert reader.current() == "second-secret-value"
    assert "second-secret-value" not in logs.redact_text("x second-secret-value y")
    path.write_text("\n")  # emptied while being rewritten: the last one stays
    assert reader.current() == "second-secret-value"
    path.unlink()
    assert reader.current() == "second-secret-value"


def test_a_secret_file_that_cannot_be_used_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REBIND_PLATFORM__BASE_URL", "https://iot.example.com:8743")
    monkeypatch.setenv("REBIND_PLATFORM__APP_ID", APP)
    monkeypatch.setenv("REBIND_PLATFORM__SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="REBIND_PLATFORM__SECRET_FILE: cannot read"):
        load_settings()
    (tmp_path / "empty").write_text(" \n")
    monkeypatch.setenv("REBIND_PLATFORM__SECRET_FILE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"REBIND_PLATFORM__SECRET_FILE: .* is empty"):
        load_settings()
    (tmp_path / "ok").write_text("file-secret-value\n")
    monkeypatch.setenv("REBIND_PLATFORM__SECRET_FILE", str(tmp_path / "ok"))
    assert load_settings().platform.secret.get_secret_value() == "file-secret-value"


def test_the_refused_login_codes() -> None:
    assert {"100208", "100025", "100203"} <= AUTH_BLOCKING_CODES
    assert "1010005" not in AUTH_BLOCKING_CODES  # a dead token: log in again, nothing to wait


# ---------------------------------------------------------------------- the token manager
async def test_a_refused_login_makes_callers_wait_and_is_retried_until_accepted(
    http: tuple[Platform, httpx.AsyncClient], tmp_path: Path
) -> None:
    platform, client = http
    path = tmp_path / "secret"
    path.write_text("wrong-secret-1\n")
    metrics = Metrics()
    budget = RateBudget(100_000, metrics=metrics)
    manager = TokenManager(_settings(path), metrics, budget, client)
    seen: list[bool] = []
    manager.gate.subscribe(lambda gate: seen.append(gate.blocked))
    try:
        callers = [asyncio.create_task(manager.get()) for _ in range(10)]
        await wait_until(lambda: len(platform.logins) >= 4, timeout=5, what="logins retried")
        assert not any(task.done() for task in callers)  # waiting, none failed
        assert manager.gate.blocked
        assert manager.gate.code == "100208"
        assert manager.gate.reason is not None
        assert "100208" in manager.gate.reason
        assert "REBIND_PLATFORM__SECRET_FILE" in manager.gate.reason
        assert metrics.registry.get_sample_value("rebind_platform_auth_blocked") == 1
        assert not manager.healthy() or manager.gate.blocked

        path.write_text(f"{RIGHT}\n")  # the mounted Secret is fixed
        tokens = await asyncio.wait_for(asyncio.gather(*callers), 5)

        assert len(set(tokens)) == 1
        assert not manager.gate.blocked
        assert metrics.registry.get_sample_value("rebind_platform_auth_blocked") == 0
        assert platform.logins[-1] == RIGHT
        assert set(platform.logins[:-1]) == {"wrong-secret-1"}
        await wait_until(lambda: seen == [True, False], timeout=2, what="listeners told")
        # one login at a time: the ten callers shared every attempt
        assert len(platform.logins) < 50
    finally:
        await manager.aclose()
        await budget.aclose()


async def test_other_login_failures_are_not_held(http: tuple[Platform, httpx.AsyncClient]) -> None:
    _, client = http

    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error_code": "50252", "error_desc": "Internal error."})

    client._transport = httpx.MockTransport(down)
    metrics = Metrics()
    budget = RateBudget(100_000, metrics=metrics)
    manager = TokenManager(_settings(), metrics, budget, client)
    try:
        with pytest.raises(TokenError) as caught:
            await manager.get()
        assert not caught.value.blocking
        assert not manager.gate.blocked
    finally:
        await manager.aclose()
        await budget.aclose()


# ---------------------------------------------------------------------- followers
SCOPE = b"group-1/app-1"


def _provider(
    instance: str, client: httpx.AsyncClient, published: list[tuple[bytes, bytes]]
) -> SharedTokenProvider:
    async def publish(key: bytes, value: bytes) -> None:
        published.append((key, value))

    metrics = Metrics()
    return SharedTokenProvider(
        _settings(),
        KafkaSettings(group_id="group-1", instance_id=instance),
        "token-topic",
        metrics,
        RateBudget(100_000, metrics=metrics),
        http=client,
        wait_seconds=0.3,
        publish=publish,
    )


async def test_followers_wait_with_a_holder_whose_login_is_refused(
    http: tuple[Platform, httpx.AsyncClient],
) -> None:
    platform, client = http
    platform.secret = "the-platform-has-another-one"
    published: list[tuple[bytes, bytes]] = []
    holder, follower = _provider("i0", client, published), _provider("i1", client, published)
    holder.set_holder(True)
    try:
        waiting_holder = asyncio.create_task(holder.get())
        await wait_until(
            lambda: any(k == SCOPE + b"/blocked" for k, _ in published),
            timeout=5,
            what="the holder's blocked notice",
        )
        [notice] = [v for k, v in published if k == SCOPE + b"/blocked"]
        assert b"100208" not in notice  # encrypted like every record
        follower.receive(SCOPE + b"/blocked", notice, offset=1)
        assert follower.gate.blocked
        assert follower.gate.source == "holder"
        assert "100208" in (follower.gate.reason or "")
        waiting_follower = asyncio.create_task(follower.get())
        # while the holder retries for longer than the follower's wait (0.3 s), the follower
        # neither times out nor takes over
        started = time.monotonic()
        await wait_until(
            lambda: time.monotonic() - started > 0.6 and len(platform.logins) >= 10,
            timeout=10,
            what="the holder retrying for a while",
        )
        assert not waiting_follower.done()
        assert follower.takeovers == 0

        platform.secret = "wrong-secret-1"  # the platform accepts the configured secret now
        assert await asyncio.wait_for(waiting_holder, 5) == f"access-{len(platform.logins)}"
        await wait_until(
            lambda: any(k == SCOPE for k, _ in published), timeout=5, what="the token published"
        )
        follower.receive(SCOPE, [v for k, v in published if k == SCOPE][-1], offset=2)
        assert await asyncio.wait_for(waiting_follower, 5) == await holder.get()
        assert not follower.gate.blocked
        # an old blocked notice written again (a replay) blocks nobody: a newer token is held
        follower.receive(SCOPE + b"/blocked", notice, offset=3)
        assert not follower.gate.blocked
    finally:
        await holder.aclose()
        await follower.aclose()


async def test_a_follower_reads_a_token_under_a_rotated_secret(
    http: tuple[Platform, httpx.AsyncClient], tmp_path: Path
) -> None:
    """The holder's file was updated first: its record is under the new secret's key; the
    follower reads it once its own file is updated too, without another record."""
    _, client = http
    path = tmp_path / "secret"
    path.write_text("old-secret-value\n")
    metrics = Metrics()
    follower = SharedTokenProvider(
        _settings(path),
        KafkaSettings(group_id="group-1", instance_id="i1"),
        "token-topic",
        metrics,
        RateBudget(100_000, metrics=metrics),
        http=client,
        wait_seconds=1,
        publish=lambda key, value: asyncio.sleep(0),
    )
    now = time.time()
    record = TokenCodec(APP, "new-secret-value").encode_token(
        SharedToken("tok-NEW", None, now, now + 3600, now + 3000, "i0", sequence=3), SCOPE
    )
    try:
        follower.receive(SCOPE, record, offset=1)
        assert follower.latest is None  # not readable with the old secret
        path.write_text("new-secret-value\n")
        assert await follower.get() == "tok-NEW"
    finally:
        await follower.aclose()


def test_the_gate_is_idempotent() -> None:
    gate = AuthGate()
    assert not gate.blocked
    gate.unblock()
    assert not gate.blocked
    told: list[bool] = []
    gate.subscribe(lambda g: told.append(g.blocked))
    gate.block("100208", "platform: login refused", source="login")  # no loop running here
    assert gate.blocked
    gate.block("100208", "platform: login refused", source="login")  # the same: not told twice
    gate.unblock()
    assert told == [True, False]
