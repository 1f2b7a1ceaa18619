"""The platform's error codes, as data: the one table every other module reads.

Each row says, for one (operation, HTTP status, error code), what the code means, its category
(the ``category`` of a ``rebind-failed`` event), what the service does about it (:class:`Action`)
and the reference's recommended handling (paraphrased). :func:`classify` looks a response up in the
table and falls back on the HTTP status for codes the table does not know; :func:`parse_error_body`
reads both error body shapes the platform is known to send.

Decisions worth knowing:

* ``100217`` (application not authorized), in a 200 or a 403, is terminal (``FAIL``, category
  ``auth``). The reference says ``appId`` must be left out when the application is not authorized;
  the service already leaves it out unless the event names an authorized application, so the event
  named an application this app may not act for. Retrying without ``appId`` would act on the wrong
  application's device namespace, so it is never done silently.
* ``100426`` (nodeId duplicated) is always ``RECONCILE``: it may mean that this very device already
  holds the nodeId (a repeated call after a success), which only a device query can tell apart from
  a genuine conflict with another device.
* ``100611`` (device online) is ``DEFER_ONLINE``; the rebind logic reconciles it instead when the
  call may already have been applied (a repeat).
* ``1010005`` (token invalid) is ``REAUTH``: log in again once and repeat the call once.
* ``1010009`` (flow control) is ``THROTTLED``: it does not count as an attempt, slows the budget
  down, and is bounded by the deadline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal

Operation = Literal[
    "refresh_device_key",
    "login",
    "refresh_token",
    "query_device",
    "query_activation",
    "subscribe",
    "any",
]


class Action(StrEnum):
    """What the service does about an answer."""

    FAIL = "fail"
    """Terminal: publish rebind-failed at once."""
    RETRY = "retry"
    """Transient: retry with capped exponential backoff, within max_attempts and the deadline."""
    THROTTLED = "throttled"
    """Flow control: slow the budget down and retry; not an attempt, bounded by the deadline."""
    REAUTH = "reauth"
    """Token invalid: log in again once and repeat the call once."""
    DEFER_ONLINE = "defer_online"
    """Device online: defer the event (durably) and retry later, until the online deadline."""
    RECONCILE = "reconcile"
    """Ambiguous: ask the platform what the device holds now before doing anything else."""


class Category(StrEnum):
    """Values of ``category`` in ``rebind-failed`` events (contracts.md), plus ``transport``."""

    DEVICE_ONLINE = "device_online"
    THROTTLED = "throttled"
    AUTH = "auth"
    NOT_FOUND = "not_found"
    INVALID_REQUEST = "invalid_request"
    CONFLICT = "conflict"
    PLATFORM_ERROR = "platform_error"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    TRANSPORT = "transport"
    SUPERSEDED = "superseded"
    INTERNAL = "internal"
    BIND_EXPIRED = "bind_expired"
    BIND_UNCONFIRMED = "bind_unconfirmed"
    SWAP_TOO_OLD = "swap_too_old"


# Service-own codes: failures that carry no platform code.
TIMEOUT: Final = "TIMEOUT"
CONNECTION_ERROR: Final = "CONNECTION_ERROR"
DEADLINE_EXCEEDED: Final = "DEADLINE_EXCEEDED"
SUPERSEDED: Final = "SUPERSEDED"
INTERNAL_ERROR: Final = "INTERNAL_ERROR"
"""An unexpected failure inside the service while handling the swap (a bug, not an answer)."""
ATTEMPTS_EXHAUSTED: Final = "ATTEMPTS_EXHAUSTED"
HTTP_ERROR: Final = "HTTP_ERROR"
"""An HTTP error answer that carried no platform error code (e.g. an HTML 502 page)."""
BAD_SUCCESS_BODY: Final = "BAD_SUCCESS_BODY"
"""A 2xx refresh answer that is not a JSON object carrying ``verifyCode`` (an HTML page from a
proxy, a 204 without a body, ``[]``, ``{}``): the key may or may not have changed."""
BIND_EXPIRED: Final = "BIND_EXPIRED"
"""The key was refreshed with a non-zero timeout and the new device did not bind within it: the
platform deleted the device's registration."""
BIND_NOT_CONFIRMED: Final = "BIND_NOT_CONFIRMED"
"""The key was refreshed, but no bind was seen before the watch's deadline."""
SWAP_TOO_OLD: Final = "SWAP_TOO_OLD"
"""The swap's ``time`` is older than the ledger's retention (``REBIND_LEDGER__RETENTION_DAYS``):
the device's entry may have expired, so the swap can no longer be proven the latest. No call."""
SERVICE_CODES: Final = frozenset(
    {
        TIMEOUT,
        CONNECTION_ERROR,
        DEADLINE_EXCEEDED,
        SUPERSEDED,
        INTERNAL_ERROR,
        ATTEMPTS_EXHAUSTED,
        HTTP_ERROR,
        BAD_SUCCESS_BODY,
        BIND_EXPIRED,
        BIND_NOT_CONFIRMED,
        SWAP_TOO_OLD,
    }
)

AUTH_BLOCKING_CODES: Final = frozenset({"100208", "100025", "100203", "100247", "102202"})
"""Answers to a login that no swap can get past: a wrong or rotated secret (100208), an app id the
platform does not know (100025, 100203), a frozen application (100247), an empty app id or
secret (102202). The service stops taking work and retries the login until it is accepted
(``service.platform.tokens.AuthGate``) instead of failing every swap."""

# Platform codes the client reacts to itself.
THROTTLE_CODE: Final = "1010009"
TOKEN_INVALID_CODE: Final = "1010005"  # noqa: S105 - an error code, not a secret
DEVICE_ONLINE_CODE: Final = "100611"
NODE_ID_DUPLICATED_CODE: Final = "100426"


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    code: str
    http_status: int | None
    operation: str
    description: str
    category: str
    action: Action
    recommended_handling: str

    @property
    def terminal(self) -> bool:
        return self.action is Action.FAIL


_REFRESH: Final = "refresh_device_key"
_LOGIN: Final = "login"
_REFRESH_TOKEN: Final = "refresh_token"  # noqa: S105 - an operation name
_SUBSCRIBE: Final = "subscribe"
_ANY: Final = "any"

_UNAUTHORIZED_HANDLING = (
    "The event names an application this app is not authorized for; appId must be omitted "
    "unless the device belongs to an application that authorized this one. Fix the event's appId."
)
_APP_MISSING_HANDLING = (
    "The application named by appId does not exist on the platform. Check the event's appId."
)

ERROR_TABLE: Final[tuple[ErrorSpec, ...]] = (
    # ---- PUT deviceCredentials/{deviceId}: the refresh call (all 16 rows of the reference) ----
    ErrorSpec(
        "100217",
        200,
        _REFRESH,
        "The application hasn't been authorized.",
        Category.AUTH,
        Action.FAIL,
        _UNAUTHORIZED_HANDLING,
    ),
    ErrorSpec(
        "100003",
        400,
        _REFRESH,
        "Invalid verify code.",
        Category.INVALID_REQUEST,
        Action.FAIL,
        "Check the verifyCode sent; if none was sent, ask the platform operators.",
    ),
    ErrorSpec(
        "100007",
        400,
        _REFRESH,
        "Bad request message.",
        Category.INVALID_REQUEST,
        Action.FAIL,
        "A request parameter is invalid (e.g. deviceId not set); check the request.",
    ),
    ErrorSpec(
        "100426",
        400,
        _REFRESH,
        "The nodeId is duplicated.",
        Category.CONFLICT,
        Action.RECONCILE,
        "Another device (or this one, already) holds the nodeId; check the nodeId.",
    ),
    ErrorSpec(
        "100610",
        400,
        _REFRESH,
        "Device is not active.",
        Category.INVALID_REQUEST,
        Action.FAIL,
        "The device never connected to the platform; activate it first.",
    ),
    ErrorSpec(
        "100611",
        400,
        _REFRESH,
        "Device is online.",
        Category.DEVICE_ONLINE,
        Action.DEFER_ONLINE,
        "Take the device offline (disconnect it) and try again.",
    ),
    ErrorSpec(
        "50400",
        400,
        _REFRESH,
        "The input is invalid.",
        Category.INVALID_REQUEST,
        Action.FAIL,
        "An input parameter is invalid; check the parameters of the call.",
    ),
    ErrorSpec(
        "100025",
        401,
        _REFRESH,
        "AppId for auth not exist.",
        Category.AUTH,
        Action.FAIL,
        "The app_key header names no known application; check the service's app id.",
    ),
    ErrorSpec(
        "100203",
        403,
        _REFRESH,
        "The application is not existed.",
        Category.AUTH,
        Action.FAIL,
        _APP_MISSING_HANDLING,
    ),
    ErrorSpec(
        "100217",
        403,
        _REFRESH,
        "The application hasn't been authorized.",
        Category.AUTH,
        Action.FAIL,
        _UNAUTHORIZED_HANDLING,
    ),
    ErrorSpec(
        "1010009",
        403,
        _REFRESH,
        "app throttle exceed.",
        Category.THROTTLED,
        Action.THROTTLED,
        "Calls exceed the application's flow control (100/minute by default); slow down "
        "or ask the platform operators to raise the threshold.",
    ),
    ErrorSpec(
        "1010005",
        403,
        _REFRESH,
        "App_key or access_token is invalid.",
        Category.AUTH,
        Action.REAUTH,
        "The access token is wrong, expired or replaced; log in again.",
    ),
    ErrorSpec(
        "100403",
        404,
        _REFRESH,
        "The device is not existed.",
        Category.NOT_FOUND,
        Action.FAIL,
        "No such device; check the deviceId.",
    ),
    ErrorSpec(
        "100418",
        404,
        _REFRESH,
        "The deviceData is not existed.",
        Category.NOT_FOUND,
        Action.FAIL,
        "The platform holds no data for the device; check the deviceId.",
    ),
    ErrorSpec(
        "100203",
        500,
        _REFRESH,
        "The application is not existed.",
        Category.AUTH,
        Action.FAIL,
        _APP_MISSING_HANDLING,
    ),
    ErrorSpec(
        "50252",
        500,
        _REFRESH,
        "Internal server error.",
        Category.PLATFORM_ERROR,
        Action.RETRY,
        "A fault inside the platform; retried, and reported to the operators if it lasts.",
    ),
    # ---- POST login ----
    ErrorSpec(
        "100247",
        400,
        _LOGIN,
        "The application is frozen.",
        Category.AUTH,
        Action.FAIL,
        "The application is frozen; ask the platform operators.",
    ),
    ErrorSpec(
        "102202",
        400,
        _LOGIN,
        "Required parameter is null or empty.",
        Category.INVALID_REQUEST,
        Action.FAIL,
        "appId or secret is empty; check the service's configuration.",
    ),
    ErrorSpec(
        "100208",
        401,
        _LOGIN,
        "AppId or secret is not right.",
        Category.AUTH,
        Action.FAIL,
        "The app id or secret is wrong; fix the configuration.",
    ),
    ErrorSpec(
        "50252",
        500,
        _LOGIN,
        "Internal server error.",
        Category.PLATFORM_ERROR,
        Action.RETRY,
        "A fault inside the platform; retried.",
    ),
    ErrorSpec(
        "100025",
        401,
        _LOGIN,
        "AppId for auth not exist.",
        Category.AUTH,
        Action.FAIL,
        "No application with this app id; fix REBIND_PLATFORM__APP_ID.",
    ),
    ErrorSpec(
        "100203",
        403,
        _LOGIN,
        "The application is not existed.",
        Category.AUTH,
        Action.FAIL,
        "No application with this app id; fix REBIND_PLATFORM__APP_ID.",
    ),
    # ---- POST refreshToken ----
    ErrorSpec(
        "100247",
        400,
        _REFRESH_TOKEN,
        "The application is frozen.",
        Category.AUTH,
        Action.FAIL,
        "The application is frozen; ask the platform operators.",
    ),
    ErrorSpec(
        "102202",
        400,
        _REFRESH_TOKEN,
        "Required parameter is null or empty.",
        Category.INVALID_REQUEST,
        Action.FAIL,
        "appId, secret or refreshToken is empty; a fresh login is made instead.",
    ),
    ErrorSpec(
        "50400",
        400,
        _REFRESH_TOKEN,
        "The input is invalid.",
        Category.INVALID_REQUEST,
        Action.FAIL,
        "A parameter is invalid; a fresh login is made instead.",
    ),
    ErrorSpec(
        "100208",
        401,
        _REFRESH_TOKEN,
        "AppId, secret or refreshToken is not right.",
        Category.AUTH,
        Action.REAUTH,
        "The refresh token is wrong or expired; log in again.",
    ),
    ErrorSpec(
        "50252",
        500,
        _REFRESH_TOKEN,
        "Internal server error.",
        Category.PLATFORM_ERROR,
        Action.RETRY,
        "A fault inside the platform; retried.",
    ),
    # ---- POST subscriptions (bindDevice pushes); other codes follow the refresh call's rows ----
    ErrorSpec(
        "100222",
        400,
        _SUBSCRIBE,
        "The callback URL is invalid.",
        Category.INVALID_REQUEST,
        Action.FAIL,
        "The platform refused the callback URL of the bindDevice subscription: it must be an "
        "https URL (http only for commissioning) that names its port, e.g. "
        "https://rebind.example.com:8443/path, and that the platform can reach. Fix the "
        "configured callback URL.",
    ),
    # ---- gateway codes any call can meet (flow control covers every call) ----
    ErrorSpec(
        "1010009",
        None,
        _ANY,
        "app throttle exceed.",
        Category.THROTTLED,
        Action.THROTTLED,
        "Calls exceed the application's flow control; slow down.",
    ),
    ErrorSpec(
        "1010005",
        None,
        _ANY,
        "App_key or access_token is invalid.",
        Category.AUTH,
        Action.REAUTH,
        "The access token is invalid; log in again.",
    ),
    # ---- the service's own codes ----
    ErrorSpec(
        TIMEOUT,
        None,
        _ANY,
        "No answer within the request timeout.",
        Category.TRANSPORT,
        Action.RETRY,
        "The platform did not answer in time; retried (reconciled when the call may have "
        "been applied).",
    ),
    ErrorSpec(
        CONNECTION_ERROR,
        None,
        _ANY,
        "Connection refused, reset or dropped.",
        Category.TRANSPORT,
        Action.RETRY,
        "The platform could not be reached or dropped the connection; retried.",
    ),
    ErrorSpec(
        DEADLINE_EXCEEDED,
        None,
        _ANY,
        "The swap's deadline passed before it succeeded.",
        Category.DEADLINE_EXCEEDED,
        Action.FAIL,
        "Look at the last error; replay the swap once the cause is fixed.",
    ),
    ErrorSpec(
        INTERNAL_ERROR,
        None,
        _ANY,
        "An unexpected failure inside the service while handling the swap.",
        Category.INTERNAL,
        Action.FAIL,
        "A defect of the service: report it with the log line of this swap; the device was "
        "queried first, so the key was not changed by this swap. Replay it once fixed.",
    ),
    ErrorSpec(
        SUPERSEDED,
        None,
        _ANY,
        "A newer swap of the same device replaced this one.",
        Category.SUPERSEDED,
        Action.FAIL,
        "Nothing to do: the newer swap is applied instead.",
    ),
    ErrorSpec(
        BIND_EXPIRED,
        None,
        _ANY,
        "The new device did not bind within the verifyCode's timeout.",
        Category.BIND_EXPIRED,
        Action.FAIL,
        "The key was refreshed with a non-zero timeout and the new device did not bind within "
        "it, so the platform deleted the device's registration: the deviceId no longer exists. "
        "Register the device again (a new deviceId), then bind the new hardware with it.",
    ),
    ErrorSpec(
        BIND_NOT_CONFIRMED,
        None,
        _ANY,
        "No bind of the new device was seen before the watch's deadline.",
        Category.BIND_UNCONFIRMED,
        Action.FAIL,
        "The key was refreshed, but the service saw no bind before its watch deadline (no push "
        "arrived and polling did not see the device activated). Check the device in the field "
        "(powered, connected, configured with the new verifyCode) and query the device on the "
        "platform to learn whether it bound.",
    ),
    ErrorSpec(
        SWAP_TOO_OLD,
        None,
        _ANY,
        "The swap's time is older than the ledger's retention: it cannot be proven the latest.",
        Category.SWAP_TOO_OLD,
        Action.FAIL,
        "The device's ledger entry may have expired (REBIND_LEDGER__RETENTION_DAYS), so the "
        "service cannot tell whether a newer swap was applied since; no call was made. If this "
        "swap is still the one to apply, re-issue it on purpose with a fresh time "
        "(device-rebind replay --fresh-time).",
    ),
    ErrorSpec(
        ATTEMPTS_EXHAUSTED,
        None,
        _ANY,
        "Transient errors lasted for every attempt.",
        Category.PLATFORM_ERROR,
        Action.FAIL,
        "The platform kept failing; replay the swap once it is healthy.",
    ),
    ErrorSpec(
        BAD_SUCCESS_BODY,
        None,
        _ANY,
        "A 2xx answer without a JSON object carrying verifyCode.",
        Category.PLATFORM_ERROR,
        Action.RETRY,
        "Something between the service and the platform (a proxy, a WAF) answered instead of "
        "the platform; the device is queried to learn whether the key changed, and the call is "
        "repeated when it did not. Check the proxies on the way if it lasts.",
    ),
)

OTHER_CODE: Final = "other"
"""The metric label of an error code that is neither in the table nor one of the service's."""
KNOWN_CODES: Final[frozenset[str]] = frozenset(spec.code for spec in ERROR_TABLE) | SERVICE_CODES
"""Every code a metric label may carry (plus ``none`` and :data:`OTHER_CODE`)."""


def metric_code(error_code: str | None) -> str:
    """The bounded ``error_code`` label of a code: itself when known, else ``other``."""
    if error_code is None:
        return "none"
    return error_code if error_code in KNOWN_CODES else OTHER_CODE


_BY_KEY: Final[dict[tuple[str, int | None, str], ErrorSpec]] = {
    (spec.operation, spec.http_status, spec.code): spec for spec in ERROR_TABLE
}
_BY_CODE: Final[dict[tuple[str, str], ErrorSpec]] = {}
for _spec in ERROR_TABLE:  # first row of a code per operation wins
    _BY_CODE.setdefault((_spec.operation, _spec.code), _spec)

_TABLE_ALIASES: Final[dict[str, str]] = {
    "query_device": _REFRESH,
    "query_activation": _REFRESH,
    _SUBSCRIBE: _REFRESH,
}
"""Calls whose other codes are the refresh call's: the device query and the activation query
(same device resource), and the subscription (the common table)."""


def lookup(operation: str, http_status: int | None, error_code: str) -> ErrorSpec | None:
    """The table's row for the code, or None. Exact status first, then the code under any status."""
    ops = [operation]
    if operation in _TABLE_ALIASES:
        ops.append(_TABLE_ALIASES[operation])
    ops.append(_ANY)
    for op in ops:
        spec = _BY_KEY.get((op, http_status, error_code))
        if spec is not None:
            return spec
    for op in ops:
        spec = _BY_CODE.get((op, error_code))
        if spec is not None:
            return spec
    return None


def classify(operation: str, http_status: int | None, error_code: str | None) -> ErrorSpec:
    """The spec of an error answer (or of no answer: ``http_status`` None).

    Known codes come from the table. Unknown ones fall back on the HTTP status: no response and
    5xx are transient, 429 is flow control, 401 asks for a new token, other 4xx are terminal.
    """
    if error_code is not None:
        spec = lookup(operation, http_status, error_code)
        if spec is not None:
            return spec
    code = (
        error_code
        if error_code is not None
        else (CONNECTION_ERROR if http_status is None else HTTP_ERROR)
    )
    category: str
    action: Action
    if http_status is None:
        category, action = Category.TRANSPORT, Action.RETRY
        handling = "No answer from the platform; retried."
    elif http_status >= 500 or http_status == 408:
        category, action = Category.PLATFORM_ERROR, Action.RETRY
        handling = "Unlisted platform fault; retried."
    elif http_status == 429:
        category, action = Category.THROTTLED, Action.THROTTLED
        handling = "Too many requests; slow down."
    elif http_status == 401:
        category, action = Category.AUTH, Action.REAUTH
        handling = "Authentication refused; log in again once."
    elif http_status == 403:
        category, action = Category.AUTH, Action.FAIL
        handling = "Access refused for an unlisted reason; check the application's rights."
    elif http_status == 404:
        category, action = Category.NOT_FOUND, Action.FAIL
        handling = "Not found; check the deviceId."
    elif http_status == 409:
        category, action = Category.CONFLICT, Action.FAIL
        handling = "Conflict; check the request against the device's state."
    elif 400 <= http_status < 500:
        category, action = Category.INVALID_REQUEST, Action.FAIL
        handling = "The platform refused the request; check its parameters."
    else:  # an error code inside a 2xx, or an unexpected 1xx/3xx
        category, action = Category.PLATFORM_ERROR, Action.FAIL
        handling = "Unexpected answer from the platform; check the platform's release notes."
    return ErrorSpec(
        code=code,
        http_status=http_status,
        operation=operation,
        description="unlisted error code" if error_code is not None else "no error code",
        category=category,
        action=action,
        recommended_handling=handling,
    )


_SNIPPET_MAX: Final = 200
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
_NO_ERROR_CODES: Final = frozenset({"", "0"})


def _as_code(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | str):
        text = str(value).strip()
        return None if text in _NO_ERROR_CODES else text
    return None


def _as_desc(value: object) -> str | None:
    if value is None:
        return None
    return str(value)[:_SNIPPET_MAX]


def snippet(content: bytes) -> str | None:
    """A short, single-line, tag-free excerpt of a body, for an error description."""
    text = content.decode("utf-8", errors="replace")
    text = _SPACE.sub(" ", _TAG.sub(" ", text)).strip()
    return text[:_SNIPPET_MAX] or None


def parse_json_object(content: bytes) -> dict[str, object] | None:
    if not content.strip():
        return None
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_error_body(
    status: int, content: bytes, content_type: str | None
) -> tuple[str | None, str | None]:
    """(error code, description) of a body; (None, None) for a 2xx without an error code.

    Reads ``{"error_code", "error_desc"}`` and ``{"resultcode", "resultmsg"}``, codes as strings or
    numbers. A body that is not a JSON object gives (None, a short snippet) for an error status.
    The content type is a hint only: JSON is tried whatever it says.
    """
    del content_type  # gateways mislabel bodies; the content decides
    obj = parse_json_object(content)
    is_success = 200 <= status < 300
    if obj is None:
        return (None, None) if is_success else (None, snippet(content))
    for code_key, desc_key in (("error_code", "error_desc"), ("resultcode", "resultmsg")):
        if code_key in obj:
            code = _as_code(obj[code_key])
            if code is not None:
                return code, _as_desc(obj.get(desc_key))
    if is_success:
        return None, None
    desc = obj.get("error_desc", obj.get("resultmsg", obj.get("message")))
    return None, _as_desc(desc) if desc is not None else snippet(content)
