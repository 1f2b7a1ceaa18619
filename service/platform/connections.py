"""The platform client's connections: one single-connection ``httpx.AsyncClient`` per call.

httpcore scans its whole pool on every request and every release (each idle connection polled
for readability through anyio's attribute lookup), so the cost of a call grows with the pool.
:class:`ConnectionSlots` holds as many one-connection clients as calls may be in flight and lends
an idle one to each call, the most recently used first (its connection is the warmest; the ones
left unused expire after the keep-alive). A call never queues behind another one's connection
while a client is idle; when none is, it waits for the next one given back, for at most the pool
timeout, and then fails as httpx's own pool would: :class:`httpx.PoolTimeout` (never sent).

:class:`SetCookieJar` spares each answer without a cookie httpx's cookie bookkeeping (it builds a
``urllib`` request from every response to hand it to the standard library's cookie jar, which
then finds nothing to store); an answer that sets a cookie is stored as before.
"""

from __future__ import annotations

import asyncio
from collections import deque

import httpx

_SET_COOKIE_HEADERS = ("set-cookie", "set-cookie2")
"""The headers from which the standard library's cookie jar takes cookies (``make_cookies``)."""


class SetCookieJar(httpx.Cookies):
    """A client's cookies, extracted only from answers that carry a ``Set-Cookie`` header."""

    def extract_cookies(self, response: httpx.Response) -> None:
        headers = response.headers
        if any(name in headers for name in _SET_COOKIE_HEADERS):
            super().extract_cookies(response)


def with_set_cookie_jar(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """``client``, its cookie jar replaced by a :class:`SetCookieJar` (httpx's ``cookies``
    setter would wrap it into a plain ``httpx.Cookies``)."""
    client._cookies = SetCookieJar(client.cookies)
    return client


class ConnectionSlots:
    """Lends each call a client of its own and takes it back (:meth:`take`, :meth:`give`)."""

    def __init__(self, clients: list[httpx.AsyncClient], *, wait_seconds: float) -> None:
        if not clients:
            raise ValueError("at least one client")
        self.clients = clients
        self._idle = list(clients)  # a stack: the most recently given back on top
        self._waiters: deque[asyncio.Future[httpx.AsyncClient]] = deque()
        self._wait_seconds = wait_seconds

    @property
    def idle(self) -> int:
        """Clients not lent out."""
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Calls waiting for a client."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def take(self) -> httpx.AsyncClient:
        """An idle client; when none is, the next one given back (FIFO among the waiting
        calls), or :class:`httpx.PoolTimeout` after ``wait_seconds``."""
        if self._idle:
            return self._idle.pop()
        waiter: asyncio.Future[httpx.AsyncClient] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._wait_seconds):
                return await waiter
        except BaseException as exc:
            # Cancelled or timed out just as a client was handed over: pass it on.
            if waiter.done() and not waiter.cancelled():
                self.give(waiter.result())
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout("no connection free within the pool timeout") from None
            raise

    def give(self, client: httpx.AsyncClient) -> None:
        """Take back a client lent by :meth:`take`: to the longest waiting call, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(client)
                return
        self._idle.append(client)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
