"""A deviceId accepted at intake stays exactly one URL path segment (issue 11, item 6).

Property: for any deviceId that ``decode_swap`` accepts, the request the platform client builds
(``refresh_key_path`` / ``query_device_path`` on the configured base URL, as httpx normalises
it) has exactly one segment after ``deviceCredentials/`` (and after ``devices/``), and that
segment decodes back to the deviceId.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from service.events import SWAPPED_TYPE, InvalidEvent, decode_swap
from service.platform.client import query_device_path, refresh_key_path

BASE_URL = "https://iot.example.com:8743"
REFRESH_PREFIX = "/iocm/app/reg/v1.1.0/deviceCredentials/"
QUERY_PREFIX = "/iocm/app/dm/v1.4.0/devices/"
SCHEMA = orjson.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "device-swapped.v1.schema.json").read_bytes()
)
DEVICE_ID_SCHEMA = Draft202012Validator(SCHEMA["properties"]["data"]["properties"]["deviceId"])

# Pieces that URL handling treats specially, mixed with ordinary text.
_TRICKY = st.sampled_from(
    [".", "..", "/", "\\", "?", "#", "%", "%2e", "%2E", "%2f", "%00", ";", "&", "=", "+", "@",
     ":", " ", "\t", "\n", "\x00", "\x7f", "\x85", "\u00a0", "\u2028", "\u3000", "\uff0e",
     "\u2024", "\u200b", "é", "a", "0"]
)  # fmt: skip
DEVICE_IDS = st.one_of(
    st.text(min_size=1, max_size=40),
    st.lists(_TRICKY, min_size=1, max_size=8).map("".join),
    st.lists(st.one_of(_TRICKY, st.text(max_size=3)), min_size=1, max_size=6).map("".join),
)


def accepted(device_id: str) -> bool:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "/test",
        "type": SWAPPED_TYPE,
        "subject": device_id,
        "data": {"deviceId": device_id, "nodeId": "n-1"},
    }
    try:
        swap = decode_swap(orjson.dumps(event), [])
    except InvalidEvent:
        return False
    assert swap.data.device_id == device_id
    return True


def one_segment_after(prefix: str, path: str, device_id: str) -> None:
    request = httpx.Request("PUT", BASE_URL + path)
    url = request.url
    raw_path = url.raw_path.decode("ascii")
    assert url.query == b""
    assert url.fragment == ""
    assert raw_path.startswith(prefix), (device_id, raw_path)
    segment = raw_path[len(prefix) :]
    assert segment, (device_id, raw_path)
    assert "/" not in segment, (device_id, raw_path)
    assert unquote(segment) == device_id
    assert url.path == prefix.rstrip("/") + "/" + device_id  # httpx's decoded view agrees


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(DEVICE_IDS)
@example(".")
@example("..")
@example("a/..")
@example("%2e%2e")
@example(" ")
def test_an_accepted_device_id_is_exactly_one_path_segment(device_id: str) -> None:
    if not accepted(device_id):
        return
    one_segment_after(REFRESH_PREFIX, refresh_key_path(device_id), device_id)
    one_segment_after(QUERY_PREFIX, query_device_path(device_id), device_id)


def test_the_ids_of_the_report_are_refused() -> None:
    for device_id in (".", "..", "a/b", "a\\b", "a?b", "a#b", "a%2fb", "a\x00", "\u3000 "):
        assert not accepted(device_id), device_id


@settings(max_examples=400, deadline=None)
@given(DEVICE_IDS)
@example(".")
@example("\u3000\t")
@example("\ufeff")
def test_the_schema_and_the_service_agree_on_device_ids(device_id: str) -> None:
    assert DEVICE_ID_SCHEMA.is_valid(device_id) == accepted(device_id), repr(device_id)
