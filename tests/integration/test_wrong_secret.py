"""A wrong or rotated secret stops the intake instead of failing swaps (issue 11, item 3).

The service reads its secret from a file (``REBIND_PLATFORM__SECRET_FILE``, a mounted Kubernetes
Secret). With a wrong one, the login is answered 100208: the swaps already read wait, the input
partitions are paused, ``/readyz`` answers 503 with the reason, ``rebind_platform_auth_blocked``
is 1, and the login is retried with a capped backoff within the budget. Once the file holds the
right secret, the next login succeeds without a restart and every swap ends
``credential-updated``: none ends ``rebind-failed``. Real broker, simulator, the service.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.fixtures.service import Harness
from tests.support.events import swap_event
from tests.support.exposition import get, scrape
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


async def test_a_wrong_secret_holds_the_input_until_the_secret_file_is_fixed(
    harness: Harness, tmp_path: Path
) -> None:
    control = harness.sim.control
    await control.configure(rate_limit_per_minute=100_000)
    devices = [f"dev-sec-{n}" for n in range(12)]
    await control.seed_devices([{"device_id": d, "node_id": f"old-{d}"} for d in devices])
    secret_file = tmp_path / "secret"
    secret_file.write_text("not-the-secret\n")
    service = await harness.start_service(secret_file=secret_file)
    port = service.ops.port

    await harness.produce(
        [(d.encode(), swap_event(d, f"new-{d}", event_id=f"evt-{d}")) for d in devices]
    )

    async def blocked() -> bool:
        readyz = await get(port, "/readyz")
        return readyz.status_code == 503 and "100208" in readyz.text

    await wait_until(blocked, timeout=30, what="/readyz 503 naming the refused login")
    readyz = await get(port, "/readyz")
    metrics = await scrape(port)
    assert metrics.value("rebind_platform_auth_blocked") == 1
    assert service.pipeline.held is not None
    assert set(service.pipeline.paused()) == set(service.pipeline.assigned())

    async def retried() -> bool:
        return len(await control.calls(operation="login")) >= 7

    await wait_until(retried, timeout=30, what="the login retried")
    logins = await control.calls(operation="login")
    assert {c["error_code"] for c in logins} == {"100208"}
    assert await control.calls(operation="refresh_key") == []
    outcomes = await scrape(port)
    assert outcomes.value("rebind_outcomes_total", outcome="rebind_failed") == 0
    assert outcomes.value("rebind_outcomes_total", outcome="credential_updated") == 0

    # the operator fixes the mounted secret: no restart
    secret_file.write_text(f"  {harness.sim.secret}\n")
    outs = await harness.read(len(devices), timeout=60)

    assert len(outs) == len(devices)
    assert {o.topic for o in outs} == {harness.topics.credential_updated}
    assert sorted(o.data["deviceId"] for o in outs) == sorted(devices)
    await wait_until(lambda: service.readiness()[0], timeout=10, what="ready again")
    after = await scrape(port)
    assert after.value("rebind_platform_auth_blocked") == 0
    assert service.pipeline.held is None
    assert service.pipeline.paused() == []
    logins = await control.calls(operation="login")
    assert [c["error_code"] for c in logins][-1] in (None, "", "0")
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(logins)]
    print(
        f"\nwrong secret: /readyz {readyz.status_code} {readyz.text!r}; "
        f"{len(logins)} logins ({len(logins) - 1} refused), gaps "
        f"{[round(g, 2) for g in gaps]} s; then {len(outs)} x credential-updated"
    )
    # retried with a capped backoff (0.05 s doubling to 0.5 s here, half of it jitter), not
    # once per swap or per poll
    assert all(gap >= 0.2 for gap in gaps[4:-1])
