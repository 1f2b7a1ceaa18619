"""The error-code table: every row classifies to itself; unknown codes fall back on the status."""

from __future__ import annotations

import json

import pytest

from service.platform.errors import (
    CONNECTION_ERROR,
    ERROR_TABLE,
    HTTP_ERROR,
    TIMEOUT,
    Action,
    Category,
    ErrorSpec,
    classify,
    parse_error_body,
)
from tests.support.reference import REFRESH_ROWS

CONTRACT_CATEGORIES = {c.value for c in Category}

LOGIN_ROWS = [(400, "100247"), (400, "102202"), (401, "100208"), (500, "50252")]
REFRESH_TOKEN_ROWS = [
    (400, "100247"),
    (400, "102202"),
    (400, "50400"),
    (401, "100208"),
    (500, "50252"),
]


def _row(operation: str, status: int, code: str) -> ErrorSpec:
    rows = [
        s
        for s in ERROR_TABLE
        if s.operation == operation and s.http_status == status and s.code == code
    ]
    assert len(rows) == 1, (operation, status, code)
    return rows[0]


def _row_id(spec: ErrorSpec) -> str:
    return f"{spec.operation}-{spec.http_status}-{spec.code}"


@pytest.mark.parametrize("row", ERROR_TABLE, ids=_row_id)
def test_every_row_classifies_to_itself(row: ErrorSpec) -> None:
    assert classify(row.operation, row.http_status, row.code) is row
    assert row.category in CONTRACT_CATEGORIES
    assert row.recommended_handling
    assert row.description


def test_table_covers_the_reference() -> None:
    for status, code in REFRESH_ROWS:
        _row("refresh_device_key", status, code)
    for status, code in LOGIN_ROWS:
        _row("login", status, code)
    for status, code in REFRESH_TOKEN_ROWS:
        _row("refresh_token", status, code)
    keys = [(s.operation, s.http_status, s.code) for s in ERROR_TABLE]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize(
    ("status", "code", "action", "category"),
    [
        (200, "100217", Action.FAIL, "auth"),
        (403, "100217", Action.FAIL, "auth"),
        (400, "100426", Action.RECONCILE, "conflict"),
        (400, "100611", Action.DEFER_ONLINE, "device_online"),
        (403, "1010009", Action.THROTTLED, "throttled"),
        (403, "1010005", Action.REAUTH, "auth"),
        (404, "100403", Action.FAIL, "not_found"),
        (500, "50252", Action.RETRY, "platform_error"),
        (500, "100203", Action.FAIL, "auth"),
        (400, "50400", Action.FAIL, "invalid_request"),
    ],
)
def test_refresh_actions(status: int, code: str, action: Action, category: str) -> None:
    spec = classify("refresh_device_key", status, code)
    assert (spec.action, spec.category) == (action, category)


def test_query_device_uses_the_refresh_rows() -> None:
    assert classify("query_device", 404, "100403").category == "not_found"
    assert classify("query_device", 403, "1010005").action is Action.REAUTH


def test_gateway_codes_under_any_status_and_operation() -> None:
    assert classify("login", 403, "1010009").action is Action.THROTTLED
    assert classify("refresh_device_key", 401, "1010005").action is Action.REAUTH
    assert classify("query_device", 429, "1010009").action is Action.THROTTLED


def test_refresh_token_100208_falls_back_to_login() -> None:
    assert classify("refresh_token", 401, "100208").action is Action.REAUTH
    assert classify("login", 401, "100208").action is Action.FAIL


@pytest.mark.parametrize(
    ("status", "action", "category"),
    [
        (None, Action.RETRY, "transport"),
        (500, Action.RETRY, "platform_error"),
        (502, Action.RETRY, "platform_error"),
        (503, Action.RETRY, "platform_error"),
        (429, Action.THROTTLED, "throttled"),
        (401, Action.REAUTH, "auth"),
        (403, Action.FAIL, "auth"),
        (404, Action.FAIL, "not_found"),
        (409, Action.FAIL, "conflict"),
        (400, Action.FAIL, "invalid_request"),
        (422, Action.FAIL, "invalid_request"),
        (200, Action.FAIL, "platform_error"),
    ],
)
def test_unknown_codes_fall_back_on_status(
    status: int | None, action: Action, category: str
) -> None:
    spec = classify("refresh_device_key", status, "999999")
    assert (spec.action, spec.category) == (action, category)
    assert spec.code == "999999"


def test_no_code_fallbacks() -> None:
    assert classify("refresh_device_key", 502, None).code == HTTP_ERROR
    assert classify("refresh_device_key", None, None).code == CONNECTION_ERROR
    assert classify("refresh_device_key", None, TIMEOUT).category == "transport"
    assert classify("login", None, CONNECTION_ERROR).action is Action.RETRY


def test_known_code_under_unlisted_status_keeps_its_row() -> None:
    assert classify("refresh_device_key", 400, "100403").category == "not_found"


def _body(obj: object) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            _body({"error_code": "100418", "error_desc": "The deviceData is not existed."}),
            ("100418", "The deviceData is not existed."),
        ),
        (_body({"error_code": 100418, "error_desc": "x"}), ("100418", "x")),
        (
            _body({"resultcode": "1010005", "resultmsg": "Invalid access token or appId."}),
            ("1010005", "Invalid access token or appId."),
        ),
        (_body({"resultcode": 1010009, "resultmsg": "throttle"}), ("1010009", "throttle")),
        (_body({"error_code": "50252"}), ("50252", None)),
    ],
)
def test_both_body_shapes(content: bytes, expected: tuple[str, str | None]) -> None:
    assert parse_error_body(403, content, "application/json") == expected


def test_error_inside_a_200() -> None:
    content = _body({"error_code": "100217", "error_desc": "The app hasn't been authorized."})
    code, _ = parse_error_body(200, content, "application/json")
    assert code == "100217"
    assert classify("refresh_device_key", 200, code).action is Action.FAIL


def test_success_body_has_no_error() -> None:
    assert parse_error_body(200, _body({"verifyCode": "A", "timeout": 0}), "application/json") == (
        None,
        None,
    )
    assert parse_error_body(200, b"", None) == (None, None)
    gateway_ok = _body({"resultcode": "0", "resultmsg": "ok"})
    assert parse_error_body(200, gateway_ok, None) == (None, None)


def test_non_json_error_body_gives_a_short_snippet() -> None:
    html = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 5000 + b"</body>"
    code, desc = parse_error_body(502, html, "text/html")
    assert code is None
    assert desc is not None
    assert desc.startswith("502 Bad Gateway")
    assert len(desc) <= 200
    assert "<" not in desc


def test_json_without_code_on_error_status() -> None:
    assert parse_error_body(500, _body({"message": "boom"}), "application/json") == (None, "boom")
    assert parse_error_body(500, _body([1, 2]), "application/json") == (None, "[1, 2]")
    assert parse_error_body(503, b"", None) == (None, None)


def test_content_type_is_only_a_hint() -> None:
    content = _body({"error_code": "100611", "error_desc": "Device is online."})
    assert parse_error_body(400, content, "text/plain")[0] == "100611"
