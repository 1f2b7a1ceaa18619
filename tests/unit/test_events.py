"""service.events: decoding the input, building the outcomes, dead-letter headers."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from service.events import (
    CONTENT_TYPE,
    DLQ_DETAIL_HEADER,
    DLQ_REASON_HEADER,
    FAILED_TYPE,
    INVALID_REASONS,
    MAX_CONTEXT_DEPTH,
    REBOUND_TYPE,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
    SWAPPED_TYPE,
    UPDATED_TYPE,
    CredentialUpdatedEvent,
    DeviceReboundEvent,
    InvalidEvent,
    OutcomeEvent,
    RebindFailedEvent,
    SwapEvent,
    credential_updated,
    dead_letter_headers,
    decode_swap,
    device_rebound,
    outcome_id,
    parse_outcome,
    parse_rfc3339,
    rebind_failed,
)

DEVICE = "a1b2c3d4-0000-4000-8000-000000000001"
NOW = datetime(2026, 11, 25, 9, 30, 1, tzinfo=UTC)
CE_JSON = [("content-type", CONTENT_TYPE.encode())]


def _event(**data: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "deviceId": DEVICE,
        "nodeId": "864475040000123",
        "previousNodeId": "864475040000099",
        "appId": None,
        "verifyCode": None,
        "timeout": None,
        "workOrderId": "WO-2026-11-0042",
    }
    body.update(data)
    return {
        "specversion": "1.0",
        "id": "4f7f1c3e-0b7a-4c55-9d3c-2f0c6f1d9a10",
        "source": "/inventory/warehouse-7",
        "type": SWAPPED_TYPE,
        "time": "2026-11-25T09:30:00Z",
        "subject": DEVICE,
        "datacontenttype": "application/json",
        "data": body,
    }


def _decode(event: Any, headers: list[tuple[str, bytes]] | None = None) -> SwapEvent:
    return decode_swap(orjson.dumps(event), CE_JSON if headers is None else headers)


def _reason(value: bytes | None, headers: list[tuple[str, bytes]] | None = None) -> str:
    with pytest.raises(InvalidEvent) as info:
        decode_swap(value, CE_JSON if headers is None else headers)
    assert info.value.reason in INVALID_REASONS
    assert len(info.value.detail) <= 1000
    return info.value.reason


def _binary_headers(**override: str | None) -> list[tuple[str, bytes]]:
    headers: dict[str, str | None] = {
        "ce_specversion": "1.0",
        "ce_id": "b-1",
        "ce_source": "/inventory",
        "ce_type": SWAPPED_TYPE,
        "ce_time": "2026-11-25T09:30:00+01:00",
        "ce_subject": DEVICE,
        "content-type": "application/json",
    }
    headers.update(override)
    return [(k, v.encode()) for k, v in headers.items() if v is not None]


# --------------------------------------------------------------------------------------------
# Decoding: structured mode
# --------------------------------------------------------------------------------------------


def test_decode_contract_example() -> None:
    swap = _decode(_event())
    assert swap.id == "4f7f1c3e-0b7a-4c55-9d3c-2f0c6f1d9a10"
    assert swap.time == datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
    assert swap.data.device_id == DEVICE
    assert swap.data.node_id == "864475040000123"
    assert swap.data.previous_node_id == "864475040000099"
    assert swap.data.app_id is None
    assert swap.data.verify_code is None
    assert swap.data.timeout is None
    assert swap.data.context == {"workOrderId": "WO-2026-11-0042"}
    assert swap.context == {"previousNodeId": "864475040000099", "workOrderId": "WO-2026-11-0042"}


def test_decode_accepts_absent_or_plain_json_content_type() -> None:
    raw = orjson.dumps(_event())
    expected = decode_swap(raw, CE_JSON)
    assert decode_swap(raw, []) == expected
    assert decode_swap(raw, [("Content-Type", b"application/json")]) == expected
    assert decode_swap(raw, [("content-type", b"application/cloudevents+json; charset=utf-8")])


def test_unknown_fields_pass_through_unchanged() -> None:
    extra = {"nested": {"a": [1, 2.5, None, {"b": True}]}, "context": {"x": 1}, "model_config": 3}
    swap = _decode(_event(**extra))
    assert swap.data.context == {"workOrderId": "WO-2026-11-0042", **extra}
    assert swap.data.device_id == DEVICE  # a field named like a pydantic attribute is harmless


def test_extension_attributes_are_ignored() -> None:
    event = _event()
    event["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert _decode(event).id == event["id"]


def test_optional_fields() -> None:
    swap = _decode(_event(appId="app-1", verifyCode="v" * 256, timeout=2147483647))
    assert (swap.data.app_id, swap.data.verify_code, swap.data.timeout) == (
        "app-1",
        "v" * 256,
        2147483647,
    )
    assert _decode(_event(timeout=0)).data.timeout == 0
    assert _decode(_event(timeout=300.0)).data.timeout == 300  # an integral JSON number
    minimal = {"specversion": "1.0", "id": "x", "source": "s", "type": SWAPPED_TYPE,
               "data": {"deviceId": "d", "nodeId": "n"}}  # fmt: skip
    swap = _decode(minimal)
    assert swap.time is None
    assert swap.subject is None
    assert swap.context == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T09:30:00Z", datetime(2026, 11, 25, 9, 30, tzinfo=UTC)),
        ("2026-11-25t09:30:00z", datetime(2026, 11, 25, 9, 30, tzinfo=UTC)),
        (
            "2026-11-25T10:30:00.1234567+01:00",
            datetime(2026, 11, 25, 9, 30, 0, 123456, tzinfo=UTC),
        ),
        ("2026-11-25T04:00:00-05:30", datetime(2026, 11, 25, 9, 30, tzinfo=UTC)),
    ],
)
def test_rfc3339_accepted(text: str, expected: datetime) -> None:
    assert parse_rfc3339(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-25T09:30:00",
        "2026-11-25 09:30:00Z",
        "2026-11-25",
        "2026-02-30T00:00:00Z",
        "2026-11-25T23:59:60Z",
        "2026-11-25T09:30:00+24:00",
        "0000-01-01T00:00:00Z",
        "1764063000",
        "2026-11-25T09:30:00Z\n",
    ],
)
def test_rfc3339_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_rfc3339(text)
    assert _reason(orjson.dumps({**_event(), "time": text})) == "not_cloudevent"


# --------------------------------------------------------------------------------------------
# Decoding: binary mode
# --------------------------------------------------------------------------------------------


def test_binary_mode() -> None:
    data = _event()["data"]
    swap = decode_swap(orjson.dumps(data), _binary_headers())
    assert swap.id == "b-1"
    assert swap.source == "/inventory"
    assert swap.time == datetime(2026, 11, 25, 8, 30, tzinfo=UTC)
    assert swap.subject == DEVICE
    assert swap.datacontenttype == "application/json"
    assert swap.data == _decode(_event()).data


def test_binary_mode_minimal_headers_and_charset() -> None:
    value = orjson.dumps({"deviceId": DEVICE, "nodeId": "n"})
    swap = decode_swap(
        value, _binary_headers(ce_time=None, ce_subject=None, **{"content-type": None})
    )
    assert (swap.time, swap.subject) == (None, None)
    charset = _binary_headers(**{"content-type": "application/json; charset=utf-8"})
    assert decode_swap(value, charset).data.node_id == "n"


@pytest.mark.parametrize(
    ("override", "value", "reason"),
    [
        ({"ce_id": None}, None, "not_cloudevent"),
        ({"ce_id": ""}, None, "not_cloudevent"),
        ({"ce_source": None}, None, "not_cloudevent"),
        ({"ce_time": "now"}, None, "not_cloudevent"),
        ({"content-type": "text/plain"}, None, "not_cloudevent"),
        ({"ce_specversion": "0.3"}, None, "unsupported_specversion"),
        ({"ce_type": "com.example"}, None, "wrong_type"),
        ({"ce_type": None}, None, "not_cloudevent"),
        ({"ce_subject": "other"}, None, "invalid_data"),
        ({}, b"[1, 2]", "invalid_data"),
        ({}, b'{"deviceId": "d"}', "invalid_data"),
        ({}, b"deviceId=d", "not_json"),
        ({}, b'{"deviceId": "\xff"}', "not_utf8"),
    ],
)
def test_binary_mode_rejections(override: dict[str, str | None], value: bytes | None,
                                reason: str) -> None:  # fmt: skip
    raw = value if value is not None else orjson.dumps(_event()["data"])
    assert _reason(raw, _binary_headers(**override)) == reason


def test_binary_mode_header_not_utf8_or_repeated() -> None:
    raw = orjson.dumps(_event()["data"])
    assert _reason(raw, [*_binary_headers(ce_id=None), ("ce_id", b"\xff\xfe")]) == "not_utf8"
    assert _reason(raw, [*_binary_headers(), ("ce_id", b"b-2")]) == "not_cloudevent"


# --------------------------------------------------------------------------------------------
# Every InvalidEvent reason
# --------------------------------------------------------------------------------------------

REASON_CASES: list[tuple[str, bytes | None, list[tuple[str, bytes]] | None]] = [
    ("missing_value", None, None),
    ("missing_value", b"", None),
    ("too_large", orjson.dumps(_event(blob="x" * 2_000_000)), None),
    ("not_utf8", b'{"id": "\xc3\x28"}', None),
    ("not_utf8", "é".encode("latin-1") + b"{}", None),
    ("not_json", b"{", None),
    ("not_json", b"NaN", None),
    ("not_json", b"\xef\xbb\xbf{}", None),  # BOM
    ("not_json", b"[" * 2000 + b"]" * 2000, None),
    ("not_cloudevent", b"[]", None),
    ("not_cloudevent", b'"text"', None),
    ("not_cloudevent", b"42", None),
    ("not_cloudevent", orjson.dumps({"deviceId": DEVICE, "nodeId": "n"}), None),
    ("not_cloudevent", orjson.dumps(_event()), [("content-type", b"text/plain")]),
    (
        "not_cloudevent",
        orjson.dumps(_event()),
        [("content-type", b"application/cloudevents-batch+json")],
    ),
    ("not_cloudevent", orjson.dumps({**_event(), "id": ""}), None),
    ("not_cloudevent", orjson.dumps({**_event(), "id": "i" * 257}), None),
    ("not_cloudevent", orjson.dumps({**_event(), "type": 7}), None),
    ("not_cloudevent", orjson.dumps({**_event(), "datacontenttype": "text/xml"}), None),
    ("unsupported_specversion", orjson.dumps({**_event(), "specversion": "0.3"}), None),
    ("unsupported_specversion", orjson.dumps({**_event(), "specversion": 1.0}), None),
    ("wrong_type", orjson.dumps({**_event(), "type": UPDATED_TYPE}), None),
    ("invalid_data", orjson.dumps({**_event(), "data": None}), None),
    ("invalid_data", orjson.dumps({**_event(), "data": [1]}), None),
    ("invalid_data", orjson.dumps({k: v for k, v in _event().items() if k != "data"}), None),
    ("invalid_data", orjson.dumps({**_event(), "subject": "another-device"}), None),
    ("invalid_data", orjson.dumps(_event(nodeId="")), None),
    ("invalid_data", orjson.dumps(_event(nodeId="n" * 257)), None),
    ("invalid_data", orjson.dumps(_event(deviceId=1)), None),
    ("invalid_data", orjson.dumps(_event(timeout=True)), None),
    ("invalid_data", orjson.dumps(_event(timeout=False)), None),
    ("invalid_data", orjson.dumps(_event(timeout=1.5)), None),
    ("invalid_data", orjson.dumps(_event(timeout=-1)), None),
    ("invalid_data", orjson.dumps(_event(timeout=2147483648)), None),
    ("invalid_data", orjson.dumps(_event(timeout="300")), None),
    (
        "invalid_data",
        b'{"specversion":"1.0","id":"i","source":"s","type":"'
        + SWAPPED_TYPE.encode()
        + b'","data":{"deviceId":"d","nodeId":"n","timeout":1e300}}',
        None,
    ),
    ("invalid_data", orjson.dumps(_event(verifyCode="")), None),
    ("invalid_data", orjson.dumps(_event(appId=42)), None),
    ("invalid_device_id", orjson.dumps({**_event(deviceId=".."), "subject": ".."}), None),
    ("invalid_device_id", orjson.dumps({**_event(deviceId="a/b"), "subject": None}), None),
]


@pytest.mark.parametrize(
    ("reason", "value", "headers"),
    REASON_CASES,
    ids=[f"{i}-{case[0]}" for i, case in enumerate(REASON_CASES)],
)
def test_invalid_reason(reason: str, value: bytes | None,
                        headers: list[tuple[str, bytes]] | None) -> None:  # fmt: skip
    assert _reason(value, headers) == reason


def test_every_reason_is_exercised() -> None:
    # key_mismatch is the pipeline's (it compares the Kafka key with data.deviceId)
    assert {case[0] for case in REASON_CASES} | {"key_mismatch", "clock_skew"} == INVALID_REASONS


BAD_DEVICE_IDS = [
    ".",
    "..",
    "a/b",
    "/",
    "dev/../x",
    "a\\b",
    "a?b",
    "?",
    "a#b",
    "a%2Fb",
    "%2e%2e",
    "%",
    "a\x00b",
    "line\nbreak",
    "tab\there",
    "del\x7f",
    "c1\x85",
    "c1\x9f",
    " ",
    "   ",
    "\t",
    "\u00a0",
    "\u2003\u3000",
    "\u2028",
]
GOOD_DEVICE_IDS = [
    "dev-1",
    "...",
    ".a",
    "a.",
    "a..b",
    " dev ",
    "a b",
    "dévice-ü-設備",
    "a;b,c=d&e+f@g:h",
    "\u200b",  # zero-width space: a format character, not whitespace or a control
    "d" * 256,
]


@pytest.mark.parametrize("device_id", BAD_DEVICE_IDS, ids=repr)
def test_device_ids_that_leave_their_path_segment_are_refused(device_id: str) -> None:
    structured = orjson.dumps({**_event(deviceId=device_id), "subject": device_id})
    assert _reason(structured) == "invalid_device_id"
    assert _reason(orjson.dumps({**_event(deviceId=device_id), "subject": None})) == (
        "invalid_device_id"
    )
    binary = orjson.dumps(_event(deviceId=device_id)["data"])
    assert _reason(binary, _binary_headers(ce_subject=None)) == "invalid_device_id"
    with pytest.raises(InvalidEvent) as info:
        decode_swap(structured, CE_JSON)
    assert info.value.detail.startswith("data.deviceId: ")


@pytest.mark.parametrize("device_id", GOOD_DEVICE_IDS, ids=repr)
def test_other_device_ids_are_accepted(device_id: str) -> None:
    swap = decode_swap(orjson.dumps({**_event(deviceId=device_id), "subject": device_id}), CE_JSON)
    assert swap.data.device_id == device_id


def test_a_bad_device_id_among_other_data_errors_is_still_named() -> None:
    raw = orjson.dumps({**_event(deviceId="..", nodeId=""), "subject": None})
    assert _reason(raw) == "invalid_device_id"
    # a structural problem outside data still wins
    raw = orjson.dumps({**_event(deviceId=".."), "subject": None, "id": 5})
    assert _reason(raw) == "not_cloudevent"


def test_too_large_is_configurable() -> None:
    raw = orjson.dumps(_event())
    assert decode_swap(raw, CE_JSON, max_bytes=len(raw)).id
    with pytest.raises(InvalidEvent) as info:
        decode_swap(raw, CE_JSON, max_bytes=len(raw) - 1)
    assert info.value.reason == "too_large"
    headers = _binary_headers(ce_source="s" * 100)
    value = orjson.dumps(_event()["data"])
    with pytest.raises(InvalidEvent, match="too_large"):
        decode_swap(value, headers, max_bytes=len(value) + 50)


def test_deep_context_is_rejected_so_outcomes_can_always_be_encoded() -> None:
    deep: Any = "leaf"
    for _ in range(MAX_CONTEXT_DEPTH + 1):
        deep = [deep]
    assert _reason(orjson.dumps(_event(deep=deep))) == "invalid_data"
    ok: Any = "leaf"
    for _ in range(MAX_CONTEXT_DEPTH - 1):
        ok = {"k": ok}
    swap = _decode(_event(ok=ok))
    outcome = credential_updated(
        swap, verify_code="v", timeout=0, attempts=1, source="/device-rebind", time=NOW
    )
    assert parse_outcome(outcome.value).data.context["ok"] == ok


def test_detail_is_bounded_and_does_not_echo_values() -> None:
    huge = "S" * 100_000
    for event in (
        {**_event(), "type": huge},
        {**_event(), "specversion": huge},
        {**_event(), "id": huge},
        _event(nodeId=huge, verifyCode=huge, appId=huge, deviceId=huge, timeout=huge),
    ):
        with pytest.raises(InvalidEvent) as info:
            _decode(event)
        assert len(info.value.detail) <= 1000
        assert "S" * 200 not in info.value.detail
        assert len(str(info.value)) <= 1100


def test_detail_names_the_field() -> None:
    with pytest.raises(InvalidEvent) as info:
        _decode(_event(timeout=-1))
    assert info.value.detail.startswith("data.timeout: ")


def test_random_bytes_only_ever_raise_invalid_event() -> None:
    rng = random.Random(20261125)
    seeds = [orjson.dumps(_event()), orjson.dumps(_event()["data"]), b'{"a": [1, {"b": null}]}']
    alphabet = b'{}[]",:0123456789.eE+-truefalsnul \\\xff\xc3\x80'
    binary = _binary_headers()
    outcomes = {"ok": 0, "invalid": 0}
    problems: list[str] = []
    for i in range(6000):
        seed = seeds[i % len(seeds)]
        kind = i % 4
        if kind == 0:
            value = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        elif kind == 1:  # flip a few bytes
            buf = bytearray(seed)
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] = rng.choice(alphabet)
            value = bytes(buf)
        elif kind == 2:  # cut, or splice with a structural byte
            cut = rng.randrange(len(seed) + 1)
            value = seed[:cut] + bytes([rng.choice(alphabet)]) + seed[cut + rng.randrange(8) :]
        else:  # replace one data field with a random JSON value
            event = _event()
            field = rng.choice(["deviceId", "nodeId", "appId", "verifyCode", "timeout", "x"])
            event["data"][field] = rng.choice(
                [None, True, 0, -1, 1.5, 2**31, 1e20, "", "s", [], {}, [[[]]], {"a": {}}]
            )
            if rng.random() < 0.3:
                event[rng.choice(["id", "time", "subject", "specversion"])] = rng.choice(
                    [None, 1, "", [], "2026-13-01T00:00:00Z"]
                )
            value = orjson.dumps(event)
        headers = binary if rng.random() < 0.25 else CE_JSON
        try:
            decode_swap(value, headers)
        except InvalidEvent as exc:
            problems.extend(
                f"{value!r}: {exc.reason}"
                for bad in (exc.reason not in INVALID_REASONS, len(exc.detail) > 1000)
                if bad
            )
            outcomes["invalid"] += 1
        else:
            outcomes["ok"] += 1
    assert problems == []
    assert outcomes["invalid"] > 1000
    assert outcomes["ok"] > 50


def test_odd_header_values_never_crash() -> None:
    raw = orjson.dumps(_event()["data"])
    weird: list[Any] = [("ce_specversion", None), ("ce_id", 5), ("content-type", None)]
    with pytest.raises(InvalidEvent):
        decode_swap(raw, weird)


# --------------------------------------------------------------------------------------------
# Outcomes
# --------------------------------------------------------------------------------------------


def _updated(swap: SwapEvent, **kw: Any) -> OutcomeEvent:
    args: dict[str, Any] = {"verify_code": "864475040000123", "timeout": 300, "attempts": 2,
                            "source": "/device-rebind", "time": NOW}  # fmt: skip
    args.update(kw)
    return credential_updated(swap, **args)


def _failed(swap: SwapEvent, **kw: Any) -> OutcomeEvent:
    args: dict[str, Any] = {
        "error_code": "100611",
        "error_desc": "The device is online.",
        "http_status": 400,
        "category": "device_online",
        "recommended_handling": "Wait until the device is offline.",
        "attempts": 5,
        "first_attempt_at": NOW - timedelta(hours=2),
        "last_attempt_at": NOW,
        "source": "/device-rebind",
        "time": NOW,
    }
    args.update(kw)
    return rebind_failed(swap, **args)


def test_credential_updated_event() -> None:
    swap = _decode(_event(appId="app-7"))
    out = _updated(swap)
    assert out.type == UPDATED_TYPE
    assert out.key == DEVICE.encode()
    assert out.headers == [("content-type", b"application/cloudevents+json")]
    doc = orjson.loads(out.value)
    assert doc == {
        "specversion": "1.0",
        "id": out.id,
        "source": "/device-rebind",
        "type": UPDATED_TYPE,
        "time": "2026-11-25T09:30:01Z",
        "subject": DEVICE,
        "datacontenttype": "application/json",
        "data": {
            "deviceId": DEVICE,
            "nodeId": "864475040000123",
            "appId": "app-7",
            "verifyCode": "864475040000123",
            "timeout": 300,
            "attempts": 2,
            "swapEventId": swap.id,
            "context": {"previousNodeId": "864475040000099", "workOrderId": "WO-2026-11-0042"},
        },
    }
    parsed = parse_outcome(out.value)
    assert isinstance(parsed, CredentialUpdatedEvent)
    assert parsed.data.verify_code == "864475040000123"


def test_rebind_failed_event() -> None:
    swap = _decode(_event())
    out = _failed(swap, time=datetime(2026, 11, 25, 11, 30, tzinfo=timezone(timedelta(hours=2))))
    assert out.type == FAILED_TYPE
    doc = orjson.loads(out.value)
    assert doc["time"] == "2026-11-25T09:30:00Z"  # written in UTC
    assert set(doc["data"]) == {
        "deviceId", "nodeId", "appId", "errorCode", "errorDesc", "httpStatus", "category",
        "recommendedHandling", "attempts", "firstAttemptAt", "lastAttemptAt", "swapEventId",
        "context",
    }  # fmt: skip
    assert doc["data"]["firstAttemptAt"] == "2026-11-25T07:30:01Z"
    parsed = parse_outcome(out.value)
    assert isinstance(parsed, RebindFailedEvent)
    assert parsed.data.error_code == "100611"
    assert parsed.data.http_status == 400
    assert parsed.subject == DEVICE

    none = _failed(swap, error_code="TIMEOUT", http_status=None, attempts=0,
                   first_attempt_at=None, last_attempt_at=None)  # fmt: skip
    data = orjson.loads(none.value)["data"]
    assert (data["httpStatus"], data["firstAttemptAt"], data["lastAttemptAt"]) == (None, None, None)


def test_outcome_ids_are_deterministic() -> None:
    swap = _decode(_event())
    first, again = _updated(swap), _updated(swap, time=NOW + timedelta(minutes=5), attempts=9)
    assert first.id == again.id == outcome_id("credential-updated", swap.source, swap.id)
    assert uuid.UUID(first.id).version == 5
    failed = _failed(swap)
    assert failed.id == _failed(swap, attempts=1).id
    assert failed.id == outcome_id("rebind-failed", swap.source, swap.id)
    assert failed.id != first.id
    other = _decode({**_event(), "id": "another-input"})
    assert _updated(other).id != first.id
    # CloudEvents: an event is its source and id together; the same id from another source is
    # another event, with another outcome id
    elsewhere = _decode({**_event(), "source": "/inventory/elsewhere"})
    assert _updated(elsewhere).id != first.id
    assert outcome_id("credential-updated", "a:b", "c") != outcome_id(
        "credential-updated", "a", "b:c"
    )
    # Pinned: a change of namespace or name would silently break downstream deduplication.
    pinned = "4f7f1c3e-0b7a-4c55-9d3c-2f0c6f1d9a10"
    assert outcome_id("credential-updated", "/inventory/x", pinned) == str(
        uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, "urn:device-rebind:outcome"),
                   f"credential-updated:12:/inventory/x:{pinned}")
    )  # fmt: skip


def test_outcome_of_binary_input_is_structured() -> None:
    swap = decode_swap(orjson.dumps(_event()["data"]), _binary_headers())
    doc = orjson.loads(_updated(swap).value)
    assert doc["data"]["swapEventId"] == "b-1"
    assert doc["subject"] == DEVICE


def test_builders_reject_bad_arguments() -> None:
    swap = _decode(_event())
    with pytest.raises(ValueError, match="timezone-aware"):
        _updated(swap, time=datetime(2026, 11, 25, 9, 30))
    with pytest.raises(ValueError, match="timeout"):
        _updated(swap, timeout=-1)
    with pytest.raises(ValueError, match="verify_code"):
        _updated(swap, verify_code="")
    with pytest.raises(ValueError, match="attempts"):
        _updated(swap, attempts=0)
    with pytest.raises(ValueError, match="source"):
        _updated(swap, source="")
    with pytest.raises(ValueError, match="http_status"):
        _failed(swap, http_status=42)


def _rebound(swap: SwapEvent, **kw: Any) -> OutcomeEvent:
    args: dict[str, Any] = {
        "bound_at": NOW + timedelta(seconds=70),
        "via": "push",
        "seconds_to_bind": 71.0,
        "source": "/device-rebind",
        "time": NOW + timedelta(seconds=71),
    }
    args.update(kw)
    return device_rebound(swap, **args)


def test_device_rebound_event() -> None:
    swap = _decode(_event(appId="app-7"))
    out = _rebound(
        swap, bound_at=datetime(2026, 11, 25, 11, 31, 11, tzinfo=timezone(timedelta(hours=2)))
    )
    assert out.type == REBOUND_TYPE
    assert out.key == DEVICE.encode()
    assert out.headers == [("content-type", b"application/cloudevents+json")]
    doc = orjson.loads(out.value)
    assert doc == {
        "specversion": "1.0",
        "id": out.id,
        "source": "/device-rebind",
        "type": REBOUND_TYPE,
        "time": "2026-11-25T09:31:12Z",
        "subject": DEVICE,
        "datacontenttype": "application/json",
        "data": {
            "deviceId": DEVICE,
            "nodeId": "864475040000123",
            "appId": "app-7",
            "swapEventId": swap.id,
            "boundAt": "2026-11-25T09:31:11Z",  # written in UTC
            "via": "push",
            "secondsToBind": 71.0,
            "context": {"previousNodeId": "864475040000099", "workOrderId": "WO-2026-11-0042"},
        },
    }
    parsed = parse_outcome(out.value)
    assert isinstance(parsed, DeviceReboundEvent)
    assert parsed.data.via == "push"
    assert parsed.data.seconds_to_bind == 71.0
    assert parsed.data.bound_at == datetime(2026, 11, 25, 9, 31, 11, tzinfo=UTC)
    assert parsed.subject == DEVICE

    polled = orjson.loads(_rebound(swap, via="poll", seconds_to_bind=0.0004).value)["data"]
    assert (polled["via"], polled["secondsToBind"]) == ("poll", 0.0)  # kept to the millisecond
    whole = orjson.loads(_rebound(swap, seconds_to_bind=42).value)["data"]
    assert whole["secondsToBind"] == 42.0


def test_device_rebound_id_is_deterministic_and_its_own() -> None:
    swap = _decode(_event())
    first = _rebound(swap)
    again = _rebound(swap, time=NOW + timedelta(hours=3), via="poll", seconds_to_bind=9.5)
    assert first.id == again.id
    assert uuid.UUID(first.id).version == 5
    # derived from the swap like the other outcomes, under its own kind
    assert first.id not in (_updated(swap).id, _failed(swap).id)
    other = _decode({**_event(), "id": "another-input"})
    assert _rebound(other).id != first.id


def test_device_rebound_rejects_bad_arguments() -> None:
    swap = _decode(_event())
    with pytest.raises(ValueError, match="via"):
        _rebound(swap, via="sms")
    for bad in (-0.001, float("nan"), float("inf"), True, "12"):
        with pytest.raises(ValueError, match="seconds_to_bind"):
            _rebound(swap, seconds_to_bind=bad)
    with pytest.raises(ValueError, match="timezone-aware"):
        _rebound(swap, bound_at=datetime(2026, 11, 25, 9, 31))
    with pytest.raises(ValueError, match="source"):
        _rebound(swap, source="")


def test_device_rebound_model_rejects_what_the_schema_rejects() -> None:
    doc = orjson.loads(_rebound(_decode(_event())).value)
    for field_name, bad in (
        ("via", "sms"),
        ("secondsToBind", -1),
        ("secondsToBind", True),
        ("secondsToBind", "71"),
        ("boundAt", "2026-11-25 09:31:11Z"),
    ):
        broken = {**doc, "data": {**doc["data"], field_name: bad}}
        with pytest.raises(ValueError, match="validation error"):
            parse_outcome(orjson.dumps(broken))
    extra = {**doc, "data": {**doc["data"], "verifyCode": "x"}}
    with pytest.raises(ValueError, match="validation error"):
        parse_outcome(orjson.dumps(extra))


def test_error_desc_is_clipped() -> None:
    out = _failed(_decode(_event()), error_desc="e" * 10_000)
    desc = orjson.loads(out.value)["data"]["errorDesc"]
    assert len(desc) == 1024
    assert desc.endswith("...")


def test_parse_outcome_rejects_other_documents() -> None:
    with pytest.raises(ValueError, match="not an outcome type"):
        parse_outcome(orjson.dumps(_event()))
    with pytest.raises(ValueError, match="not an outcome type"):
        parse_outcome(b"[]")
    with pytest.raises(ValueError):  # noqa: PT011  (orjson's own message)
        parse_outcome(b"{")


# --------------------------------------------------------------------------------------------
# Dead letters
# --------------------------------------------------------------------------------------------


def test_dead_letter_headers_keep_originals_and_append_reason() -> None:
    original = [("content-type", b"application/json"), ("traceparent", b"00-abc"), ("x", b"1")]
    headers = dead_letter_headers(
        original, reason="not_json", detail="value is not JSON", topic="asset.device-swapped.v1",
        partition=2, offset=41,
    )  # fmt: skip
    assert headers[:3] == original
    assert headers[3:] == [
        (DLQ_REASON_HEADER, b"not_json"),
        (DLQ_DETAIL_HEADER, b"value is not JSON"),
        (SOURCE_TOPIC_HEADER, b"asset.device-swapped.v1"),
        (SOURCE_PARTITION_HEADER, b"2"),
        (SOURCE_OFFSET_HEADER, b"41"),
    ]


def test_dead_letter_headers_replace_an_earlier_dead_lettering() -> None:
    first = dead_letter_headers(
        [("a", b"1")], reason="not_json", detail="d1", topic="t1", partition=0, offset=1
    )
    second = dead_letter_headers(
        first, reason="invalid_data", detail="d2", topic="t2", partition=5, offset=9
    )
    names = [name for name, _ in second]
    assert names.count(DLQ_REASON_HEADER) == 1
    assert len(second) == 6
    assert dict(second)[DLQ_REASON_HEADER] == b"invalid_data"
    assert dict(second)[SOURCE_TOPIC_HEADER] == b"t2"


def test_dead_letter_detail_is_bounded() -> None:
    headers = dead_letter_headers(
        [], reason="invalid_data", detail="é" * 5000, topic="t", partition=0, offset=0
    )
    assert len(dict(headers)[DLQ_DETAIL_HEADER].decode()) <= 1000
