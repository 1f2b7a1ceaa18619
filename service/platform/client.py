"""The platform's HTTP client: budget, token, TLS, one call, classified. Knows nothing of Kafka.

Every call spends one grant of the :class:`RateBudget` first, then takes the current token (a grant
whose token took longer than ``GRANT_STALE_SECONDS`` is given back and taken anew), sends,
reads both error body shapes, classifies the answer with the error table and counts it. A 1010005
answer reports the token as invalid (one re-login for all callers) and repeats the call once. A
1010009 answer slows the budget down. Headers are never logged; nor are the secret or tokens.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import httpx
import structlog

from service.config import PlatformSettings
from service.metrics import Metrics
from service.ownership import await_call_guard
from service.platform.budget import DEFAULT_SAFETY_MARGIN_SECONDS, PRIORITY_FRESH, RateBudget
from service.platform.connections import ConnectionSlots, with_set_cookie_jar
from service.platform.errors import (
    BAD_SUCCESS_BODY,
    CONNECTION_ERROR,
    THROTTLE_CODE,
    TIMEOUT,
    TOKEN_INVALID_CODE,
    ErrorSpec,
    classify,
    parse_error_body,
    parse_json_object,
    snippet,
)
from service.platform.network import asyncio_transport
from service.platform.tokens import TokenError, TokenManager, TokenProvider

log = structlog.get_logger(__name__)

REFRESH_KEY_PATH: Final = "/iocm/app/reg/v1.1.0/deviceCredentials/{device_id}"
QUERY_DEVICE_PATH: Final = "/iocm/app/dm/v1.4.0/devices/{device_id}"
QUERY_ACTIVATION_PATH: Final = REFRESH_KEY_PATH
"""The activation status is a GET of the refresh call's resource."""
SUBSCRIBE_PATH: Final = "/iocm/app/sub/v1.2.0/subscriptions"
CONNECT_TIMEOUT_MAX_SECONDS: Final = 5.0
GRANT_STALE_SECONDS: Final = DEFAULT_SAFETY_MARGIN_SECONDS / 2
"""A budget grant is used only if the token was in hand within this: a call leaves when its
grant says, so no window holds the calls granted while others waited for a token. Half the
budget's safety margin: the margin must also cover the time from the token to the call's
arrival (a new connection, the network). With the whole margin here, a burst whose token came
just in time and whose connections were slow arrived more than the margin after its grants, and
the next window's burst, sent at once, met them in the platform's window: 1010009."""
KEEPALIVE_EXPIRY_SECONDS: Final = 30.0


def refresh_key_path(device_id: str) -> str:
    """The refresh call's path: the deviceId percent-encoded into one segment (intake refuses
    the ids no encoding keeps in one segment, see ``service.events.device_id_problem``)."""
    return REFRESH_KEY_PATH.format(device_id=quote(device_id, safe=""))


def query_device_path(device_id: str) -> str:
    return QUERY_DEVICE_PATH.format(device_id=quote(device_id, safe=""))


def query_activation_path(device_id: str) -> str:
    return QUERY_ACTIVATION_PATH.format(device_id=quote(device_id, safe=""))


def base_url(url: str) -> httpx.URL:
    """The platform's base URL as an httpx client holds its ``base_url`` (a trailing slash)."""
    return httpx.URL(url.rstrip("/") + "/")


def call_url(base: httpx.URL, path: str) -> httpx.URL:
    """The absolute URL of ``path`` (percent-encoded, as ``refresh_key_path`` & co. make it) on
    ``base``: what an httpx client with that ``base_url`` makes of the relative ``path``, joined
    the way it joins them, without parsing ``path`` on its own first."""
    return base.copy_with(raw_path=base.raw_path + path.lstrip("/").encode("ascii"))


@dataclass(frozen=True, slots=True)
class RefreshRequest:
    """One key refresh as sent (:func:`service.platform.rebind.build_request` makes it)."""

    device_id: str
    node_id: str
    verify_code: str
    timeout: int
    app_id: str | None


@dataclass(frozen=True, slots=True)
class CallResult:
    """The outcome of one platform call (after at most one token repeat)."""

    ok: bool
    http_status: int | None
    """None when no response arrived."""
    error_code: str | None
    """The platform's code, or TIMEOUT / CONNECTION_ERROR when no response arrived."""
    error_desc: str | None
    spec: ErrorSpec | None
    """The error table's row (None on success)."""
    verify_code: str | None = None
    timeout: int | None = None
    outcome_unknown: bool = False
    """True when the request may have reached the platform but no answer came back."""
    body: dict[str, Any] | None = None
    """The parsed JSON object of a successful answer."""


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    """The answer of the device query (for reconciliation)."""

    result: CallResult
    node_id: str | None = None
    status: str | None = None

    @property
    def ok(self) -> bool:
        return self.result.ok


@dataclass(frozen=True, slots=True)
class ActivationQuery:
    """The answer of the activation-status query: has the device (its new hardware) bound?"""

    result: CallResult
    activated: bool | None = None
    """None when the call failed (or its answer carried no boolean ``activated``)."""

    @property
    def ok(self) -> bool:
        return self.result.ok


def build_ssl_context(settings: PlatformSettings) -> ssl.SSLContext:
    """Verify the platform against the CA bundle (or the system store); present a client cert."""
    cafile = str(settings.ca_bundle) if settings.ca_bundle is not None else None
    ctx = ssl.create_default_context(cafile=cafile)
    if not settings.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings.client_cert is not None and settings.client_key is not None:
        ctx.load_cert_chain(str(settings.client_cert), str(settings.client_key))
    return ctx


class PlatformClient:
    def __init__(
        self,
        settings: PlatformSettings,
        metrics: Metrics,
        budget: RateBudget,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        tokens: TokenProvider | None = None,
        clock: Callable[[], float] = time.monotonic,
        user_agent: str = "device-rebind",
    ) -> None:
        self._settings = settings
        # Names the replica in the platform's access logs (e.g. "device-rebind/0.1.0 (pod-0)").
        self._user_agent = user_agent
        self._metrics = metrics
        self.budget = budget
        self._clock = clock
        if not settings.verify_tls:
            log.warning(
                "platform_tls_verification_disabled",
                detail="REBIND_PLATFORM__VERIFY_TLS=false: the platform's certificate is NOT "
                "verified; anyone on the path can read the secret and tokens",
            )
        timeout = httpx.Timeout(
            settings.request_timeout_seconds,
            connect=min(settings.request_timeout_seconds, CONNECT_TIMEOUT_MAX_SECONDS),
        )
        # One single-connection client per call in flight instead of one large pool: httpcore
        # scans its whole pool on every request and every release, which made one
        # 66-connection pool the service's hottest code (docs/benchmarks.md). Each call borrows
        # an idle client (ConnectionSlots).
        connections = settings.max_concurrency + 2  # + a login and a query beside the refreshes
        tls = build_ssl_context(settings)
        # Every call's URL is this plus its path, joined as httpx joins a client's base_url and
        # a relative URL (the same bytes), once per call instead of parsing the path first.
        self._base_url = base_url(str(settings.base_url))

        def one_connection() -> httpx.AsyncClient:
            limits = httpx.Limits(
                max_connections=1,
                max_keepalive_connections=1,
                keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS,
            )
            client = httpx.AsyncClient(
                base_url=str(settings.base_url).rstrip("/"),
                transport=(
                    transport
                    if transport is not None
                    else asyncio_transport(ssl_context=tls, limits=limits)
                ),
                timeout=timeout,
                follow_redirects=False,
                trust_env=False,
            )
            return with_set_cookie_jar(client)

        self._slots = ConnectionSlots(
            [one_connection() for _ in range(connections)],
            wait_seconds=settings.request_timeout_seconds,  # httpx's pool timeout
        )
        self._token_http: httpx.AsyncClient | None = None
        if tokens is None:  # logins on a connection of their own, beside the calls
            self._token_http = one_connection()
            tokens = TokenManager(settings, metrics, budget, self._token_http, clock=clock)
        self.tokens: TokenProvider = tokens

    async def aclose(self) -> None:
        if isinstance(self.tokens, TokenManager):  # its own: stop a login retry in progress
            await self.tokens.aclose()
        await self._slots.aclose()
        if self._token_http is not None:
            await self._token_http.aclose()

    async def __aenter__(self) -> PlatformClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _app_param(self, app_id: str | None) -> dict[str, str]:
        """``appId`` only for a device of an authorized application (not our own app)."""
        if app_id is not None and app_id != self._settings.app_id:
            return {"appId": app_id}
        return {}

    # ------------------------------------------------------------------ calls
    async def refresh_device_key(
        self, req: RefreshRequest, *, priority: int = PRIORITY_FRESH
    ) -> CallResult:
        body: dict[str, Any] = {"nodeId": req.node_id, "verifyCode": req.verify_code}
        if req.timeout is not None:
            body["timeout"] = req.timeout
        result = await self._call(
            "refresh_device_key",
            "PUT",
            refresh_key_path(req.device_id),
            params=self._app_param(req.app_id),
            json=body,
            priority=priority,
            success_field="verifyCode",
        )
        if not result.ok or result.body is None:
            return result
        verify = result.body.get("verifyCode")
        timeout = result.body.get("timeout")
        return CallResult(
            ok=True,
            http_status=result.http_status,
            error_code=None,
            error_desc=None,
            spec=None,
            verify_code=verify if isinstance(verify, str) else None,
            timeout=timeout if isinstance(timeout, int) and not isinstance(timeout, bool) else None,
            body=result.body,
        )

    async def query_device(
        self, device_id: str, app_id: str | None, *, priority: int = PRIORITY_FRESH
    ) -> DeviceQuery:
        result = await self._call(
            "query_device",
            "GET",
            query_device_path(device_id),
            params=self._app_param(app_id),
            json=None,
            priority=priority,
        )
        info = (result.body or {}).get("deviceInfo")
        if not result.ok or not isinstance(info, dict):
            if result.ok:  # a 2xx without deviceInfo: nothing can be concluded
                spec = classify("query_device", result.http_status, None)
                result = CallResult(False, result.http_status, None, "no deviceInfo", spec)
            return DeviceQuery(result=result)
        node_id, status = info.get("nodeId"), info.get("status")
        return DeviceQuery(
            result=result,
            node_id=node_id if isinstance(node_id, str) else None,
            status=status if isinstance(status, str) else None,
        )

    async def query_activation(
        self, device_id: str, app_id: str | None, *, priority: int
    ) -> ActivationQuery:
        """``GET deviceCredentials/{deviceId}``: ``{"deviceId", "activated", "name"}``.

        ``activated`` turns true when the device binds (after a key refresh: when the new
        hardware connected with the new verifyCode). A 2xx without a boolean ``activated`` is
        no answer (``ok`` False, nothing can be concluded), like a device query without
        ``deviceInfo``.
        """
        result = await self._call(
            "query_activation",
            "GET",
            query_activation_path(device_id),
            params=self._app_param(app_id),
            json=None,
            priority=priority,
        )
        if not result.ok:
            return ActivationQuery(result=result)
        activated = (result.body or {}).get("activated")
        if not isinstance(activated, bool):
            spec = classify("query_activation", result.http_status, None)
            failed = CallResult(False, result.http_status, None, "no boolean activated", spec)
            return ActivationQuery(result=failed)
        return ActivationQuery(result=result, activated=activated)

    async def subscribe(
        self,
        notify_type: str,
        callback_url: str,
        app_id: str | None,
        *,
        owner_flag: bool | None = None,
        priority: int,
    ) -> CallResult:
        """``POST subscriptions``: have the platform push ``notify_type`` notifications (e.g.
        ``bindDevice``) to ``callback_url``. Repeating it is harmless; success is any 2xx
        (``body`` holds the answer's JSON object, if any: ``subscriptionId``, ...).

        ``app_id``: sent in the body only for another (authorized) application, as for every
        call. ``owner_flag``: the ``ownerFlag`` query parameter (False: the callback belongs to
        the authorizing application, True: to the authorized one), left out when None.
        """
        body: dict[str, Any] = {"notifyType": notify_type, "callbackUrl": callback_url}
        body.update(self._app_param(app_id))
        params = {} if owner_flag is None else {"ownerFlag": "true" if owner_flag else "false"}
        return await self._call(
            "subscribe", "POST", SUBSCRIBE_PATH, params=params, json=body, priority=priority
        )

    async def _call(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        params: dict[str, str],
        json: dict[str, Any] | None,
        priority: int,
        success_field: str | None = None,
    ) -> CallResult:
        """One call (after at most one token repeat). ``success_field``: a 2xx counts as success
        only when its body is a JSON object with this field as a non-empty string; any other 2xx
        is ambiguous (``BAD_SUCCESS_BODY``, outcome unknown)."""
        stale: str | None = None
        renewed = False  # the refused token was reported and replaced already
        while True:
            grant = await self.budget.acquire_grant(priority)
            asked = self.budget.now()
            try:
                token = (
                    await self.tokens.get()
                    if stale is None or renewed
                    else await self.tokens.invalidated(stale)
                )
            except TokenError as exc:
                self.budget.give_back(grant)  # nothing was sent
                return CallResult(
                    ok=False,
                    http_status=exc.http_status,
                    error_code=exc.error_code,
                    error_desc=f"{exc.operation}: {exc.error_desc or exc.spec.description}",
                    spec=exc.spec,
                )
            try:
                await await_call_guard()  # only the partition's owner calls (service.ownership)
            except asyncio.CancelledError:
                self.tokens.release(token, sent=False)
                self.budget.give_back(grant)
                raise
            if self.budget.now() - asked > GRANT_STALE_SECONDS:
                # The token (or the proof of ownership) took long (a rotation, a refused login,
                # a renewal, a member that was frozen): the grant is
                # stale, and every call that waited with one would leave at once, on top of
                # the calls granted meanwhile. Give it back and take a fresh one, token in hand.
                self.tokens.release(token, sent=False)
                self.budget.give_back(grant)
                renewed = stale is not None
                continue
            refused = False
            try:
                result = await self._send(
                    operation,
                    method=method,
                    path=path,
                    params=params,
                    json=json,
                    token=token,
                    success_field=success_field,
                )
                refused = result.error_code == TOKEN_INVALID_CODE
            finally:
                # a token rotation waits for the calls on the wire
                self.tokens.release(token, refused=refused)
            if result.error_code == TOKEN_INVALID_CODE and stale is None:
                stale = token
                continue  # one re-login (shared by all callers), then repeat once
            return result

    async def _send(
        self,
        operation: str,
        *,
        method: str,
        path: str,
        params: dict[str, str],
        json: dict[str, Any] | None,
        token: str,
        success_field: str | None = None,
    ) -> CallResult:
        headers = {
            "app_key": self._settings.app_id,
            "Authorization": f"Bearer {token}",
            "User-Agent": self._user_agent,
        }
        started = self._clock()
        try:
            http = await self._slots.take()
            try:
                resp = await http.request(
                    method,
                    call_url(self._base_url, path),
                    params=params or None,
                    json=json,
                    headers=headers,
                )
            finally:
                self._slots.give(http)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # The request never left: safe to resend, nothing to reconcile.
            never_sent = CONNECTION_ERROR if isinstance(exc, httpx.ConnectError) else TIMEOUT
            return self._transport_failure(
                operation, never_sent, exc, started, outcome_unknown=False
            )
        except httpx.TimeoutException as exc:  # read/write timeout: it may have been applied
            return self._transport_failure(operation, TIMEOUT, exc, started, outcome_unknown=True)
        except httpx.TransportError as exc:  # reset / dropped after sending: may have applied
            return self._transport_failure(
                operation, CONNECTION_ERROR, exc, started, outcome_unknown=True
            )
        status = resp.status_code
        code, desc = parse_error_body(status, resp.content, resp.headers.get("content-type"))
        ok = code is None and 200 <= status < 300
        body = parse_json_object(resp.content) if ok else None
        if ok and success_field is not None:
            value = body.get(success_field) if body is not None else None
            if not isinstance(value, str) or not value:
                return self._bad_success(operation, status, resp.content, success_field, started)
        spec = None if ok else classify(operation, status, code)
        self._count(operation, status, code, started)
        if code == THROTTLE_CODE:
            self.budget.penalize()
        if ok:
            log.debug("platform_call", operation=operation, http_status=status)
            return CallResult(
                ok=True,
                http_status=status,
                error_code=None,
                error_desc=None,
                spec=None,
                body=body,
            )
        assert spec is not None
        log.info(
            "platform_call_rejected",
            operation=operation,
            http_status=status,
            error_code=code,
            category=spec.category,
            action=spec.action.value,
        )
        return CallResult(
            ok=False,
            http_status=status,
            error_code=code,
            error_desc=desc if desc is not None else spec.description,
            spec=spec,
        )

    def _bad_success(
        self, operation: str, status: int, content: bytes, field: str, started: float
    ) -> CallResult:
        """A 2xx without the JSON object a success carries: the call may or may not have been
        applied (a proxy or WAF may have answered), so the outcome is unknown."""
        self._count(operation, status, BAD_SUCCESS_BODY, started)
        excerpt = snippet(content) if content.strip() else None
        desc = f"HTTP {status} without a JSON object carrying {field}: " + (
            repr(excerpt) if excerpt is not None else "empty body"
        )
        log.warning(
            "platform_call_ambiguous_success",
            operation=operation,
            http_status=status,
            error_code=BAD_SUCCESS_BODY,
            detail=desc,
            outcome_unknown=True,
        )
        return CallResult(
            ok=False,
            http_status=status,
            error_code=BAD_SUCCESS_BODY,
            error_desc=desc,
            spec=classify(operation, status, BAD_SUCCESS_BODY),
            outcome_unknown=True,
        )

    def _transport_failure(
        self,
        operation: str,
        code: str,
        exc: httpx.TransportError,
        started: float,
        *,
        outcome_unknown: bool,
    ) -> CallResult:
        self._count(operation, None, code, started)
        desc = f"{type(exc).__name__}: no response from the platform"
        log.warning(
            "platform_call_transport_error",
            operation=operation,
            error_code=code,
            error=type(exc).__name__,
            outcome_unknown=outcome_unknown,
        )
        return CallResult(
            ok=False,
            http_status=None,
            error_code=code,
            error_desc=desc,
            spec=classify(operation, None, code),
            outcome_unknown=outcome_unknown,
        )

    def _count(self, operation: str, status: int | None, code: str | None, started: float) -> None:
        self._metrics.platform_call(operation, status, code, self._clock() - started)
