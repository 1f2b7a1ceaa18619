"""The JSON Schemas in schemas/ and the pydantic models in service.events agree.

Every example file is judged the same way by both; outputs of the builders are valid by the
schemas; asyncapi.yaml is well-formed and points at files that exist.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from jsonschema import Draft202012Validator, FormatChecker

from service.events import (
    FAILED_TYPE,
    INVALID_REASONS,
    REBOUND_TYPE,
    UPDATED_TYPE,
    CredentialUpdatedEvent,
    DeviceReboundEvent,
    InvalidEvent,
    RebindFailedEvent,
    credential_updated,
    dead_letter_headers,
    decode_swap,
    device_rebound,
    rebind_failed,
)
from service.platform.errors import (
    BIND_EXPIRED,
    BIND_NOT_CONFIRMED,
    ERROR_TABLE,
    SERVICE_CODES,
    Category,
    classify,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
EXAMPLES = SCHEMAS / "examples"

# An independent RFC 3339 date-time check (the jsonschema extra that provides one is not a
# dependency): offset required, fields in range, no leap second.
_DATE_TIME = re.compile(
    r"\d{4}-\d\d-\d\d[Tt](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-](\d\d):(\d\d))", re.ASCII
)
FORMATS = FormatChecker(formats=())


@FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(instance: object) -> bool:
    if not isinstance(instance, str):
        return True
    match = _DATE_TIME.fullmatch(instance)
    if match is None:
        return False
    datetime.strptime(instance[:10], "%Y-%m-%d")  # raises for month 13, Feb 30, year 0
    hour, minute, second = (int(g) for g in match.group(1, 2, 3))
    if match.group(6) is not None and (int(match.group(6)) > 23 or int(match.group(7)) > 59):
        return False
    return hour <= 23 and minute <= 59 and second <= 59


def _validator(name: str) -> Draft202012Validator:
    schema = orjson.loads((SCHEMAS / name).read_bytes())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FORMATS)


SWAPPED = _validator("device-swapped.v1.schema.json")
UPDATED = _validator("credential-updated.v1.schema.json")
FAILED = _validator("rebind-failed.v1.schema.json")
REBOUND = _validator("device-rebound.v1.schema.json")
DLQ = _validator("dead-letter-headers.schema.json")
SWAPPED_DATA = Draft202012Validator(
    orjson.loads((SCHEMAS / "device-swapped.v1.schema.json").read_bytes())["properties"]["data"],
    format_checker=FORMATS,
)
CE_JSON = [("content-type", b"application/cloudevents+json")]


def _files(folder: str, prefix: str) -> list[Path]:
    return sorted((EXAMPLES / folder).glob(f"{prefix}.*.json"))


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_format_checker_is_strict() -> None:
    assert FORMATS.conforms("2026-11-25T09:30:00Z", "date-time")
    assert FORMATS.conforms("2026-11-25T09:30:00.5+05:30", "date-time")
    for bad in ("2026-11-25T09:30:00", "2026-11-25 09:30:00Z", "2026-02-30T00:00:00Z", "now"):
        assert not FORMATS.conforms(bad, "date-time"), bad


def test_every_schema_has_an_urn_id() -> None:
    for path in SCHEMAS.glob("*.schema.json"):
        schema = orjson.loads(path.read_bytes())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"].startswith("urn:device-rebind:schema:")


def test_there_are_enough_examples() -> None:
    for prefix in ("device-swapped", "credential-updated", "rebind-failed", "device-rebound"):
        assert len(_files("valid", prefix)) >= 2, prefix
        assert len(_files("invalid", prefix)) >= 3, prefix
    assert len(list((EXAMPLES / "binary").glob("*.json"))) >= 6


# --------------------------------------------------------------------------------------------
# Input examples: schema and decode_swap agree
# --------------------------------------------------------------------------------------------

INPUT_VALID = _files("valid", "device-swapped")
INPUT_INVALID = _files("invalid", "device-swapped")


@pytest.mark.parametrize("path", INPUT_VALID, ids=_ids(INPUT_VALID))
def test_valid_input_example(path: Path) -> None:
    raw = path.read_bytes()
    errors = [e.message for e in SWAPPED.iter_errors(orjson.loads(raw))]
    assert errors == []
    event = decode_swap(raw, CE_JSON)
    assert event.data.device_id
    assert decode_swap(raw, []) == event  # content-type header may be absent


@pytest.mark.parametrize("path", INPUT_INVALID, ids=_ids(INPUT_INVALID))
def test_invalid_input_example(path: Path) -> None:
    raw = path.read_bytes()
    assert not SWAPPED.is_valid(orjson.loads(raw))
    with pytest.raises(InvalidEvent) as info:
        decode_swap(raw, CE_JSON)
    expected = path.name.split(".")[1]  # device-swapped.<reason>.<what>.json
    assert expected in INVALID_REASONS
    assert info.value.reason == expected, info.value.detail


# --------------------------------------------------------------------------------------------
# Binary mode examples: judged by decode_swap (headers are not a JSON document)
# --------------------------------------------------------------------------------------------

BINARY = sorted((EXAMPLES / "binary").glob("*.json"))


def _binary_record(path: Path) -> tuple[bytes, list[tuple[str, bytes]]]:
    wrapper: dict[str, Any] = orjson.loads(path.read_bytes())
    headers = [(k, v.encode()) for k, v in wrapper["headers"].items()]
    if "valueText" in wrapper:
        return wrapper["valueText"].encode(), headers
    return orjson.dumps(wrapper["value"]), headers


@pytest.mark.parametrize("path", BINARY, ids=_ids(BINARY))
def test_binary_example(path: Path) -> None:
    value, headers = _binary_record(path)
    parts = path.name.split(".")  # device-swapped.binary-mode.<valid|invalid>[.<reason>].<what>
    if parts[2] == "valid":
        event = decode_swap(value, headers)
        assert event.id == dict(headers)["ce_id"].decode()
        # The data on its own is valid by the data part of the structured schema.
        data_errors = [e.message for e in SWAPPED_DATA.iter_errors(orjson.loads(value))]
        assert data_errors == []
    else:
        assert parts[2] == "invalid"
        with pytest.raises(InvalidEvent) as info:
            decode_swap(value, headers)
        assert info.value.reason == parts[3], info.value.detail


# --------------------------------------------------------------------------------------------
# Output examples: schema and the pydantic models agree
# --------------------------------------------------------------------------------------------

OUTPUT_MODELS: dict[str, tuple[Draft202012Validator, type[Any]]] = {
    "credential-updated": (UPDATED, CredentialUpdatedEvent),
    "rebind-failed": (FAILED, RebindFailedEvent),
    "device-rebound": (REBOUND, DeviceReboundEvent),
}
OUTPUT_VALID = [p for kind in OUTPUT_MODELS for p in _files("valid", kind)]
OUTPUT_INVALID = [p for kind in OUTPUT_MODELS for p in _files("invalid", kind)]


@pytest.mark.parametrize("path", OUTPUT_VALID, ids=_ids(OUTPUT_VALID))
def test_valid_output_example(path: Path) -> None:
    validator, model = OUTPUT_MODELS[path.name.split(".")[0]]
    doc = orjson.loads(path.read_bytes())
    assert [e.message for e in validator.iter_errors(doc)] == []
    model.model_validate(doc)


@pytest.mark.parametrize("path", OUTPUT_INVALID, ids=_ids(OUTPUT_INVALID))
def test_invalid_output_example(path: Path) -> None:
    validator, model = OUTPUT_MODELS[path.name.split(".")[0]]
    doc = orjson.loads(path.read_bytes())
    assert not validator.is_valid(doc)
    with pytest.raises(ValueError, match="validation error"):
        model.model_validate(doc)


# --------------------------------------------------------------------------------------------
# Builders produce schema-valid events
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", INPUT_VALID, ids=_ids(INPUT_VALID))
def test_builder_outputs_are_schema_valid(path: Path) -> None:
    swap = decode_swap(path.read_bytes(), CE_JSON)
    now = datetime(2026, 11, 25, 9, 30, 1, 250_000, tzinfo=UTC)
    ok = credential_updated(
        swap,
        verify_code=swap.data.verify_code or swap.data.node_id,
        timeout=0,
        attempts=1,
        source="/device-rebind",
        time=now,
    )
    failed = rebind_failed(
        swap,
        error_code="100611",
        error_desc="The device is online.",
        http_status=400,
        category="device_online",
        recommended_handling="Wait until the device is offline.",
        attempts=4,
        first_attempt_at=now,
        last_attempt_at=now,
        source="/device-rebind",
        time=now,
    )
    never = rebind_failed(
        swap,
        error_code="SUPERSEDED",
        error_desc="",
        http_status=None,
        category="superseded",
        recommended_handling="",
        attempts=0,
        first_attempt_at=None,
        last_attempt_at=None,
        source="/device-rebind",
        time=now,
    )
    bound = device_rebound(
        swap,
        bound_at=now,
        via="push",
        seconds_to_bind=71.25,
        source="/device-rebind",
        time=now,
    )
    polled = device_rebound(
        swap, bound_at=now, via="poll", seconds_to_bind=0, source="/device-rebind", time=now
    )
    bind_failures = [
        rebind_failed(
            swap,
            error_code=spec.code,
            error_desc=spec.description,
            http_status=None,
            category=spec.category,
            recommended_handling=spec.recommended_handling,
            attempts=1,
            first_attempt_at=now,
            last_attempt_at=now,
            source="/device-rebind",
            time=now,
        )
        for spec in (classify("any", None, BIND_EXPIRED), classify("any", None, BIND_NOT_CONFIRMED))
    ]
    for outcome, validator, event_type in (
        (ok, UPDATED, UPDATED_TYPE),
        (failed, FAILED, FAILED_TYPE),
        (never, FAILED, FAILED_TYPE),
        (bound, REBOUND, REBOUND_TYPE),
        (polled, REBOUND, REBOUND_TYPE),
        *((f, FAILED, FAILED_TYPE) for f in bind_failures),
    ):
        doc = orjson.loads(outcome.value)
        assert [e.message for e in validator.iter_errors(doc)] == []
        assert doc["type"] == event_type == outcome.type


def test_rebind_failed_schema_documents_every_code_and_category() -> None:
    schema = orjson.loads((SCHEMAS / "rebind-failed.v1.schema.json").read_bytes())
    data = schema["properties"]["data"]["properties"]
    documented_codes = data["errorCode"]["description"]
    documented_categories = data["category"]["description"]
    for code in sorted(SERVICE_CODES):
        assert code in documented_codes, code
    for category in Category:
        assert category.value in documented_categories, category
    # the bind codes are rows of the error table, terminal, with their own categories
    for code, category in (
        (BIND_EXPIRED, Category.BIND_EXPIRED),
        (BIND_NOT_CONFIRMED, Category.BIND_UNCONFIRMED),
    ):
        [row] = [spec for spec in ERROR_TABLE if spec.code == code]
        assert row.terminal
        assert row.category == category
        assert classify("refresh_device_key", None, code) is row


def test_dead_letter_headers_match_their_schema() -> None:
    for reason in sorted(INVALID_REASONS):
        headers = dead_letter_headers(
            [("content-type", b"application/json")],
            reason=reason,
            detail="x" * 5000,
            topic="asset.device-swapped.v1",
            partition=3,
            offset=123456789,
        )
        as_map = {k: v.decode() for k, v in headers}
        assert [e.message for e in DLQ.iter_errors(as_map)] == []


# --------------------------------------------------------------------------------------------
# AsyncAPI
# --------------------------------------------------------------------------------------------


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def _pointer(doc: Any, fragment: str) -> Any:
    for part in fragment.lstrip("/").split("/"):
        if part:
            doc = doc[part.replace("~1", "/").replace("~0", "~")]
    return doc


def test_asyncapi_document() -> None:
    doc = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text(encoding="utf-8"))
    assert doc["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {
        "asset.device-swapped.v1",
        "asset.device-swapped.urgent.v1",
        "iot.credential-updated.v1",
        "iot.rebind-failed.v1",
        "asset.device-swapped.v1.dlq",
        "device-rebind.retry.v1",
        "iot.device-rebound.v1",
        "device-rebind.bind-notify.v1",
    }
    actions = {op["action"] for op in doc["operations"].values()}
    assert actions == {"send", "receive"}
    assert "service-owned" in doc["channels"]["retry"]["title"]
    assert "service-owned" in doc["channels"]["bindNotify"]["title"]
    sent = {
        op["channel"]["$ref"].rsplit("/", 1)[-1]
        for op in doc["operations"].values()
        if op["action"] == "send"
    }
    assert {"deviceRebound", "bindNotify"} <= sent
    referenced_files = set()
    for ref in _refs(doc):
        target, _, fragment = ref.partition("#")
        if target:
            path = (SCHEMAS / target).resolve()
            assert path.is_file(), ref
            referenced_files.add(path.name)
            _pointer(orjson.loads(path.read_bytes()), fragment)
        else:
            _pointer(doc, fragment)  # local references resolve
    assert referenced_files >= {
        "device-swapped.v1.schema.json",
        "credential-updated.v1.schema.json",
        "rebind-failed.v1.schema.json",
        "device-rebound.v1.schema.json",
        "dead-letter-headers.schema.json",
    }
