"""A consumer record as the pipeline reads it (``offset``, ``key``, ``value``, ``timestamp``,
``headers``), for unit tests that feed a ``PartitionCore`` or a ledger without a broker."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FakeRecord:
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: list[tuple[str, bytes]] = field(default_factory=list)
