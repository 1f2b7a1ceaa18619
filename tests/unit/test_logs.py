"""service.logs: JSON lines by default, a console renderer for terminals, secrets redacted."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Literal

import orjson
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from service import logs
from service.config import KafkaSettings, LogSettings, PlatformSettings, Settings
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
        structlog.get_logger("test").info("credential_updated", attempts=1)
    text = cap.text
    assert "credential_updated" in text
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


# ------------------------------------------------------------------ secrets (issue 11, item 1)


@pytest.fixture
def registry() -> Iterator[None]:
    logs._forget_secrets()
    try:
        yield
    finally:
        logs._forget_secrets()


def _raise_with_a_secret_local() -> None:
    secret = "local-secret-value-123"
    form = {"appId": "app", "secret": secret}
    raise ValueError(f"cannot send {len(form)} fields")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_carry_no_frame_locals(fmt: Literal["json", "console"]) -> None:
    with captured_logs(fmt=fmt) as cap:
        try:
            _raise_with_a_secret_local()
        except ValueError:
            structlog.get_logger("test").exception("failed")
        try:
            _raise_with_a_secret_local()
        except ValueError as exc:
            logging.getLogger("some.library").error("library failed", exc_info=exc)
    assert "local-secret-value-123" not in cap.text
    assert "_raise_with_a_secret_local" in cap.text  # the traceback itself is there
    if fmt == "json":
        lines = cap.lines()
        assert [line["event"] for line in lines] == ["failed", "library failed"]
        for line in lines:
            [rendered] = line["exception"]
            assert rendered["exc_type"] == "ValueError"
            assert rendered["frames"]
            assert all("locals" not in frame for frame in rendered["frames"])


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_registered_secrets_are_masked_wherever_they_appear(
    fmt: Literal["json", "console"],
) -> None:
    logs.register_secret("Reg1stered-Secret-abc")
    logs.register_secret(SecretStr("Reg1stered-SASL-pw"))
    logs.register_secret("short")  # too short to be masked everywhere: ignored
    with captured_logs(fmt=fmt) as cap:
        log = structlog.get_logger("test")
        log.info("in the event Reg1stered-Secret-abc", detail="x Reg1stered-SASL-pw y")
        log.info("nested", ctx={"a": ["Reg1stered-Secret-abc", {"b": "Reg1stered-SASL-pw"}]})
        try:
            raise RuntimeError("login with Reg1stered-Secret-abc refused")
        except RuntimeError:
            log.exception("failed")
        logging.getLogger("some.library").warning("library saw %s", "Reg1stered-SASL-pw")
        log.info("a short word stays", word="short")
    text = cap.text
    assert "Reg1stered-Secret-abc" not in text
    assert "Reg1stered-SASL-pw" not in text
    assert text.count(logs.MASK) >= 6
    assert "short" in text


@pytest.mark.parametrize(
    ("raw", "gone"),
    [
        ("Authorization: Bearer abc.DEF-123_x", "abc.DEF-123_x"),
        ("{'authorization': 'Bearer tok123456'}", "tok123456"),
        ("appId=app-1&secret=s3cr3t%21x&other=1", "s3cr3t%21x"),
        ('{"appId": "a", "secret": "json-s3cret", "refreshToken": "rt-123"}', "json-s3cret"),
        ('{"appId": "a", "secret": "json-s3cret", "refreshToken": "rt-123"}', "rt-123"),
        ("{'secret': 'repr-s3cret', 'x': 1}", "repr-s3cret"),
        ("access_token=at-999 refresh_token=rt-999", "at-999"),
        ("access_token=at-999 refresh_token=rt-999", "rt-999"),
        ("password: hunter2hunter2", "hunter2hunter2"),
        ('"accessToken":"a-b-c-d"', "a-b-c-d"),
    ],
)
def test_secret_looking_assignments_are_masked(raw: str, gone: str) -> None:
    masked = logs.redact_text(raw)
    assert gone not in masked
    assert logs.MASK in masked


@pytest.mark.parametrize(
    "kept",
    [
        "platform_token_obtained expires_in=3600",
        "token_fp=abc123 error_code=100208",
        "The app id or secret is wrong; fix the configuration.",
        "tokens: 3",
    ],
)
def test_ordinary_text_is_left_alone(kept: str) -> None:
    assert logs.redact_text(kept) == kept


@pytest.mark.usefixtures("registry")
def test_the_registry_is_bounded_and_forgets_the_oldest() -> None:
    values = [f"token-value-{i:05d}" for i in range(logs.MAX_REGISTERED_SECRETS + 10)]
    for value in values:
        logs.register_secret(value)
    assert logs.redact_text(values[-1]) == logs.MASK
    assert logs.redact_text(values[0]) == values[0]  # forgotten: the oldest goes first


@pytest.mark.usefixtures("registry")
def test_configure_with_the_settings_registers_their_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(
        platform=PlatformSettings(
            base_url="https://iot.example.com:8743", app_id="app-1", secret="Settings-S3cret-1"
        ),
        kafka=KafkaSettings(sasl_username="u", sasl_password="Settings-SASL-pw"),
    )
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        logs.configure(settings, stream=stream)
        structlog.configure(cache_logger_on_first_use=False)
        structlog.get_logger("test").info("x Settings-S3cret-1 y Settings-SASL-pw z")
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = saved[0], saved[1]
    text = stream.getvalue()
    assert "Settings-S3cret-1" not in text
    assert "Settings-SASL-pw" not in text
    assert orjson.loads(text)["event"] == f"x {logs.MASK} y {logs.MASK} z"


def test_aiokafka_lines_come_out_in_the_service_s_own_shape() -> None:
    """Issue 12: the Kafka client's records go through the same structlog pipeline: the same
    keys, the same compact JSON, the bound context, redaction, plus the logger's name."""
    with (
        captured_logs(level="INFO") as cap,
        structlog.contextvars.bound_contextvars(topic="asset.device-swapped.v1", partition=2),
    ):
        structlog.get_logger("service.x").warning("own line", detail="x")
        logging.getLogger("aiokafka.conn").error(
            "Unable connect to %r: %s (sasl_password=%s)", "kafka-0:9092", "refused", "hunter22"
        )
    own, kafka = cap.text.splitlines()
    assert ", " not in kafka.split('"event"')[0]  # compact, like our own lines
    mine, theirs = orjson.loads(own), orjson.loads(kafka)
    assert set(mine) - {"detail"} <= set(theirs)
    assert theirs["logger"] == "aiokafka.conn"
    assert theirs["level"] == "error"
    assert theirs["partition"] == 2
    assert theirs["event"].startswith("Unable connect to 'kafka-0:9092': refused")
    assert "hunter22" not in kafka


# ---- repeated library warnings (issue 24) ----------------------------------------------------

_RETRY = "Got error produce response on topic-partition %s, retrying. Error: %s"


class _NotEnoughReplicasError(Exception):
    """Stands for aiokafka's error class (the limiter keys on the class name)."""


class _NotLeaderForPartitionError(Exception):
    pass


def _retry_record(
    partition: int, error: type[Exception] = _NotEnoughReplicasError
) -> logging.LogRecord:
    return logging.LogRecord(
        "aiokafka.producer.sender",
        logging.WARNING,
        __file__,
        1,
        _RETRY,
        (f"tp-{partition}", error),
        None,
    )


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_repeated_aiokafka_warnings_become_one_line_with_a_count() -> None:
    with captured_logs() as cap:
        sender = logging.getLogger("aiokafka.producer.sender")
        for i in range(100):
            sender.warning(_RETRY, f"tp-{i % 6}", _NotEnoughReplicasError)
        assert len(cap.lines()) == 1  # the first passes at once, the repeats are held back
        assert logs._current_limiter is not None
        logs._current_limiter.flush()
    first, summary = cap.lines()
    assert first["logger"] == summary["logger"] == "aiokafka.producer.sender"
    assert "repeated" not in first
    assert "NotEnoughReplicasError" in summary["event"]
    assert summary["level"] == "warning"
    assert summary["repeated"] == 99
    assert isinstance(summary["seconds"], float)


def test_kinds_are_counted_apart_and_other_lines_pass() -> None:
    emitted: list[logging.LogRecord] = []
    limiter = logs.RepeatLimiter(emitted.append, clock=_Clock(), timers=False)
    passed = [
        limiter.filter(record)
        for record in (
            _retry_record(0),
            _retry_record(1),  # same kind, another partition: held back
            _retry_record(0, _NotLeaderForPartitionError),  # another error: another kind
            _retry_record(2, _NotLeaderForPartitionError),
        )
    ]
    assert passed == [True, False, True, False]
    for other in (
        logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, "boom %s", ("x",), None),
        logging.LogRecord("service.x", logging.WARNING, __file__, 1, _RETRY, ("a", "b"), None),
        logging.LogRecord("aiokafkaesque", logging.WARNING, __file__, 1, _RETRY, ("a", "b"), None),
    ):
        assert limiter.filter(other)
        assert limiter.filter(other)  # never limited
    limiter.flush()
    held = {str(r.getMessage()).rsplit(".", 1)[-1][:-2]: r.repeated for r in emitted}  # type: ignore[attr-defined]
    assert held == {"_NotEnoughReplicasError": 1, "_NotLeaderForPartitionError": 1}
    limiter.flush()  # nothing held back any more: nothing more
    assert len(emitted) == 2


def test_a_steady_flood_is_one_line_per_interval() -> None:
    clock = _Clock()
    emitted: list[logging.LogRecord] = []
    limiter = logs.RepeatLimiter(emitted.append, interval=10.0, clock=clock, timers=False)
    passed = 0
    for _ in range(351):  # 35 s, one every 0.1 s
        passed += limiter.filter(_retry_record(3))
        clock.now += 0.1
    limiter.flush()
    assert passed == 1
    counts = [r.repeated for r in emitted]  # type: ignore[attr-defined]
    assert len(counts) == 4  # after 10, 20 and 30 s, and the rest at the flush
    assert passed + sum(counts) == 351  # every record counted once
    clock.now += 60  # quiet for a while: the next one passes again
    assert limiter.filter(_retry_record(3))


def test_the_count_comes_out_when_the_interval_ends_without_more_records() -> None:
    emitted: list[logging.LogRecord] = []
    limiter = logs.RepeatLimiter(emitted.append, interval=0.05)
    assert limiter.filter(_retry_record(0))
    assert not limiter.filter(_retry_record(1))
    assert not limiter.filter(_retry_record(2))
    deadline = time.monotonic() + 5
    while not emitted and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the condition, with a deadline
    [summary] = emitted
    assert summary.repeated == 2  # type: ignore[attr-defined]


_FRAGMENTS = st.sampled_from(
    ["Reg1stered-Secret-abc", "Bearer ", "bearer\t", "eyJ.tok", "secret=", "token:", '"secret": ',
     "password", "=", ":", " ", "\x00", "a", "0", "é", "dev-1", "'", '"', ",", "&"]
)  # fmt: skip
_PLAIN_VALUES = st.one_of(
    st.lists(_FRAGMENTS, max_size=6).map("".join),
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
)
_KEYS = st.sampled_from(["event", "device_id", "detail", "token", "Secret", "error", "n", "x"])


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(_KEYS, _PLAIN_VALUES, max_size=6))
def test_a_line_of_plain_values_is_redacted_as_value_by_value(values: dict[str, object]) -> None:
    """The one-search fast path of ``redact`` (issue 24) masks exactly what masking each value
    on its own masks: a line left alone when nothing matches, the same line otherwise."""
    logs._forget_secrets()
    try:
        logs.register_secret("Reg1stered-Secret-abc")
        expected = {
            key: logs.MASK if logs._is_secret_key(key) and value else logs._redact_value(value)
            for key, value in values.items()
        }
        assert logs.redact(None, "info", dict(values)) == expected
    finally:
        logs._forget_secrets()
