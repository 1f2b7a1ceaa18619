"""The ops port (issue 11, item 9): aiohttp.web behind a deadline and a connection cap.

Real sockets on loopback. Same answers as before (/metrics, /healthz, /readyz, 404, 405, HEAD),
plus the hostile clients of the review: a client that sends one header line every 2 s is dropped
within a few seconds, 1,000 idle connections do not keep /healthz from answering (and most of
them are closed at once by the cap), an oversized request line or header gets a 4xx and nothing
unhandled is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import resource
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from service.httpserver import MAX_CONNECTIONS, REQUEST_DEADLINE_SECONDS, OpsServer
from service.metrics import Metrics
from tests.support.logcapture import CapturedLogs, captured_logs
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

IDLE_CONNECTIONS = 1000


@dataclass
class Probe:
    ready: tuple[bool, str] = (True, "ready")
    alive: bool = True


@dataclass
class Ops:
    server: OpsServer
    probe: Probe
    metrics: Metrics
    loop_errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    async def get(self, path: str, method: str = "GET", **headers: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=5) as c:
            return await c.request(method, path, headers=headers)


@pytest.fixture
def logs() -> Iterator[CapturedLogs]:
    with captured_logs(level="DEBUG", fmt="json") as cap:
        yield cap


@pytest.fixture
async def ops(logs: CapturedLogs) -> AsyncIterator[Ops]:
    probe = Probe()
    metrics = Metrics()
    server = OpsServer("127.0.0.1", 0, metrics, lambda: probe.ready, lambda: probe.alive)
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    state = Ops(server, probe, metrics)
    loop.set_exception_handler(lambda _loop, context: state.loop_errors.append(context))
    await server.start()
    try:
        yield state
    finally:
        await server.stop()
        loop.set_exception_handler(previous)


def nothing_unhandled(ops: Ops, logs: CapturedLogs) -> None:
    assert ops.loop_errors == []
    bad = [line for line in logs.lines() if line["level"] in ("error", "critical", "exception")]
    assert bad == []
    assert "Traceback" not in logs.text


async def raw_exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send ``payload`` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), timeout)
        except ConnectionError:
            return b""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# ------------------------------------------------------------------ same answers as before


async def test_endpoints_answer_as_before(ops: Ops, logs: CapturedLogs) -> None:
    metrics = await ops.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "rebind_build_info" in metrics.text
    assert "rebind_ready 1.0" in metrics.text

    assert ((await ops.get("/healthz")).status_code, (await ops.get("/healthz")).text) == (
        200,
        "ok\n",
    )
    ops.probe.alive = False
    stalled = await ops.get("/healthz")
    assert (stalled.status_code, stalled.text) == (503, "event loop stalled\n")

    ready = await ops.get("/readyz")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    ops.probe.ready = (False, "kafka: not connected yet")
    not_ready = await ops.get("/readyz")
    assert (not_ready.status_code, not_ready.text) == (503, "kafka: not connected yet\n")
    assert ops.metrics.registry.get_sample_value("rebind_ready") == 0  # the last answer

    for path in ("/nope", "/metrics/extra", "/", "/healthz/"):
        assert (await ops.get(path)).status_code == 404, path
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        for path in ("/metrics", "/readyz", "/nope"):
            answer = await ops.get(path, method=method)
            assert answer.status_code == 405, (method, path)
    head = await ops.get("/readyz", method="HEAD")
    assert head.status_code == 503
    assert head.content == b""
    assert head.headers["connection"] == "close"
    nothing_unhandled(ops, logs)


async def test_metrics_negotiate_openmetrics_and_gzip(ops: Ops) -> None:
    om = await ops.get("/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-encoding: gzip" in head.lower()
    assert b"transfer-encoding: chunked" not in head.lower()  # a plain body to decompress
    assert b"rebind_build_info" in gzip.decompress(body)


# ------------------------------------------------------------------ hostile clients


async def test_a_slow_header_client_is_dropped_within_a_few_seconds(
    ops: Ops, logs: CapturedLogs
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
    started = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    await writer.drain()

    async def trickle() -> None:
        n = 0
        while True:  # one header line every 2 s, never the blank line that ends them
            await asyncio.sleep(2.0)  # the client's pace, not a synchronisation
            n += 1
            writer.write(f"X-Slow-{n}: {'y' * 10}\r\n".encode())
            await writer.drain()

    sender = asyncio.create_task(trickle())
    try:
        try:
            answer = await asyncio.wait_for(reader.read(), REQUEST_DEADLINE_SECONDS + 10)
        except ConnectionError:
            answer = b""
        elapsed = time.monotonic() - started
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        writer.close()
    assert b"200" not in answer
    assert elapsed < REQUEST_DEADLINE_SECONDS + 2.0, f"dropped only after {elapsed:.1f} s"
    assert ops.server.connections == 0
    assert (await ops.get("/healthz")).status_code == 200
    nothing_unhandled(ops, logs)


@contextlib.contextmanager
def open_files_limit(wanted: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target < IDLE_CONNECTIONS + 3 * MAX_CONNECTIONS:
        pytest.skip(f"the open files hard limit ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_thousand_idle_connections_do_not_keep_healthz_out(
    ops: Ops, logs: CapturedLogs
) -> None:
    with open_files_limit(4 * IDLE_CONNECTIONS):
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        closed: list[asyncio.Task[bytes]] = []

        async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
            try:
                return await reader.read()
            except ConnectionError:
                return b""

        try:
            for _ in range(IDLE_CONNECTIONS // 50):
                batch = await asyncio.gather(
                    *(asyncio.open_connection("127.0.0.1", ops.port) for _ in range(50))
                )
                idle.extend(batch)
            closed = [asyncio.create_task(read_until_closed(r)) for r, _ in idle]
            started = time.monotonic()
            health = await ops.get("/healthz")
            assert health.status_code == 200
            assert health.text == "ok\n"
            assert time.monotonic() - started < 2.0
            # the cap: all but the newest MAX_CONNECTIONS idle ones are closed at once, long
            # before their request deadline
            await wait_until(
                lambda: sum(t.done() for t in closed) >= IDLE_CONNECTIONS - MAX_CONNECTIONS,
                REQUEST_DEADLINE_SECONDS - 1.0,
                "the connection cap to close the oldest idle connections",
            )
            assert ops.server.connections <= MAX_CONNECTIONS
            # and the deadline closes the rest
            await wait_until(
                lambda: all(t.done() for t in closed),
                REQUEST_DEADLINE_SECONDS + 3.0,
                "every idle connection closed by the request deadline",
            )
            assert all(t.result() == b"" for t in closed)  # closed without an answer
            assert (await ops.get("/healthz")).status_code == 200
        finally:
            for task in closed:
                task.cancel()
            for _, writer in idle:
                writer.close()
    nothing_unhandled(ops, logs)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n", id="line"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (70 * 1024) + b"\r\n\r\n",
            id="header",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
            + b"\r\n",
            id="many-headers",
        ),
    ],
)
async def test_an_oversized_request_gets_a_4xx_and_nothing_unhandled(
    ops: Ops, logs: CapturedLogs, payload: bytes
) -> None:
    answer = await raw_exchange(ops.port, payload)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split(b" ")[1].startswith(b"4"), answer[:200]
    assert (await ops.get("/healthz")).status_code == 200
    nothing_unhandled(ops, logs)
    await wait_until(lambda: ops.server.connections == 0, 5, "the connections closed")
