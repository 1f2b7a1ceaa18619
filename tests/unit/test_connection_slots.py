"""ConnectionSlots: each platform call borrows a single-connection client of its own (issue 24).

An idle client is lent at once (the most recently given back first); with none idle, a call waits
for the next one given back, in arrival order, and fails as httpx's pool would (PoolTimeout,
never sent) after the pool timeout; a waiter cancelled just as a client was handed to it passes
the client on, so no client is ever lost.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.platform.connections import ConnectionSlots, SetCookieJar, with_set_cookie_jar
from tests.support.waiting import wait_until


def clients(n: int) -> list[httpx.AsyncClient]:
    return [httpx.AsyncClient() for _ in range(n)]


async def test_idle_clients_are_lent_most_recently_given_back_first() -> None:
    a, b = clients(2)
    slots = ConnectionSlots([a, b], wait_seconds=1.0)
    first = await slots.take()
    second = await slots.take()
    assert {first, second} == {a, b}
    assert slots.idle == 0
    slots.give(first)
    slots.give(second)
    assert await slots.take() is second  # the warmest connection
    assert slots.idle == 1


async def test_a_call_waits_for_the_next_client_given_back_in_arrival_order() -> None:
    (only,) = clients(1)
    slots = ConnectionSlots([only], wait_seconds=5.0)
    lent = await slots.take()
    order: list[str] = []

    async def call(name: str) -> None:
        client = await slots.take()
        order.append(name)
        slots.give(client)

    waiting = [asyncio.create_task(call("first")), asyncio.create_task(call("second"))]
    await wait_until(lambda: slots.waiting == 2, 5.0, "both calls queued behind the lent one")
    assert order == []
    slots.give(lent)
    await asyncio.wait_for(asyncio.gather(*waiting), 5.0)
    assert order == ["first", "second"]
    assert slots.idle == 1


async def test_no_client_within_the_pool_timeout_is_httpx_pool_timeout() -> None:
    (only,) = clients(1)
    slots = ConnectionSlots([only], wait_seconds=0.05)
    lent = await slots.take()
    with pytest.raises(httpx.PoolTimeout):
        await slots.take()
    assert slots.waiting == 0
    slots.give(lent)
    assert await slots.take() is only  # the timed-out waiter took nothing


async def test_a_waiter_cancelled_after_the_hand_over_passes_the_client_on() -> None:
    (only,) = clients(1)
    slots = ConnectionSlots([only], wait_seconds=5.0)
    lent = await slots.take()
    waiter = asyncio.create_task(slots.take())
    await wait_until(lambda: slots.waiting == 1, 5.0, "the call queued behind the lent one")
    slots.give(lent)  # handed to the waiter, which has not run yet
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.idle == 1  # given back, not lost
    assert await slots.take() is only


async def test_cookies_set_by_an_answer_are_kept_and_sent_as_httpx_does() -> None:
    """The jar skips only answers without ``Set-Cookie``: a cookie the platform (or a load
    balancer in front of it) sets still rides the following requests."""
    sent: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("cookie"))
        if request.url.path == "/set":
            return httpx.Response(200, headers={"Set-Cookie": "affinity=node-7; Path=/"})
        return httpx.Response(200, json={})

    client = with_set_cookie_jar(
        httpx.AsyncClient(base_url="http://platform.test", transport=httpx.MockTransport(answer))
    )
    async with client:
        await client.get("/plain")
        assert not client.cookies
        await client.get("/set")
        await client.get("/plain")
    assert isinstance(client.cookies, SetCookieJar)
    assert client.cookies.get("affinity") == "node-7"
    assert sent == [None, None, "affinity=node-7"]
