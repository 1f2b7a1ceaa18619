"""Reading the per-device ledger topic's records in tests."""

from __future__ import annotations

from typing import Any

import orjson

from tests.support.events import Received


def entry(record: Received) -> dict[str, Any]:
    """The ledger entry a record carries (``state``, ``eventId``, ``wait``, ...)."""
    assert record.value is not None
    doc = orjson.loads(record.value)
    assert isinstance(doc, dict)
    return doc


def waits(records: list[Received]) -> list[dict[str, Any]]:
    """The ``wait`` part of every record that says the swap waits."""
    return [entry(r)["wait"] for r in records if entry(r)["state"] == "waiting"]
