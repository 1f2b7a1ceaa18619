"""Hostile input for the intake, as hypothesis strategies (issue 11, item 10).

One strategy, :func:`records`, draws Kafka records the way a careless or hostile producer could
write them: arbitrary bytes, arbitrary JSON, and CloudEvents in structured and binary mode whose
attributes and data fields have random types, sizes, unicode and nesting, with random headers
(duplicated ``ce_*`` headers, odd content types, non-UTF-8 values) and random keys (absent, the
deviceId, anything). Most drawn CloudEvents are close to valid, so the corpus reaches deep into
the validation instead of stopping at the first check.

The unit fuzz test (``tests/unit/test_intake_fuzz.py``) runs the strategy against the intake
directly; the integration test (``tests/integration/test_intake_fuzz_e2e.py``) draws a fixed-seed
sample with :func:`sample` and sends it through the real broker and the running service.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from service.events import SWAPPED_TYPE

T = TypeVar("T")

Header = tuple[str, bytes]


@dataclass(frozen=True)
class FuzzRecord:
    """A Kafka record as the intake sees it (the attributes of aiokafka's ConsumerRecord)."""

    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    offset: int = 0
    timestamp: int = 1_764_000_000_000

    def __repr__(self) -> str:  # short, so a failing example stays readable
        value = self.value if self.value is None or len(self.value) <= 300 else self.value[:300]
        return f"FuzzRecord(key={self.key!r}, value={value!r}, headers={self.headers!r})"


# ---------------------------------------------------------------------- building blocks

# Text that stresses decoders and validators: controls, separators, non-BMP, combining marks,
# right-to-left, NUL, the characters a URL path cares about.
_TRICKY_CHARS = (
    "\x00\x01\x1f\x7f\x85\u00a0\u2028\u2029\u200b\u202e\ufeff\uffff\U0001f600\U0010ffff"
    "\u0301é./\\?#%:; \t\n"
)
TEXT = st.one_of(
    st.text(max_size=24),
    st.text(alphabet=_TRICKY_CHARS + string.ascii_letters, max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=600),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),  # beyond 64 bits: JSON parsers differ
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(TEXT, children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    """A value nested 1..130 containers deep (the limit of ``context`` is 64)."""
    depth = draw(st.integers(min_value=1, max_value=130))
    value: Any = draw(SCALARS)
    for _ in range(depth):
        value = [value] if draw(st.booleans()) else {"k": value}
    return value


ANY_JSON = st.one_of(JSON, deep())


DEVICE_IDS = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,23}", fullmatch=True),
    st.text(min_size=1, max_size=30),
    st.sampled_from([".", "..", "a/b", "a%2Fb", "a?b", " ", "\u3000", "dev\x00", "x" * 257]),
)
IDS = st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=40), st.just("x" * 257))
TIMES = st.one_of(
    st.sampled_from(
        [
            "2026-11-25T09:30:00Z",
            "2026-11-25T09:30:00.123456789+05:30",
            "0001-01-01T00:00:00-23:59",
            "0001-01-01T00:00:00+23:59",
            "9999-12-31T23:59:59-23:59",
            "9999-12-31T23:59:59+23:59",
            "2026-02-30T00:00:00Z",
            "2026-12-31T23:59:60Z",
            "2026-11-25 09:30:00",
            "2026-11-25T09:30:00",
        ]
    ),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
)


VALID_DEVICE_IDS = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,23}", fullmatch=True),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), max_size=20)
    .map(lambda t: "d" + t)
    .filter(lambda t: not any(c in t for c in "/\\?#%")),
)
SIZES = (700_000, 900_000, 980_000, 1_040_000, 1_048_000, 1_100_000, 2_100_000)
"""Context sizes near what matters: the ledger's copy of a waiting swap (base64), the service's
input limit (960 KiB), the producer's request limit (1 MiB), and well beyond."""
VALID = {
    "previousNodeId": IDS,
    "appId": st.sampled_from(["rebind-home-app", "rebind-partner-app", "rebind-other-app", "x"]),
    "verifyCode": IDS,
    "timeout": st.one_of(st.integers(min_value=0, max_value=2**31 - 1), st.just(300.0)),
}


@st.composite
def swap_data(draw: st.DrawFn) -> dict[str, Any]:
    """A valid ``data`` of a swap: deviceId, nodeId, some optional fields, some context."""
    data: dict[str, Any] = {
        "deviceId": draw(VALID_DEVICE_IDS),
        "nodeId": draw(st.from_regex(r"[A-Za-z0-9]{1,24}", fullmatch=True)),
    }
    for name, valid in VALID.items():
        if _one_in(draw, 4):
            data[name] = draw(st.one_of(st.none(), valid))
    for name, value in draw(st.dictionaries(TEXT, JSON, max_size=3)).items():
        data.setdefault(name, value)  # unknown fields: passed through as context
    if _one_in(draw, 25):  # a big context: anything up to 300 KB, or around the size limits
        size = draw(st.one_of(st.integers(min_value=0, max_value=300_000), st.sampled_from(SIZES)))
        data["padding"] = "p" * size
    return data


ATTRIBUTES: dict[str, st.SearchStrategy[Any]] = {
    "specversion": st.sampled_from(["0.3", "1", "2.0", " 1.0", 1.0]),
    "id": IDS,
    "source": st.one_of(TEXT, st.just("s" * 2049), st.just("")),
    "type": st.sampled_from(["com.iot.other.v1", "", SWAPPED_TYPE.upper()]),
    "time": TIMES,
    "subject": DEVICE_IDS,
    "datacontenttype": st.sampled_from(["text/plain", "application/cloudevents+json"]),
}
DATA_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "deviceId": DEVICE_IDS,
    "nodeId": IDS,
    **VALID,
    "context": ANY_JSON,  # an unknown field like any other, possibly nested too deep
}


@st.composite
def cloud_event(draw: st.DrawFn) -> tuple[dict[str, Any], str | None]:
    """A device-swapped CloudEvent as a dict and its deviceId: a valid event, then up to four
    mutations (an attribute or data field deleted, nulled, or replaced by another valid-looking
    value or by any JSON at all), so the corpus covers every check of the validation."""
    data = draw(swap_data())
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": draw(st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=40))),
        "source": draw(st.sampled_from(["/inventory/fuzz", "urn:inventory", "ü/ß"])),
        "type": SWAPPED_TYPE,
        "data": data,
    }
    if draw(st.booleans()):
        event["time"] = draw(TIMES)
    if draw(st.booleans()):
        event["subject"] = data["deviceId"]
    if draw(st.booleans()):
        event["datacontenttype"] = "application/json"
    mutations = draw(st.sampled_from([0, 0, 0, 1, 1, 2, 4]))
    for _ in range(mutations):
        in_data = draw(st.booleans()) and isinstance(event.get("data"), dict)
        target, fields = (event["data"], DATA_FIELDS) if in_data else (event, ATTRIBUTES)
        name = draw(st.sampled_from(sorted(fields)))
        how = draw(st.integers(0, 3))
        if how == 0:
            target.pop(name, None)
        elif how == 1:
            target[name] = None
        elif how == 2:
            target[name] = draw(fields[name])
        else:
            target[name] = draw(ANY_JSON)
    if _one_in(draw, 20):
        event["data"] = draw(ANY_JSON)
    for name, value in draw(st.dictionaries(TEXT, JSON, max_size=2)).items():
        event.setdefault(name, value)  # extensions and junk attributes
    device = data.get("deviceId")
    return event, device if isinstance(device, str) else None


def _one_in(draw: st.DrawFn, n: int) -> bool:
    """True about once in ``n`` draws (hypothesis favours small integers; a sample does not)."""
    return bool(draw(st.sampled_from([False] * (n - 1) + [True])))


def _dumps(value: Any, *, ascii_only: bool) -> bytes:
    # The standard library writes what orjson refuses (integers beyond 64 bits): both kinds of
    # JSON reach the intake.
    return json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )


@st.composite
def damaged(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw``, mostly intact, sometimes truncated, with a flipped byte, a BOM or trailing junk."""
    how = draw(st.sampled_from(["intact"] * 12 + ["truncated", "flipped", "bom", "junk"]))
    if how == "truncated" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "flipped" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
    if how == "bom":
        return b"\xef\xbb\xbf" + raw
    if how == "junk":
        return raw + draw(st.binary(min_size=1, max_size=8))
    return raw


HEADER_NAMES = st.one_of(
    st.text(max_size=16),
    st.text(max_size=16),
    st.sampled_from(
        [
            "content-type",
            "Content-Type",
            "ce_specversion",
            "ce_id",
            "ce_source",
            "ce_type",
            "ce_time",
            "ce_subject",
            "CE_ID",
            "traceparent",
            "rebind-error-reason",
            "rebind-source-offset",
        ]
    ),
)
CONTENT_TYPES = st.sampled_from(
    [
        b"application/cloudevents+json",
        b"application/cloudevents+json; charset=utf-8",
        b"application/cloudevents-batch+json",
        b"application/json",
        b"APPLICATION/JSON ; charset=UTF-8",
        b"text/plain",
        b"",
        b"\xff\xfe",
    ]
)
HEADER_VALUES = st.one_of(st.binary(max_size=24), TEXT.map(lambda t: t.encode()))


def _attribute_header(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else _dumps(value, ascii_only=True)


@st.composite
def headers(draw: st.DrawFn) -> list[Header]:
    return draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4))


@st.composite
def structured(draw: st.DrawFn) -> tuple[bytes | None, bytes, list[Header]]:
    event, device = draw(cloud_event())
    value = draw(damaged(_dumps(event, ascii_only=draw(st.booleans()))))
    hdrs: list[Header] = []
    if draw(st.booleans()):
        hdrs.append(("content-type", draw(CONTENT_TYPES)))
    hdrs += draw(headers())
    return draw(_key(device)), value, draw(st.permutations(hdrs))


@st.composite
def binary(draw: st.DrawFn) -> tuple[bytes | None, bytes, list[Header]]:
    event, device = draw(cloud_event())
    data = event.pop("data", None)
    hdrs: list[Header] = []
    for name in ("specversion", "id", "source", "type", "time", "subject"):
        if name in event and event[name] is not None:
            raw = _attribute_header(event[name])
            hdrs.append((f"ce_{name}", raw + b"\xff" if _one_in(draw, 20) else raw))
    if draw(st.booleans()):
        hdrs.append(("content-type", draw(CONTENT_TYPES)))
    hdrs += draw(headers())
    value = draw(damaged(_dumps(data, ascii_only=draw(st.booleans()))))
    return draw(_key(device)), value, draw(st.permutations(hdrs))


@st.composite
def _key(draw: st.DrawFn, device: str | None) -> bytes | None:
    choice = draw(st.integers(0, 9))
    if device is not None and choice < 7:
        return device.encode("utf-8", "surrogatepass")
    if choice < 8:
        return None
    return draw(st.binary(max_size=16))


@st.composite
def arbitrary(draw: st.DrawFn) -> tuple[bytes | None, bytes | None, list[Header]]:
    """Not a CloudEvent at all: bytes, or any JSON."""
    value = draw(
        st.one_of(
            st.none(),
            st.just(b""),
            st.binary(max_size=64),
            ANY_JSON.map(lambda v: _dumps(v, ascii_only=False)),
        )
    )
    return draw(st.one_of(st.none(), st.binary(max_size=16))), value, draw(headers())


@st.composite
def records(draw: st.DrawFn) -> FuzzRecord:
    key, value, hdrs = draw(st.one_of(structured(), structured(), binary(), arbitrary()))
    return FuzzRecord(key, value, tuple(hdrs))


def sample(strategy: st.SearchStrategy[T], count: int, seed: int) -> list[T]:
    """``count`` examples of ``strategy``, the same ones for the same seed (for tests that send
    a corpus through a real system rather than explore it)."""
    drawn: list[T] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: T) -> None:
        drawn.append(example)

    collect()
    return drawn[:count]
