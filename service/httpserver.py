"""The operations port: /metrics, /healthz, /readyz. A few lines of asyncio, no framework."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from service.metrics import Metrics

log = structlog.get_logger(__name__)

ReadinessCheck = Callable[[], tuple[bool, str]]
LivenessCheck = Callable[[], bool]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class OpsServer:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        ready: ReadinessCheck,
        alive: LivenessCheck,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._ready = ready
        self._alive = alive
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            status, ctype, body = self._route(method, path)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/metrics":
            self._metrics.ready.set(1 if self._ready()[0] else 0)
            return 200, _PROMETHEUS_TEXT, self._metrics.render()
        if path == "/healthz":
            ok = self._alive()
            return (200 if ok else 503), "text/plain", b"ok\n" if ok else b"event loop stalled\n"
        if path == "/readyz":
            ok, why = self._ready()
            self._metrics.ready.set(1 if ok else 0)
            return (200 if ok else 503), "text/plain", (why + "\n").encode()
        return 404, "text/plain", b"not found\n"
