"""Event contracts: the device-swapped input, the outcome events and the dead-letter headers.

Everything that crosses the Kafka boundary as bytes is turned into a model here, and back.
The rules are those of the README's event contracts; the JSON Schemas in ``schemas/``
say the same thing for other systems (the tests keep the two in step).

Input (:func:`decode_swap`) accepts CloudEvents 1.0 in

* structured mode: the value is the whole event as JSON; the ``content-type`` header is absent,
  ``application/cloudevents+json`` or ``application/json`` (without ``ce_*`` headers), and
* binary mode: the ``ce_specversion``, ``ce_id``, ``ce_source``, ``ce_type`` (and optional
  ``ce_time``, ``ce_subject``) Kafka headers carry the attributes, ``content-type`` (absent or
  ``application/json``) is the ``datacontenttype`` and the value is the ``data`` JSON.

Every problem with the bytes ends in :class:`InvalidEvent` with a ``reason`` from a closed set;
nothing else is raised for any input, so a bad record can always be dead-lettered.

Decisions beyond the contract page (also in ``schemas/README.md``):

* ``subject``, when present, must equal ``data.deviceId`` (else ``invalid_data``): the key, the
  subject and the data must not disagree about which device is meant.
* ``id`` is 1..256 characters and ``source`` 1..2048: the id is the idempotency key and is stored.
* ``time`` is RFC 3339 with an offset (``Z`` or ``+hh:mm``); leap second ``60`` is rejected.
* ``timeout`` is an integer; a JSON number with a zero fraction (``300.0``) counts as an integer,
  as in JSON Schema; ``true``/``false`` and strings are rejected.
* Optional attributes and optional data fields may be ``null`` (= absent).
* Unknown envelope attributes (CloudEvents extensions) are ignored; unknown data fields are kept
  and passed through as ``context``. ``previousNodeId`` is passed through in ``context`` too.
* ``context`` nested deeper than :data:`MAX_CONTEXT_DEPTH` is rejected, so that an accepted input
  can always be written back out (orjson refuses deeper documents).
* Secrets never appear in any of these models.
"""

from __future__ import annotations

import math
import re
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Final, Literal, get_args

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "CONTENT_TYPE",
    "CONTEXT_TRUNCATED_HEADER",
    "DATA_CONTENT_TYPE",
    "DEFAULT_MAX_RECORD_BYTES",
    "DLQ_DETAIL_HEADER",
    "DLQ_REASON_HEADER",
    "FAILED_TYPE",
    "INVALID_REASONS",
    "MAX_CONTEXT_DEPTH",
    "MAX_DETAIL_CHARS",
    "ORIGINAL_SIZE_HEADER",
    "OUTCOME_HEADROOM_BYTES",
    "OUTCOME_ID_NAMESPACE",
    "REBOUND_TYPE",
    "SOURCE_OFFSET_HEADER",
    "SOURCE_PARTITION_HEADER",
    "SOURCE_TOPIC_HEADER",
    "SWAPPED_TYPE",
    "UPDATED_TYPE",
    "CredentialUpdatedData",
    "CredentialUpdatedEvent",
    "DeviceReboundData",
    "DeviceReboundEvent",
    "InvalidEvent",
    "InvalidReason",
    "OutcomeEvent",
    "OutcomeKind",
    "RebindFailedData",
    "RebindFailedEvent",
    "SwapData",
    "SwapEvent",
    "credential_updated",
    "dead_letter_headers",
    "decode_swap",
    "device_id_problem",
    "device_rebound",
    "encode_swap",
    "outcome_id",
    "parse_outcome",
    "parse_rfc3339",
    "rebind_failed",
    "record_size",
    "trim_context",
]

SWAPPED_TYPE: Final = "com.iot.asset.device.swapped.v1"
UPDATED_TYPE: Final = "com.iot.device.credential-updated.v1"
FAILED_TYPE: Final = "com.iot.device.rebind-failed.v1"
REBOUND_TYPE: Final = "com.iot.device.rebound.v1"
CONTENT_TYPE: Final = "application/cloudevents+json"
DATA_CONTENT_TYPE: Final = "application/json"

DLQ_REASON_HEADER: Final = "rebind-error-reason"
DLQ_DETAIL_HEADER: Final = "rebind-error-detail"
SOURCE_TOPIC_HEADER: Final = "rebind-source-topic"
SOURCE_PARTITION_HEADER: Final = "rebind-source-partition"
SOURCE_OFFSET_HEADER: Final = "rebind-source-offset"
"""Where a record was read: on every dead letter and every outcome (``device-rebind replay``)."""
_DLQ_HEADERS: Final = frozenset(
    {
        DLQ_REASON_HEADER,
        DLQ_DETAIL_HEADER,
        SOURCE_TOPIC_HEADER,
        SOURCE_PARTITION_HEADER,
        SOURCE_OFFSET_HEADER,
    }
)

ORIGINAL_SIZE_HEADER: Final = "rebind-original-size"
"""On a ``too_large`` dead letter: the size of the record it stands for (key, value, headers)."""
CONTEXT_TRUNCATED_HEADER: Final = "rebind-context-truncated"
"""On the service's own compact copy of a swap (see :func:`encode_swap`): its context was
trimmed, so its outcome says ``contextTruncated``."""

DEFAULT_MAX_RECORD_BYTES: Final = 983_040
"""The largest record the service reads or writes (``REBIND_KAFKA__MAX_INPUT_BYTES``): 960 KiB,
64 KiB under the 1 MiB request limit of its producers (keys, headers and batch overhead fit in
between)."""
OUTCOME_HEADROOM_BYTES: Final = 16_384
"""What an outcome's value leaves free under the record limit: the outcome's key and headers,
and in the duplicate memory's copy of it, the key (source and id) and the outcome's key."""

#: Fixed namespace of the outcome ids: ``uuid5(NAMESPACE_URL, "urn:device-rebind:outcome")``.
OUTCOME_ID_NAMESPACE: Final = uuid.UUID("6d9d1f33-6411-5b1e-a7ce-4ff84b337484")

MAX_DETAIL_CHARS: Final = 1000
MAX_CONTEXT_DEPTH: Final = 64
MAX_ERROR_DESC_CHARS: Final = 1024
_INT32_MAX: Final = 2_147_483_647

InvalidReason = Literal[
    "missing_value",
    "too_large",
    "not_utf8",
    "not_json",
    "not_cloudevent",
    "unsupported_specversion",
    "wrong_type",
    "invalid_data",
    "invalid_device_id",
    "key_mismatch",
    "clock_skew",
]
"""``invalid_device_id``: a deviceId that cannot stay one URL path segment (see
:func:`device_id_problem`). ``key_mismatch``: the record's Kafka key differs from
``data.deviceId`` (given by the pipeline, which sees the key). ``clock_skew``: the event's
``time`` lies more than ``REBIND_KAFKA__MAX_CLOCK_SKEW_SECONDS`` after its record's timestamp
(given by the pipeline, which sees the timestamp): trusted, it would decide the order of the
device's swaps for as long as its clock is ahead."""
INVALID_REASONS: Final[frozenset[str]] = frozenset(get_args(InvalidReason))


class InvalidEvent(Exception):  # noqa: N818  (the name is the contract's)
    """An input record that cannot be processed; it goes to the dead-letter topic.

    ``reason`` is one of :data:`INVALID_REASONS` (a bounded metric/header value);
    ``detail`` is for humans, at most :data:`MAX_DETAIL_CHARS` characters, never a raw value.
    """

    def __init__(self, reason: InvalidReason, detail: str) -> None:
        self.reason: str = reason
        self.detail: str = _clip(detail, MAX_DETAIL_CHARS)
        super().__init__(f"{reason}: {self.detail}")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: object, limit: int = 64) -> str:
    """A short, safe rendering of a value for an error detail."""
    return _clip(repr(value), limit)


# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 date-time (offset required; fractions beyond µs truncated).

    Raises ``ValueError`` for anything else, including leap seconds and out-of-range fields.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("must be an RFC 3339 date-time with offset, e.g. 2026-11-25T09:30:00Z")
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    fraction = match.group(7)
    micro = int((fraction + "00000")[:6]) if fraction else 0
    if match.group(8):
        tz: timezone = UTC
    else:
        off_h, off_m = int(match.group(10)), int(match.group(11))
        if off_h > 23 or off_m > 59:
            raise ValueError("RFC 3339 offset out of range")
        delta = timedelta(hours=off_h, minutes=off_m)
        tz = timezone(-delta if match.group(9) == "-" else delta)
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        raise ValueError("RFC 3339 date-time with a field out of range") from None


def _to_datetime(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse_rfc3339(value)
        except ValueError as exc:
            raise PydanticCustomError("rfc3339", str(exc)) from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise PydanticCustomError("rfc3339", "date-time must carry a UTC offset")
        return value
    if value is None:
        return None
    raise PydanticCustomError("rfc3339", "must be an RFC 3339 date-time string")


def _to_int(value: Any) -> Any:
    """Integers as JSON Schema sees them: ints and zero-fraction numbers; never booleans."""
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "must be an integer, not a boolean")
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise PydanticCustomError("int_type", "must be an integer")
    return value


# Unicode White_Space (the controls among them are refused as controls anyway).
_WHITESPACE: Final = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)
_PATH_CHARS: Final = frozenset("/\\?#%")


def device_id_problem(device_id: str) -> str | None:
    """Why ``device_id`` cannot be a deviceId, or None.

    The id becomes one segment of the platform's URL paths (percent-encoded), so it must not
    be a dot segment (``.``, ``..``: URL normalisation removes them), contain ``/``, a
    backslash, ``?``, ``#`` or ``%`` (separators, or escapes that proxies decode), a control
    character (Unicode Cc), or consist of whitespace only.
    """
    if device_id in (".", ".."):
        return "must not be a dot segment ('.' or '..')"
    for ch in device_id:
        if ch in _PATH_CHARS:
            return f"must not contain {ch!r}"
        if unicodedata.category(ch) == "Cc":
            return f"must not contain a control character (U+{ord(ch):04X})"
    if all(ch in _WHITESPACE for ch in device_id):
        return "must not be whitespace only"
    return None


def _check_device_id(value: str) -> str:
    problem = device_id_problem(value)
    if problem is not None:
        raise PydanticCustomError("invalid_device_id", problem)
    return value


Rfc3339 = Annotated[datetime, BeforeValidator(_to_datetime)]
StrictInt = Annotated[int, BeforeValidator(_to_int)]
Id256 = Annotated[str, Field(min_length=1, max_length=256)]


def _depth(value: object, limit: int) -> bool:
    """True when ``value`` nests no deeper than ``limit`` containers (iterative, bounded)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > limit:
            return False
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return True


# --------------------------------------------------------------------------------------------
# Input: device swapped
# --------------------------------------------------------------------------------------------


class SwapData(BaseModel):
    """``data`` of a device-swapped event. Unknown fields are kept, see :attr:`context`."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    device_id: Annotated[Id256, AfterValidator(_check_device_id)] = Field(alias="deviceId")
    node_id: Id256 = Field(alias="nodeId")
    previous_node_id: Id256 | None = Field(default=None, alias="previousNodeId")
    app_id: Id256 | None = Field(default=None, alias="appId")
    verify_code: Id256 | None = Field(default=None, alias="verifyCode")
    timeout: Annotated[StrictInt, Field(ge=0, le=_INT32_MAX)] | None = Field(
        default=None, alias="timeout"
    )

    @model_validator(mode="after")
    def _context_bounded(self) -> SwapData:
        extra = self.__pydantic_extra__
        if extra and not _depth(extra, MAX_CONTEXT_DEPTH):
            raise PydanticCustomError(
                "context_depth",
                "extra fields nest deeper than {limit} levels",
                {"limit": MAX_CONTEXT_DEPTH},
            )
        return self

    @property
    def context(self) -> dict[str, Any]:
        """The fields this service does not know, unchanged."""
        return dict(self.__pydantic_extra__ or {})


class SwapEvent(BaseModel):
    """A device-swapped CloudEvent (structured or binary mode, same model)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    specversion: Literal["1.0"]
    id: Id256
    source: Annotated[str, Field(min_length=1, max_length=2048)]
    type: Literal["com.iot.asset.device.swapped.v1"]
    time: Rfc3339 | None = None
    subject: Id256 | None = None
    datacontenttype: Literal["application/json"] | None = None
    data: SwapData

    @model_validator(mode="after")
    def _subject_is_device(self) -> SwapEvent:
        if self.subject is not None and self.subject != self.data.device_id:
            raise PydanticCustomError("subject_mismatch", "subject must equal data.deviceId")
        return self

    @property
    def context(self) -> dict[str, Any]:
        """What the outcome event carries as ``data.context``.

        The unknown data fields, plus ``previousNodeId`` when it was given.
        """
        ctx = self.data.context
        if self.data.previous_node_id is not None:
            ctx = {"previousNodeId": self.data.previous_node_id, **ctx}
        return ctx


def _summarise(exc: ValidationError) -> str:
    parts: list[str] = []
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    for err in errors[:5]:
        path = ".".join(_clip(str(p), 40) for p in err["loc"]) or "(event)"
        parts.append(f"{path}: {_clip(err['msg'], 160)}")
    if len(errors) > 5:
        parts.append(f"(+{len(errors) - 5} more)")
    return "; ".join(parts)


def _reason_for(exc: ValidationError) -> InvalidReason:
    device_id = False
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = err["loc"]
        if loc and loc[0] == "data":
            device_id = device_id or err["type"] == "invalid_device_id"
            continue
        if not loc and err["type"] in ("subject_mismatch",):
            continue
        return "not_cloudevent"
    return "invalid_device_id" if device_id else "invalid_data"


def _media_type(raw: str) -> str:
    return raw.split(";", 1)[0].strip().lower()


def _loads(value: bytes, what: str) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise InvalidEvent(
                "not_utf8", f"{what} is not UTF-8 (byte offset {uexc.start})"
            ) from None
        raise InvalidEvent("not_json", f"{what} is not JSON: {_clip(str(exc), 200)}") from None


def _header_text(name: str, raw: object) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise InvalidEvent("not_cloudevent", f"header {name!r} is not bytes")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent("not_utf8", f"header {name!r} is not UTF-8") from None


_BINARY_ATTRS: Final = {
    "ce_specversion": "specversion",
    "ce_id": "id",
    "ce_source": "source",
    "ce_type": "type",
    "ce_time": "time",
    "ce_subject": "subject",
}


def decode_swap(
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    *,
    max_bytes: int = 1_048_576,
) -> SwapEvent:
    """Decode one Kafka record into a :class:`SwapEvent`.

    Raises :class:`InvalidEvent` (and nothing else) when the record is not a valid
    device-swapped CloudEvent; ``max_bytes`` bounds the value plus the ``ce_*`` headers.
    """
    try:
        return _decode(value, headers, max_bytes)
    except InvalidEvent:
        raise
    except Exception as exc:  # the promise: a bad record never escapes as anything else
        raise InvalidEvent("not_cloudevent", f"undecodable record ({type(exc).__name__})") from exc


def _read_headers(
    headers: Sequence[tuple[str, bytes]],
) -> tuple[str | None, dict[str, str], int]:
    """The media type of ``content-type``, the ``ce_*`` attributes and their total size."""
    content_type: str | None = None
    attrs: dict[str, str] = {}
    size = 0
    for name, raw in headers:
        lname = name.lower()
        if lname == "content-type":
            content_type = _media_type(_header_text(name, raw))
        elif lname in _BINARY_ATTRS:
            if lname in attrs:
                raise InvalidEvent("not_cloudevent", f"header {lname!r} appears more than once")
            text = _header_text(name, raw)
            size += len(text)
            attrs[lname] = text
    return content_type, attrs, size


def _decode(value: bytes | None, headers: Sequence[tuple[str, bytes]], max_bytes: int) -> SwapEvent:
    if value is None or len(value) == 0:
        raise InvalidEvent("missing_value", "record has no value (tombstone or empty)")
    if len(value) > max_bytes:
        raise InvalidEvent("too_large", f"value is {len(value)} bytes, limit {max_bytes}")
    content_type, attrs, attrs_size = _read_headers(headers)
    if len(value) + attrs_size > max_bytes:
        raise InvalidEvent("too_large", f"value and ce_ headers exceed {max_bytes} bytes")

    if content_type is not None and content_type.startswith("application/cloudevents"):
        if content_type != CONTENT_TYPE:
            raise InvalidEvent("not_cloudevent", f"unsupported content-type {_show(content_type)}")
        event = _loads(value, "value")
    elif "ce_specversion" in attrs:
        if content_type not in (None, DATA_CONTENT_TYPE):
            raise InvalidEvent(
                "not_cloudevent",
                f"binary mode needs content-type application/json, got {_show(content_type)}",
            )
        data = _loads(value, "value")
        event = {_BINARY_ATTRS[k]: v for k, v in attrs.items()}
        event["datacontenttype"] = DATA_CONTENT_TYPE
        event["data"] = data
    elif content_type in (None, DATA_CONTENT_TYPE):
        event = _loads(value, "value")
    else:
        raise InvalidEvent("not_cloudevent", f"unsupported content-type {_show(content_type)}")
    return _validate(event)


def _validate(event: Any) -> SwapEvent:
    if not isinstance(event, dict):
        raise InvalidEvent("not_cloudevent", f"event is a JSON {type(event).__name__}, not object")
    spec = event.get("specversion")
    if spec is None:
        raise InvalidEvent("not_cloudevent", "specversion is missing")
    if spec != "1.0":
        raise InvalidEvent("unsupported_specversion", f"specversion {_show(spec)} is not 1.0")
    etype = event.get("type")
    if not isinstance(etype, str):
        raise InvalidEvent("not_cloudevent", "type is missing or not a string")
    if etype != SWAPPED_TYPE:
        raise InvalidEvent("wrong_type", f"type {_show(etype, 120)} is not {SWAPPED_TYPE}")
    if "data" in event and not isinstance(event["data"], dict):
        raise InvalidEvent(
            "invalid_data", f"data is a JSON {type(event['data']).__name__}, not object"
        )
    try:
        return SwapEvent.model_validate(event)
    except ValidationError as exc:
        raise InvalidEvent(_reason_for(exc), _summarise(exc)) from None


# --------------------------------------------------------------------------------------------
# Output: credential-updated, rebind-failed and device-rebound
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutcomeEvent:
    """An encoded outcome, ready to produce: key = deviceId, value = structured CloudEvent."""

    id: str
    type: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]] = field(
        default_factory=lambda: [("content-type", CONTENT_TYPE.encode())]
    )


OutcomeKind = Literal["credential-updated", "rebind-failed", "device-rebound"]
"""The outcome kinds: the prefix of the name an outcome's id is derived from."""


def outcome_id(kind: OutcomeKind, input_source: str, input_id: str) -> str:
    """The deterministic id of the outcome of kind ``kind`` for the input event identified by
    ``input_source`` and ``input_id`` (CloudEvents: an event is its source and id together, so
    two events with the same id from two sources get two outcome ids). The source is
    length-prefixed, so no (source, id) pair can spell another."""
    name = f"{kind}:{len(input_source)}:{input_source}:{input_id}"
    return str(uuid.uuid5(OUTCOME_ID_NAMESPACE, name))


def record_size(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
) -> int:
    """A record's size as the limits count it: key, value, header names and values."""
    return (
        len(key or b"")
        + len(value or b"")
        + sum(len(name.encode("utf-8", "surrogatepass")) + len(raw or b"") for name, raw in headers)
    )


def trim_context(context: dict[str, Any], room: int) -> tuple[dict[str, Any], bool]:
    """``context`` if its JSON fits in ``room`` bytes, else the largest subset of its fields (the
    smallest first, kept in their order) that fits, and True."""
    if len(orjson.dumps(context)) <= room:
        return context, False
    sizes = sorted(
        ((len(orjson.dumps({name: value})) - 1, name) for name, value in context.items()),
        key=lambda item: item[0],
    )
    kept: set[str] = set()
    used = 2  # the braces
    for size, name in sizes:
        if used + size > room:
            break
        kept.add(name)
        used += size
    return {name: value for name, value in context.items() if name in kept}, True


def encode_swap(swap: SwapEvent, *, max_bytes: int) -> bytes:
    """``swap`` as a structured CloudEvent of at most ``max_bytes`` bytes: every attribute and
    data field the service uses, and as much of the context as fits (:func:`trim_context`).

    :func:`decode_swap` reads it back as the same swap (with the trimmed context). The service
    keeps such a copy of a waiting swap whose input is too large to keep as it is.
    """
    d = swap.data
    optional = {
        "previousNodeId": d.previous_node_id,
        "appId": d.app_id,
        "verifyCode": d.verify_code,
        "timeout": d.timeout,
    }
    data: dict[str, Any] = {
        "deviceId": d.device_id,
        "nodeId": d.node_id,
        **{name: value for name, value in optional.items() if value is not None},
    }
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": swap.id,
        "source": swap.source,
        "type": swap.type,
        "datacontenttype": DATA_CONTENT_TYPE,
        "data": data,
    }
    if swap.time is not None:
        event["time"] = swap.time
    if swap.subject is not None:
        event["subject"] = swap.subject
    room = max_bytes - len(orjson.dumps(event, option=_DUMP_OPTS))
    context, _ = trim_context(d.context, room)
    data.update(context)
    return orjson.dumps(event, option=_DUMP_OPTS)


def _utc(name: str, value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value.astimezone(UTC)


_DUMP_OPTS: Final = orjson.OPT_UTC_Z


def _envelope(
    kind: OutcomeKind,
    event_type: str,
    swap: SwapEvent,
    *,
    source: str,
    time: datetime,
    data: dict[str, Any],
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    context_truncated: bool = False,
) -> OutcomeEvent:
    """The outcome event; its value stays within ``max_bytes - OUTCOME_HEADROOM_BYTES``: when
    ``data.context`` does not fit, it is trimmed (:func:`trim_context`) and ``data`` says
    ``contextTruncated: true`` (as it does when ``context_truncated``: the swap's context was
    trimmed before, see :func:`encode_swap`)."""
    if not source:
        raise ValueError("source must not be empty")
    event_id = outcome_id(kind, swap.source, swap.id)
    device_id = swap.data.device_id
    body = {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": event_type,
        "time": _utc("time", time),
        "subject": device_id,
        "datacontenttype": DATA_CONTENT_TYPE,
        "data": data,
    }
    value = orjson.dumps(body, option=_DUMP_OPTS)
    limit = max_bytes - OUTCOME_HEADROOM_BYTES
    if context_truncated or len(value) > limit:
        context = data.get("context") or {}
        body["data"] = data = {**data, "context": {}, "contextTruncated": True}
        room = limit - len(orjson.dumps(body, option=_DUMP_OPTS))
        data["context"], _ = trim_context(context, room)
        value = orjson.dumps(body, option=_DUMP_OPTS)
    return OutcomeEvent(id=event_id, type=event_type, key=device_id.encode("utf-8"), value=value)


def credential_updated(
    swap: SwapEvent,
    *,
    verify_code: str,
    timeout: int,
    attempts: int,
    source: str,
    time: datetime,
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    context_truncated: bool = False,
) -> OutcomeEvent:
    """The credential-updated event for ``swap``; ``verify_code``/``timeout`` as the platform
    answered. ``max_bytes``, ``context_truncated``: see :func:`_envelope`."""
    if not 1 <= len(verify_code) <= 256:
        raise ValueError("verify_code must be 1..256 characters")
    if isinstance(timeout, bool) or not 0 <= timeout <= _INT32_MAX:
        raise ValueError("timeout must be an integer 0..2147483647")
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    d = swap.data
    data = {
        "deviceId": d.device_id,
        "nodeId": d.node_id,
        "appId": d.app_id,
        "verifyCode": verify_code,
        "timeout": timeout,
        "attempts": attempts,
        "swapEventId": swap.id,
        "context": swap.context,
    }
    return _envelope(
        "credential-updated",
        UPDATED_TYPE,
        swap,
        source=source,
        time=time,
        data=data,
        max_bytes=max_bytes,
        context_truncated=context_truncated,
    )


def rebind_failed(
    swap: SwapEvent,
    *,
    error_code: str,
    error_desc: str,
    http_status: int | None,
    category: str,
    recommended_handling: str,
    attempts: int,
    first_attempt_at: datetime | None,
    last_attempt_at: datetime | None,
    source: str,
    time: datetime,
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    context_truncated: bool = False,
) -> OutcomeEvent:
    """The rebind-failed event for ``swap``. ``error_desc`` is clipped to 1024 characters.
    ``max_bytes``, ``context_truncated``: see :func:`_envelope`."""
    if not error_code or not category:
        raise ValueError("error_code and category must not be empty")
    if http_status is not None and not 100 <= http_status <= 599:
        raise ValueError("http_status must be 100..599 or None")
    if attempts < 0:
        raise ValueError("attempts must not be negative")
    d = swap.data
    data = {
        "deviceId": d.device_id,
        "nodeId": d.node_id,
        "appId": d.app_id,
        "errorCode": _clip(error_code, 64),
        "errorDesc": _clip(error_desc, MAX_ERROR_DESC_CHARS),
        "httpStatus": http_status,
        "category": _clip(category, 64),
        "recommendedHandling": _clip(recommended_handling, MAX_ERROR_DESC_CHARS),
        "attempts": attempts,
        "firstAttemptAt": None if first_attempt_at is None else _utc("first", first_attempt_at),
        "lastAttemptAt": None if last_attempt_at is None else _utc("last", last_attempt_at),
        "swapEventId": swap.id,
        "context": swap.context,
    }
    return _envelope(
        "rebind-failed",
        FAILED_TYPE,
        swap,
        source=source,
        time=time,
        data=data,
        max_bytes=max_bytes,
        context_truncated=context_truncated,
    )


def device_rebound(
    swap: SwapEvent,
    *,
    bound_at: datetime,
    via: Literal["push", "poll"],
    seconds_to_bind: float,
    source: str,
    time: datetime,
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    context_truncated: bool = False,
) -> OutcomeEvent:
    """The device-rebound event for ``swap``: its new hardware bound at ``bound_at``.
    ``max_bytes``, ``context_truncated``: see :func:`_envelope`.

    ``via``: how the bind was learned (the platform's ``bindDevice`` push, or polling);
    ``seconds_to_bind``: from the key refresh to the bind, >= 0 (kept to the millisecond).
    """
    if via not in ("push", "poll"):
        raise ValueError("via must be 'push' or 'poll'")
    if (
        isinstance(seconds_to_bind, bool)
        or not isinstance(seconds_to_bind, int | float)
        or not math.isfinite(seconds_to_bind)
        or seconds_to_bind < 0
    ):
        raise ValueError("seconds_to_bind must be a finite number >= 0")
    d = swap.data
    data = {
        "deviceId": d.device_id,
        "nodeId": d.node_id,
        "appId": d.app_id,
        "swapEventId": swap.id,
        "boundAt": _utc("bound_at", bound_at),
        "via": via,
        "secondsToBind": round(float(seconds_to_bind), 3),
        "context": swap.context,
    }
    return _envelope(
        "device-rebound",
        REBOUND_TYPE,
        swap,
        source=source,
        time=time,
        data=data,
        max_bytes=max_bytes,
        context_truncated=context_truncated,
    )


class _OutcomeData(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    device_id: Id256 = Field(alias="deviceId")
    node_id: Id256 = Field(alias="nodeId")
    app_id: Id256 | None = Field(alias="appId")
    swap_event_id: Id256 = Field(alias="swapEventId")
    context: dict[str, Any]
    context_truncated: bool = Field(default=False, alias="contextTruncated")
    """Present (true) when ``context`` is a subset of the input's: the whole did not fit under
    the record size limit."""


class CredentialUpdatedData(_OutcomeData):
    verify_code: Id256 = Field(alias="verifyCode")
    timeout: Annotated[StrictInt, Field(ge=0, le=_INT32_MAX)]
    attempts: Annotated[StrictInt, Field(ge=1)]


class RebindFailedData(_OutcomeData):
    error_code: Annotated[str, Field(min_length=1, max_length=64)] = Field(alias="errorCode")
    error_desc: Annotated[str, Field(max_length=MAX_ERROR_DESC_CHARS)] = Field(alias="errorDesc")
    http_status: Annotated[StrictInt, Field(ge=100, le=599)] | None = Field(alias="httpStatus")
    category: Annotated[str, Field(min_length=1, max_length=64)]
    recommended_handling: Annotated[str, Field(max_length=MAX_ERROR_DESC_CHARS)] = Field(
        alias="recommendedHandling"
    )
    attempts: Annotated[StrictInt, Field(ge=0)]
    first_attempt_at: Rfc3339 | None = Field(alias="firstAttemptAt")
    last_attempt_at: Rfc3339 | None = Field(alias="lastAttemptAt")


class DeviceReboundData(_OutcomeData):
    bound_at: Rfc3339 = Field(alias="boundAt")
    via: Literal["push", "poll"]
    seconds_to_bind: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        alias="secondsToBind"
    )


class _OutcomeEnvelope(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    specversion: Literal["1.0"]
    id: Id256
    source: Annotated[str, Field(min_length=1, max_length=2048)]
    time: Rfc3339
    subject: Id256
    datacontenttype: Literal["application/json"]


class CredentialUpdatedEvent(_OutcomeEnvelope):
    type: Literal["com.iot.device.credential-updated.v1"]
    data: CredentialUpdatedData


class RebindFailedEvent(_OutcomeEnvelope):
    type: Literal["com.iot.device.rebind-failed.v1"]
    data: RebindFailedData


class DeviceReboundEvent(_OutcomeEnvelope):
    type: Literal["com.iot.device.rebound.v1"]
    data: DeviceReboundData


def parse_outcome(value: bytes) -> CredentialUpdatedEvent | RebindFailedEvent | DeviceReboundEvent:
    """Read an outcome event back (tests, replay). Raises ``ValueError`` when it is not one
    (``pydantic.ValidationError`` and ``orjson.JSONDecodeError`` are both ``ValueError``)."""
    event = orjson.loads(value)
    etype = event.get("type") if isinstance(event, dict) else None
    if etype == UPDATED_TYPE:
        return CredentialUpdatedEvent.model_validate(event)
    if etype == FAILED_TYPE:
        return RebindFailedEvent.model_validate(event)
    if etype == REBOUND_TYPE:
        return DeviceReboundEvent.model_validate(event)
    raise ValueError(f"not an outcome type: {_show(etype)}")


# --------------------------------------------------------------------------------------------
# Dead letters
# --------------------------------------------------------------------------------------------


def dead_letter_headers(
    original: Sequence[tuple[str, bytes]],
    *,
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
) -> list[tuple[str, bytes]]:
    """The headers of a dead letter: the original ones (minus the reason headers of an earlier
    dead-lettering, which are replaced) followed by the five ``rebind-*`` headers."""
    kept = [(k, v) for k, v in original if k.lower() not in _DLQ_HEADERS]
    kept.extend(
        (
            (DLQ_REASON_HEADER, _clip(reason, 64).encode()),
            (DLQ_DETAIL_HEADER, _clip(detail, MAX_DETAIL_CHARS).encode()),
            (SOURCE_TOPIC_HEADER, topic.encode()),
            (SOURCE_PARTITION_HEADER, str(partition).encode()),
            (SOURCE_OFFSET_HEADER, str(offset).encode()),
        )
    )
    return kept
