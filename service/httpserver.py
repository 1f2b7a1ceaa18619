"""The operations port: /metrics, /healthz, /readyz, served by aiohttp.web.

``/metrics`` is prometheus-client's aiohttp handler (it negotiates the OpenMetrics format and gzip).
Anything else than ``GET``/``HEAD`` answers 405, any other path 404.

The port faces the cluster network, so it keeps its own resources bounded:

* request line and header fields at most :data:`MAX_LINE_BYTES` bytes (larger: 400), at most
  :data:`MAX_HEADERS` headers, bodies at most :data:`MAX_BODY_BYTES`;
* one request per connection (``Connection: close``), and a deadline per connection: the request
  must be complete :data:`REQUEST_DEADLINE_SECONDS` after the connection was accepted (a client
  that sends its headers slowly is dropped then), the answer written
  :data:`CONNECTION_LIFETIME_SECONDS` after it;
* at most :data:`MAX_CONNECTIONS` connections: a new connection beyond that closes the oldest
  one that has not sent a complete request yet, so idle connections can never keep a probe or a
  scrape out.

aiohttp has no deadline for a request's headers (its timeouts cover keep-alive and bodies), so the
deadlines and the cap are a thin wrapper around its protocol (:class:`_GuardedConnection`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.aiohttp import make_aiohttp_handler

from service.metrics import Metrics

log = structlog.get_logger(__name__)

ReadinessCheck = Callable[[], tuple[bool, str]]
LivenessCheck = Callable[[], bool]

MAX_LINE_BYTES: Final = 8190
"""Longest request line or header field (aiohttp answers 400 beyond it)."""
MAX_HEADERS: Final = 64
MAX_BODY_BYTES: Final = 1024
"""The ops endpoints take no body."""
REQUEST_DEADLINE_SECONDS: Final = 5.0
"""A connection must have sent a complete request this long after it was accepted."""
CONNECTION_LIFETIME_SECONDS: Final = 30.0
"""A connection is closed this long after it was accepted, whatever it is doing."""
MAX_CONNECTIONS: Final = 128
"""Open connections; a new one beyond this closes the oldest that has not sent a request."""
_ALLOWED_METHODS: Final = frozenset({"GET", "HEAD"})


class _ClientErrorFilter(logging.Filter):
    """aiohttp logs a malformed request (line or header too long, too many headers, not HTTP) as
    an error with a traceback; it is the client's fault, answered 400: a DEBUG line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.debug("ops_bad_request", status=exc.code, reason=str(exc.message)[:200])
            return False
        return True


_server_log = logging.getLogger("service.httpserver.aiohttp")
_server_log.addFilter(_ClientErrorFilter())


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
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._guard = _ConnectionGuard()
        self._prometheus = make_aiohttp_handler(metrics.registry)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Connections open now (for tests and debugging)."""
        return len(self._guard.open)

    async def start(self) -> None:
        app = web.Application(
            client_max_size=MAX_BODY_BYTES,
            middlewares=[self._methods],
        )
        app.router.add_get("/metrics", self._metrics_endpoint)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=REQUEST_DEADLINE_SECONDS,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            max_headers=MAX_HEADERS,
            lingering_time=1.0,
            logger=_server_log,
            shutdown_timeout=2.0,
        )
        await runner.setup()
        self._runner = runner
        self._server = await serve_guarded(runner, self._guard, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._guard.close_all()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._runner.cleanup(), 3)
            self._runner = None

    # ------------------------------------------------------------------ handlers
    @web.middleware
    async def _methods(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self._guard.request_started(request.transport)
        if request.method not in _ALLOWED_METHODS:
            response: web.StreamResponse = _text(405, "method not allowed")
            response.headers["Allow"] = "GET, HEAD"
        else:
            try:
                response = await handler(request)
            except web.HTTPNotFound:
                response = _text(404, "not found")
        response.force_close()  # one request per connection
        return response

    async def _metrics_endpoint(self, request: web.Request) -> web.StreamResponse:
        self._metrics.ready.set(1 if self._ready()[0] else 0)
        return await self._prometheus(request)

    async def _healthz(self, _: web.Request) -> web.StreamResponse:
        if self._alive():
            return _text(200, "ok")
        return _text(503, "event loop stalled")

    async def _readyz(self, _: web.Request) -> web.StreamResponse:
        ok, why = self._ready()
        self._metrics.ready.set(1 if ok else 0)
        return _text(200 if ok else 503, why)


async def serve_guarded(
    runner: web.AppRunner,
    guard: _ConnectionGuard,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """Serve ``runner``'s application with the deadlines and the connection cap of ``guard``."""
    factory = runner.server
    assert factory is not None
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _GuardedConnection(factory(), guard),
        host,
        port,
        backlog=MAX_CONNECTIONS,
        reuse_address=True,
        ssl=ssl_context,
    )


def new_guard() -> _ConnectionGuard:
    return _ConnectionGuard()


def _text(status: int, body: str) -> web.Response:
    return web.Response(status=status, text=body + "\n", content_type="text/plain")


class _ConnectionGuard:
    """Deadlines and the connection cap, shared by the connections of one server."""

    def __init__(self) -> None:
        self.open: OrderedDict[_GuardedConnection, None] = OrderedDict()
        """Connections in the order they were accepted (the oldest first)."""
        self._by_transport: dict[int, _GuardedConnection] = {}

    def accepted(self, conn: _GuardedConnection) -> None:
        self.open[conn] = None
        if conn.transport is not None:
            self._by_transport[id(conn.transport)] = conn
        if len(self.open) > MAX_CONNECTIONS:
            idle = next((c for c in self.open if not c.requested and c is not conn), None)
            if idle is not None:
                idle.drop("connection cap: the oldest connection without a request is closed")

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self._by_transport.get(id(transport)) if transport is not None else None
        if conn is not None:
            conn.request_started()

    def closed(self, conn: _GuardedConnection) -> None:
        self.open.pop(conn, None)
        if conn.transport is not None:
            self._by_transport.pop(id(conn.transport), None)

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.drop(None)


class _GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a deadline and a place under the cap."""

    def __init__(self, inner: asyncio.Protocol, guard: _ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self.transport: asyncio.Transport | None = None
        self.requested = False
        self._accepted_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol, delegated
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._accepted_at = time.monotonic()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(
            REQUEST_DEADLINE_SECONDS,
            self.drop,
            f"no complete request within {REQUEST_DEADLINE_SECONDS:g} s",
        )
        self._inner.connection_made(transport)
        self._guard.accepted(self)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._guard.closed(self)
        self._inner.connection_lost(exc)

    # the guard's side
    def request_started(self) -> None:
        """A complete request arrived: from now on only the connection's lifetime bounds it."""
        if self.requested:
            return
        self.requested = True
        if self._timer is not None:
            self._timer.cancel()
        remaining = max(0.0, self._accepted_at + CONNECTION_LIFETIME_SECONDS - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(
            remaining, self.drop, f"connection open for {CONNECTION_LIFETIME_SECONDS:g} s"
        )

    def drop(self, reason: str | None) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if reason is not None:
            log.debug("ops_connection_dropped", reason=reason)
        transport.abort()  # connection_lost follows later: leave the cap's count at once
        self._guard.closed(self)
