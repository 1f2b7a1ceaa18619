"""The budget is spent only by calls that can leave at once (issue 19, item 5), proven on a real
broker with the strict simulator enforcing N calls a window (the suite's platform clock,
``tests/support/clock.py``: compressed in CI, 60 s under ``make soak``, token lifetimes with it):

* a token rotation under budget saturation: tokens renewed while a backlog larger than two
  windows keeps the budget full; every rotation holds the calls for a moment.
* a refused-secret outage with a full queue, then resumed: two replicas share the token and the
  budget; the application's secret is changed on the platform and its token invalidated, so the
  next call is answered 1010005 and the holder's login is refused (100208) until the secret is
  restored. Meanwhile a backlog larger than the budget arrives: every replica's concurrency is
  taken by swaps whose calls wait for a token. Then the platform accepts the login again.

Before the fix, the calls granted during a hold left together when it ended, on top of the calls
granted after them: a window held more than N (16 % over at a saturated rotation; after the
outage, the queued calls of both replicas on top of the next window's grants), and the platform
answered 1010009. Each run prints::

    GRANTS <run>: calls=.. busiest window=../N 1010009=.. logins=.. refreshes=..

and the outage run, before it, what the outage held::

    OUTAGE: held=..s refused logins=.. 1010005=.. swaps in flight at resume=.. (per replica ..)

and asserts 0 x 1010009, the busiest window <= N and every swap answered credential-updated.
"""

from __future__ import annotations

import secrets
import time
import uuid

import httpx
import pytest

from tests.faults.conftest import FaultKit
from tests.support.accounting import produce_inputs
from tests.support.calllog import Calls, max_in_window
from tests.support.clock import WINDOW_SECONDS, pick
from tests.support.events import swap_event
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

N = 120
"""Calls per window: the simulator enforces it, the service is configured with it."""
TOKEN_TTL = pick(12, 6)
"""The access token's lifetime (s): about one rotation per 8 s of a 60 s window at full length,
per 4 s of the compressed one, so the run sees about as many rotations."""
MARGIN = pick(4.0, 2.0)
ROTATION_HOLD = pick(1.0, 0.5)


async def _swaps(kit: FaultKit, count: int, tag: str) -> int:
    devices = [f"{tag}-{i:04d}-{uuid.uuid4().hex[:4]}" for i in range(count)]
    await kit.control.seed_devices([{"device_id": d, "node_id": f"old-{d}"} for d in devices])
    inputs = await produce_inputs(
        kit.harness.bootstrap,
        kit.harness.topics.device_swapped,
        [
            (d.encode(), swap_event(d, f"new-{d}", event_id=eid), [], (eid, d, f"new-{d}"))
            for d in devices
            for eid in [str(uuid.uuid4())]
        ],
    )
    return len(inputs)


async def _report(kit: FaultKit, label: str, swaps: int) -> None:
    assert kit.reader is not None
    await kit.reader.wait_for(swaps, timeout=300)
    calls = await Calls.read(kit.control)
    counted = calls.accepted_times
    busiest = max_in_window(counted, WINDOW_SECONDS)
    outcomes = {r.topic for r in kit.reader.records}
    print(
        f"\nGRANTS {label}: calls={len(calls.log)} busiest window={busiest}/{N} "
        f"1010009={len(calls.throttled)} logins={len(calls.of('login'))} "
        f"refreshes={len(calls.of('refresh_token'))} outcomes={kit.reader.count}",
        flush=True,
    )
    assert not calls.throttled, f"{len(calls.throttled)} x 1010009"
    assert busiest <= N
    assert outcomes == {kit.harness.topics.credential_updated}


@pytest.mark.timeout(420)
async def test_token_rotations_under_a_saturated_budget_never_overrun_it(
    fault_kit: FaultKit, process_logs: None
) -> None:
    await fault_kit.control.configure(rate_limit_per_minute=N, token_ttl=TOKEN_TTL)
    await fault_kit.start_reader()
    service = fault_kit.process(
        instance="gr0",
        rate_limit_per_minute=N,
        max_concurrency=32,
        token_refresh_margin_seconds=MARGIN,
        token_rotation_window_seconds=ROTATION_HOLD,
    )
    await service.start_ready()
    swaps = await _swaps(fault_kit, 2 * N + N // 2, "rot")
    await _report(fault_kit, "token rotation, saturated", swaps)


def _gauge(text: str, name: str) -> float:
    """The value of an unlabelled gauge in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


@pytest.mark.timeout(420)
async def test_calls_queued_through_a_refused_secret_outage_leave_within_the_budget(
    fault_kit: FaultKit, process_logs: None
) -> None:
    kit, concurrency = fault_kit, 24
    control, app_id = kit.control, kit.harness.sim.app_id
    await control.configure(rate_limit_per_minute=N)
    await kit.start_reader()
    replicas = [
        kit.process(
            instance=f"rs{i}",
            rate_limit_per_minute=N,
            max_concurrency=concurrency,
            retry_backoff_initial_seconds=1.0,
            retry_backoff_max_seconds=4.0,
        )
        for i in range(2)
    ]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        await replica.wait_ready()

    # A few swaps first: the holder logs in (on demand) and every replica holds the token.
    assert kit.reader is not None
    warm = await _swaps(kit, 4, "warm")
    await kit.reader.wait_for(warm, timeout=90)

    # The outage: the platform no longer knows the service's secret, and the token it holds is
    # invalidated, so the next call needs a login, which is refused until the secret is back.
    await control.upsert_app(app_id, secret=secrets.token_hex(16))
    await control.expire_token(app_id)
    outage = time.monotonic()
    swaps = await _swaps(kit, N + N // 4, "out")

    async with httpx.AsyncClient(timeout=5) as http:

        async def metrics() -> list[str]:
            return [(await http.get(f"http://127.0.0.1:{r.port}/metrics")).text for r in replicas]

        async def queued() -> list[int] | None:
            texts = await metrics()
            blocked = all(_gauge(t, "rebind_platform_auth_blocked") == 1 for t in texts)
            inflight = [int(_gauge(t, "rebind_inflight_events")) for t in texts]
            refused = [
                c for c in await control.calls(operation="login") if c["error_code"] == "100208"
            ]
            # Every replica's concurrency is taken by swaps waiting for a token, and the holder
            # has had its login refused more than once (the retries run).
            full = all(n >= concurrency for n in inflight)
            return inflight if blocked and full and len(refused) >= 3 else None

        held = await wait_until(queued, 120, "both replicas' queues full while logins are refused")
        assert held is not None

    # The platform accepts the service's secret again: the next login retry gets a token.
    await control.upsert_app(app_id, secret=kit.harness.sim.secret)
    held_for = time.monotonic() - outage
    calls = await Calls.read(control)
    print(
        f"\nOUTAGE: held={held_for:.1f}s refused logins="
        f"{sum(c['error_code'] == '100208' for c in calls.of('login'))} "
        f"1010005={sum(c['error_code'] == '1010005' for c in calls.log)} "
        f"swaps in flight at resume={sum(held)} (per replica {held})",
        flush=True,
    )
    await _report(kit, "refused-secret outage, full queue, resumed", warm + swaps)
