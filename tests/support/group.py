"""What the broker says about the service's consumer group: its members and committed offsets.

Both are read with an admin client, from outside the service, so tests can wait on them whatever
the service's own implementation: "the input offset is committed past record X" (X was handled
and its answer committed) and "the group has n members" (a paused member was dropped).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


@contextlib.asynccontextmanager
async def admin_client(bootstrap: str) -> AsyncIterator[Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def committed_offsets(bootstrap: str, group_id: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (absent: nothing committed)."""
    async with admin_client(bootstrap) as admin:
        offsets = await admin.list_consumer_group_offsets(group_id)
    return {
        tp.partition: int(meta.offset)
        for tp, meta in offsets.items()
        if isinstance(tp, TopicPartition) and tp.topic == topic and meta.offset >= 0
    }


async def committed_past(
    bootstrap: str, group_id: str, topic: str, partition: int, offset: int
) -> bool:
    """True once the group's committed offset of ``topic:partition`` is beyond ``offset``."""
    return (await committed_offsets(bootstrap, group_id, topic)).get(partition, -1) > offset


async def group_state(bootstrap: str, group_id: str) -> tuple[str, list[str]]:
    """(state, client ids of the members) of the group, as the coordinator sees it now."""
    async with admin_client(bootstrap) as admin:
        [response] = await admin.describe_consumer_groups([group_id])
    group = response.groups[0]
    state = str(group[2])
    members = [str(m[1]) for m in group[5]]
    return state, members


async def stable_with(bootstrap: str, group_id: str, members: int) -> bool:
    """True when the group is Stable with exactly ``members`` members (a wait_until condition)."""
    state, found = await group_state(bootstrap, group_id)
    return state == "Stable" and len(found) == members
