"""Building input events and reading outputs back, for tests and the demo."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from service.config import LedgerSettings
from service.events import SWAPPED_TYPE

LONG_RETENTION: Final = LedgerSettings(retention_days=3_650)
"""The ledger retention of services under test: swaps made here are dated 2026-11-25 by default,
a fixed day that must never fall behind the retention (then they would be SWAP_TOO_OLD)."""


def swap_event(
    device_id: str,
    node_id: str,
    *,
    event_id: str | None = None,
    source: str = "/inventory/test",
    ce_time: str = "2026-11-25T09:30:00Z",
    **data: Any,
) -> bytes:
    """A structured-mode ``device.swapped`` CloudEvent (``ce_time``: its ``time`` attribute)."""
    body = {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": SWAPPED_TYPE,
        "time": ce_time,
        "subject": device_id,
        "datacontenttype": "application/json",
        "data": {"deviceId": device_id, "nodeId": node_id, **data},
    }
    return orjson.dumps(body)


def fresh_swap_event(device_id: str, node_id: str, **kwargs: Any) -> bytes:
    """:func:`swap_event` dated now: what the demo and the bench produce, so their swaps stay
    inside the retention of a service run with its defaults, whatever the day."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return swap_event(device_id, node_id, ce_time=now, **kwargs)


@dataclass(frozen=True)
class Received:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def json(self) -> dict[str, Any]:
        assert self.value is not None
        parsed = orjson.loads(self.value)
        assert isinstance(parsed, dict)
        return parsed

    @property
    def data(self) -> dict[str, Any]:
        data = self.json()["data"]
        assert isinstance(data, dict)
        return data

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode()
        return None
