"""Structured logs: JSON lines by default (orjson), a readable console format for a terminal.

Context about the event being worked on (topic, partition, offset, device_id, event_id) is bound
with contextvars by the pipeline, so every line about an event carries it.

Secrets never reach a log line. The code never passes one to a logger; exceptions are rendered
without frame locals (a traceback's locals hold the app secret, httpx's form data and the
``Authorization`` header); and, as a second line of defence, every rendered line goes through
:func:`redact`, which masks the values registered with :func:`register_secret` (the settings'
secrets, every access and refresh token the service obtains) wherever they appear, ``Bearer <x>``,
``secret=<x>`` / ``"secret": "<x>"`` and the like, and the values of secret-named keys.

Warnings the Kafka client repeats (a produce retried, a connection refused while a broker
restarts) are rate-limited by :class:`RepeatLimiter`: the first of a kind is logged at once, the
repeats that follow within :data:`REPEAT_INTERVAL_SECONDS` become one line per interval with
``repeated`` (how many) and ``seconds`` (over how long), so a flood cannot hide other lines.
"""

from __future__ import annotations

import atexit
import io
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
import structlog
from pydantic import SecretStr
from structlog.tracebacks import ExceptionDictTransformer

from service.config import LogSettings

if TYPE_CHECKING:
    from service.config import Settings

MASK: Final = "**********"

# Keys whose values are secrets wherever they appear (compared case-insensitively).
_SECRET_KEYS: Final = frozenset(
    {
        "secret",
        "password",
        "passwd",
        "token",
        "access_token",
        "accesstoken",
        "refresh_token",
        "refreshtoken",
        "authorization",
        "proxy-authorization",
        "sasl_password",
        "sasl_plain_password",
    }
)

MIN_SECRET_CHARS: Final = 8
"""Shorter values are not registered: masking them everywhere would garble every line."""
MAX_REGISTERED_SECRETS: Final = 256
"""The registry keeps this many values, dropping the oldest (tokens are renewed every hour)."""

_MAX_DEPTH: Final = 32

_registry: dict[str, None] = {}  # insertion-ordered set
_registry_lock = threading.Lock()
_registry_pattern: re.Pattern[str] | None = None

_BEARER: Final = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;)\]}]+")
_KEY_NAMES: Final = (
    r"(?:sasl_)?pass(?:word|wd)|secret|(?:access|refresh)[_-]?token|token|"
    r"(?:proxy-)?authorization|x-auth-token"
)
# ``secret=<x>`` (forms, query strings, reprs), ``"secret": "<x>"`` (JSON, dict reprs). The value
# is a quoted string or runs to the next separator.
_KEY_VALUE: Final = re.compile(
    r"(?i)(?<![A-Za-z0-9])([\"']?(?:" + _KEY_NAMES + r")[\"']?\s*[:=]\s*)"
    r"(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[^\s&,;\"')\]}]+)"
)


def register_secret(value: str | SecretStr | None) -> None:
    """Mask ``value`` wherever it appears in a log line from now on.

    Values shorter than :data:`MIN_SECRET_CHARS` are ignored; at most
    :data:`MAX_REGISTERED_SECRETS` values are kept (the oldest are forgotten first).
    """
    global _registry_pattern  # noqa: PLW0603 - the process-wide registry
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if not text or len(text) < MIN_SECRET_CHARS:
        return
    with _registry_lock:
        if text in _registry:
            return
        _registry[text] = None
        while len(_registry) > MAX_REGISTERED_SECRETS:
            del _registry[next(iter(_registry))]
        ordered = sorted(_registry, key=len, reverse=True)  # the longest first
        _registry_pattern = re.compile("|".join(re.escape(v) for v in ordered))


def register_settings_secrets(settings: Settings) -> None:
    """Register every secret of the configuration (app secret, SASL password, TLS key password;
    the OAUTHBEARER token is registered each time it is read)."""
    register_secret(settings.platform.secret)
    register_secret(settings.kafka.sasl_password)
    register_secret(settings.kafka.ssl_key_password)


def _forget_secrets() -> None:
    """Empty the registry (tests)."""
    global _registry_pattern  # noqa: PLW0603 - the process-wide registry
    with _registry_lock:
        _registry.clear()
        _registry_pattern = None


def _mask_key_value(match: re.Match[str]) -> str:
    value = match.group(2)
    quote = value[0] if value[0] in "\"'" else ""
    return f"{match.group(1)}{quote}{MASK}{quote}"


def redact_text(text: str) -> str:
    """``text`` with registered secrets and secret-looking assignments masked."""
    pattern = _registry_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return _KEY_VALUE.sub(_mask_key_value, text)


def _redact_value(value: Any, depth: int = 0) -> Any:  # noqa: PLR0911 - one case per type
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth > _MAX_DEPTH:  # a pathological structure: keep nothing of it
        return MASK
    if isinstance(value, Mapping):
        return {
            k: (MASK if _is_secret_key(k) and v else _redact_value(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    text = repr(value)  # what the renderer falls back on for unknown types
    masked = redact_text(text)
    return value if masked == text else masked


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower() in _SECRET_KEYS


_PLAIN: Final = (str, int, float, bool, type(None))
_JOIN: Final = "\x00"
"""Joins a line's strings for one search: no pattern matches across it without also matching
inside one string (a non-word, non-space character, like the string's own start or end)."""


def _needs_redaction(values: list[str]) -> bool:
    """Whether any of ``values`` has something :func:`redact_text` would mask: one search of
    each pattern over all of them (a line about an event has none, so nothing is rewritten)."""
    text = _JOIN.join(values)
    pattern = _registry_pattern
    if pattern is not None and pattern.search(text):
        return True
    if ("earer" in text or "EARER" in text) and _BEARER.search(text):
        return True
    return _KEY_VALUE.search(text) is not None


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the last step before rendering (after exceptions are rendered)."""
    strings: list[str] = []
    for key, value in event_dict.items():
        if type(value) not in _PLAIN or (value and _is_secret_key(key)):
            break  # a structure, bytes, an object, a secret-named key: value by value below
        if type(value) is str:
            strings.append(value)
    else:
        if not _needs_redaction(strings):
            return event_dict  # plain values, nothing to mask: as value by value would leave it
    for key, value in event_dict.items():
        event_dict[key] = MASK if _is_secret_key(key) and value else _redact_value(value)
    return event_dict


# Tracebacks without frame locals (structlog's default shows them).
_dict_tracebacks: Final = structlog.processors.ExceptionRenderer(
    ExceptionDictTransformer(show_locals=False)
)


REPEAT_INTERVAL_SECONDS: Final = 10.0
"""Repeats of one kind of library warning are logged as one line per this many seconds."""
RATE_LIMITED_LOGGERS: Final = ("aiokafka",)
"""Loggers (and their children) whose WARNING records are rate-limited by kind."""


_Kind = tuple[str, str, tuple[str, ...]]


@dataclass(slots=True)
class _Repeats:
    until: float  # the end of the current interval
    started: float  # when the repeats counted in ``count`` began
    count: int = 0  # repeats held back in this interval
    last: logging.LogRecord | None = None
    timer: threading.Timer | None = None


class RepeatLimiter(logging.Filter):
    """Rate-limits repeated WARNING records of the library loggers, kind by kind.

    A kind is the logger, the message template and the exception classes among its arguments
    (``Got error produce response on topic-partition %s, retrying. Error: %s`` with
    NotEnoughReplicasError is one kind, whatever the partition). The first record of a kind
    passes; the repeats within ``interval`` seconds are held back and counted; when the interval
    ends (a timer, or the next record of the kind, whichever comes first) one line is emitted:
    the last repeat, with ``repeated`` = how many were held back and ``seconds`` = over how long.
    While the repeats go on, that is one line per interval. Other records pass untouched.
    """

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], object],
        *,
        interval: float = REPEAT_INTERVAL_SECONDS,
        loggers: tuple[str, ...] = RATE_LIMITED_LOGGERS,
        clock: Callable[[], float] = time.monotonic,
        timers: bool = True,
    ) -> None:
        super().__init__()
        self._emit = emit
        self._interval = interval
        self._loggers = loggers
        self._clock = clock
        self._timers = timers  # False: only the next record of a kind or flush() ends a wait
        self._kinds: dict[_Kind, _Repeats] = {}
        self._lock = threading.Lock()

    def _limited(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or hasattr(record, "repeated"):
            return False
        name = record.name
        return any(name == n or name.startswith(n + ".") for n in self._loggers)

    @staticmethod
    def _kind(record: logging.LogRecord) -> _Kind:
        args = record.args if isinstance(record.args, tuple) else ()
        errors = tuple(
            a.__name__ if isinstance(a, type) else type(a).__name__
            for a in args
            if (isinstance(a, type) and issubclass(a, BaseException))
            or isinstance(a, BaseException)
        )
        return (record.name, str(record.msg), errors)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._limited(record):
            return True
        kind = self._kind(record)
        now = self._clock()
        due: logging.LogRecord | None = None
        with self._lock:
            repeats = self._kinds.get(kind)
            if repeats is not None and now >= repeats.until:
                due = self._take(kind, repeats, now)
                repeats = self._kinds.get(kind)
            if repeats is None:  # the first of its kind for a while: it passes
                self._kinds[kind] = _Repeats(until=now + self._interval, started=now)
                passes = True
            else:
                if repeats.count == 0:
                    repeats.started = now
                repeats.count += 1
                repeats.last = record
                if self._timers and repeats.timer is None:
                    timer = threading.Timer(max(0.0, repeats.until - now), self._expire, (kind,))
                    timer.daemon = True
                    repeats.timer = timer
                    timer.start()
                passes = False
        if due is not None:
            self._emit(due)
        return passes

    def _take(self, kind: _Kind, repeats: _Repeats, now: float) -> logging.LogRecord | None:
        """End the interval of ``kind`` (the lock held): the summary record of its repeats, if
        any; a kind with repeats goes on with a new interval, one without is forgotten."""
        if repeats.timer is not None:
            repeats.timer.cancel()
            repeats.timer = None
        if repeats.count == 0 or repeats.last is None:
            del self._kinds[kind]
            return None
        summary = logging.makeLogRecord(repeats.last.__dict__)
        summary.repeated = repeats.count
        summary.seconds = round(max(0.0, now - repeats.started), 1)
        repeats.count, repeats.last = 0, None
        repeats.until = now + self._interval
        return summary

    def _expire(self, kind: _Kind) -> None:
        with self._lock:
            repeats = self._kinds.get(kind)
            if repeats is None:
                return
            repeats.timer = None
            due = self._take(kind, repeats, self._clock())
        if due is not None:
            self._emit(due)

    def flush(self) -> None:
        """Emit every held-back count now (at exit, or in a test)."""
        now = self._clock()
        with self._lock:
            due = [self._take(kind, r, now) for kind, r in list(self._kinds.items())]
        for record in due:
            if record is not None:
                self._emit(record)


class _ToStructlog(logging.Handler):
    """A standard-library handler that re-emits each record through structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = record.getMessage()
        except Exception:  # noqa: BLE001 - a library's bad format string must not crash us
            self.handleError(record)
            return
        level = record.levelname.lower()
        method = level if level in ("debug", "info", "warning", "error", "critical") else "error"
        kwargs: dict[str, Any] = {"logger": record.name}
        repeated = getattr(record, "repeated", None)
        if repeated is not None:  # a RepeatLimiter summary
            kwargs["repeated"] = repeated
            kwargs["seconds"] = getattr(record, "seconds", None)
        if record.exc_info and record.exc_info[0] is not None:
            kwargs["exc_info"] = record.exc_info
        getattr(structlog.get_logger(record.name), method)(event, **kwargs)


def _orjson_dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default)


def _orjson_dumps_str(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure(
    settings: LogSettings | Settings, *, stream: Any = None, secrets: Settings | None = None
) -> None:
    """Set up structlog and the standard library's logging.

    Given the whole :class:`~service.config.Settings` (as ``settings`` or ``secrets``), its
    secrets are registered for redaction first.
    """
    if isinstance(settings, LogSettings):
        log_settings = settings
    else:
        log_settings = settings.log
        register_settings_secrets(settings)
    if secrets is not None:
        register_settings_secrets(secrets)
    level = logging.getLevelName(log_settings.level)
    out: Any = stream if stream is not None else sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    console = log_settings.format == "console"
    exceptions: Any = structlog.processors.format_exc_info if console else _dict_tracebacks
    if console:
        renderer: Any = structlog.dev.ConsoleRenderer(
            colors=out.isatty() if hasattr(out, "isatty") else False
        )
        factory: Any = structlog.PrintLoggerFactory(out)
    elif hasattr(out, "buffer") or not isinstance(out, io.TextIOBase):  # bytes underneath
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        factory = structlog.BytesLoggerFactory(out.buffer if hasattr(out, "buffer") else out)
    else:  # a text stream with no binary buffer underneath (io.StringIO): write str
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps_str)
        text_out: Any = out
        factory = structlog.WriteLoggerFactory(text_out)
    structlog.configure(
        processors=[*shared, exceptions, redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries (aiokafka, aiohttp, asyncio) log through the standard library: keep them quiet
    # unless something is wrong, and send their records through the very same structlog pipeline
    # (same JSON shape, exceptions without locals, redaction), with the library's logger name.
    # Their repeated warnings are rate-limited (RepeatLimiter): one line per kind and interval.
    handler = _ToStructlog()
    limiter = RepeatLimiter(handler.handle)
    handler.addFilter(limiter)
    _flush_at_exit(limiter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))


_current_limiter: RepeatLimiter | None = None


def _flush_at_exit(limiter: RepeatLimiter) -> None:
    """At exit, log the counts the latest :class:`RepeatLimiter` still holds back."""
    global _current_limiter  # noqa: PLW0603 - the process-wide logging setup
    if _current_limiter is None:
        atexit.register(lambda: _current_limiter.flush() if _current_limiter else None)
    _current_limiter = limiter
