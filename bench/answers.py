"""The first committed outcome of each swap or device the bench waits for (sections 13-16)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer


def by_swap(event: dict[str, Any]) -> str:
    """An outcome's key: the swap it answers (its ``data.swapEventId``)."""
    return str(event.get("data", {}).get("swapEventId"))


def by_device(event: dict[str, Any]) -> str:
    """An outcome's key: its device (the CloudEvent ``subject``)."""
    return str(event.get("subject"))


async def first_answers(
    bootstrap: str,
    topics: list[str],
    want: set[str],
    key: Callable[[dict[str, Any]], str],
    timeout: float,
    *,
    seen: dict[str, float] | None = None,
) -> dict[str, tuple[dict[str, Any], int]]:
    """key -> (the first committed outcome's CloudEvent, its record timestamp in ms), read from
    the beginning of ``topics`` until every ``want`` is answered or ``timeout`` seconds pass.
    ``seen``: also key -> the wall clock (``time.time()``) when this reader first had it, for a
    reader started before the outcomes are written (the moment an outcome became visible)."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    found: dict[str, tuple[dict[str, Any], int]] = {}
    try:
        deadline = time.monotonic() + timeout
        while not want <= set(found) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                wall = time.time()
                for record in records:
                    event = orjson.loads(record.value or b"{}")
                    found.setdefault(key(event), (event, record.timestamp))
                    if seen is not None:
                        seen.setdefault(key(event), wall)
    finally:
        await consumer.stop()
    return found
