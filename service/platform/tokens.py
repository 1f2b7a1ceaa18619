"""Access tokens: one holder, renewed ahead of expiry, one renewal at a time.

Each login invalidates the application's previous access token, so logins must be rare and never
concurrent. :class:`TokenManager` keeps one token, renews it (refreshToken, or a login when that is
not possible) ``token_refresh_margin_seconds`` before it expires (clamped to a fraction of the
token's lifetime for short-lived tokens), and lets exactly one renewal run at a time: concurrent
callers await the same future. A call answered 1010005 reports its token through
:meth:`TokenManager.invalidated`; the first report of a token triggers one login, later reports of
the same (now replaced) token simply get the new one.

The :class:`TokenProvider` protocol is what the client depends on, so a shared-token design (see
``docs/tokens.md``) can replace this single-holder manager without touching the client.

A login the platform refuses for good (a wrong or rotated secret, an unknown or frozen
application: :data:`~service.platform.errors.AUTH_BLOCKING_CODES`) closes the
:class:`AuthGate`: callers wait instead of failing (the service pauses its input meanwhile), and
the login is retried with a capped backoff within the budget, reading the secret again each
time (:class:`SecretReader`: ``REBIND_PLATFORM__SECRET_FILE``), until it is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

import httpx
import structlog

from service import logs
from service.config import PlatformSettings
from service.metrics import Metrics
from service.platform.budget import PRIORITY_URGENT, RateBudget
from service.platform.errors import (
    AUTH_BLOCKING_CODES,
    CONNECTION_ERROR,
    THROTTLE_CODE,
    TIMEOUT,
    Action,
    ErrorSpec,
    classify,
    parse_error_body,
    parse_json_object,
)

log = structlog.get_logger(__name__)

LOGIN_PATH: Final = "/iocm/app/sec/v1.1.0/login"
REFRESH_TOKEN_PATH: Final = "/iocm/app/sec/v1.1.0/refreshToken"  # noqa: S105 - a path

MARGIN_MAX_FRACTION: Final = 0.5
"""The refresh margin never exceeds this fraction of the token's lifetime."""
REFRESH_TOKEN_LIFETIME_SECONDS: Final = 24 * 3600.0
"""The shorter of the two documented refresh-token lifetimes (24 h / one month)."""
FAILURE_HOLD_TRANSIENT_SECONDS: Final = 1.0
FAILURE_HOLD_TERMINAL_SECONDS: Final = 30.0
"""After a failed renewal, callers get the same error for this long instead of a new login."""


@runtime_checkable
class TokenProvider(Protocol):
    async def get(self) -> str:
        """A valid access token (renewing it first when needed)."""
        ...

    async def invalidated(self, token: str) -> str:
        """``token`` was refused (1010005): a replacement (one re-login for all reporters)."""
        ...

    def release(self, token: str, *, refused: bool = False, sent: bool = True) -> None:
        """The call that took ``token`` (from get or invalidated) has its answer; ``refused``:
        it was 1010005; ``sent`` False: the call was not sent after all (it proves nothing)."""
        ...


class TokenError(Exception):
    """No token could be obtained: the failed login/refreshToken call, classified."""

    def __init__(
        self,
        operation: str,
        http_status: int | None,
        error_code: str | None,
        error_desc: str | None,
        spec: ErrorSpec,
    ) -> None:
        super().__init__(f"{operation} failed: {http_status} {error_code or spec.code}")
        self.operation = operation
        self.http_status = http_status
        self.error_code = error_code
        self.error_desc = error_desc
        self.spec = spec

    @property
    def blocking(self) -> bool:
        """A refused login that no retry of a swap can get past (see :class:`AuthGate`)."""
        return self.operation == "login" and self.error_code in AUTH_BLOCKING_CODES


class SecretReader:
    """The application secret: ``REBIND_PLATFORM__SECRET``, or the content of
    ``REBIND_PLATFORM__SECRET_FILE`` (stripped), read again at every call so that a rotated,
    mounted Secret is used without a restart. An unreadable or empty file keeps the last secret
    read (and is logged). Every value read is registered for redaction from the logs."""

    def __init__(self, settings: PlatformSettings) -> None:
        self._file: Path | None = settings.secret_file
        self._last = settings.secret.get_secret_value()
        logs.register_secret(self._last)
        self._complaint: str | None = None

    def current(self) -> str:
        if self._file is None:
            return self._last
        try:
            text = self._file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            self._complain(f"cannot read it ({type(exc).__name__}); the last secret read is used")
            return self._last
        if not text:
            self._complain("it is empty; the last secret read is used")
            return self._last
        self._complaint = None
        if text != self._last:
            logs.register_secret(text)
            log.info("platform_secret_changed", file=str(self._file))
            self._last = text
        return text

    def _complain(self, what: str) -> None:
        if what != self._complaint:  # once per kind of trouble, not at every login
            log.warning("platform_secret_file_unusable", file=str(self._file), problem=what)
            self._complaint = what


class AuthGate:
    """Open while the platform accepts the service's credentials.

    Closed (``block``) when a login is refused for good (``source="login"``), or, on a replica
    that follows the shared token, when the token holder says so (``source="holder"``). While
    closed, token callers wait, ``/readyz`` names ``reason``, ``rebind_platform_auth_blocked``
    is 1, and listeners (the service: pause the input) are told; opened again by the next
    accepted login (or the holder's next token).
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.code: str | None = None
        self.reason: str | None = None
        self.source: str | None = None
        self._metrics = metrics
        self._listeners: list[Callable[[AuthGate], None]] = []
        if metrics is not None:
            metrics.auth_blocked.set(0)

    @property
    def blocked(self) -> bool:
        return self.reason is not None

    def subscribe(self, listener: Callable[[AuthGate], None]) -> None:
        self._listeners.append(listener)

    def block(self, code: str, reason: str, *, source: str) -> None:
        changed = (self.code, self.reason, self.source) != (code, reason, source)
        self.code, self.reason, self.source = code, reason, source
        self._open.clear()
        if changed:
            self._changed()

    def unblock(self) -> None:
        if not self.blocked:
            return
        self.code = self.reason = self.source = None
        self._open.set()
        self._changed()

    async def wait_open(self) -> None:
        await self._open.wait()

    def _changed(self) -> None:
        if self._metrics is not None:
            self._metrics.auth_blocked.set(1 if self.blocked else 0)
        # Listeners run in a context of their own: the change is no business of the swap whose
        # call happened to find it (its device and event ids would label their log lines).
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): tell them now
            for listener in list(self._listeners):
                listener(self)
            return
        for listener in list(self._listeners):
            loop.call_soon(listener, self, context=contextvars.Context())


def refused_login_reason(exc: TokenError) -> str:
    """The one line ``/readyz`` and the logs give for a refused login."""
    desc = (exc.error_desc or exc.spec.description).strip().rstrip(".")
    handling = exc.spec.recommended_handling.strip().rstrip(".")
    return (
        f"platform: login refused ({exc.error_code}, {desc}); {handling} "
        "(REBIND_PLATFORM__APP_ID, REBIND_PLATFORM__SECRET_FILE or REBIND_PLATFORM__SECRET); "
        "input paused, login retried"
    )


@dataclass(frozen=True, slots=True)
class _Token:
    access: str = field(repr=False)
    refresh: str | None = field(repr=False)
    obtained_at: float
    expires_at: float
    renew_at: float

    def __post_init__(self) -> None:
        # Every token the service holds is masked in the logs from the moment it exists.
        logs.register_secret(self.access)
        logs.register_secret(self.refresh)


class TokenManager:
    """The single-holder token manager (one token per replica; see docs/tokens.md)."""

    def __init__(
        self,
        settings: PlatformSettings,
        metrics: Metrics,
        budget: RateBudget,
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        secret: SecretReader | None = None,
        gate: AuthGate | None = None,
        retry_refused_login: bool = True,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._budget = budget
        self._http = http
        self.secret = secret or SecretReader(settings)
        self.gate = gate or AuthGate(metrics)
        self._retry: asyncio.Task[None] | None = None
        self._retry_refused_login = retry_refused_login
        self._before_call: Callable[[], Awaitable[None]] | None = None
        """False: a refused login closes the gate, and the owner retries (the shared-token
        holder retries through its fence, see service/shared/shared_token.py)."""
        self._clock = clock
        self._token: _Token | None = None
        self._inflight: asyncio.Future[_Token] | None = None
        self._failure: TokenError | None = None
        self._failure_until = 0.0
        self.logins = 0
        self.refreshes = 0
        metrics.token_valid.set_function(self._is_valid)

    def _is_valid(self) -> float:
        tok = self._token
        return 1.0 if tok is not None and self._clock() < tok.expires_at else 0.0

    def healthy(self) -> bool:
        """A valid token is held, or nothing says one cannot be had (for /readyz)."""
        return (
            self._is_valid() == 1.0 or self._failure is None or self._clock() >= self._failure_until
        )

    async def aclose(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry

    # ------------------------------------------------------------------ TokenProvider
    async def get(self) -> str:
        """A valid token; while the platform refuses the login, wait until it accepts it."""
        while True:
            await self.gate.wait_open()
            tok = self._token
            if tok is not None and self._clock() < tok.renew_at:
                return tok.access
            try:
                return (await self._renew(force_login=False)).access
            except TokenError as exc:
                if not exc.blocking:
                    raise
                # the gate is closed now: wait for the retried login

    async def invalidated(self, token: str) -> str:
        tok = self._token
        if tok is not None and tok.access == token:
            log.info("platform_token_rejected", action="login")
            self._token = None
            self._failure = None
            try:
                return (await self._renew(force_login=True)).access
            except TokenError as exc:
                if not exc.blocking:
                    raise
        return await self.get()  # already replaced (or being replaced) by another caller

    def release(self, token: str, *, refused: bool = False, sent: bool = True) -> None:
        """Nothing to do: one replica, nobody waits for its calls to drain."""

    # ------------------------------------------------------------------ refused logins
    def _block(self, exc: TokenError) -> None:
        reason = refused_login_reason(exc)
        if not self.gate.blocked:
            log.error(
                "platform_login_refused",
                error_code=exc.error_code,
                http_status=exc.http_status,
                action="input paused; the login is retried with a capped backoff",
            )
        self.gate.block(exc.error_code or "", reason, source="login")
        if self._retry_refused_login and (self._retry is None or self._retry.done()):
            self._retry = asyncio.get_running_loop().create_task(
                self._retry_login(), name="login-retry", context=contextvars.Context()
            )

    def _unblock(self) -> None:
        if self.gate.blocked and self.gate.source == "login":
            log.info("platform_login_accepted", action="input resumed")
            self.gate.unblock()

    async def _retry_login(self) -> None:
        """Log in again with a capped, jittered backoff (each try spends a budget grant and
        reads the secret again) until the platform accepts it."""
        initial = self._settings.retry_backoff_initial_seconds
        cap = self._settings.retry_backoff_max_seconds
        attempt = 0
        while self.gate.blocked and self.gate.source == "login":
            attempt += 1
            ceiling = min(cap, initial * 2.0 ** min(attempt - 1, 30))
            await asyncio.sleep(random.uniform(ceiling / 2, ceiling))  # noqa: S311 - jitter
            self._failure = None
            try:
                await self._renew(force_login=True)
            except TokenError as exc:
                log.info("platform_login_retry_refused", attempt=attempt, error_code=exc.error_code)
            except Exception:  # never stop retrying
                log.warning("platform_login_retry_failed", attempt=attempt, exc_info=True)

    # ------------------------------------------------------------------ single flight
    async def _renew(self, *, force_login: bool) -> _Token:
        if self._inflight is None:
            if self._failure is not None and self._clock() < self._failure_until:
                raise self._failure
            loop = asyncio.get_running_loop()
            self._inflight = loop.create_task(self._do_renew(force_login=force_login))
            self._inflight.add_done_callback(self._renewed)
        return await asyncio.shield(self._inflight)

    def _renewed(self, fut: asyncio.Future[_Token]) -> None:
        self._inflight = None
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, TokenError):
            self._failure = exc
            hold = (
                FAILURE_HOLD_TERMINAL_SECONDS
                if exc.spec.action is Action.FAIL
                else FAILURE_HOLD_TRANSIENT_SECONDS
            )
            self._failure_until = self._clock() + hold
        elif exc is None:
            self._failure = None

    async def renew_once(
        self, *, login: bool, before_call: Callable[[], Awaitable[None]] | None = None
    ) -> _Token:
        """Exactly one platform call: a refreshToken with the refresh token held (when
        ``login`` is False and it has one young enough), else a login. No fall-back from a
        failed refresh to a login: the caller decides (and fences) that second call.
        ``before_call`` runs once the budget has granted the call, right before it is sent (the
        shared-token holder checks there that it is still the holder); raising stops it."""
        if not login and not self.can_refresh():
            login = True
        self._before_call = before_call
        try:
            return await self._do_renew(force_login=login, fallback_login=False)
        finally:
            self._before_call = None

    def can_refresh(self) -> bool:
        tok = self._token
        return (
            tok is not None
            and tok.refresh is not None
            and self._clock() < tok.obtained_at + REFRESH_TOKEN_LIFETIME_SECONDS
        )

    async def _do_renew(self, *, force_login: bool, fallback_login: bool = True) -> _Token:
        tok = self._token
        if (
            not force_login
            and tok is not None
            and tok.refresh is not None
            and self._clock() < tok.obtained_at + REFRESH_TOKEN_LIFETIME_SECONDS
        ):
            try:
                new = await self._post("refresh_token", REFRESH_TOKEN_PATH, tok.refresh)
            except TokenError as exc:
                if not fallback_login or (
                    exc.spec.action in (Action.RETRY, Action.THROTTLED)
                    and self._clock() < tok.expires_at
                ):
                    raise  # the current token still works: try again later
                log.info("platform_token_refresh_failed", code=exc.error_code, action="login")
            else:
                self.refreshes += 1
                self._token = new
                return new
        try:
            new = await self._post("login", LOGIN_PATH, None)
        except TokenError as exc:
            if exc.blocking:
                self._block(exc)
            raise
        self.logins += 1
        self._token = new
        self._unblock()
        return new

    # ------------------------------------------------------------------ HTTP
    async def _post(self, operation: str, path: str, refresh_token: str | None) -> _Token:
        await self._budget.acquire(PRIORITY_URGENT)
        if self._before_call is not None:
            await self._before_call()
        secret = self.secret.current()
        sent_at = self._clock()
        try:
            if refresh_token is None:
                resp = await self._http.post(
                    path, data={"appId": self._settings.app_id, "secret": secret}
                )
            else:
                resp = await self._http.post(
                    path,
                    json={
                        "appId": self._settings.app_id,
                        "secret": secret,
                        "refreshToken": refresh_token,
                    },
                )
        except httpx.TimeoutException as exc:
            self._count(operation, None, TIMEOUT, sent_at)
            raise TokenError(
                operation, None, TIMEOUT, type(exc).__name__, classify(operation, None, TIMEOUT)
            ) from None
        except httpx.TransportError as exc:
            self._count(operation, None, CONNECTION_ERROR, sent_at)
            raise TokenError(
                operation,
                None,
                CONNECTION_ERROR,
                type(exc).__name__,
                classify(operation, None, CONNECTION_ERROR),
            ) from None
        code, desc = parse_error_body(
            resp.status_code, resp.content, resp.headers.get("content-type")
        )
        self._count(operation, resp.status_code, code, sent_at)
        body = parse_json_object(resp.content) if code is None else None
        access = body.get("accessToken") if body is not None else None
        if code is None and 200 <= resp.status_code < 300 and isinstance(access, str) and access:
            return self._token_from(body or {}, access, sent_at)
        spec = classify(operation, resp.status_code, code)
        if code == THROTTLE_CODE:
            self._budget.penalize()
        log.warning(
            "platform_token_call_failed",
            operation=operation,
            http_status=resp.status_code,
            error_code=code,
            category=spec.category,
        )
        raise TokenError(operation, resp.status_code, code, desc, spec)

    def _token_from(self, body: dict[str, object], access: str, sent_at: float) -> _Token:
        raw_ttl = body.get("expiresIn", 3600)
        try:
            ttl = float(raw_ttl) if isinstance(raw_ttl, int | float | str) else 3600.0
        except ValueError:
            ttl = 3600.0
        ttl = max(ttl, 1.0)
        margin = min(self._settings.token_refresh_margin_seconds, ttl * MARGIN_MAX_FRACTION)
        refresh = body.get("refreshToken")
        log.info("platform_token_obtained", expires_in=ttl)
        return _Token(
            access=access,
            refresh=refresh if isinstance(refresh, str) and refresh else None,
            obtained_at=sent_at,
            expires_at=sent_at + ttl,
            renew_at=sent_at + ttl - margin,
        )

    def _count(self, operation: str, status: int | None, code: str | None, sent_at: float) -> None:
        self._metrics.platform_call(operation, status, code, self._clock() - sent_at)
