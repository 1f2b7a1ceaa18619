"""The platform simulator behaves as docs/platform-api.md describes (raw httpx calls)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import httpx
import pytest

from tests.fixtures.simulator import SimulatorHandle, client_ssl_context
from tests.simulator import SimulatorControl, SimulatorControlError, SimulatorProcess
from tests.support.reference import REFRESH_ROWS
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

LOGIN = "/iocm/app/sec/v1.1.0/login"
REFRESH = "/iocm/app/sec/v1.1.0/refreshToken"
CRED = "/iocm/app/reg/v1.1.0/deviceCredentials"
DEVICES = "/iocm/app/dm/v1.4.0/devices"


@pytest.fixture
async def http(sim: SimulatorHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        yield client


async def login(http: httpx.AsyncClient, app_id: str, secret: str) -> dict[str, Any]:
    resp = await http.post(LOGIN, data={"appId": app_id, "secret": secret})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def headers(token: str, app_key: str) -> dict[str, str]:
    return {"app_key": app_key, "Authorization": f"Bearer {token}"}


async def put_key(
    http: httpx.AsyncClient,
    device_id: str,
    body: Any,
    hdrs: dict[str, str],
    *,
    app_id: str | None = None,
) -> httpx.Response:
    params = {"appId": app_id} if app_id is not None else None
    if isinstance(body, bytes):
        return await http.put(
            f"{CRED}/{device_id}",
            content=body,
            headers=hdrs | {"Content-Type": "application/json"},
            params=params,
        )
    return await http.put(f"{CRED}/{device_id}", json=body, headers=hdrs, params=params)


def documented(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error_code"] == code, body
    assert isinstance(body["error_desc"], str)
    assert "resultcode" not in body


def gateway(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["resultcode"] == code, body
    assert isinstance(body["resultmsg"], str)
    assert "error_code" not in body


# --------------------------------------------------------------------------- login / tokens


async def test_login_returns_the_five_fields(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    tok = await login(http, sim.app_id, sim.secret)
    assert set(tok) == {"scope", "tokenType", "expiresIn", "accessToken", "refreshToken"}
    assert tok["tokenType"] == "bearer"
    assert tok["expiresIn"] == 3600
    await sim.control.configure(token_type="Bearer", token_ttl=120)
    tok = await login(http, sim.app_id, sim.secret)
    assert tok["tokenType"] == "Bearer"
    assert tok["expiresIn"] == 120
    assert (await sim.control.stats())["logins"] == 2


async def test_login_errors(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    documented(await http.post(LOGIN, data={"appId": sim.app_id, "secret": ""}), 400, "102202")
    documented(await http.post(LOGIN, data={"appId": sim.app_id}), 400, "102202")
    documented(await http.post(LOGIN, data={"appId": sim.app_id, "secret": "x"}), 401, "100208")
    documented(await http.post(LOGIN, data={"appId": "nope", "secret": "x"}), 401, "100208")
    await sim.control.freeze_app(sim.app_id)
    documented(
        await http.post(LOGIN, data={"appId": sim.app_id, "secret": sim.secret}), 400, "100247"
    )
    await sim.control.freeze_app(sim.app_id, frozen=False)
    await sim.control.inject_error(500, "50252", operation="login")
    documented(
        await http.post(LOGIN, data={"appId": sim.app_id, "secret": sim.secret}), 500, "50252"
    )
    await login(http, sim.app_id, sim.secret)


async def test_each_login_invalidates_the_previous_token(
    sim: SimulatorHandle, http: httpx.AsyncClient
) -> None:
    await sim.control.seed_device("d1", "N1")
    first = await login(http, sim.app_id, sim.secret)
    resp = await http.get(f"{DEVICES}/d1", headers=headers(first["accessToken"], sim.app_id))
    assert resp.status_code == 200
    second = await login(http, sim.app_id, sim.secret)
    assert second["accessToken"] != first["accessToken"]
    old = await http.get(f"{DEVICES}/d1", headers=headers(first["accessToken"], sim.app_id))
    gateway(old, 403, "1010005")
    new = await http.get(f"{DEVICES}/d1", headers=headers(second["accessToken"], sim.app_id))
    assert new.status_code == 200
    # a token is bound to its app: right token, other app_key -> 1010005
    partner = await http.get(
        f"{DEVICES}/d1", headers=headers(second["accessToken"], sim.partner_app_id)
    )
    gateway(partner, 403, "1010005")


async def test_token_expiry_is_enforced(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    await sim.control.seed_device("d1", "N1")
    await sim.control.configure(token_ttl=60)
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    assert (await http.get(f"{DEVICES}/d1", headers=hdrs)).status_code == 200
    await sim.control.advance_clock(61)
    gateway(await http.get(f"{DEVICES}/d1", headers=hdrs), 403, "1010005")
    await login(http, sim.app_id, sim.secret)
    await sim.control.expire_token(sim.app_id)
    gateway(await http.get(f"{DEVICES}/d1", headers=hdrs), 403, "1010005")


async def test_a_login_spends_the_refresh_token_and_a_call_on_the_wire_meets_the_new_token(
    sim: SimulatorHandle, http: httpx.AsyncClient
) -> None:
    """The strict reading: one valid token per application; a login (or a refresh) replaces the
    access token at once, so a call sent before it but handled after it is answered 1010005, and
    the previous refresh token is spent."""
    await sim.control.seed_device("d1", "N1")
    first = await login(http, sim.app_id, sim.secret)
    await sim.control.inject_latency(0.5, operation="get_device")
    on_the_wire = asyncio.create_task(
        http.get(f"{DEVICES}/d1", headers=headers(first["accessToken"], sim.app_id))
    )
    # the call has reached the server (it is logged on arrival), the latency rule holds it
    await wait_until(
        lambda: sim.control.calls(operation="get_device"), timeout=5, what="the call to arrive"
    )
    second = await login(http, sim.app_id, sim.secret)
    gateway(await on_the_wire, 403, "1010005")
    body = {"appId": sim.app_id, "secret": sim.secret, "refreshToken": first["refreshToken"]}
    documented(await http.post(REFRESH, json=body), 401, "100208")
    ok = await http.get(f"{DEVICES}/d1", headers=headers(second["accessToken"], sim.app_id))
    assert ok.status_code == 200


async def test_refresh_token_flow(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    await sim.control.seed_device("d1", "N1")
    tok = await login(http, sim.app_id, sim.secret)
    body = {"appId": sim.app_id, "secret": sim.secret, "refreshToken": tok["refreshToken"]}
    resp = await http.post(REFRESH, json=body)
    assert resp.status_code == 200, resp.text
    new = resp.json()
    assert set(new) == {"scope", "tokenType", "expiresIn", "accessToken", "refreshToken"}
    assert new["accessToken"] != tok["accessToken"]
    gateway(
        await http.get(f"{DEVICES}/d1", headers=headers(tok["accessToken"], sim.app_id)),
        403,
        "1010005",
    )
    ok = await http.get(f"{DEVICES}/d1", headers=headers(new["accessToken"], sim.app_id))
    assert ok.status_code == 200
    # the used refresh token is rotated out
    documented(await http.post(REFRESH, json=body), 401, "100208")
    good = body | {"refreshToken": new["refreshToken"]}
    documented(await http.post(REFRESH, json=good | {"secret": "bad"}), 401, "100208")
    documented(await http.post(REFRESH, json=good | {"refreshToken": ""}), 400, "102202")
    documented(await http.post(REFRESH, json={"appId": sim.app_id}), 400, "102202")
    documented(
        await http.post(REFRESH, content=b"not json", headers={"Content-Type": "application/json"}),
        400,
        "50400",
    )
    documented(await http.post(REFRESH, json=good | {"secret": 5}), 400, "50400")
    await sim.control.inject_error(500, "50252", operation="refresh_token")
    documented(await http.post(REFRESH, json=good), 500, "50252")
    await sim.control.freeze_app(sim.app_id)
    documented(await http.post(REFRESH, json=good), 400, "100247")
    await sim.control.freeze_app(sim.app_id, frozen=False)
    assert (await http.post(REFRESH, json=good)).status_code == 200
    stats = await sim.control.stats()
    assert stats["token_refreshes"] == 2
    assert stats["logins"] == 1


# --------------------------------------------------------------------------- refresh device key


async def test_refresh_key_success_applies_and_records_history(
    sim: SimulatorHandle, http: httpx.AsyncClient
) -> None:
    await sim.control.seed_device("d1", "OLD-1")
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    body = {"nodeId": "NEW-1", "verifyCode": "NEW-1", "timeout": 300}
    resp = await put_key(http, "d1", body, hdrs)
    assert resp.status_code == 200
    assert resp.json() == {"verifyCode": "NEW-1", "timeout": 300}
    # generated verifyCode and default timeout
    resp = await put_key(http, "d1", {"nodeId": "NEW-2"}, hdrs)
    assert resp.status_code == 200
    out = resp.json()
    assert out["timeout"] == 180
    assert isinstance(out["verifyCode"], str)
    assert out["verifyCode"]
    dev = await sim.control.device("d1")
    assert dev["node_id"] == "NEW-2"
    assert [h["node_id"] for h in dev["history"]] == ["NEW-1", "NEW-2"]
    assert dev["applied_pairs"] == [["NEW-1", "NEW-1"], ["NEW-2", out["verifyCode"]]]
    got = await http.get(f"{DEVICES}/d1", headers=hdrs)
    assert got.json()["deviceInfo"]["nodeId"] == "NEW-2"
    # the old nodeId is free again, the new one is taken
    await sim.control.seed_device("d2", "OLD-1")
    documented(await put_key(http, "d2", {"nodeId": "NEW-2"}, hdrs), 400, "100426")


async def test_repeat_identical_put_modes(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    await sim.control.seed_device("d1", "OLD")
    await sim.control.seed_device("d2", "OLD2", repeat_put_mode="duplicate")
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    body = {"nodeId": "NEW", "verifyCode": "NEW", "timeout": 0}
    assert (await put_key(http, "d1", body, hdrs)).status_code == 200
    assert (await put_key(http, "d1", body, hdrs)).status_code == 200  # global mode "ok"
    body2 = {"nodeId": "NEW2", "verifyCode": "NEW2", "timeout": 0}
    assert (await put_key(http, "d2", body2, hdrs)).status_code == 200
    documented(await put_key(http, "d2", body2, hdrs), 400, "100426")  # per-device mode
    await sim.control.configure(repeat_put_mode="duplicate")
    documented(await put_key(http, "d1", body, hdrs), 400, "100426")
    assert len((await sim.control.device("d1"))["history"]) == 2
    assert (await sim.control.device("d1"))["applied_pairs"] == [["NEW", "NEW"]]


async def test_authorized_app_query_param(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    await sim.control.seed_device("p1", "PN1", app_id=sim.partner_app_id)
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    resp = await put_key(http, "p1", {"nodeId": "PN2"}, hdrs, app_id=sim.partner_app_id)
    assert resp.status_code == 200, resp.text
    assert (await sim.control.device("p1"))["node_id"] == "PN2"
    # without appId the home app does not see the partner's device
    documented(await put_key(http, "p1", {"nodeId": "PN3"}, hdrs), 404, "100403")
    # naming the home app itself is accepted
    await sim.control.seed_device("d1", "N1")
    assert (await put_key(http, "d1", {}, hdrs, app_id=sim.app_id)).status_code == 200


Sim = SimulatorHandle
Http = httpx.AsyncClient
Hdrs = dict[str, str]
Resp = httpx.Response
Scenario = Callable[[Sim, Http, Hdrs], Awaitable[Resp]]


async def _s_unauth_200(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": "X"}, hd, app_id=s.other_app_id)


async def _s_unauth_403(s: Sim, h: Http, hd: Hdrs) -> Resp:
    await s.control.configure(unauthorized_status=403)
    return await put_key(h, "d1", {"nodeId": "X"}, hd, app_id=s.other_app_id)


async def _s_verify_empty(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": "X", "verifyCode": ""}, hd)


async def _s_verify_long(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": "X", "verifyCode": "v" * 257}, hd)


async def _s_verify_nbiot(s: Sim, h: Http, hd: Hdrs) -> Resp:
    await s.control.seed_device("nb", "IMEI1", nb_iot=True)
    ok = await put_key(h, "nb", {"nodeId": "IMEI2", "verifyCode": "IMEI2"}, hd)
    assert ok.status_code == 200
    return await put_key(h, "nb", {"nodeId": "IMEI3", "verifyCode": "other"}, hd)


async def _s_bad_json(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", b"{nodeId:", hd)


async def _s_bad_type(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": 12, "timeout": "300"}, hd)


async def _s_no_device_id(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await h.put(CRED, json={"nodeId": "X"}, headers=hd)


async def _s_dup_other(s: Sim, h: Http, hd: Hdrs) -> Resp:
    await s.control.seed_device("d2", "TAKEN")
    return await put_key(h, "d1", {"nodeId": "TAKEN"}, hd)


async def _s_inactive(s: Sim, h: Http, hd: Hdrs) -> Resp:
    await s.control.seed_device("d3", "N3", status="INACTIVE")
    return await put_key(h, "d3", {"nodeId": "X"}, hd)


async def _s_online(s: Sim, h: Http, hd: Hdrs) -> Resp:
    await s.control.set_status("d1", "ONLINE")
    return await put_key(h, "d1", {"nodeId": "X"}, hd)


async def _s_timeout_neg(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": "X", "timeout": -1}, hd)


async def _s_timeout_big(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": "X", "timeout": 2147483648}, hd)


async def _s_node_long(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": "n" * 257}, hd)


async def _s_no_app_key(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": "X"}, {"Authorization": hd["Authorization"]})


async def _s_bad_app_key(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": "X"}, hd | {"app_key": "ghost"})


async def _s_app_unknown(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": "X"}, hd, app_id="ghost-app")


async def _s_app_unknown_500(s: Sim, h: Http, hd: Hdrs) -> Resp:
    await s.control.configure(app_unknown_status=500)
    return await put_key(h, "d1", {"nodeId": "X"}, hd, app_id="ghost-app")


async def _s_inject_100203(s: Sim, h: Http, hd: Hdrs) -> Resp:
    await s.control.inject_error(500, "100203", operation="refresh_key", device_id="d1")
    return await put_key(h, "d1", {"nodeId": "X"}, hd)


async def _s_throttle(s: Sim, h: Http, hd: Hdrs) -> Resp:
    await s.control.configure(rate_limit_per_minute=2)  # the login already used one call
    assert (await h.get(f"{DEVICES}/d1", headers=hd)).status_code == 200
    return await put_key(h, "d1", {}, hd)


async def _s_bad_token(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": "X"}, hd | {"Authorization": "Bearer nope"})


async def _s_no_token(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "d1", {"nodeId": "X"}, {"app_key": s.app_id})


async def _s_no_device(s: Sim, h: Http, hd: Hdrs) -> Resp:
    return await put_key(h, "ghost", {"nodeId": "X"}, hd)


async def _s_no_data(s: Sim, h: Http, hd: Hdrs) -> Resp:
    await s.control.update_device("d1", device_data_missing=True)
    return await put_key(h, "d1", {"nodeId": "X"}, hd)


async def _s_internal(s: Sim, h: Http, hd: Hdrs) -> Resp:
    await s.control.inject_error(500, "50252", operation="refresh_key")
    return await put_key(h, "d1", {"nodeId": "X"}, hd)


class Row(NamedTuple):
    name: str
    scenario: Scenario
    status: int
    code: str
    shape: str


ROWS: list[Row] = [
    Row("100217-in-200", _s_unauth_200, 200, "100217", "documented"),
    Row("100217-403", _s_unauth_403, 403, "100217", "documented"),
    Row("100003-empty", _s_verify_empty, 400, "100003", "documented"),
    Row("100003-long", _s_verify_long, 400, "100003", "documented"),
    Row("100003-nbiot", _s_verify_nbiot, 400, "100003", "documented"),
    Row("100007-json", _s_bad_json, 400, "100007", "documented"),
    Row("100007-types", _s_bad_type, 400, "100007", "documented"),
    Row("100007-no-device-id", _s_no_device_id, 400, "100007", "documented"),
    Row("100426-other-device", _s_dup_other, 400, "100426", "documented"),
    Row("100610", _s_inactive, 400, "100610", "documented"),
    Row("100611", _s_online, 400, "100611", "documented"),
    Row("50400-timeout-neg", _s_timeout_neg, 400, "50400", "documented"),
    Row("50400-timeout-big", _s_timeout_big, 400, "50400", "documented"),
    Row("50400-node-long", _s_node_long, 400, "50400", "documented"),
    Row("100025-missing", _s_no_app_key, 401, "100025", "documented"),
    Row("100025-unknown", _s_bad_app_key, 401, "100025", "documented"),
    Row("100203-403", _s_app_unknown, 403, "100203", "documented"),
    Row("100203-500", _s_app_unknown_500, 500, "100203", "documented"),
    Row("100203-500-injected", _s_inject_100203, 500, "100203", "documented"),
    Row("1010009", _s_throttle, 403, "1010009", "gateway"),
    Row("1010005-bad", _s_bad_token, 403, "1010005", "gateway"),
    Row("1010005-missing", _s_no_token, 403, "1010005", "gateway"),
    Row("100403", _s_no_device, 404, "100403", "documented"),
    Row("100418", _s_no_data, 404, "100418", "documented"),
    Row("50252", _s_internal, 500, "50252", "documented"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_refresh_key_error_rows(sim: Sim, http: Http, row: Row) -> None:
    await sim.control.seed_device("d1", "N1")
    tok = await login(http, sim.app_id, sim.secret)
    resp = await row.scenario(sim, http, headers(tok["accessToken"], sim.app_id))
    (gateway if row.shape == "gateway" else documented)(resp, row.status, row.code)
    assert (await sim.control.device("d1"))["history"] == []  # nothing applied
    log = await sim.control.calls(operation="refresh_key")
    assert log[-1]["status"] == row.status
    assert log[-1]["error_code"] == row.code


async def test_all_sixteen_table_rows_are_covered() -> None:
    table = set(REFRESH_ROWS)
    assert {(r.status, r.code) for r in ROWS} == table


@pytest.mark.parametrize(
    ("shape", "check_throttle", "check_other"),
    [("gateway", gateway, gateway), ("documented", documented, documented)],
)
async def test_error_shape_can_be_forced(
    sim: SimulatorHandle,
    http: httpx.AsyncClient,
    shape: str,
    check_throttle: Callable[[httpx.Response, int, str], None],
    check_other: Callable[[httpx.Response, int, str], None],
) -> None:
    await sim.control.configure(error_shape="gateway" if shape == "gateway" else "documented")
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    check_other(await put_key(http, "ghost", {}, hdrs), 404, "100403")
    check_throttle(
        await put_key(http, "ghost", {}, hdrs | {"Authorization": "Bearer x"}), 403, "1010005"
    )
    # per-rule shape override
    await sim.control.inject_error(500, "50252", shape="gateway")
    gateway(await put_key(http, "ghost", {}, hdrs), 500, "50252")


# --------------------------------------------------------------------------- GET calls


async def test_get_device_and_credentials(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    await sim.control.seed_device("d1", "N1", name="meter-1")
    await sim.control.seed_device("d2", "N2", status="INACTIVE")
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    resp = await http.get(f"{DEVICES}/d1", headers=hdrs)
    assert resp.status_code == 200
    body = resp.json()
    assert {
        "deviceId",
        "gatewayId",
        "nodeType",
        "createTime",
        "lastModifiedTime",
        "deviceInfo",
        "services",
    } <= set(body)
    info = body["deviceInfo"]
    assert info["nodeId"] == "N1"
    assert info["status"] == "OFFLINE"
    assert {"name", "manufacturerId", "deviceType", "model", "statusDetail"} <= set(info)
    cred = await http.get(f"{CRED}/d2", headers=hdrs)
    assert cred.json() == {"deviceId": "d2", "activated": False, "name": "device-d2"}
    assert (await http.get(f"{CRED}/d1", headers=hdrs)).json()["activated"] is True
    documented(await http.get(f"{DEVICES}/nope", headers=hdrs), 404, "100403")
    documented(await http.get(f"{CRED}/nope", headers=hdrs), 404, "100403")
    gateway(
        await http.get(f"{DEVICES}/d1", headers=hdrs | {"Authorization": "Bearer x"}),
        403,
        "1010005",
    )
    documented(
        await http.get(f"{DEVICES}/d1", headers={"Authorization": "Bearer x"}), 401, "100025"
    )
    await sim.control.set_status("d1", "ABNORMAL")
    info = (await http.get(f"{DEVICES}/d1", headers=hdrs)).json()["deviceInfo"]
    assert info["status"] == "ABNORMAL"


# --------------------------------------------------------------------------- flow control


async def test_flow_control_sliding_window(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    await sim.control.configure(rate_limit_per_minute=5)
    await sim.control.seed_device("d1", "N1")
    tok = await login(http, sim.app_id, sim.secret)  # call 1 (t=0)
    hdrs = headers(tok["accessToken"], sim.app_id)
    for _ in range(2):  # calls 2-3 (t=0)
        assert (await http.get(f"{DEVICES}/d1", headers=hdrs)).status_code == 200
    await sim.control.advance_clock(30)
    for _ in range(2):  # calls 4-5 (t=30)
        assert (await put_key(http, "d1", {}, hdrs)).status_code == 200
    gateway(await http.get(f"{DEVICES}/d1", headers=hdrs), 403, "1010009")
    # login and refreshToken count too, and are throttled too
    gateway(
        await http.post(LOGIN, data={"appId": sim.app_id, "secret": sim.secret}), 403, "1010009"
    )
    await sim.control.advance_clock(29)  # t=59: the t=0 calls are still inside the window
    gateway(await http.get(f"{DEVICES}/d1", headers=hdrs), 403, "1010009")
    await sim.control.advance_clock(2)  # t=61: three calls aged out, rejections never counted
    for _ in range(3):
        assert (await http.get(f"{DEVICES}/d1", headers=hdrs)).status_code == 200
    gateway(await http.get(f"{DEVICES}/d1", headers=hdrs), 403, "1010009")
    # other apps have their own budget
    await login(http, sim.partner_app_id, sim.partner_secret)
    # the limit is settable at runtime
    await sim.control.configure(rate_limit_per_minute=100)
    assert (await http.get(f"{DEVICES}/d1", headers=hdrs)).status_code == 200
    stats = await sim.control.stats()
    home = stats["apps"][sim.app_id]
    assert home["accepted_calls"] == 9
    assert home["throttled_calls"] == 4
    assert home["max_calls_in_any_window"] == 6  # 5 + the one after raising the limit
    assert home["logged_calls"] == 13
    assert home["max_logged_calls_in_any_window"] == 10  # t=30: 4, t=59: 1, t=61: 5
    assert stats["apps"][sim.partner_app_id]["accepted_calls"] == 1
    flow = await sim.control.flow(sim.app_id)
    assert len(flow["accepted"]) == 9
    assert flow["window_seconds"] == 60.0
    assert len(flow["rejected"]) == 4


async def test_flow_control_window_is_configurable(
    sim: SimulatorHandle, http: httpx.AsyncClient
) -> None:
    """``flow_window_seconds``: the platform configures flow control per application."""
    await sim.control.configure(rate_limit_per_minute=2, flow_window_seconds=10)
    await sim.control.seed_device("d1", "N1")
    tok = await login(http, sim.app_id, sim.secret)  # call 1 (t=0)
    hdrs = headers(tok["accessToken"], sim.app_id)
    assert (await http.get(f"{DEVICES}/d1", headers=hdrs)).status_code == 200  # call 2 (t=0)
    gateway(await http.get(f"{DEVICES}/d1", headers=hdrs), 403, "1010009")
    await sim.control.advance_clock(9)  # t=9: still inside the 10 s window
    gateway(await http.get(f"{DEVICES}/d1", headers=hdrs), 403, "1010009")
    await sim.control.advance_clock(2)  # t=11: both aged out (a 60 s window would still hold them)
    for _ in range(2):
        assert (await http.get(f"{DEVICES}/d1", headers=hdrs)).status_code == 200
    flow = await sim.control.flow(sim.app_id)
    assert flow["window_seconds"] == 10.0
    assert flow["max_calls_in_any_window"] == 2
    for bad in (0, -1, True):
        with pytest.raises(SimulatorControlError, match="flow_window_seconds"):
            await sim.control.configure(flow_window_seconds=bad)
    # a reset restores the default window
    await sim.control.reset()
    assert (await sim.control.get_config())["flow_window_seconds"] == 60.0


async def test_call_log_contents(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    await sim.control.seed_device("d1", "N1")
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    await put_key(
        http, "d1", {"nodeId": "N2", "verifyCode": "N2", "timeout": 0}, hdrs, app_id=sim.app_id
    )
    log = await sim.control.calls()
    assert [c["operation"] for c in log] == ["login", "refresh_key"]
    login_call, put_call = log
    assert login_call["body"]["appId"] == sim.app_id
    assert login_call["body"]["secret"] != sim.secret  # secrets are fingerprinted
    assert put_call["method"] == "PUT"
    assert put_call["path"] == f"{CRED}/d1"
    assert put_call["device_id"] == "d1"
    assert put_call["app_id_query"] == sim.app_id
    assert put_call["app_key"] == sim.app_id
    assert put_call["body"] == {"nodeId": "N2", "verifyCode": "N2", "timeout": 0}
    assert put_call["token_fp"]
    assert put_call["token_fp"] not in tok["accessToken"]
    assert put_call["status"] == 200
    assert put_call["error_code"] is None
    assert put_call["time"] >= login_call["time"]
    assert await sim.control.calls(since=put_call["seq"]) == []
    assert len(await sim.control.calls(device_id="d1")) == 1


# --------------------------------------------------------------------------- faults


async def test_drop_after_apply(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    await sim.control.seed_device("d1", "N1")
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    await sim.control.inject_drop_after_apply(device_id="d1")
    body = {"nodeId": "N2", "verifyCode": "N2", "timeout": 0}
    with pytest.raises(httpx.TransportError):
        await put_key(http, "d1", body, hdrs)
    dev = await sim.control.device("d1")
    assert dev["node_id"] == "N2"
    assert dev["applied_pairs"] == [["N2", "N2"]]
    # the client retries the identical call: 200 again (default repeat mode)
    assert (await put_key(http, "d1", body, hdrs)).status_code == 200
    log = await sim.control.calls(operation="refresh_key")
    assert log[0]["fault"] == "drop_after_apply"


async def test_refuse_does_not_apply(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    await sim.control.seed_device("d1", "N1")
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    await sim.control.inject_refuse(operation="refresh_key", times=2)
    for _ in range(2):
        with pytest.raises(httpx.TransportError):
            await put_key(http, "d1", {"nodeId": "N2"}, hdrs)
    assert (await sim.control.device("d1"))["history"] == []
    assert (await put_key(http, "d1", {"nodeId": "N2"}, hdrs)).status_code == 200


async def test_html_error_latency_and_matching(
    sim: SimulatorHandle, http: httpx.AsyncClient
) -> None:
    await sim.control.seed_device("d1", "N1")
    await sim.control.seed_device("d2", "N2")
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    await sim.control.inject_html(502, device_id="d2")
    assert (await put_key(http, "d1", {}, hdrs)).status_code == 200  # rule does not match d1
    resp = await put_key(http, "d2", {}, hdrs)
    assert resp.status_code == 502
    assert resp.headers["content-type"].startswith("text/html")
    assert (await put_key(http, "d2", {}, hdrs)).status_code == 200  # rule used up
    await sim.control.inject_latency(0.3, operation="get_device")
    start = time.monotonic()
    assert (await http.get(f"{DEVICES}/d1", headers=hdrs)).status_code == 200
    assert time.monotonic() - start >= 0.3
    await sim.control.inject_error(403, "100203", times=-1, operation="get_device")
    for _ in range(3):
        documented(await http.get(f"{DEVICES}/d1", headers=hdrs), 403, "100203")
    assert (await sim.control.faults())[-1]["hits"] == 3
    await sim.control.clear_faults()
    assert (await http.get(f"{DEVICES}/d1", headers=hdrs)).status_code == 200


# --------------------------------------------------------------------------- device status


async def test_online_goes_offline_after_delay(
    sim: SimulatorHandle, http: httpx.AsyncClient
) -> None:
    await sim.control.seed_device("d1", "N1", status="ONLINE")
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    documented(await put_key(http, "d1", {"nodeId": "N2"}, hdrs), 400, "100611")
    await sim.control.go_offline_after("d1", 0.3)
    status = (await http.get(f"{DEVICES}/d1", headers=hdrs)).json()["deviceInfo"]["status"]
    assert status == "ONLINE"

    async def offline() -> bool:
        got = (await http.get(f"{DEVICES}/d1", headers=hdrs)).json()["deviceInfo"]["status"]
        return bool(got == "OFFLINE")

    await wait_until(offline, timeout=5, what="d1 offline after 0.3 s")
    # timeout 0: the registration never expires while the new hardware is awaited
    assert (await put_key(http, "d1", {"nodeId": "N2", "timeout": 0}, hdrs)).status_code == 200
    # the simulator clock works too
    await sim.control.go_online_after("d1", 600)
    await sim.control.advance_clock(601)
    assert (await sim.control.device("d1"))["status"] == "ONLINE"


async def test_online_right_after_success(sim: SimulatorHandle, http: httpx.AsyncClient) -> None:
    await sim.control.seed_device("d1", "N1")
    await sim.control.go_online_after_success("d1")
    tok = await login(http, sim.app_id, sim.secret)
    hdrs = headers(tok["accessToken"], sim.app_id)
    body = {"nodeId": "N2", "verifyCode": "N2", "timeout": 0}
    assert (await put_key(http, "d1", body, hdrs)).status_code == 200
    status = (await http.get(f"{DEVICES}/d1", headers=hdrs)).json()["deviceInfo"]["status"]
    assert status == "ONLINE"
    documented(await put_key(http, "d1", body, hdrs), 400, "100611")


# --------------------------------------------------------------------------- TLS / process


async def test_https_requires_client_cert(tls_sim: SimulatorHandle) -> None:
    assert tls_sim.certs is not None
    no_cert = client_ssl_context(tls_sim.certs, with_client_cert=False)
    async with httpx.AsyncClient(base_url=tls_sim.url, verify=no_cert, timeout=5) as client:
        with pytest.raises(httpx.TransportError):
            await client.post(LOGIN, data={"appId": tls_sim.app_id, "secret": tls_sim.secret})
    assert tls_sim.client_ssl is not None
    async with httpx.AsyncClient(
        base_url=tls_sim.url, verify=tls_sim.client_ssl, timeout=5
    ) as client:
        tok = await login(client, tls_sim.app_id, tls_sim.secret)
        assert tok["accessToken"]
    assert tls_sim.url.startswith("https://127.0.0.1:")
    assert (await tls_sim.control.stats())["logins"] == 1


async def test_subprocess_mode() -> None:
    proc = SimulatorProcess(rate_limit_per_minute=1000, flow_window_seconds=12.5, seed_demo=True)
    url = await asyncio.to_thread(proc.start)
    try:
        assert url.startswith("http://127.0.0.1:")
        async with SimulatorControl(url) as control, httpx.AsyncClient(base_url=url) as client:
            assert any(d["device_id"] == "dev-0001" for d in await control.devices())
            config = await control.get_config()
            assert (config["rate_limit_per_minute"], config["flow_window_seconds"]) == (1000, 12.5)
            resp = await client.post(
                LOGIN, data={"appId": "rebind-home-app", "secret": "home-secret-0001"}
            )
            assert resp.status_code == 200
    finally:
        rc = await asyncio.to_thread(proc.stop)
    assert rc == 0
