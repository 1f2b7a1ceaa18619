"""Structured logs: JSON lines by default (orjson), a readable console format for a terminal.

Context about the event being worked on (topic, partition, offset, device_id, event_id) is bound
with contextvars by the pipeline, so every line about an event carries it.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Any

import orjson
import structlog

from service.config import LogSettings

# Keys whose values are secrets wherever they appear; a last line of defence, not the plan:
# the code never passes secrets to a logger in the first place.
_SECRET_KEYS = frozenset(
    {
        "secret",
        "password",
        "token",
        "access_token",
        "refresh_token",
        "authorization",
        "sasl_password",
    }
)


def _redact(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in event_dict.keys() & _SECRET_KEYS:
        event_dict[key] = "**********"
    return event_dict


def _orjson_dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default)


def _orjson_dumps_str(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure(settings: LogSettings, *, stream: Any = None) -> None:
    level = logging.getLevelName(settings.level)
    out: Any = stream if stream is not None else sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    if settings.format == "console":
        processors = [
            *shared,
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=out.isatty() if hasattr(out, "isatty") else False),
        ]
        factory: Any = structlog.PrintLoggerFactory(out)
    elif hasattr(out, "buffer") or not isinstance(out, io.TextIOBase):  # bytes underneath
        processors = [
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
        factory = structlog.BytesLoggerFactory(out.buffer if hasattr(out, "buffer") else out)
    else:  # a text stream with no binary buffer underneath (io.StringIO): write str
        processors = [
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps_str),
        ]
        text_out: Any = out
        factory = structlog.WriteLoggerFactory(text_out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library: keep them quiet unless something is wrong,
    # and send them through the same renderer.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer()
                if settings.format == "json"
                else structlog.dev.ConsoleRenderer(colors=False),
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))
