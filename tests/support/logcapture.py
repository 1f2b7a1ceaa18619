"""Capture the service's structured logs in a test, through the real ``service.logs`` setup.

``service.logs.configure`` caches each module's logger on first use (right for production, where
it is called once). A test reconfigures after other tests have logged, so the capture turns that
cache off and puts structlog and the root logger back as they were on exit.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import structlog

from service import logs
from service.config import LogSettings


@dataclass
class CapturedLogs:
    stream: io.StringIO = field(default_factory=io.StringIO)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        """Every line parsed as a JSON object (fails on a line that is not one)."""
        out: list[dict[str, Any]] = []
        for line in self.text.splitlines():
            parsed = orjson.loads(line)
            assert isinstance(parsed, dict), line
            out.append(parsed)
        return out

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event]


@contextmanager
def captured_logs(
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "DEBUG",
    fmt: Literal["json", "console"] = "json",
) -> Iterator[CapturedLogs]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    captured = CapturedLogs()
    logs.configure(LogSettings(level=level, format=fmt), stream=captured.stream)
    structlog.configure(cache_logger_on_first_use=False)
    try:
        yield captured
    finally:
        structlog.reset_defaults()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
