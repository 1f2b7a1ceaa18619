"""The simulator's side of binding: subscriptions, the activation status, bindDevice pushes.

A real simulator on loopback (raw httpx calls) and, to catch its pushes, a tiny aiohttp receiver
run by the test on its own event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.fixtures.simulator import SimulatorHandle
from tests.integration.test_simulator import documented, gateway, headers, login, put_key
from tests.simulator import SimulatorControlError
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

CRED = "/iocm/app/reg/v1.1.0/deviceCredentials"
DEVICES = "/iocm/app/dm/v1.4.0/devices"
SUBS = "/iocm/app/sub/v1.2.0/subscriptions"


@dataclass
class Receiver:
    """Catches pushes: every POST is recorded; answers come from ``answers``, then 200."""

    base: str
    received: list[tuple[str, Any]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)

    def url(self, path: str = "/bind") -> str:
        return f"{self.base}{path}"

    def bodies(self, path: str | None = None) -> list[Any]:
        return [body for p, body in self.received if path is None or p == path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(base="")

    async def handle(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        rec.received.append((request.path, body))
        status = rec.answers.pop(0) if rec.answers else 200
        return web.json_response({"status": status}, status=status)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield rec
    finally:
        await runner.cleanup()


@pytest.fixture
async def http(sim: SimulatorHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        yield client


@pytest.fixture
async def hdrs(sim: SimulatorHandle, http: httpx.AsyncClient) -> dict[str, str]:
    tok = await login(http, sim.app_id, sim.secret)
    return headers(tok["accessToken"], sim.app_id)


async def subscribe(
    http: httpx.AsyncClient,
    hdrs: dict[str, str],
    callback: Any,
    *,
    notify_type: Any = "bindDevice",
    app_id: str | None = None,
    owner_flag: str | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {"notifyType": notify_type, "callbackUrl": callback}
    if app_id is not None:
        body["appId"] = app_id
    params = {"ownerFlag": owner_flag} if owner_flag is not None else None
    return await http.post(SUBS, json=body, headers=hdrs, params=params)


async def activated(http: httpx.AsyncClient, hdrs: dict[str, str], device_id: str) -> bool:
    resp = await http.get(f"{CRED}/{device_id}", headers=hdrs)
    assert resp.status_code == 200, resp.text
    value = resp.json()["activated"]
    assert isinstance(value, bool)
    return value


async def device_info(http: httpx.AsyncClient, hdrs: dict[str, str], device_id: str) -> Any:
    resp = await http.get(f"{DEVICES}/{device_id}", headers=hdrs)
    assert resp.status_code == 200, resp.text
    return resp.json()["deviceInfo"]


async def refresh(
    http: httpx.AsyncClient, hdrs: dict[str, str], device_id: str, node_id: str, timeout: int
) -> None:
    body = {"nodeId": node_id, "verifyCode": node_id, "timeout": timeout}
    resp = await put_key(http, device_id, body, hdrs)
    assert resp.status_code == 200, resp.text


async def received(rec: Receiver, count: int, what: str, path: str | None = None) -> list[Any]:
    """Wait until ``count`` pushes (to ``path``) arrived; return them all."""

    def enough() -> list[Any]:
        bodies = rec.bodies(path)
        return bodies if len(bodies) >= count else []

    return await wait_until(enough, timeout=10, what=what)


# --------------------------------------------------------------------------- subscriptions


async def test_subscription_is_created_stored_and_repeatable(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    url = receiver.url("/bind/secret-1")
    first = await subscribe(http, hdrs, url, owner_flag="false")
    assert first.status_code == 201, first.text
    answer = first.json()
    assert set(answer) == {"subscriptionId", "notifyType", "callbackUrl"}
    assert (answer["notifyType"], answer["callbackUrl"]) == ("bindDevice", url)
    again = await subscribe(http, hdrs, url)  # repeating is harmless: the same subscription
    assert again.status_code == 201
    assert again.json() == answer
    [stored] = await sim.control.subscriptions(sim.app_id)
    assert stored["subscription_id"] == answer["subscriptionId"]
    assert (stored["app_id"], stored["created_by"], stored["requests"]) == (
        sim.app_id,
        sim.app_id,
        2,
    )
    # another URL is another subscription; an authorized app's devices have their own
    assert (await subscribe(http, hdrs, receiver.url("/other"))).status_code == 201
    partner = await subscribe(http, hdrs, url, app_id=sim.partner_app_id, owner_flag="true")
    assert partner.status_code == 201, partner.text
    assert len(await sim.control.subscriptions(sim.app_id)) == 2
    [theirs] = await sim.control.subscriptions(sim.partner_app_id)
    assert theirs["owner_flag"] is True
    # logged, and counted against flow control like every call (login + 4)
    log = await sim.control.calls(operation="subscribe")
    assert [c["status"] for c in log] == [201] * 4
    assert log[0]["path"] == SUBS
    assert log[0]["body"] == {"notifyType": "bindDevice", "callbackUrl": url}
    assert (await sim.control.stats())["apps"][sim.app_id]["accepted_calls"] == 5


@pytest.mark.parametrize(
    "callback",
    [
        "https://rebind.example.com/bind",  # no port
        "http://127.0.0.1/bind",
        "ftp://rebind.example.com:21/bind",
        "https://:8443/bind",  # no host
        "https://rebind.example.com:99999/bind",  # not a port
        "https://rebind example.com:8443/bind",
        "rebind.example.com:8443",
        "",
        None,
        42,
    ],
)
async def test_an_invalid_callback_url_is_100222(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], callback: Any
) -> None:
    documented(await subscribe(http, hdrs, callback), 400, "100222")
    assert await sim.control.subscriptions() == []


async def test_subscription_rejections(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    url = receiver.url()
    documented(await subscribe(http, hdrs, url, notify_type="somethingElse"), 400, "50400")
    documented(await subscribe(http, hdrs, url, notify_type=None), 400, "50400")
    documented(await subscribe(http, hdrs, url, owner_flag="maybe"), 400, "50400")
    bad_json = await http.post(
        SUBS, content=b"{notifyType:", headers=hdrs | {"Content-Type": "application/json"}
    )
    documented(bad_json, 400, "100007")
    documented(await subscribe(http, hdrs, url, app_id=sim.other_app_id), 200, "100217")
    documented(await subscribe(http, hdrs, url, app_id="ghost-app"), 403, "100203")
    gateway(await subscribe(http, hdrs | {"Authorization": "Bearer nope"}, url), 403, "1010005")
    documented(await subscribe(http, {}, url), 401, "100025")
    assert await sim.control.subscriptions() == []


async def test_subscription_meets_faults_and_flow_control(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    await sim.control.inject_error(500, "50252", operation="subscribe")
    documented(await subscribe(http, hdrs, receiver.url()), 500, "50252")
    await sim.control.inject_error(403, "1010009", operation="subscribe", shape="gateway")
    gateway(await subscribe(http, hdrs, receiver.url()), 403, "1010009")
    await sim.control.configure(rate_limit_per_minute=2)  # the login used one call
    assert (await subscribe(http, hdrs, receiver.url())).status_code == 201
    gateway(await subscribe(http, hdrs, receiver.url()), 403, "1010009")
    log = await sim.control.calls(operation="subscribe")
    assert [(c["status"], c["fault"]) for c in log] == [
        (500, "error"),
        (403, "error"),
        (201, None),
        (403, None),
    ]


# --------------------------------------------------------------------------- activation status


async def test_activation_and_device_query_follow_the_bind(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str]
) -> None:
    await sim.control.seed_device("d1", "OLD-1")
    assert await activated(http, hdrs, "d1")  # seeded devices have bound once
    await refresh(http, hdrs, "d1", "NEW-1", timeout=0)
    # refreshed: the new nodeId is registered, the new hardware has not connected yet
    assert not await activated(http, hdrs, "d1")
    info = await device_info(http, hdrs, "d1")
    assert (info["nodeId"], info["status"]) == ("NEW-1", "OFFLINE")
    state = await sim.control.device("d1")
    assert (state["awaiting_bind"], state["bind_deadline"], state["bind_at"]) == (True, None, None)
    # a repeated refresh while waiting is accepted as before
    await refresh(http, hdrs, "d1", "NEW-1", timeout=0)

    bound = await sim.control.connect("d1")
    assert (bound["awaiting_bind"], bound["status"]) == (False, "ONLINE")
    assert bound["bound_at"] is not None
    assert await activated(http, hdrs, "d1")
    info = await device_info(http, hdrs, "d1")
    assert (info["nodeId"], info["status"]) == ("NEW-1", "ONLINE")
    # the new hardware is online now: a further refresh must wait for it to go offline
    documented(await put_key(http, "d1", {"nodeId": "NEW-2"}, hdrs), 400, "100611")
    # no subscriber: the notification is logged, nothing is pushed
    [note] = await sim.control.notifications(device_id="d1")
    assert (note["result_code"], note["targets"]) == ("succeeded", [])
    assert await sim.control.pushes() == []
    # a device that is not waiting cannot "connect"
    with pytest.raises(SimulatorControlError, match="409"):
        await sim.control.connect("d1")
    with pytest.raises(SimulatorControlError, match="404"):
        await sim.control.connect("ghost")
    ops = [c["operation"] for c in await sim.control.calls(device_id="d1")]
    assert "query_activation" in ops


async def test_activation_query_errors_and_faults(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str]
) -> None:
    await sim.control.seed_device("p1", "PN1", app_id=sim.partner_app_id)
    documented(await http.get(f"{CRED}/p1", headers=hdrs), 404, "100403")
    partner = await http.get(f"{CRED}/p1", headers=hdrs, params={"appId": sim.partner_app_id})
    assert partner.json() == {"deviceId": "p1", "activated": True, "name": "device-p1"}
    await sim.control.inject_error(500, "50252", operation="query_activation")
    documented(
        await http.get(f"{CRED}/p1", headers=hdrs, params={"appId": sim.partner_app_id}),
        500,
        "50252",
    )
    gateway(
        await http.get(f"{CRED}/p1", headers=hdrs | {"Authorization": "Bearer x"}), 403, "1010005"
    )


# --------------------------------------------------------------------------- pushes


async def test_a_bind_pushes_succeeded_to_every_subscribed_callback(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    await sim.control.seed_device("d1", "OLD-1", name="meter-1", connect_after_refresh=0)
    await subscribe(http, hdrs, receiver.url("/a"))
    await subscribe(http, hdrs, receiver.url("/b"))
    await subscribe(http, hdrs, receiver.url("/other-type"), notify_type="deviceAdded")
    await refresh(http, hdrs, "d1", "NEW-1", timeout=300)  # binds at once (default behaviour)
    [body] = await received(receiver, 1, "the push to /a", "/a")
    assert body == {
        "notifyType": "bindDevice",
        "deviceId": "d1",
        "resultCode": "succeeded",
        "deviceInfo": {
            "nodeId": "NEW-1",
            "name": "meter-1",
            "manufacturerId": "ACME",
            "manufacturerName": "ACME",
            "deviceType": "Meter",
            "model": "M1",
            "status": "ONLINE",
        },
    }
    assert await received(receiver, 1, "the push to /b", "/b") == [body]
    pushes = await wait_until(
        lambda: sim.control.pushes(device_id="d1"), timeout=10, what="the push log"
    )
    assert sorted(p["url"] for p in pushes) == [receiver.url("/a"), receiver.url("/b")]
    for push in pushes:
        assert (push["status"], push["delivered"], push["attempt"], push["copy"]) == (
            200,
            True,
            1,
            1,
        )
        assert (push["result_code"], push["dropped"], push["error"]) == ("succeeded", False, None)
        assert push["answer"] == '{"status": 200}'
    assert receiver.bodies("/other-type") == []  # another notification type
    assert await activated(http, hdrs, "d1")
    # the deadline is gone with the bind: nothing expires later
    await sim.control.advance_clock(301)
    assert (await sim.control.device("d1"))["status"] == "ONLINE"
    assert [n["result_code"] for n in await sim.control.notifications()] == ["succeeded"]


async def test_connect_after_a_delay_or_never(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    for device in ("d1", "d2", "d3"):
        await sim.control.seed_device(device, f"OLD-{device}")
        await refresh(http, hdrs, device, f"NEW-{device}", timeout=0)
    await subscribe(http, hdrs, receiver.url())
    planned = await sim.control.connect("d1", after=30)  # simulator clock
    assert planned["bind_at"] is not None
    await sim.control.connect("d2", after=10)
    await sim.control.never_connect("d2")  # cancels the planned connection
    assert (await sim.control.device("d2"))["bind_at"] is None
    assert not await activated(http, hdrs, "d1")
    await sim.control.advance_clock(31)
    [body] = await received(receiver, 1, "d1's push after the clock moved")
    assert (body["deviceId"], body["resultCode"]) == ("d1", "succeeded")
    assert await activated(http, hdrs, "d1")
    assert not await activated(http, hdrs, "d2")
    # real time too: the dispatcher wakes up when a planned bind comes due
    await sim.control.connect("d3", after=0.3)
    bodies = await received(receiver, 2, "d3's push 0.3 s later")
    assert [b["deviceId"] for b in bodies] == ["d1", "d3"]
    # d2 never binds
    await sim.control.advance_clock(3000)  # (within the token's hour)
    assert not await activated(http, hdrs, "d2")
    assert [b["deviceId"] for b in receiver.bodies()] == ["d1", "d3"]


async def test_anything_that_brings_a_waiting_device_online_binds_it(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    await subscribe(http, hdrs, receiver.url())
    await sim.control.seed_device("d1", "OLD-1")
    await sim.control.seed_device("d2", "OLD-2")
    await sim.control.seed_device("d3", "OLD-3", connect_after_refresh=5)
    await sim.control.go_online_after_success("d3", 0)  # the one shot wins over the default
    for device in ("d1", "d2", "d3"):
        await refresh(http, hdrs, device, f"NEW-{device}", timeout=0)
    await sim.control.set_status("d1", "ONLINE")
    await sim.control.go_online_after("d2", 20)
    await sim.control.advance_clock(21)
    bodies = await received(receiver, 3, "three pushes")
    assert sorted(b["deviceId"] for b in bodies) == ["d1", "d2", "d3"]
    for device in ("d1", "d2", "d3"):
        assert await activated(http, hdrs, device)


async def test_expiry_pushes_expired_and_deletes_the_device(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    await subscribe(http, hdrs, receiver.url())
    await sim.control.seed_device("d1", "OLD-1")  # never connects
    await sim.control.seed_device("d2", "OLD-2")  # timeout 0: never expires
    await sim.control.seed_device("d3", "OLD-3", connect_after_refresh=60)  # binds in time
    await refresh(http, hdrs, "d1", "NEW-1", timeout=120)
    await refresh(http, hdrs, "d2", "NEW-2", timeout=0)
    await refresh(http, hdrs, "d3", "NEW-3", timeout=120)
    assert (await sim.control.device("d1"))["bind_deadline"] is not None
    await sim.control.advance_clock(121)
    bodies = await received(receiver, 2, "d3's bind and d1's expiry")
    assert [(b["deviceId"], b["resultCode"]) for b in bodies] == [
        ("d3", "succeeded"),  # at t=60
        ("d1", "expired"),  # at t=120
    ]
    assert bodies[1]["deviceInfo"]["nodeId"] == "NEW-1"
    # the registration is gone: every call for it answers 100403
    documented(await http.get(f"{CRED}/d1", headers=hdrs), 404, "100403")
    documented(await http.get(f"{DEVICES}/d1", headers=hdrs), 404, "100403")
    documented(await put_key(http, "d1", {"nodeId": "NEW-1"}, hdrs), 404, "100403")
    with pytest.raises(SimulatorControlError, match="404"):
        await sim.control.device("d1")
    await sim.control.advance_clock(10**6)
    assert (await sim.control.device("d2"))["awaiting_bind"] is True
    assert (await sim.control.device("d3"))["status"] == "ONLINE"
    assert len(receiver.bodies()) == 2


async def test_expiry_in_real_time(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    await subscribe(http, hdrs, receiver.url())
    await sim.control.seed_device("d1", "OLD-1")
    await refresh(http, hdrs, "d1", "NEW-1", timeout=1)
    [body] = await received(receiver, 1, "the expired push one second later")
    assert (body["deviceId"], body["resultCode"]) == ("d1", "expired")
    documented(await http.get(f"{CRED}/d1", headers=hdrs), 404, "100403")


async def test_a_push_without_a_2xx_is_retried(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    await sim.control.configure(push_retry_delay_seconds=0.05, push_max_attempts=3)
    await subscribe(http, hdrs, receiver.url())
    await sim.control.seed_device("d1", "OLD-1", connect_after_refresh=0)
    await sim.control.seed_device("d2", "OLD-2", connect_after_refresh=0)
    receiver.answers = [503, 404]
    await refresh(http, hdrs, "d1", "NEW-1", timeout=0)
    await received(receiver, 3, "two failed attempts and a delivered one")

    async def three_attempts() -> list[dict[str, Any]]:
        pushes = await sim.control.pushes(device_id="d1")
        return pushes if len(pushes) == 3 else []

    pushes = await wait_until(three_attempts, timeout=10, what="three logged attempts")
    assert [(p["attempt"], p["status"], p["delivered"]) for p in pushes] == [
        (1, 503, False),
        (2, 404, False),
        (3, 200, True),
    ]
    # a receiver that never answers 2xx: given up after push_max_attempts
    receiver.answers = [500, 500, 500]
    await refresh(http, hdrs, "d2", "NEW-2", timeout=0)

    async def given_up() -> list[dict[str, Any]]:
        pushes = await sim.control.pushes(device_id="d2")
        return pushes if len(pushes) == 3 else []

    failed = await wait_until(given_up, timeout=10, what="three failed attempts for d2")
    assert [(p["status"], p["delivered"]) for p in failed] == [(500, False)] * 3


async def test_an_unreachable_callback_is_logged(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str]
) -> None:
    await sim.control.configure(push_retry_delay_seconds=0.01, push_max_attempts=2)
    closed = web.AppRunner(web.Application())
    await closed.setup()
    site = web.TCPSite(closed, "127.0.0.1", 0)
    await site.start()
    port = closed.addresses[0][1]
    await closed.cleanup()  # nothing listens on that port any more
    await subscribe(http, hdrs, f"http://127.0.0.1:{port}/bind")
    await sim.control.seed_device("d1", "OLD-1", connect_after_refresh=0)
    await refresh(http, hdrs, "d1", "NEW-1", timeout=0)

    async def two_attempts() -> list[dict[str, Any]]:
        pushes = await sim.control.pushes()
        return pushes if len(pushes) == 2 else []

    pushes = await wait_until(two_attempts, timeout=10, what="two failed attempts")
    for push in pushes:
        assert (push["status"], push["delivered"]) == (None, False)
        assert push["error"]


async def test_drop_the_next_pushes(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    await subscribe(http, hdrs, receiver.url())
    assert await sim.control.drop_pushes(1) == {"drop_next": 1, "copies": 1}
    for device in ("d1", "d2"):
        await sim.control.seed_device(device, f"OLD-{device}", connect_after_refresh=0)
        await refresh(http, hdrs, device, f"NEW-{device}", timeout=0)
    [body] = await received(receiver, 1, "d2's push")
    assert body["deviceId"] == "d2"
    dropped = await sim.control.pushes(device_id="d1")
    assert [(p["dropped"], p["attempt"], p["status"]) for p in dropped] == [(True, 0, None)]
    assert await sim.control.push_behaviour() == {"drop_next": 0, "copies": 1}
    # the bind happened although its push was lost
    assert await activated(http, hdrs, "d1")


async def test_repeat_every_push(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    await subscribe(http, hdrs, receiver.url())
    await sim.control.repeat_pushes(3)
    await sim.control.seed_device("d1", "OLD-1", connect_after_refresh=0)
    await refresh(http, hdrs, "d1", "NEW-1", timeout=0)
    bodies = await received(receiver, 3, "three copies of the push")
    assert len({orjson.dumps(b) for b in bodies}) == 1
    pushes = await wait_until(
        lambda: sim.control.pushes(device_id="d1"), timeout=10, what="the push log"
    )
    assert [(p["copy"], p["delivered"]) for p in pushes] == [(1, True), (2, True), (3, True)]
    with pytest.raises(SimulatorControlError, match="copies"):
        await sim.control.repeat_pushes(0)


async def test_send_an_arbitrary_notification(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    await subscribe(http, hdrs, receiver.url())
    stale = {"notifyType": "bindDevice", "deviceId": "d9", "resultCode": "succeeded"}
    note = await sim.control.send_notification(stale)
    assert (note["injected"], note["targets"]) == (True, [receiver.url()])
    assert await received(receiver, 1, "the injected push") == [stale]
    await sim.control.send_notification("not even JSON object")
    bodies = await received(receiver, 2, "the second injected push")
    assert bodies[1] == "not even JSON object"
    # an app without subscribers: logged, not sent
    lonely = await sim.control.send_notification(stale, app_id=sim.partner_app_id)
    assert lonely["targets"] == []


async def test_reset_forgets_subscriptions_and_push_state(
    sim: SimulatorHandle, http: httpx.AsyncClient, hdrs: dict[str, str], receiver: Receiver
) -> None:
    await subscribe(http, hdrs, receiver.url())
    await sim.control.push_behaviour(drop_next=2, copies=2)
    await sim.control.send_notification({"notifyType": "bindDevice", "deviceId": "x"})
    await sim.control.reset()
    assert await sim.control.subscriptions() == []
    assert await sim.control.notifications() == []
    assert await sim.control.pushes() == []
    assert await sim.control.push_behaviour() == {"drop_next": 0, "copies": 1}
    stats = await sim.control.stats()
    assert (stats["subscriptions"], stats["notifications"], stats["push_attempts"]) == (0, 0, 0)
