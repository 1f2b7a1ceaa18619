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
from service.platform.client import (
    SUBSCRIBE_PATH,
    base_url,
    call_url,
    query_device_path,
    refresh_key_path,
)

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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    DEVICE_IDS, st.sampled_from([BASE_URL, BASE_URL + "/", BASE_URL + "/gw/v2", "http://10.0.0.7"])
)
@example("a b", BASE_URL + "/gw/v2/")
def test_the_client_joins_base_and_path_as_httpx_does(device_id: str, base: str) -> None:
    """The client builds each call's absolute URL itself (issue 24: one parse less per call);
    it is the URL httpx makes of the relative path on a client with that ``base_url``."""
    if not accepted(device_id):
        return
    client = httpx.AsyncClient(base_url=base.rstrip("/"))
    for path in (refresh_key_path(device_id), query_device_path(device_id), SUBSCRIBE_PATH):
        expected = client.build_request("PUT", path).url
        joined = call_url(base_url(base), path)
        assert joined == expected
        assert joined.raw_path == expected.raw_path


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
