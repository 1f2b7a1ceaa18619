"""In-memory state of the simulated IoT platform (apps, tokens, devices, flow control, faults, log).

Everything here is plain synchronous Python driven by the aiohttp handlers in ``server.py``; it
runs on one event loop, so no locking is needed. All times come from :meth:`PlatformState.now`,
which is the wall clock plus a settable offset, so tests can jump over the flow-control window
(60 s unless ``flow_window_seconds`` says otherwise), token expiry and delayed status changes
without waiting.

Binding. A successful key refresh leaves the device *waiting for a bind*: its activation status
reads ``activated: false`` and it stays OFFLINE until its new hardware connects. When that
happens (a control call, or the device's default behaviour after each refresh, or any change
that brings it ONLINE) it is bound: activated, ONLINE, and a ``bindDevice`` ``succeeded``
notification is queued for every subscribed callback of its application. A refresh with a
non-zero ``timeout`` also sets a deadline: a device still waiting then gets an ``expired``
notification and is deleted (every later call for it answers 100403). Timed binds and deadlines
sit in a heap on the simulator clock; :meth:`PlatformState.run_due` applies those that are due
(the server calls it before every device access and from its dispatcher task). The server's
dispatcher delivers the queued notifications (``outbox``) and records every attempt (``pushes``).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import secrets
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

ErrorShape = Literal["documented", "gateway", "mixed"]
RepeatPutMode = Literal["ok", "duplicate"]
DeviceStatus = Literal["ONLINE", "OFFLINE", "INACTIVE", "ABNORMAL"]
FaultAction = Literal[
    "error",
    "html",
    "latency",
    "drop_after_apply",
    "refuse",
    "answer_after_apply",
    "corrupt",
    "corrupt_after_apply",
]
Operation = Literal[
    "login", "refresh_token", "refresh_key", "get_device", "query_activation", "subscribe"
]
BindResult = Literal["succeeded", "expired"]

ERROR_SHAPES: tuple[str, ...] = get_args(ErrorShape)
REPEAT_PUT_MODES: tuple[str, ...] = get_args(RepeatPutMode)
DEVICE_STATUSES: tuple[str, ...] = get_args(DeviceStatus)
FAULT_ACTIONS: tuple[str, ...] = get_args(FaultAction)
OPERATIONS: tuple[str, ...] = get_args(Operation)

FLOW_WINDOW_S = 60.0
"""The default length of the sliding flow-control window (``SimConfig.flow_window_seconds``)."""
NOTIFICATION_LOG_MAX = 10_000
PUSH_LOG_MAX = 100_000

NOTIFY_TYPES: frozenset[str] = frozenset(
    {
        "bindDevice",
        "deviceAdded",
        "deviceInfoChanged",
        "deviceDataChanged",
        "deviceDatasChanged",
        "deviceDeleted",
        "serviceInfoChanged",
        "messageConfirm",
        "commandRsp",
        "deviceEvent",
        "ruleEvent",
        "deviceModelAdded",
        "deviceModelDeleted",
        "deviceDesiredPropertiesModifyStatusChanged",
    }
)
"""Notification types a subscription may name; the simulator itself only sends ``bindDevice``."""
BIND_DEVICE = "bindDevice"

HOME_APP_ID = "rebind-home-app"
HOME_SECRET = "home-secret-0001"
PARTNER_APP_ID = "rebind-partner-app"
"""An application whose devices the home app is authorized to act for (``?appId=`` accepted)."""
PARTNER_SECRET = "partner-secret-0001"
OTHER_APP_ID = "rebind-other-app"
"""An application that exists but has NOT authorized the home app (``?appId=`` -> 100217)."""
OTHER_SECRET = "other-secret-0001"

ERROR_DESCS: dict[str, str] = {
    "100217": "The application hasn't been authorized.",
    "100003": "Invalid verify code.",
    "100007": "Bad request message.",
    "100426": "The nodeId is duplicated.",
    "100610": "Device is not active.",
    "100611": "Device is online.",
    "50400": "The input is invalid.",
    "100025": "AppId for auth not exist.",
    "100203": "The application is not existed.",
    "1010009": "app throttle exceed.",
    "1010005": "Invalid access token or appId.",
    "100403": "The device is not existed.",
    "100418": "The deviceData is not existed.",
    "50252": "Internal server error.",
    "102202": "Required Parameter is null or empty.",
    "100208": "AppId or secret is not right.",
    "100247": "The application is frozen.",
    "100222": "The callback url is invalid.",
}
GATEWAY_CODES = frozenset({"1010005", "1010009"})


class PlatformError(Exception):
    """A platform error answer: HTTP status plus platform error code."""

    def __init__(self, status: int, code: str, desc: str | None = None) -> None:
        super().__init__(f"{status} {code}")
        self.status = status
        self.code = code
        self.desc = desc if desc is not None else ERROR_DESCS.get(code, "error")


def fingerprint(token: str | None) -> str | None:
    """Short, stable, non-reversible fingerprint of a token for the call log."""
    if not token:
        return None
    return hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass
class SimConfig:
    rate_limit_per_minute: int = 100
    flow_window_seconds: float = FLOW_WINDOW_S
    """Length of the sliding window ``rate_limit_per_minute`` counts calls in (the platform
    configures it per application; the fault tests compress it)."""
    token_ttl: int = 3600
    refresh_token_ttl: int = 86400
    token_type: str = "bearer"
    error_shape: ErrorShape = "mixed"
    repeat_put_mode: RepeatPutMode = "ok"
    unauthorized_status: int = 200
    """HTTP status of 100217 (unauthorized ``appId``): 200 (error inside a 200) or 403."""
    app_unknown_status: int = 403
    """HTTP status of 100203 (unknown ``appId``): 403 or 500."""
    default_timeout: int = 180
    call_log_max: int = 100_000
    push_max_attempts: int = 3
    """Deliveries of one push tried until one is answered 2xx."""
    push_retry_delay_seconds: float = 0.2
    """Real seconds between two attempts of one push."""
    push_timeout_seconds: float = 5.0
    """Real seconds one attempt may take."""

    def update(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if not hasattr(self, key):
                raise ValueError(f"unknown config key {key!r}")
            if key == "error_shape" and value not in ERROR_SHAPES:
                raise ValueError(f"error_shape must be one of {ERROR_SHAPES}")
            if key == "repeat_put_mode" and value not in REPEAT_PUT_MODES:
                raise ValueError(f"repeat_put_mode must be one of {REPEAT_PUT_MODES}")
            if key == "unauthorized_status" and value not in (200, 403):
                raise ValueError("unauthorized_status must be 200 or 403")
            if key == "app_unknown_status" and value not in (403, 500):
                raise ValueError("app_unknown_status must be 403 or 500")
            if key == "token_type" and not isinstance(value, str):
                raise ValueError("token_type must be a string")
            if key in (
                "rate_limit_per_minute",
                "token_ttl",
                "refresh_token_ttl",
                "default_timeout",
                "call_log_max",
            ) and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{key} must be a non-negative integer")
            if key == "push_max_attempts" and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError("push_max_attempts must be an integer >= 1")
            if key == "flow_window_seconds":
                if (
                    not isinstance(value, int | float)
                    or isinstance(value, bool)
                    or not math.isfinite(value)
                    or value <= 0
                ):
                    raise ValueError("flow_window_seconds must be a positive number")
                self.flow_window_seconds = float(value)
                continue
            if key in ("push_retry_delay_seconds", "push_timeout_seconds"):
                if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be a non-negative number")
                setattr(self, key, float(value))
                continue
            setattr(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class App:
    app_id: str
    secret: str
    frozen: bool = False
    can_act_for: set[str] = field(default_factory=set)
    access_token: str | None = None
    access_expires_at: float = 0.0
    refresh_token: str | None = None
    refresh_expires_at: float = 0.0
    accepted: list[float] = field(default_factory=list)
    """Timestamps (sim clock) of every call that passed flow control (sorted)."""
    rejected: list[float] = field(default_factory=list)
    """Timestamps of every call answered 1010009 (they do not count against the window)."""
    window: deque[float] = field(default_factory=deque)
    logins: int = 0
    token_refreshes: int = 0

    def public(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id,
            "frozen": self.frozen,
            "can_act_for": sorted(self.can_act_for),
            "access_token_fingerprint": fingerprint(self.access_token),
            "access_expires_at": self.access_expires_at,
            "logins": self.logins,
            "token_refreshes": self.token_refreshes,
            "accepted_calls": len(self.accepted),
            "throttled_calls": len(self.rejected),
        }


@dataclass
class Change:
    node_id: str
    verify_code: str
    timeout: int
    time: float


@dataclass
class Device:
    device_id: str
    node_id: str
    app_id: str
    status: DeviceStatus = "OFFLINE"
    activated: bool = True
    nb_iot: bool = False
    name: str = ""
    device_data_missing: bool = False
    repeat_put_mode: RepeatPutMode | None = None
    gateway_id: str = ""
    node_type: str = "GATEWAY"
    manufacturer_id: str = "ACME"
    device_type: str = "Meter"
    model: str = "M1"
    create_time: float = 0.0
    last_modified_time: float = 0.0
    status_at: float | None = None
    status_next: DeviceStatus | None = None
    online_after_success: float | None = None
    """One shot: the new hardware connects this long after the next successful refresh."""
    connect_after_refresh: float | None = None
    """Default behaviour: the new hardware connects this long after each successful refresh
    (0 = at once); None = it never connects by itself."""
    awaiting_bind: bool = False
    """Refreshed, and its new hardware has not connected (bound) yet."""
    bind_at: float | None = None
    """While waiting: when the new hardware connects (sim clock); None = not planned."""
    bind_deadline: float | None = None
    """While waiting: when the registration expires (refresh time + a non-zero timeout)."""
    bind_epoch: int = 0
    """Which refresh the planned bind and deadline belong to (unique per refresh)."""
    bound_at: float | None = None
    history: list[Change] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        distinct: list[list[str]] = []
        seen: set[tuple[str, str]] = set()
        for ch in self.history:
            pair = (ch.node_id, ch.verify_code)
            if pair not in seen:
                seen.add(pair)
                distinct.append([ch.node_id, ch.verify_code])
        return {
            "device_id": self.device_id,
            "node_id": self.node_id,
            "app_id": self.app_id,
            "status": self.status,
            "activated": self.activated,
            "nb_iot": self.nb_iot,
            "name": self.name,
            "device_data_missing": self.device_data_missing,
            "repeat_put_mode": self.repeat_put_mode,
            "pending_status": self.status_next,
            "pending_status_at": self.status_at,
            "online_after_success": self.online_after_success,
            "connect_after_refresh": self.connect_after_refresh,
            "awaiting_bind": self.awaiting_bind,
            "bind_at": self.bind_at,
            "bind_deadline": self.bind_deadline,
            "bound_at": self.bound_at,
            "last_modified_time": self.last_modified_time,
            "history": [asdict(ch) for ch in self.history],
            "applied_pairs": distinct,
        }


@dataclass
class FaultRule:
    action: FaultAction = "error"
    operation: str | None = None
    device_id: str | None = None
    app_id: str | None = None
    times: int = 1
    """How many matching calls this rule answers; a negative number means forever."""
    status: int = 500
    code: str | None = "50252"
    desc: str | None = None
    shape: ErrorShape | None = None
    delay: float = 0.0
    """Seconds to wait before acting (the whole action for ``latency``)."""
    body: str = ""
    """``answer_after_apply``: the raw body sent with ``status`` once the call has been applied."""
    rule_id: int = 0
    hits: int = 0

    def matches(self, operation: str, device_id: str | None, app_id: str | None) -> bool:
        if self.times == 0:
            return False
        if self.operation is not None and self.operation != operation:
            return False
        if self.device_id is not None and self.device_id != device_id:
            return False
        return self.app_id is None or self.app_id == app_id

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class CallRecord:
    seq: int
    time: float
    operation: str
    method: str
    path: str
    device_id: str | None
    app_id_query: str | None
    app_key: str | None
    body: Any
    token_fp: str | None
    app: str | None = None
    """The calling application: ``app_key`` for API calls, the body's appId for login/refresh."""
    status: int = 0
    error_code: str | None = None
    fault: str | None = None
    """Name of the fault action that shaped this call, if any."""
    user_agent: str | None = None
    """The caller's User-Agent (device-rebind names its replica there)."""

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Subscription:
    subscription_id: str
    app_id: str
    """The application whose devices' notifications it receives."""
    notify_type: str
    callback_url: str
    owner_flag: bool | None
    created_by: str
    """The ``app_key`` of the call that created it."""
    created_at: float
    requests: int = 1
    """How often it was asked for (repeating a subscription is harmless)."""

    def answer(self) -> dict[str, Any]:
        return {
            "subscriptionId": self.subscription_id,
            "notifyType": self.notify_type,
            "callbackUrl": self.callback_url,
        }

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Notification:
    """One notification the platform sends (to every target), e.g. a ``bindDevice`` push."""

    seq: int
    time: float
    app_id: str
    device_id: str | None
    notify_type: str
    result_code: str | None
    body: Any
    targets: list[str]
    injected: bool = False
    """Sent through the control API rather than caused by a device."""

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class PushAttempt:
    """One delivery attempt of a notification to one callback URL, and its answer."""

    seq: int
    notification: int
    time: float
    url: str
    device_id: str | None
    result_code: str | None
    copy: int
    """Which copy of a repeated push (1 = the first delivery)."""
    attempt: int
    """1, 2, ... for the retries of one copy; 0 for a dropped push (never sent)."""
    status: int | None = None
    answer: str = ""
    error: str | None = None
    delivered: bool = False
    dropped: bool = False

    def public(self) -> dict[str, Any]:
        return asdict(self)


def callback_url_problem(url: object) -> str | None:  # noqa: PLR0911 - one return per rule
    """Why ``url`` cannot be a callback URL (100222), or None: an http(s) URL with a host and an
    explicit port, without spaces or control characters."""
    if not isinstance(url, str) or not url:
        return "callbackUrl must be a non-empty string"
    if len(url) > 1024:
        return "callbackUrl is longer than 1024 characters"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "callbackUrl contains a space or a control character"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "callbackUrl is not a URL"
    if parts.scheme not in ("http", "https"):
        return "callbackUrl must be http or https"
    if not parts.hostname:
        return "callbackUrl has no host"
    if port is None:
        return "callbackUrl must carry its port"
    return None


class PlatformState:
    """The whole simulated platform."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.base_config = config or SimConfig()
        self.config = SimConfig(**asdict(self.base_config))
        self.clock_offset = 0.0
        self.apps: dict[str, App] = {}
        self.devices: dict[str, Device] = {}
        self.node_index: dict[str, str] = {}
        self.faults: list[FaultRule] = []
        self.calls: deque[CallRecord] = deque(maxlen=self.config.call_log_max)
        self._seq = 0
        self._fault_seq = 0
        self.on_change: Callable[[], None] | None = None
        """Called when a timer or a notification is added or the clock moves (the server's
        dispatcher wakes up); kept across resets."""
        self.reset_epoch = 0
        self.subscriptions: dict[str, dict[tuple[str, str], Subscription]] = {}
        self.notifications: deque[Notification] = deque(maxlen=NOTIFICATION_LOG_MAX)
        self.outbox: deque[Notification] = deque()
        self.pushes: deque[PushAttempt] = deque(maxlen=PUSH_LOG_MAX)
        self.push_drop_next = 0
        self.push_copies = 1
        self.expired: dict[str, float] = {}
        self._timers: list[tuple[float, int, int, str, int]] = []
        self._timer_seq = 0
        self._bind_seq = 0
        self._notification_seq = 0
        self._push_seq = 0
        self.reset()

    # ------------------------------------------------------------------ clock
    def now(self) -> float:
        return time.time() + self.clock_offset

    # ------------------------------------------------------------------ admin
    def reset(self) -> None:
        self.config = SimConfig(**asdict(self.base_config))
        self.clock_offset = 0.0
        self.apps = {}
        self.devices = {}
        self.node_index = {}
        self.faults = []
        self.calls = deque(maxlen=self.config.call_log_max)
        self._seq = 0
        self.reset_epoch += 1
        self.subscriptions = {}
        self.notifications = deque(maxlen=NOTIFICATION_LOG_MAX)
        self.outbox = deque()
        self.pushes = deque(maxlen=PUSH_LOG_MAX)
        self.push_drop_next = 0
        self.push_copies = 1
        self.expired = {}
        self._timers = []
        self.upsert_app(HOME_APP_ID, HOME_SECRET, can_act_for=[PARTNER_APP_ID])
        self.upsert_app(PARTNER_APP_ID, PARTNER_SECRET)
        self.upsert_app(OTHER_APP_ID, OTHER_SECRET)

    def configure(self, values: dict[str, Any]) -> dict[str, Any]:
        self.config.update(values)
        if "call_log_max" in values:
            self.calls = deque(self.calls, maxlen=self.config.call_log_max)
        return self.config.as_dict()

    def upsert_app(
        self,
        app_id: str,
        secret: str | None = None,
        *,
        frozen: bool | None = None,
        can_act_for: list[str] | None = None,
    ) -> App:
        app = self.apps.get(app_id)
        if app is None:
            app = App(app_id=app_id, secret=secret or secrets.token_hex(8))
            self.apps[app_id] = app
        elif secret is not None:
            app.secret = secret
        if frozen is not None:
            app.frozen = frozen
        if can_act_for is not None:
            app.can_act_for = set(can_act_for)
        return app

    def expire_token(self, app_id: str) -> None:
        app = self.apps[app_id]
        app.access_expires_at = self.now() - 1

    def seed_device(self, data: dict[str, Any]) -> Device:
        device_id = str(data["device_id"])
        node_id = str(data["node_id"])
        status = data.get("status", "OFFLINE")
        if status not in DEVICE_STATUSES:
            raise ValueError(f"status must be one of {DEVICE_STATUSES}")
        owner = str(data.get("app_id", HOME_APP_ID))
        if owner not in self.apps:
            raise ValueError(f"unknown app {owner!r}")
        holder = self.node_index.get(node_id)
        if holder is not None and holder != device_id:
            raise ValueError(f"nodeId {node_id!r} already held by device {holder!r}")
        old = self.devices.get(device_id)
        if old is not None:
            self.node_index.pop(old.node_id, None)
        repeat = data.get("repeat_put_mode")
        if repeat is not None and repeat not in REPEAT_PUT_MODES:
            raise ValueError(f"repeat_put_mode must be one of {REPEAT_PUT_MODES}")
        now = self.now()
        activated = bool(data.get("activated", status != "INACTIVE"))
        dev = Device(
            device_id=device_id,
            node_id=node_id,
            app_id=owner,
            status=status,
            activated=activated,
            nb_iot=bool(data.get("nb_iot", False)),
            name=str(data.get("name", f"device-{device_id}")),
            device_data_missing=bool(data.get("device_data_missing", False)),
            repeat_put_mode=repeat,
            gateway_id=str(data.get("gateway_id", device_id)),
            create_time=now,
            last_modified_time=now,
            connect_after_refresh=_delay_or_none(data.get("connect_after_refresh")),
        )
        self.devices[device_id] = dev
        self.node_index[node_id] = device_id
        self.expired.pop(device_id, None)
        return dev

    def delete_device(self, device_id: str) -> None:
        dev = self.devices.pop(device_id)
        if self.node_index.get(dev.node_id) == device_id:
            del self.node_index[dev.node_id]

    def update_device(self, device_id: str, data: dict[str, Any]) -> Device:
        dev = self.devices[device_id]
        self.settle(dev)
        now = self.now()
        if "status" in data:
            if data["status"] not in DEVICE_STATUSES:
                raise ValueError(f"status must be one of {DEVICE_STATUSES}")
            if data["status"] == "ONLINE" and dev.awaiting_bind:
                self.bind(dev, now)  # ONLINE while waiting: the new hardware connected
            dev.status = data["status"]
            if dev.status in ("ONLINE", "OFFLINE"):
                dev.activated = True
            dev.status_at = None
            dev.status_next = None
        for key in ("go_offline_after", "go_online_after"):
            if data.get(key) is not None:
                if key == "go_online_after" and dev.awaiting_bind:
                    self.plan_bind(dev, now + float(data[key]))
                    continue
                dev.status_at = now + float(data[key])
                dev.status_next = "OFFLINE" if key == "go_offline_after" else "ONLINE"
        if "connect_after_refresh" in data:
            dev.connect_after_refresh = _delay_or_none(data["connect_after_refresh"])
        if "go_online_after_success" in data:
            value = data["go_online_after_success"]
            if value is None or value is False:
                dev.online_after_success = None
            else:
                dev.online_after_success = 0.0 if value is True else float(value)
        for flag in ("activated", "nb_iot", "device_data_missing"):
            if flag in data:
                setattr(dev, flag, bool(data[flag]))
        if "repeat_put_mode" in data:
            mode = data["repeat_put_mode"]
            if mode is not None and mode not in REPEAT_PUT_MODES:
                raise ValueError(f"repeat_put_mode must be one of {REPEAT_PUT_MODES}")
            dev.repeat_put_mode = mode
        if "name" in data:
            dev.name = str(data["name"])
        self.settle(dev)
        return dev

    def settle(self, dev: Device) -> None:
        """Apply a pending (delayed) status change whose time has come."""
        at = dev.status_at
        if dev.status_next is not None and at is not None and self.now() >= at:
            if dev.status_next == "ONLINE" and dev.awaiting_bind:
                self.bind(dev, at)  # ONLINE while waiting: the new hardware connected
                return
            dev.status = dev.status_next
            dev.activated = dev.activated or dev.status in ("ONLINE", "OFFLINE")
            dev.status_next = None
            dev.status_at = None

    # ------------------------------------------------------------------ binding
    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _schedule(self, when: float, rank: int, dev: Device) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, rank, self._timer_seq, dev.device_id, dev.bind_epoch))
        self.changed()

    def after_refresh(self, dev: Device, now: float, timeout: int) -> None:
        """A successful key refresh: the device waits for its new hardware to bind."""
        self._bind_seq += 1
        dev.bind_epoch = self._bind_seq
        dev.awaiting_bind = True
        dev.bound_at = None
        dev.bind_at = None
        dev.bind_deadline = now + timeout if timeout > 0 else None
        if dev.bind_deadline is not None:
            self._schedule(dev.bind_deadline, 1, dev)
        delay = dev.online_after_success
        dev.online_after_success = None
        if delay is None:
            delay = dev.connect_after_refresh
        if delay is not None:
            self.plan_bind(dev, now + max(0.0, delay))

    def plan_bind(self, dev: Device, when: float | None) -> None:
        """The waiting device's new hardware connects at ``when`` (None: never)."""
        dev.bind_at = when
        if when is None:
            return
        if when <= self.now():
            self.bind(dev, when)
        else:
            self._schedule(when, 0, dev)

    def connect(self, device_id: str, after: float | None) -> Device:
        """The control API's "connect now / after ``after`` seconds / never (None)".

        Raises KeyError for an unknown device and ValueError when it is not waiting for a bind.
        """
        self.run_due()
        dev = self.devices[device_id]
        self.settle(dev)
        if not dev.awaiting_bind:
            raise ValueError(
                f"device {device_id!r} is not waiting for a bind (no key refresh since its last "
                "bind); set connect_after_refresh or go_online_after_success to plan one"
            )
        self.plan_bind(dev, None if after is None else self.now() + max(0.0, float(after)))
        return dev

    def bind(self, dev: Device, at: float) -> None:
        """The new hardware connected with the new verifyCode: activated, ONLINE, pushed."""
        dev.awaiting_bind = False
        dev.bind_at = None
        dev.bind_deadline = None
        dev.status = "ONLINE"
        dev.status_next, dev.status_at = None, None
        dev.activated = True
        dev.bound_at = at
        dev.last_modified_time = at
        self.notify_bind(dev, "succeeded", at)

    def expire(self, dev: Device, at: float) -> None:
        """The timeout passed without a bind: the platform deletes the registration."""
        self.notify_bind(dev, "expired", at)
        self.delete_device(dev.device_id)
        self.expired[dev.device_id] = at

    def run_due(self) -> None:
        """Apply every planned bind and deadline whose time has come, in time order."""
        timers = self._timers
        now = self.now()
        while timers and timers[0][0] <= now:
            when, rank, _, device_id, epoch = heapq.heappop(timers)
            dev = self.devices.get(device_id)
            if dev is None or not dev.awaiting_bind or dev.bind_epoch != epoch:
                continue
            if rank == 0 and dev.bind_at == when:
                self.bind(dev, when)
            elif rank == 1 and dev.bind_deadline == when:
                self.expire(dev, when)

    def next_due(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    # ------------------------------------------------------------------ notifications
    def subscribe(
        self,
        app_id: str,
        notify_type: str,
        callback_url: str,
        *,
        owner_flag: bool | None,
        created_by: str,
    ) -> Subscription:
        """Store a subscription; the same (type, URL) again returns the existing one."""
        subs = self.subscriptions.setdefault(app_id, {})
        key = (notify_type, callback_url)
        sub = subs.get(key)
        if sub is not None:
            sub.requests += 1
            sub.owner_flag = owner_flag
            return sub
        sub = Subscription(
            subscription_id=secrets.token_hex(16),
            app_id=app_id,
            notify_type=notify_type,
            callback_url=callback_url,
            owner_flag=owner_flag,
            created_by=created_by,
            created_at=self.now(),
        )
        subs[key] = sub
        return sub

    def targets(self, app_id: str, notify_type: str) -> list[str]:
        return [
            sub.callback_url
            for sub in self.subscriptions.get(app_id, {}).values()
            if sub.notify_type == notify_type
        ]

    def notify(
        self,
        app_id: str,
        body: Any,
        *,
        device_id: str | None = None,
        notify_type: str = BIND_DEVICE,
        result_code: str | None = None,
        at: float | None = None,
        injected: bool = False,
    ) -> Notification:
        """Queue a notification for every subscribed callback of ``app_id`` (logged even when
        there is none)."""
        self._notification_seq += 1
        note = Notification(
            seq=self._notification_seq,
            time=self.now() if at is None else at,
            app_id=app_id,
            device_id=device_id,
            notify_type=notify_type,
            result_code=result_code,
            body=body,
            targets=self.targets(app_id, notify_type),
            injected=injected,
        )
        self.notifications.append(note)
        if note.targets:
            self.outbox.append(note)
            self.changed()
        return note

    def notify_bind(self, dev: Device, result: BindResult, at: float) -> Notification:
        body = {
            "notifyType": BIND_DEVICE,
            "deviceId": dev.device_id,
            "resultCode": result,
            "deviceInfo": {
                "nodeId": dev.node_id,
                "name": dev.name,
                "manufacturerId": dev.manufacturer_id,
                "manufacturerName": dev.manufacturer_id,
                "deviceType": dev.device_type,
                "model": dev.model,
                "status": dev.status,
            },
        }
        return self.notify(dev.app_id, body, device_id=dev.device_id, result_code=result, at=at)

    def take_push_drop(self) -> bool:
        """True when the next push must be dropped (the control API asked for it)."""
        if self.push_drop_next > 0:
            self.push_drop_next -= 1
            return True
        return False

    def record_push(self, note: Notification, url: str, **fields: Any) -> PushAttempt:
        self._push_seq += 1
        attempt = PushAttempt(
            seq=self._push_seq,
            notification=note.seq,
            time=self.now(),
            url=url,
            device_id=note.device_id,
            result_code=note.result_code,
            **fields,
        )
        self.pushes.append(attempt)
        return attempt

    # ------------------------------------------------------------------ faults
    def add_fault(self, data: dict[str, Any]) -> FaultRule:
        action = data.get("action", "error")
        if action not in FAULT_ACTIONS:
            raise ValueError(f"action must be one of {FAULT_ACTIONS}")
        operation = data.get("operation")
        if operation is not None and operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}")
        shape = data.get("shape")
        if shape is not None and shape not in ERROR_SHAPES:
            raise ValueError(f"shape must be one of {ERROR_SHAPES}")
        self._fault_seq += 1
        code = data.get("code", "50252")
        rule = FaultRule(
            action=action,
            operation=operation,
            device_id=data.get("device_id"),
            app_id=data.get("app_id"),
            times=int(data.get("times", 1)),
            status=int(data.get("status", 500)),
            code=None if code is None else str(code),
            desc=data.get("desc"),
            shape=shape,
            delay=float(data.get("delay", 0.0)),
            body=str(data.get("body") or ""),
            rule_id=self._fault_seq,
        )
        self.faults.append(rule)
        return rule

    def take_fault(
        self, operation: str, device_id: str | None, app_id: str | None
    ) -> FaultRule | None:
        if not self.faults:
            return None
        for rule in self.faults:
            if rule.matches(operation, device_id, app_id):
                rule.hits += 1
                if rule.times > 0:
                    rule.times -= 1
                return rule
        return None

    # ------------------------------------------------------------------ flow control
    def admit(self, app: App) -> None:
        """Count one call against ``app``'s sliding window (``flow_window_seconds``) or raise
        1010009.

        Calls rejected with 1010009 are recorded in ``app.rejected`` but do NOT count against the
        window (a throttled client that keeps hammering recovers once its accepted calls age out).
        Calls answered by an injected fault rule never reach this point, so they are not counted
        here either; ``stats()["apps"][app]["max_logged_calls_in_any_window"]`` counts every
        logged call of the app (faulted and throttled ones included) for the stricter view.
        """
        now = self.now()
        window = app.window
        horizon = now - self.config.flow_window_seconds
        while window and window[0] <= horizon:
            window.popleft()
        if len(window) >= self.config.rate_limit_per_minute:
            app.rejected.append(now)
            raise PlatformError(403, "1010009")
        window.append(now)
        accepted = app.accepted
        if accepted and accepted[-1] > now:  # clock moved backwards (offset changed)
            accepted.insert(bisect_left(accepted, now), now)
        else:
            accepted.append(now)

    # ------------------------------------------------------------------ tokens
    def issue_tokens(self, app: App) -> dict[str, Any]:
        now = self.now()
        app.access_token = secrets.token_urlsafe(24)
        app.access_expires_at = now + self.config.token_ttl
        app.refresh_token = secrets.token_urlsafe(24)
        app.refresh_expires_at = now + self.config.refresh_token_ttl
        return {
            "scope": "default",
            "tokenType": self.config.token_type,
            "expiresIn": self.config.token_ttl,
            "accessToken": app.access_token,
            "refreshToken": app.refresh_token,
        }

    def check_token(self, app: App, authorization: str | None) -> None:
        if not authorization:
            raise PlatformError(403, "1010005")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise PlatformError(403, "1010005")
        if app.access_token is None or not secrets.compare_digest(token, app.access_token):
            raise PlatformError(403, "1010005")
        if self.now() >= app.access_expires_at:
            raise PlatformError(403, "1010005")

    # ------------------------------------------------------------------ log + stats
    def record(self, rec: CallRecord) -> None:
        self.calls.append(rec)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def stats(self) -> dict[str, Any]:
        apps: dict[str, Any] = {}
        for app in self.apps.values():
            apps[app.app_id] = {
                "accepted_calls": len(app.accepted),
                "throttled_calls": len(app.rejected),
                "logins": app.logins,
                "token_refreshes": app.token_refreshes,
                "max_calls_in_any_window": max_in_window(
                    app.accepted, self.config.flow_window_seconds
                ),
            }
        by_code: dict[str, int] = {}
        by_op: dict[str, int] = {}
        logged: dict[str, list[float]] = {}
        for rec in self.calls:
            by_op[rec.operation] = by_op.get(rec.operation, 0) + 1
            key = rec.error_code or str(rec.status)
            by_code[key] = by_code.get(key, 0) + 1
            if rec.app is not None:
                logged.setdefault(rec.app, []).append(rec.time)
        for app_id, entry in apps.items():
            times = sorted(logged.get(app_id, []))
            entry["logged_calls"] = len(times)
            entry["max_logged_calls_in_any_window"] = max_in_window(
                times, self.config.flow_window_seconds
            )
        return {
            "subscriptions": sum(len(s) for s in self.subscriptions.values()),
            "notifications": len(self.notifications),
            "push_attempts": len(self.pushes),
            "pushes_delivered": sum(1 for p in self.pushes if p.delivered),
            "logins": sum(a.logins for a in self.apps.values()),
            "token_refreshes": sum(a.token_refreshes for a in self.apps.values()),
            "calls": len(self.calls),
            "calls_by_operation": by_op,
            "calls_by_result": by_code,
            "apps": apps,
            "clock": self.now(),
        }

    def flow(self, app_id: str) -> dict[str, Any]:
        app = self.apps[app_id]
        return {
            "app_id": app_id,
            "limit_per_minute": self.config.rate_limit_per_minute,
            "window_seconds": self.config.flow_window_seconds,
            "accepted": list(app.accepted),
            "rejected": list(app.rejected),
            "max_calls_in_any_window": max_in_window(app.accepted, self.config.flow_window_seconds),
        }


def _delay_or_none(value: Any) -> float | None:
    """A delay in seconds (>= 0), or None for "never"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("a delay must be a number of seconds or null (never)")
    if value < 0:
        raise ValueError("a delay must not be negative")
    return float(value)


def max_in_window(times: list[float], window: float) -> int:
    """Largest number of timestamps (sorted) inside any half-open window of ``window`` seconds."""
    best = 0
    lo = 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
