"""Typed async client of the simulator's ``/_sim/`` control endpoints (httpx)."""

from __future__ import annotations

import ssl
from types import TracebackType
from typing import Any, Literal, cast

import httpx

from tests.simulator.state import HOME_APP_ID

ErrorShapeName = Literal["documented", "gateway", "mixed"]
RepeatPutModeName = Literal["ok", "duplicate"]
StatusName = Literal["ONLINE", "OFFLINE", "INACTIVE", "ABNORMAL"]
OperationName = Literal[
    "login", "refresh_token", "refresh_key", "get_device", "query_activation", "subscribe"
]
FaultActionName = Literal[
    "error",
    "html",
    "latency",
    "drop_after_apply",
    "refuse",
    "answer_after_apply",
    "corrupt",
    "corrupt_after_apply",
]


class SimulatorControlError(RuntimeError):
    pass


class SimulatorControl:
    """Drives a running simulator.

    Each call uses a short-lived connection, so one instance works from any event loop (and a
    session-scoped instance leaves no socket behind); the TLS context is built once.
    ``verify``: an ``ssl.SSLContext`` (CA + client cert for an mTLS simulator) or a bool.
    """

    def __init__(
        self, base_url: str, *, verify: ssl.SSLContext | bool = True, timeout: float = 10.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if isinstance(verify, ssl.SSLContext):
            self._ssl: ssl.SSLContext = verify
        else:
            self._ssl = ssl.create_default_context()
            if not verify:
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        self._timeout = timeout

    # ------------------------------------------------------------------ plumbing
    async def _call(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, str | int] | None = None,
    ) -> Any:
        async with httpx.AsyncClient(
            base_url=self.base_url, verify=self._ssl, timeout=self._timeout
        ) as client:
            resp = await client.request(method, f"/_sim{path}", json=json, params=params)
        if resp.status_code >= 400:
            raise SimulatorControlError(f"{method} {path}: {resp.status_code} {resp.text}")
        return resp.json()

    async def aclose(self) -> None:
        """Nothing to release (kept for symmetry with ``async with``)."""

    async def __aenter__(self) -> SimulatorControl:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ global
    async def health(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self._call("GET", "/health"))

    async def reset(self, *, seed_demo: bool = False) -> None:
        """Back to the start-up configuration: default apps, no devices/tokens/faults/log."""
        await self._call("POST", "/reset", {"seed_demo": seed_demo})

    async def configure(
        self,
        *,
        rate_limit_per_minute: int | None = None,
        flow_window_seconds: float | None = None,
        token_ttl: int | None = None,
        refresh_token_ttl: int | None = None,
        token_type: str | None = None,
        error_shape: ErrorShapeName | None = None,
        repeat_put_mode: RepeatPutModeName | None = None,
        unauthorized_status: Literal[200, 403] | None = None,
        app_unknown_status: Literal[403, 500] | None = None,
        default_timeout: int | None = None,
        clock_offset: float | None = None,
        push_max_attempts: int | None = None,
        push_retry_delay_seconds: float | None = None,
        push_timeout_seconds: float | None = None,
    ) -> dict[str, Any]:
        values = {k: v for k, v in locals().items() if k != "self" and v is not None}
        return cast(dict[str, Any], await self._call("POST", "/config", values))

    async def get_config(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self._call("GET", "/config"))

    async def set_clock_offset(self, offset: float) -> float:
        out = await self._call("POST", "/clock", {"offset": offset})
        return float(out["offset"])

    async def advance_clock(self, seconds: float) -> float:
        """Move the simulator clock forward (flow-control window, token expiry, delays)."""
        out = await self._call("POST", "/clock", {"advance": seconds})
        return float(out["offset"])

    # ------------------------------------------------------------------ apps
    async def apps(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self._call("GET", "/apps"))

    async def upsert_app(
        self,
        app_id: str,
        secret: str | None = None,
        *,
        frozen: bool | None = None,
        can_act_for: list[str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"app_id": app_id, "secret": secret, "frozen": frozen}
        if can_act_for is not None:
            body["can_act_for"] = can_act_for
        return cast(dict[str, Any], await self._call("POST", "/apps", body))

    async def freeze_app(self, app_id: str, frozen: bool = True) -> dict[str, Any]:
        return await self.upsert_app(app_id, frozen=frozen)

    async def expire_token(self, app_id: str = HOME_APP_ID) -> None:
        await self._call("POST", f"/apps/{app_id}/expire-token")

    # ------------------------------------------------------------------ devices
    async def seed_devices(self, devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], await self._call("POST", "/devices", devices))

    async def seed_device(
        self,
        device_id: str,
        node_id: str,
        *,
        status: StatusName = "OFFLINE",
        activated: bool | None = None,
        app_id: str = HOME_APP_ID,
        nb_iot: bool = False,
        name: str | None = None,
        device_data_missing: bool = False,
        repeat_put_mode: RepeatPutModeName | None = None,
        connect_after_refresh: float | None = None,
    ) -> dict[str, Any]:
        """``connect_after_refresh``: the device's default behaviour, its new hardware connects
        (binds) this many seconds after each successful key refresh (0 = at once); None = it
        never connects by itself (use :meth:`connect`)."""
        item: dict[str, Any] = {
            "device_id": device_id,
            "node_id": node_id,
            "status": status,
            "app_id": app_id,
            "nb_iot": nb_iot,
            "device_data_missing": device_data_missing,
            "repeat_put_mode": repeat_put_mode,
            "connect_after_refresh": connect_after_refresh,
        }
        if activated is not None:
            item["activated"] = activated
        if name is not None:
            item["name"] = name
        return (await self.seed_devices([item]))[0]

    async def device(self, device_id: str) -> dict[str, Any]:
        """State of one device: node_id, status, history, applied_pairs, ..."""
        return cast(dict[str, Any], await self._call("GET", f"/devices/{device_id}"))

    async def devices(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], await self._call("GET", "/devices"))

    async def update_device(self, device_id: str, **changes: Any) -> dict[str, Any]:
        """Keys: status, go_offline_after, go_online_after, go_online_after_success, activated,
        nb_iot, device_data_missing, repeat_put_mode, name, connect_after_refresh.

        While a refreshed device waits for its bind, anything that brings it ONLINE (``status``,
        ``go_online_after``) is its new hardware connecting: it binds."""
        return cast(dict[str, Any], await self._call("PATCH", f"/devices/{device_id}", changes))

    async def set_status(self, device_id: str, status: StatusName) -> dict[str, Any]:
        return await self.update_device(device_id, status=status)

    async def go_offline_after(self, device_id: str, seconds: float) -> dict[str, Any]:
        return await self.update_device(device_id, go_offline_after=seconds)

    async def go_online_after(self, device_id: str, seconds: float) -> dict[str, Any]:
        return await self.update_device(device_id, go_online_after=seconds)

    async def go_online_after_success(self, device_id: str, delay: float = 0.0) -> dict[str, Any]:
        """The device comes ONLINE ``delay`` s after its next successful key refresh."""
        return await self.update_device(device_id, go_online_after_success=delay)

    async def delete_device(self, device_id: str) -> None:
        await self._call("DELETE", f"/devices/{device_id}")

    # ------------------------------------------------------------------ binding and pushes
    async def connect(self, device_id: str, *, after: float | None = 0.0) -> dict[str, Any]:
        """The refreshed device's new hardware connects: now (``after=0``), ``after`` seconds
        from now (simulator clock), or never (``after=None``, cancels a planned connection).

        It then binds: activation status ``activated``, status ONLINE, and a ``bindDevice``
        ``succeeded`` push to every subscribed callback of its application. Fails (409) when
        the device is not waiting for a bind (no key refresh since its last bind)."""
        return cast(
            dict[str, Any],
            await self._call("POST", f"/devices/{device_id}/connect", {"after": after}),
        )

    async def never_connect(self, device_id: str) -> dict[str, Any]:
        return await self.connect(device_id, after=None)

    async def subscriptions(self, app_id: str | None = None) -> list[dict[str, Any]]:
        """Stored subscriptions: subscription_id, app_id, notify_type, callback_url, owner_flag,
        created_by, created_at, requests (how often it was asked for)."""
        params: dict[str, str | int] | None = None if app_id is None else {"app_id": app_id}
        return cast(list[dict[str, Any]], await self._call("GET", "/subscriptions", params=params))

    async def clear_subscriptions(self) -> None:
        await self._call("DELETE", "/subscriptions")

    async def notifications(
        self, *, device_id: str | None = None, since: int = 0
    ) -> list[dict[str, Any]]:
        """Every notification the platform sent (also those without a subscriber): seq, time,
        app_id, device_id, notify_type, result_code, body, targets, injected."""
        params: dict[str, str | int] = {"since": since}
        if device_id is not None:
            params["device_id"] = device_id
        return cast(list[dict[str, Any]], await self._call("GET", "/notifications", params=params))

    async def send_notification(
        self, body: Any, *, app_id: str = HOME_APP_ID, notify_type: str | None = None
    ) -> dict[str, Any]:
        """Push an arbitrary body to the app's subscribers (a stale, reordered or malformed
        push), through the same delivery path (drops, copies, retries) as the real ones."""
        request: dict[str, Any] = {"body": body, "app_id": app_id}
        if notify_type is not None:
            request["notify_type"] = notify_type
        return cast(dict[str, Any], await self._call("POST", "/notifications", request))

    async def pushes(self, *, device_id: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        """Every delivery attempt: seq, notification, time, url, device_id, result_code, copy,
        attempt (0 for a dropped push), status (None: no answer), answer (excerpt), error,
        delivered (2xx), dropped."""
        params: dict[str, str | int] = {"since": since}
        if device_id is not None:
            params["device_id"] = device_id
        return cast(list[dict[str, Any]], await self._call("GET", "/pushes", params=params))

    async def push_behaviour(
        self, *, drop_next: int | None = None, copies: int | None = None
    ) -> dict[str, Any]:
        """Drop the next ``drop_next`` pushes (never sent, logged as dropped) and/or deliver
        every push ``copies`` times (1 = normal, 2 = each push arrives twice, ...). Returns
        the current behaviour; with no argument only reads it."""
        if drop_next is None and copies is None:
            return cast(dict[str, Any], await self._call("GET", "/push-behaviour"))
        body = {"drop_next": drop_next, "copies": copies}
        return cast(dict[str, Any], await self._call("POST", "/push-behaviour", body))

    async def drop_pushes(self, count: int) -> dict[str, Any]:
        return await self.push_behaviour(drop_next=count)

    async def repeat_pushes(self, copies: int) -> dict[str, Any]:
        """Every push is delivered ``copies`` times (duplicate delivery)."""
        return await self.push_behaviour(copies=copies)

    # ------------------------------------------------------------------ faults
    async def inject_fault(
        self,
        action: FaultActionName = "error",
        *,
        operation: OperationName | None = None,
        device_id: str | None = None,
        app_id: str | None = None,
        times: int = 1,
        status: int = 500,
        code: str | None = "50252",
        desc: str | None = None,
        shape: ErrorShapeName | None = None,
        delay: float = 0.0,
        answer: str | None = None,
    ) -> dict[str, Any]:
        """Answer the next ``times`` matching calls (negative = forever) with the fault.

        ``answer``: the raw body of an ``answer_after_apply`` fault."""
        rule = {
            "action": action,
            "operation": operation,
            "device_id": device_id,
            "app_id": app_id,
            "times": times,
            "status": status,
            "code": code,
            "desc": desc,
            "shape": shape,
            "delay": delay,
            "body": answer,
        }
        return cast(dict[str, Any], await self._call("POST", "/faults", rule))

    async def inject_error(
        self,
        status: int,
        code: str,
        *,
        operation: OperationName | None = None,
        device_id: str | None = None,
        times: int = 1,
        shape: ErrorShapeName | None = None,
    ) -> dict[str, Any]:
        return await self.inject_fault(
            "error",
            operation=operation,
            device_id=device_id,
            times=times,
            status=status,
            code=code,
            shape=shape,
        )

    async def inject_html(
        self,
        status: int = 502,
        *,
        operation: OperationName | None = None,
        device_id: str | None = None,
        times: int = 1,
    ) -> dict[str, Any]:
        return await self.inject_fault(
            "html", operation=operation, device_id=device_id, times=times, status=status
        )

    async def inject_latency(
        self,
        seconds: float,
        *,
        operation: OperationName | None = None,
        device_id: str | None = None,
        times: int = 1,
    ) -> dict[str, Any]:
        return await self.inject_fault(
            "latency", operation=operation, device_id=device_id, times=times, delay=seconds
        )

    async def inject_drop_after_apply(
        self,
        *,
        operation: OperationName | None = "refresh_key",
        device_id: str | None = None,
        times: int = 1,
    ) -> dict[str, Any]:
        return await self.inject_fault(
            "drop_after_apply", operation=operation, device_id=device_id, times=times
        )

    async def inject_answer_after_apply(
        self,
        status: int = 200,
        body: str = "",
        *,
        operation: OperationName | None = "refresh_key",
        device_id: str | None = None,
        times: int = 1,
    ) -> dict[str, Any]:
        """Apply the call, then answer ``status`` with the raw ``body`` instead of the platform's
        answer (a proxy or WAF rewriting a success: an HTML page, a 204, ``[]``, ``{}``)."""
        return await self.inject_fault(
            "answer_after_apply",
            operation=operation,
            device_id=device_id,
            times=times,
            status=status,
            answer=body,
        )

    async def inject_refuse(
        self,
        *,
        operation: OperationName | None = None,
        device_id: str | None = None,
        times: int = 1,
    ) -> dict[str, Any]:
        return await self.inject_fault(
            "refuse", operation=operation, device_id=device_id, times=times
        )

    async def faults(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], await self._call("GET", "/faults"))

    async def clear_faults(self) -> None:
        await self._call("DELETE", "/faults")

    # ------------------------------------------------------------------ observation
    async def calls(
        self,
        *,
        operation: OperationName | None = None,
        device_id: str | None = None,
        since: int = 0,
    ) -> list[dict[str, Any]]:
        """Call log entries: seq, time, operation, method, path, device_id, app_id_query,
        app_key, body (secrets fingerprinted), token_fp, status, error_code, fault."""
        params: dict[str, str | int] = {"since": since}
        if operation is not None:
            params["operation"] = operation
        if device_id is not None:
            params["device_id"] = device_id
        return cast(list[dict[str, Any]], await self._call("GET", "/calls", params=params))

    async def stats(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self._call("GET", "/stats"))

    async def flow(self, app_id: str = HOME_APP_ID) -> dict[str, Any]:
        """Accepted / rejected call timestamps of an app and its busiest flow-control window."""
        return cast(dict[str, Any], await self._call("GET", f"/flow/{app_id}"))
