"""httpcore's sockets on asyncio's own streams, for the platform client's connections.

httpx 0.28 runs httpcore over anyio on asyncio: each read and write enters an anyio cancel scope
(``fail_after``), and every request polls each idle pooled connection through anyio's typed
attributes (``is_readable``), about a tenth of the service's CPU in section 1 of the bench
(docs/benchmarks.md). :class:`AsyncioBackend` is an ``httpcore.AsyncNetworkBackend`` (httpcore's
documented extension point) that does the same over ``asyncio.open_connection``-style streams,
with ``asyncio.timeout`` for the timeouts, and a request's head and body written in one send
(the writes are held until the answer is read). What httpx sees does not change: the same httpcore
errors for the same failures, which httpx maps to the same exceptions (a refused or timed-out
connect or TLS handshake is ``ConnectError``/``ConnectTimeout``: never sent; a failed read or
write, ``ReadError``/``WriteError``/``ReadTimeout``/``WriteTimeout``: maybe applied).

:func:`asyncio_transport` is httpx's own ``AsyncHTTPTransport`` with its connection pool built on
this backend (httpx takes no backend argument, so the pool it built is replaced).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any, SupportsIndex, cast

import httpcore
import httpx

READ_BUFFER_LIMIT = 2**16
WRITE_HOLD_BYTES = 2**16
"""Writes are held back until a read, or until this many bytes are held."""
HAPPY_EYEBALLS_DELAY = 0.25
"""A host with several addresses: the next is tried after this, as anyio's ``connect_tcp`` does."""


class _Reader(asyncio.StreamReader):
    """A stream reader that knows how many received bytes are still unread."""

    def __init__(self) -> None:
        super().__init__(limit=READ_BUFFER_LIMIT)
        self.unread = 0

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        self.unread += len(cast(bytes, data))  # the protocol feeds what the socket received
        super().feed_data(data)

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self.unread -= len(data)
        return data


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One TCP (or TLS) connection as httpcore uses it."""

    def __init__(self, reader: _Reader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._held: list[bytes] = []
        self._held_bytes = 0

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._held:  # the request is complete: send it, then wait for the answer
            await self._flush(timeout)
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Held back until the next read (or :data:`WRITE_HOLD_BYTES`): a request's head and
        body leave in one send instead of one each."""
        if not buffer:
            return
        self._held.append(buffer)
        self._held_bytes += len(buffer)
        if self._held_bytes >= WRITE_HOLD_BYTES:
            await self._flush(timeout)

    async def _flush(self, timeout: float | None) -> None:
        data = b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        writer = self._writer
        try:
            if writer.is_closing():
                raise ConnectionResetError("the connection is closed")
            writer.write(data)
            async with asyncio.timeout(timeout):
                await writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            await self.aclose()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:  # ssl.SSLError included
            await self.aclose()
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # An idle HTTP/1.1 connection is readable only when the server closed it (or sent
            # what it should not): httpcore then drops it instead of sending on it.
            reader = self._reader
            return reader.at_eof() or reader.exception() is not None or reader.unread > 0
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens :class:`AsyncioStream` connections (TCP only: the platform is reached by URL)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        reader = _Reader()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    lambda: asyncio.StreamReaderProtocol(reader),
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                    happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        sock = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not used for the platform")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def asyncio_transport(
    *, ssl_context: ssl.SSLContext, limits: httpx.Limits
) -> httpx.AsyncHTTPTransport:
    """httpx's HTTP/1.1 transport, its connection pool on :class:`AsyncioBackend`."""
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, limits=limits, http1=True)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=False,
        network_backend=AsyncioBackend(),
    )
    return transport
