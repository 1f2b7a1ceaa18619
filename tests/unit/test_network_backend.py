"""The platform client's connections on asyncio's streams (service/platform/network.py, issue 24).

httpx must see what it saw on httpcore's anyio backend: a connection that cannot be made is
``ConnectError`` (never sent), an answer that does not come in time is ``ReadTimeout``, a
connection dropped before the answer is a transport error (maybe applied), and an idle
keep-alive connection the server closed is not reused (the next request opens a new one).
Against a real loopback HTTP/1.1 server, not a mock transport.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from service.platform.network import WRITE_HOLD_BYTES, asyncio_transport
from tests.support.waiting import wait_until

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


@asynccontextmanager
async def server(serve: Serve) -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback server; yields its URL and the number of connections it accepted."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", accepted
    finally:
        srv.close()


def client(url: str, *, read: float = 5.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=30)
    return httpx.AsyncClient(
        base_url=url,
        transport=asyncio_transport(ssl_context=ssl.create_default_context(), limits=limits),
        timeout=httpx.Timeout(read, connect=1.0),
        trust_env=False,
    )


async def test_keep_alive_answers_and_the_request_on_the_wire() -> None:
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(OK)
            await writer.drain()

    async with server(serve) as (url, accepted), client(url) as http:
        for _ in range(3):
            resp = await http.put("/dev/1", json={"nodeId": "n-1"}, headers={"app_key": "a"})
            assert resp.status_code == 200
            assert resp.json() == {"ok": True}
    assert len(accepted) == 1  # one connection, kept alive
    assert seen[0].startswith(b"PUT /dev/1 HTTP/1.1\r\n")
    assert b"\r\napp_key: a\r\n" in seen[0]
    assert seen[0].endswith(b'\r\n\r\n{"nodeId":"n-1"}')


async def test_nobody_listening_is_connect_error() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with client(f"http://127.0.0.1:{port}") as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")


async def test_no_answer_in_time_is_read_timeout() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers; waits for the client to go away

    async with server(serve) as (url, _), client(url, read=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/")


async def test_dropped_before_the_answer_is_a_transport_error_not_a_connect_error() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # then closes without answering

    async with server(serve) as (url, _), client(url) as http:
        with pytest.raises(httpx.TransportError) as caught:
            await http.get("/")
    assert not isinstance(caught.value, httpx.ConnectError | httpx.ConnectTimeout)


async def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)  # keep-alive answer, then the server closes the connection
        await writer.drain()

    async with server(serve) as (url, accepted), client(url) as http:
        assert (await http.get("/")).status_code == 200
        pool = http._transport._pool  # type: ignore[attr-defined]

        def closed_seen() -> bool:
            return all(c._connection.has_expired() for c in pool.connections)

        await wait_until(closed_seen, 5.0, "the client to see the server's close")
        assert (await http.get("/")).status_code == 200  # on a new connection, no error
    assert len(accepted) == 2


async def test_a_body_larger_than_the_write_hold_arrives_whole() -> None:
    """Writes are held until the answer is read, or until WRITE_HOLD_BYTES are held."""
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await read_request(reader))
        writer.write(OK)
        await writer.drain()

    body = bytes(range(256)) * (3 * WRITE_HOLD_BYTES // 256 + 7)
    async with server(serve) as (url, _), client(url) as http:
        assert (await http.put("/big", content=body)).status_code == 200
    assert got[0].endswith(b"\r\n\r\n" + body)
