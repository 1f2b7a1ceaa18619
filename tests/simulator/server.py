"""aiohttp server of the simulated IoT platform: northbound API + ``/_sim/`` control endpoints.

It also plays the platform's side of notifications: a dispatcher task applies planned binds and
deadlines when they come due and POSTs every queued notification (``bindDevice`` pushes) to the
subscribed callback URLs with an aiohttp client, retrying an attempt that got no 2xx a few times,
and logging every attempt and its answer (``GET /_sim/pushes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
from aiohttp import web

from tests.simulator.state import (
    GATEWAY_CODES,
    HOME_APP_ID,
    NOTIFY_TYPES,
    OPERATIONS,
    PARTNER_APP_ID,
    App,
    CallRecord,
    Change,
    Device,
    ErrorShape,
    Notification,
    PlatformError,
    PlatformState,
    SimConfig,
    callback_url_problem,
    fingerprint,
)

JSON = "application/json"
_SECRET_KEYS = frozenset({"secret", "refreshToken"})
_MAX_INT = 2_147_483_647
_ANSWER_SNIPPET = 200
_DISPATCH_IDLE_S = 60.0


@dataclass(frozen=True, slots=True)
class _Created:
    """An operation's answer that is ``201 Created`` rather than ``200``."""

    body: Any


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%dT%H%M%SZ")


def _masked(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: (fingerprint(str(v)) if k in _SECRET_KEYS and v else v) for k, v in body.items()}
    return body


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=JSON)


def _raw_answer(status: int, body: str) -> web.Response:
    """An answer as a proxy might send it: HTML, JSON or nothing (always nothing for a 204)."""
    if status in (204, 304) or not body:
        return web.Response(status=status)
    ctype = "text/html" if body.lstrip().startswith("<") else JSON
    return web.Response(text=body, status=status, content_type=ctype)


def _corrupt_gzip() -> web.Response:
    """A 200 that claims a gzip body and is not one: the client fails while decoding it."""
    return web.Response(
        body=b"\x1f\x8bthis is not gzip",
        status=200,
        headers={"Content-Encoding": "gzip", "Content-Type": JSON},
    )


def _bad_control(exc: Exception) -> web.Response:
    return _json({"error": str(exc)}, status=400)


class Simulator:
    """The platform simulator: run it in-process with ``await start()`` / ``await stop()``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        config: SimConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
        seed_demo: bool = False,
        push_ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.push_ssl_context = push_ssl_context
        """Verifies https callback URLs; None: their certificates are not verified."""
        self.state = PlatformState(config)
        self.seed_demo = seed_demo
        if seed_demo:
            seed_demo_devices(self.state)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self.url = ""

    # ------------------------------------------------------------------ lifecycle
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        api = "/iocm/app"
        r = app.router
        r.add_post(f"{api}/sec/v1.1.0/login", self.h_login)
        r.add_post(f"{api}/sec/v1.1.0/refreshToken", self.h_refresh_token)
        r.add_put(f"{api}/reg/v1.1.0/deviceCredentials/{{deviceId}}", self.h_refresh_key)
        r.add_put(f"{api}/reg/v1.1.0/deviceCredentials", self.h_refresh_key)
        r.add_put(f"{api}/reg/v1.1.0/deviceCredentials/", self.h_refresh_key)
        r.add_get(f"{api}/reg/v1.1.0/deviceCredentials/{{deviceId}}", self.h_get_credentials)
        r.add_get(f"{api}/dm/v1.4.0/devices/{{deviceId}}", self.h_get_device)
        r.add_post(f"{api}/sub/v1.2.0/subscriptions", self.h_subscribe)
        r.add_get("/_sim/health", self.c_health)
        r.add_post("/_sim/reset", self.c_reset)
        r.add_get("/_sim/config", self.c_get_config)
        r.add_post("/_sim/config", self.c_configure)
        r.add_post("/_sim/clock", self.c_clock)
        r.add_get("/_sim/apps", self.c_apps)
        r.add_post("/_sim/apps", self.c_upsert_app)
        r.add_post("/_sim/apps/{appId}/expire-token", self.c_expire_token)
        r.add_post("/_sim/devices", self.c_seed_devices)
        r.add_get("/_sim/devices", self.c_devices)
        r.add_get("/_sim/devices/{deviceId}", self.c_device)
        r.add_patch("/_sim/devices/{deviceId}", self.c_update_device)
        r.add_delete("/_sim/devices/{deviceId}", self.c_delete_device)
        r.add_post("/_sim/devices/{deviceId}/connect", self.c_connect)
        r.add_get("/_sim/subscriptions", self.c_subscriptions)
        r.add_delete("/_sim/subscriptions", self.c_clear_subscriptions)
        r.add_get("/_sim/notifications", self.c_notifications)
        r.add_post("/_sim/notifications", self.c_send_notification)
        r.add_get("/_sim/pushes", self.c_pushes)
        r.add_get("/_sim/push-behaviour", self.c_push_behaviour)
        r.add_post("/_sim/push-behaviour", self.c_push_behaviour)
        r.add_post("/_sim/faults", self.c_add_fault)
        r.add_get("/_sim/faults", self.c_faults)
        r.add_delete("/_sim/faults", self.c_clear_faults)
        r.add_get("/_sim/calls", self.c_calls)
        r.add_get("/_sim/stats", self.c_stats)
        r.add_get("/_sim/flow/{appId}", self.c_flow)
        return app

    async def start(self) -> str:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=self.push_ssl_context if self.push_ssl_context is not None else False,
                limit=100,
            ),
        )
        self._wake = asyncio.Event()
        self.state.on_change = self._wake.set
        self._dispatcher = asyncio.create_task(self._dispatch(), name="sim-push-dispatcher")
        self._runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, ssl_context=self.ssl_context, backlog=1024
        )
        await site.start()
        port = self._runner.addresses[0][1]
        self.port = port
        scheme = "https" if self.ssl_context is not None else "http"
        self.url = f"{scheme}://{self.host}:{port}"
        return self.url

    async def stop(self) -> None:
        self.state.on_change = None
        tasks = [*self._deliveries]
        if self._dispatcher is not None:
            tasks.append(self._dispatcher)
            self._dispatcher = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ notifications
    async def _dispatch(self) -> None:
        """Apply due binds and deadlines; hand every queued notification to its deliveries."""
        st = self.state
        wake = self._wake
        assert wake is not None
        while True:
            wake.clear()
            st.run_due()
            while st.outbox:
                note = st.outbox.popleft()
                for url in note.targets:
                    self._spawn(self._deliver(note, url, st.reset_epoch))
            due = st.next_due()
            timeout = _DISPATCH_IDLE_S if due is None else min(_DISPATCH_IDLE_S, due - st.now())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), max(0.0, timeout))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, note: Notification, url: str, epoch: int) -> None:
        """One notification to one URL: dropped, or each copy retried until answered 2xx."""
        st = self.state
        if st.take_push_drop():
            st.record_push(note, url, copy=1, attempt=0, dropped=True, error="dropped")
            return
        copies = st.push_copies
        for copy in range(1, copies + 1):
            attempts = st.config.push_max_attempts
            for attempt in range(1, attempts + 1):
                status, answer, error = await self._post(url, note.body)
                if st.reset_epoch != epoch:
                    return  # the simulator was reset meanwhile
                delivered = status is not None and 200 <= status < 300
                st.record_push(
                    note,
                    url,
                    copy=copy,
                    attempt=attempt,
                    status=status,
                    answer=answer,
                    error=error,
                    delivered=delivered,
                )
                if delivered:
                    break
                if attempt < attempts:
                    await asyncio.sleep(st.config.push_retry_delay_seconds)

    async def _post(self, url: str, body: Any) -> tuple[int | None, str, str | None]:
        """(status, answer excerpt, error) of one POST; status None when no answer came."""
        session = self._session
        assert session is not None
        timeout = aiohttp.ClientTimeout(total=self.state.config.push_timeout_seconds)
        try:
            async with session.post(
                url,
                data=orjson.dumps(body),
                headers={"Content-Type": JSON},
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                raw = await resp.content.read(_ANSWER_SNIPPET)
                return resp.status, raw.decode("utf-8", "replace"), None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return None, "", f"{type(exc).__name__}: {exc}"[:_ANSWER_SNIPPET]

    def _cancel_deliveries(self) -> None:
        for task in [*self._deliveries]:
            task.cancel()

    # ------------------------------------------------------------------ responses
    def _error(self, exc: PlatformError, shape: ErrorShape | None = None) -> web.Response:
        shape = shape or self.state.config.error_shape
        if shape == "mixed":
            shape = "gateway" if exc.code in GATEWAY_CODES else "documented"
        if shape == "gateway":
            payload = {"resultcode": exc.code, "resultmsg": exc.desc}
        else:
            payload = {"error_code": exc.code, "error_desc": exc.desc}
        return _json(payload, exc.status)

    async def _serve(  # noqa: PLR0911 - one return per fault action
        self,
        request: web.Request,
        operation: str,
        *,
        device_id: str | None,
        identity: str | None,
        body: Any,
        work: Callable[[], Any],
    ) -> web.StreamResponse:
        """Common path: fault rules, the operation itself, the call log."""
        st = self.state
        authz = request.headers.get("Authorization")
        token = authz.partition(" ")[2].strip() if authz else None
        rec = CallRecord(
            seq=st.next_seq(),
            time=st.now(),
            operation=operation,
            method=request.method,
            path=request.path,
            device_id=device_id,
            app_id_query=request.query.get("appId"),
            app_key=request.headers.get("app_key"),
            body=_masked(body),
            token_fp=fingerprint(token),
            app=identity,
            user_agent=request.headers.get("User-Agent"),
        )
        st.record(rec)
        fault = st.take_fault(operation, device_id, identity)
        drop = False
        if fault is not None:
            rec.fault = fault.action
            if fault.delay > 0:
                await asyncio.sleep(fault.delay)
            if fault.action == "refuse":
                _abort(request)
                return web.Response(status=499)
            if fault.action == "html":
                rec.status = fault.status
                html = "<html><body><h1>Service Unavailable</h1></body></html>"
                return web.Response(text=html, status=fault.status, content_type="text/html")
            if fault.action == "corrupt":  # a body the client cannot decode, nothing applied
                rec.status = 200
                return _corrupt_gzip()
            if fault.action == "error":
                code = fault.code or "50252"
                rec.status, rec.error_code = fault.status, code
                return self._error(PlatformError(fault.status, code, fault.desc), fault.shape)
            drop = fault.action == "drop_after_apply"
        try:
            payload = work()
            if isinstance(payload, _Created):
                resp = _json(payload.body, 201)
                rec.status = 201
            else:
                resp = _json(payload)
                rec.status = 200
        except PlatformError as exc:
            rec.status, rec.error_code = exc.status, exc.code
            resp = self._error(exc)
        if drop:
            _abort(request)
        if fault is not None and fault.action == "corrupt_after_apply":
            return _corrupt_gzip()
        if fault is not None and fault.action == "answer_after_apply":
            rec.status = fault.status
            return _raw_answer(fault.status, fault.body)
        return resp

    # ------------------------------------------------------------------ northbound API
    async def h_login(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        app_id = form.get("appId") or None
        return await self._serve(
            request,
            "login",
            device_id=None,
            identity=app_id,
            body=form,
            work=lambda: self.op_login(form),
        )

    def op_login(self, form: dict[str, str]) -> dict[str, Any]:
        st = self.state
        app_id, secret = form.get("appId", ""), form.get("secret", "")
        if not app_id or not secret:
            raise PlatformError(400, "102202")
        app = st.apps.get(app_id)
        if app is None:
            raise PlatformError(401, "100208")
        st.admit(app)
        if not secrets.compare_digest(secret, app.secret):
            raise PlatformError(401, "100208")
        if app.frozen:
            raise PlatformError(400, "100247")
        app.logins += 1
        return st.issue_tokens(app)

    async def h_refresh_token(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body: Any
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")[:512]
        identity = body.get("appId") if isinstance(body, dict) else None
        return await self._serve(
            request,
            "refresh_token",
            device_id=None,
            identity=identity if isinstance(identity, str) else None,
            body=body,
            work=lambda: self.op_refresh_token(body),
        )

    def op_refresh_token(self, body: Any) -> dict[str, Any]:
        st = self.state
        if not isinstance(body, dict):
            raise PlatformError(400, "50400")
        values = [body.get(k) for k in ("appId", "secret", "refreshToken")]
        if any(v is not None and not isinstance(v, str) for v in values):
            raise PlatformError(400, "50400")
        app_id, secret, refresh = (v or "" for v in values)
        if not app_id or not secret or not refresh:
            raise PlatformError(400, "102202")
        app = st.apps.get(app_id)
        if app is None:
            raise PlatformError(401, "100208")
        st.admit(app)
        if not secrets.compare_digest(secret, app.secret):
            raise PlatformError(401, "100208")
        if (
            app.refresh_token is None
            or not secrets.compare_digest(refresh, app.refresh_token)
            or st.now() >= app.refresh_expires_at
        ):
            raise PlatformError(401, "100208")
        if app.frozen:
            raise PlatformError(400, "100247")
        app.token_refreshes += 1
        return st.issue_tokens(app)

    def _authorize(self, request: web.Request, target_app: str | None = None) -> App:
        """app_key -> flow control -> token -> ``appId`` (the query's, or ``target_app``);
        returns the devices' owner app."""
        st = self.state
        app_key = request.headers.get("app_key")
        app = st.apps.get(app_key) if app_key else None
        if app is None:
            raise PlatformError(401, "100025")
        st.admit(app)
        st.check_token(app, request.headers.get("Authorization"))
        query_app = request.query.get("appId") if target_app is None else target_app
        if not query_app or query_app == app.app_id:
            return app
        target = st.apps.get(query_app)
        if target is None:
            raise PlatformError(st.config.app_unknown_status, "100203")
        if query_app not in app.can_act_for:
            raise PlatformError(st.config.unauthorized_status, "100217")
        return target

    def _device(self, owner: App, device_id: str) -> Device:
        self.state.run_due()  # a device whose verifyCode expired is gone
        dev = self.state.devices.get(device_id)
        if dev is None or dev.app_id != owner.app_id:
            raise PlatformError(404, "100403")
        self.state.settle(dev)
        if dev.device_data_missing:
            raise PlatformError(404, "100418")
        return dev

    async def h_refresh_key(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info.get("deviceId") or None
        raw = await request.read()
        body: Any
        bad_json = False
        try:
            body = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            bad_json = True
            body = raw.decode("utf-8", "replace")[:512]
        return await self._serve(
            request,
            "refresh_key",
            device_id=device_id,
            identity=request.headers.get("app_key"),
            body=body,
            work=lambda: self.op_refresh_key(request, device_id, body, bad_json),
        )

    def op_refresh_key(
        self, request: web.Request, device_id: str | None, body: Any, bad_json: bool
    ) -> dict[str, Any]:
        st = self.state
        owner = self._authorize(request)
        if bad_json or not isinstance(body, dict) or not device_id:
            raise PlatformError(400, "100007")
        node_id = body.get("nodeId")
        verify = body.get("verifyCode")
        timeout = body.get("timeout")
        if (
            (node_id is not None and not isinstance(node_id, str))
            or (verify is not None and not isinstance(verify, str))
            or (timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool)))
        ):
            raise PlatformError(400, "100007")
        dev = self._device(owner, device_id)
        if timeout is not None and not 0 <= timeout <= _MAX_INT:
            raise PlatformError(400, "50400")
        if node_id is not None and (node_id == "" or len(node_id) > 256):
            raise PlatformError(400, "50400")
        if verify is not None and (verify == "" or len(verify) > 256):
            raise PlatformError(400, "100003")
        new_node = node_id if node_id is not None else dev.node_id
        if dev.nb_iot and verify != new_node:
            raise PlatformError(400, "100003")
        if not dev.activated or dev.status == "INACTIVE":
            raise PlatformError(400, "100610")
        if dev.status == "ONLINE":
            raise PlatformError(400, "100611")
        if node_id is not None:
            holder = st.node_index.get(node_id)
            if holder is not None and holder != dev.device_id:
                raise PlatformError(400, "100426")
            if holder == dev.device_id:
                mode = dev.repeat_put_mode or st.config.repeat_put_mode
                if mode == "duplicate":
                    raise PlatformError(400, "100426")
        # apply
        now = st.now()
        code = verify if verify is not None else _generate_verify_code()
        effective_timeout = timeout if timeout is not None else st.config.default_timeout
        if node_id is not None and node_id != dev.node_id:
            if st.node_index.get(dev.node_id) == dev.device_id:
                del st.node_index[dev.node_id]
            st.node_index[node_id] = dev.device_id
            dev.node_id = node_id
        dev.history.append(Change(dev.node_id, code, effective_timeout, now))
        dev.last_modified_time = now
        st.after_refresh(dev, now, effective_timeout)  # may bind at once (connect delay 0)
        return {"verifyCode": code, "timeout": effective_timeout}

    async def h_get_device(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["deviceId"]
        return await self._serve(
            request,
            "get_device",
            device_id=device_id,
            identity=request.headers.get("app_key"),
            body=None,
            work=lambda: self.op_get_device(request, device_id),
        )

    def op_get_device(self, request: web.Request, device_id: str) -> dict[str, Any]:
        dev = self._device(self._authorize(request), device_id)
        detail = "NOT_ACTIVE" if dev.status == "INACTIVE" else "NONE"
        return {
            "deviceId": dev.device_id,
            "gatewayId": dev.gateway_id,
            "nodeType": dev.node_type,
            "createTime": _fmt_time(dev.create_time),
            "lastModifiedTime": _fmt_time(dev.last_modified_time),
            "deviceInfo": {
                "nodeId": dev.node_id,
                "name": dev.name,
                "manufacturerId": dev.manufacturer_id,
                "deviceType": dev.device_type,
                "model": dev.model,
                "status": dev.status,
                "statusDetail": detail,
            },
            "services": [],
        }

    async def h_get_credentials(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["deviceId"]
        return await self._serve(
            request,
            "query_activation",
            device_id=device_id,
            identity=request.headers.get("app_key"),
            body=None,
            work=lambda: self.op_get_credentials(request, device_id),
        )

    def op_get_credentials(self, request: web.Request, device_id: str) -> dict[str, Any]:
        """Activation status: false while a refreshed device's new hardware has not bound."""
        dev = self._device(self._authorize(request), device_id)
        activated = dev.activated and not dev.awaiting_bind
        return {"deviceId": dev.device_id, "activated": activated, "name": dev.name}

    async def h_subscribe(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body: Any
        bad_json = False
        try:
            body = orjson.loads(raw) if raw.strip() else None
        except orjson.JSONDecodeError:
            bad_json = True
            body = raw.decode("utf-8", "replace")[:512]
        return await self._serve(
            request,
            "subscribe",
            device_id=None,
            identity=request.headers.get("app_key"),
            body=body,
            work=lambda: self.op_subscribe(request, body, bad_json),
        )

    def op_subscribe(self, request: web.Request, body: Any, bad_json: bool) -> _Created:
        """Subscribe an application's notifications of one type to a callback URL (idempotent)."""
        st = self.state
        named = body.get("appId") if isinstance(body, dict) else None
        owner = self._authorize(request, named if isinstance(named, str) else "")
        if bad_json or not isinstance(body, dict):
            raise PlatformError(400, "100007")
        if named is not None and not isinstance(named, str):
            raise PlatformError(400, "50400")
        flag = request.query.get("ownerFlag")
        if flag is not None and flag not in ("true", "false"):
            raise PlatformError(400, "50400")
        notify_type = body.get("notifyType")
        if not isinstance(notify_type, str) or notify_type not in NOTIFY_TYPES:
            raise PlatformError(400, "50400")
        callback = body.get("callbackUrl")
        if callback_url_problem(callback) is not None:
            raise PlatformError(400, "100222")
        assert isinstance(callback, str)
        sub = st.subscribe(
            owner.app_id,
            notify_type,
            callback,
            owner_flag=None if flag is None else flag == "true",
            created_by=request.headers.get("app_key", ""),
        )
        return _Created(sub.answer())

    # ------------------------------------------------------------------ control API
    @staticmethod
    async def _body(request: web.Request) -> Any:
        raw = await request.read()
        return orjson.loads(raw) if raw.strip() else {}

    async def c_health(self, request: web.Request) -> web.Response:
        return _json({"ok": True, "url": self.url})

    async def c_reset(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._cancel_deliveries()
        self.state.reset()
        if body.get("seed_demo", False):
            seed_demo_devices(self.state)
        return _json({"ok": True})

    async def c_get_config(self, request: web.Request) -> web.Response:
        cfg = self.state.config.as_dict()
        cfg["clock_offset"] = self.state.clock_offset
        return _json(cfg)

    async def c_configure(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            if "clock_offset" in body:
                self.state.clock_offset = float(body.pop("clock_offset"))
                self.state.changed()
            return _json(self.state.configure(body))
        except (ValueError, TypeError) as exc:
            return _bad_control(exc)

    async def c_clock(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if "offset" in body:
            self.state.clock_offset = float(body["offset"])
        if "advance" in body:
            self.state.clock_offset += float(body["advance"])
        self.state.changed()
        return _json({"offset": self.state.clock_offset, "now": self.state.now()})

    async def c_apps(self, request: web.Request) -> web.Response:
        return _json({k: a.public() for k, a in self.state.apps.items()})

    async def c_upsert_app(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            app = self.state.upsert_app(
                str(body["app_id"]),
                body.get("secret"),
                frozen=body.get("frozen"),
                can_act_for=body.get("can_act_for"),
            )
        except (KeyError, ValueError, TypeError) as exc:
            return _bad_control(exc)
        return _json(app.public())

    async def c_expire_token(self, request: web.Request) -> web.Response:
        app_id = request.match_info["appId"]
        if app_id not in self.state.apps:
            return _json({"error": "unknown app"}, 404)
        self.state.expire_token(app_id)
        return _json({"ok": True})

    async def c_seed_devices(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        items = body if isinstance(body, list) else body.get("devices", [body])
        try:
            devs = [self.state.seed_device(item) for item in items]
        except (KeyError, ValueError, TypeError) as exc:
            return _bad_control(exc)
        return _json([d.public() for d in devs])

    async def c_devices(self, request: web.Request) -> web.Response:
        self.state.run_due()
        for dev in self.state.devices.values():
            self.state.settle(dev)
        return _json([d.public() for d in self.state.devices.values()])

    async def c_device(self, request: web.Request) -> web.Response:
        self.state.run_due()
        dev = self.state.devices.get(request.match_info["deviceId"])
        if dev is None:
            return _json({"error": "unknown device"}, 404)
        self.state.settle(dev)
        return _json(dev.public())

    async def c_update_device(self, request: web.Request) -> web.Response:
        self.state.run_due()
        device_id = request.match_info["deviceId"]
        if device_id not in self.state.devices:
            return _json({"error": "unknown device"}, 404)
        try:
            dev = self.state.update_device(device_id, await self._body(request))
        except (ValueError, TypeError) as exc:
            return _bad_control(exc)
        return _json(dev.public())

    async def c_delete_device(self, request: web.Request) -> web.Response:
        self.state.run_due()
        device_id = request.match_info["deviceId"]
        if device_id not in self.state.devices:
            return _json({"error": "unknown device"}, 404)
        self.state.delete_device(device_id)
        return _json({"ok": True})

    async def c_connect(self, request: web.Request) -> web.Response:
        """``{"after": seconds | null}``: the waiting device's new hardware connects now (0),
        after that many seconds (simulator clock), or never (null)."""
        device_id = request.match_info["deviceId"]
        try:
            body = await self._body(request)
            after = body.get("after", 0.0)
            if after is not None and (
                isinstance(after, bool) or not isinstance(after, int | float)
            ):
                raise TypeError("after must be a number of seconds or null (never)")
            dev = self.state.connect(device_id, after)
        except KeyError:
            return _json({"error": "unknown device"}, 404)
        except ValueError as exc:
            return _json({"error": str(exc)}, 409)
        except TypeError as exc:
            return _bad_control(exc)
        return _json(dev.public())

    async def c_subscriptions(self, request: web.Request) -> web.Response:
        app_id = request.query.get("app_id")
        subs = [
            sub.public()
            for owner, by_key in self.state.subscriptions.items()
            if app_id is None or owner == app_id
            for sub in by_key.values()
        ]
        return _json(subs)

    async def c_clear_subscriptions(self, request: web.Request) -> web.Response:
        self.state.subscriptions.clear()
        return _json({"ok": True})

    async def c_notifications(self, request: web.Request) -> web.Response:
        q = request.query
        device_id = q.get("device_id")
        since = int(q.get("since", "0"))
        out = [
            n.public()
            for n in self.state.notifications
            if n.seq > since and (device_id is None or n.device_id == device_id)
        ]
        return _json(out)

    async def c_send_notification(self, request: web.Request) -> web.Response:
        """Send an arbitrary notification body to the subscribers of an app (``app_id``,
        default the home app) for ``notifyType`` (default the body's, else bindDevice)."""
        try:
            body = await self._body(request)
            payload = body["body"]
            app_id = str(body.get("app_id") or HOME_APP_ID)
            if app_id not in self.state.apps:
                raise ValueError(f"unknown app {app_id!r}")
            fallback = payload.get("notifyType") if isinstance(payload, dict) else None
            notify_type = str(body.get("notify_type") or fallback or "bindDevice")
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            return _bad_control(exc)
        device_id = payload.get("deviceId") if isinstance(payload, dict) else None
        result = payload.get("resultCode") if isinstance(payload, dict) else None
        note = self.state.notify(
            app_id,
            payload,
            device_id=device_id if isinstance(device_id, str) else None,
            notify_type=notify_type,
            result_code=result if isinstance(result, str) else None,
            injected=True,
        )
        return _json(note.public())

    async def c_pushes(self, request: web.Request) -> web.Response:
        q = request.query
        device_id = q.get("device_id")
        since = int(q.get("since", "0"))
        out = [
            p.public()
            for p in self.state.pushes
            if p.seq > since and (device_id is None or p.device_id == device_id)
        ]
        return _json(out)

    async def c_push_behaviour(self, request: web.Request) -> web.Response:
        """``{"drop_next": N, "copies": K}``: drop the next N pushes (never sent); deliver each
        push K times (1 = once, 2 = a duplicate delivery, ...)."""
        st = self.state
        if request.method == "POST":
            try:
                body = await self._body(request)
                drop = body.get("drop_next")
                copies = body.get("copies")
                for name, value, low in (("drop_next", drop, 0), ("copies", copies, 1)):
                    if value is not None and (
                        isinstance(value, bool) or not isinstance(value, int) or value < low
                    ):
                        raise ValueError(f"{name} must be an integer >= {low}")
            except (ValueError, TypeError) as exc:
                return _bad_control(exc)
            if drop is not None:
                st.push_drop_next = drop
            if copies is not None:
                st.push_copies = copies
        return _json({"drop_next": st.push_drop_next, "copies": st.push_copies})

    async def c_add_fault(self, request: web.Request) -> web.Response:
        try:
            rule = self.state.add_fault(await self._body(request))
        except (ValueError, TypeError) as exc:
            return _bad_control(exc)
        return _json(rule.public())

    async def c_faults(self, request: web.Request) -> web.Response:
        return _json([r.public() for r in self.state.faults])

    async def c_clear_faults(self, request: web.Request) -> web.Response:
        self.state.faults.clear()
        return _json({"ok": True})

    async def c_calls(self, request: web.Request) -> web.Response:
        q = request.query
        operation = q.get("operation")
        device_id = q.get("device_id")
        since = int(q.get("since", "0"))
        out = [
            r.public()
            for r in self.state.calls
            if r.seq > since
            and (operation is None or r.operation == operation)
            and (device_id is None or r.device_id == device_id)
        ]
        return _json(out)

    async def c_stats(self, request: web.Request) -> web.Response:
        return _json(self.state.stats())

    async def c_flow(self, request: web.Request) -> web.Response:
        app_id = request.match_info["appId"]
        if app_id not in self.state.apps:
            return _json({"error": "unknown app"}, 404)
        return _json(self.state.flow(app_id))


def _generate_verify_code() -> str:
    h = secrets.token_hex(7).upper()
    return f"{h[:4]}-{h[4:9]}-{h[9:14]}"


def seed_demo_devices(state: PlatformState) -> None:
    """A small demo population: offline devices ready for a rebind plus one of each edge case."""
    for i in range(1, 11):
        state.seed_device({"device_id": f"dev-{i:04d}", "node_id": f"86000000000{i:04d}"})
    state.seed_device({"device_id": "dev-online", "node_id": "860000000100001", "status": "ONLINE"})
    state.seed_device(
        {"device_id": "dev-inactive", "node_id": "860000000100002", "status": "INACTIVE"}
    )
    state.seed_device({"device_id": "dev-nbiot", "node_id": "860000000100003", "nb_iot": True})
    state.seed_device(
        {"device_id": "dev-partner", "node_id": "860000000100004", "app_id": PARTNER_APP_ID}
    )


def server_ssl_context(
    cert: str | Path, key: str | Path, ca: str | Path, *, require_client_cert: bool
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return ctx


class SimulatorThread:
    """Runs a :class:`Simulator` on its own event loop in a daemon thread (sync start/stop).

    Works whatever event loop (or none) the caller uses; the control interface is HTTP.
    """

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self.simulator.url

    def start(self, timeout: float = 10.0) -> str:
        self._thread = threading.Thread(target=self._run, name="iot-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("simulator did not start in time")
        if self._error is not None:
            raise RuntimeError("simulator failed to start") from self._error
        return self.url

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        try:
            await self.simulator.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            await self.simulator.stop()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopped is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


__all__ = [
    "OPERATIONS",
    "Simulator",
    "SimulatorThread",
    "seed_demo_devices",
    "server_ssl_context",
]
