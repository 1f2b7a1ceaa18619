"""Two replicas that both believe they hold the token never both call the platform (issue 15).

Real broker, simulator (strict: a refresh or a login replaces the token and spends the refresh
token), two SharedTokenProviders on one token topic. The second one to become the holder starts
the group's token transactional producer and so fences the first: the first one's next rotation
fails at its *rotating* record, before any platform call, and it follows from then on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.shared.shared_token import SharedTokenProvider
from tests.fixtures.service import Harness
from tests.support.token_topic import start_provider, token_records, token_topic
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def _figures(stats: dict[str, Any]) -> tuple[int, int, int]:
    return (
        int(stats["logins"]),
        int(stats["token_refreshes"]),
        int(stats["calls_by_result"].get("1010005", 0)),
    )


async def test_a_fenced_holder_steps_down_before_calling_the_platform(harness: Harness) -> None:
    control = harness.sim.control
    topic = await token_topic(harness)
    first = await start_provider(harness, "i0", topic)
    second: SharedTokenProvider | None = None
    try:
        first.set_holder(True)
        token = await first.get()
        first.release(token)
        assert _figures(await control.stats())[:2] == (1, 0)

        # The group moved partition 0 to another replica; the first has not noticed yet (a GC
        # pause, a network partition from the broker): both believe they are elected.
        second = await start_provider(harness, "i1", topic)
        second.set_holder(True)
        await wait_until(lambda: second is not None and second.is_holder, 30, "second holds")
        assert second.latest is not None
        assert second.latest.access == token  # adopted: no login
        assert first.is_holder  # it does not know yet

        # The platform drops the token; the first replica's call is answered 1010005. As the
        # holder it would renew: its rotating record fails (fenced), so it calls nothing, and
        # the second one, told by the refused notice, renews once with its refresh token.
        await control.expire_token()
        renewed = await asyncio.wait_for(first.invalidated(token), 30)
        first.release(renewed)
        assert renewed != token
        assert first.fenced >= 1
        assert second.is_holder
        logins, refreshes, _ = _figures(await control.stats())
        assert (logins, refreshes) == (1, 1)  # one login (the start), one refresh, no storm
        assert second.manager.refreshes == 1
        assert first.manager.refreshes == first.manager.logins - 1 == 0

        # The first replica's partition-0 ownership ends at its next assignment.
        first.set_holder(False)
        await wait_until(lambda: not first.is_holder, 10, "the first to follow")
        assert await first.get() == renewed
        first.release(renewed)
        # what readers see: only committed records; the token records are the second's last
        records = await token_records(harness, topic)
        tokens = [r for r in records if r[1] == f"{harness.group_id}/{harness.sim.app_id}".encode()]
        assert tokens
    finally:
        await first.aclose()
        if second is not None:
            await second.aclose()
