"""service.logs: JSON lines by default, a console renderer for terminals, secrets redacted."""

from __future__ import annotations

import io
import logging
from datetime import datetime

import orjson
import pytest
import structlog

from service import logs
from service.config import LogSettings
from tests.support.logcapture import captured_logs

EVENT_KEYS = ("topic", "partition", "offset", "device_id", "event_id")


def test_json_is_the_default_format() -> None:
    assert LogSettings().format == "json"
    assert LogSettings().level == "INFO"


def test_every_json_line_has_timestamp_level_and_event() -> None:
    with captured_logs(level="DEBUG") as cap:
        log = structlog.get_logger("test")
        log.debug("one", n=1)
        log.info("two", detail="x")
        log.warning("three")
        log.error("four", code="E1")
    lines = cap.lines()
    assert [line["event"] for line in lines] == ["one", "two", "three", "four"]
    assert [line["level"] for line in lines] == ["debug", "info", "warning", "error"]
    for line in lines:
        stamp = datetime.fromisoformat(line["timestamp"])
        assert stamp.utcoffset() is not None  # UTC, with an offset
    assert lines[0]["n"] == 1
    assert lines[3]["code"] == "E1"


def test_the_level_filters() -> None:
    with captured_logs(level="WARNING") as cap:
        log = structlog.get_logger("test")
        log.info("dropped")
        log.warning("kept")
    assert [line["event"] for line in cap.lines()] == ["kept"]


def test_exceptions_render_as_structured_json() -> None:
    with captured_logs() as cap:
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("test").exception("failed")
    [line] = cap.lines()
    assert line["event"] == "failed"
    assert line["level"] == "error"
    assert "ValueError" in orjson.dumps(line["exception"]).decode()


def test_context_bound_with_contextvars_is_on_every_line() -> None:
    with captured_logs() as cap:
        log = structlog.get_logger("test")
        with structlog.contextvars.bound_contextvars(
            topic="t", partition=3, offset=42, device_id="dev-9", event_id="evt-9"
        ):
            log.info("inside")
            log.warning("inside too")
        log.info("outside")
    inside, inside_too, outside = cap.lines()
    for line in (inside, inside_too):
        assert {k: line[k] for k in EVENT_KEYS} == {
            "topic": "t",
            "partition": 3,
            "offset": 42,
            "device_id": "dev-9",
            "event_id": "evt-9",
        }
    assert not set(EVENT_KEYS) & outside.keys()


def test_secret_keys_are_masked_as_a_last_line_of_defence() -> None:
    with captured_logs() as cap:
        structlog.get_logger("test").info(
            "oops", secret="s3cr3t-value", password="pw-value", authorization="Bearer tok-value"
        )
    assert "s3cr3t-value" not in cap.text
    assert "pw-value" not in cap.text
    assert "tok-value" not in cap.text
    [line] = cap.lines()
    assert line["secret"] == "**********"


def test_standard_library_warnings_come_out_as_json_too() -> None:
    with captured_logs() as cap:
        logging.getLogger("some.library").warning("library says %s", "hi")
        logging.getLogger("some.library").info("quiet: below WARNING for libraries")
    [line] = cap.lines()
    assert line["event"] == "library says hi"
    assert line["level"] == "warning"
    assert line["logger"] == "some.library"
    assert "timestamp" in line


def test_console_format_renders_readable_lines() -> None:
    with (
        captured_logs(fmt="console") as cap,
        structlog.contextvars.bound_contextvars(device_id="dev-c"),
    ):
        structlog.get_logger("test").info("credential updated", attempts=1)
    text = cap.text
    assert "credential updated" in text
    assert "attempts=1" in text
    assert "device_id=dev-c" in text
    assert "info" in text
    assert "\x1b[" not in text  # no colours when the stream is not a terminal
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text.splitlines()[0])


@pytest.mark.parametrize("stream", [io.StringIO(), io.BytesIO()])
def test_json_to_a_stream_with_or_without_a_binary_buffer(stream: io.IOBase) -> None:
    """Regression: JSON format with an ``io.StringIO`` stream raised TypeError (bytes to text)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure(LogSettings(format="json"), stream=stream)
        structlog.configure(cache_logger_on_first_use=False)
        structlog.get_logger("test").info("hello", n=1)
        raw = stream.getvalue()  # type: ignore[attr-defined]
        text = raw.decode() if isinstance(raw, bytes) else raw
        assert orjson.loads(text.splitlines()[0])["event"] == "hello"
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = saved[0], saved[1]


def test_json_to_a_text_stream_with_a_buffer_writes_bytes_underneath() -> None:
    raw = io.BytesIO()
    text = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure(LogSettings(format="json"), stream=text)
        structlog.configure(cache_logger_on_first_use=False)
        structlog.get_logger("test").info("to the buffer")
        assert orjson.loads(raw.getvalue().splitlines()[0])["event"] == "to the buffer"
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = saved[0], saved[1]
