"""What the pipeline writes: a record to produce, and the kind of outcome it carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class OutcomeKind(StrEnum):
    """The ``outcome`` label of ``rebind_outcomes_total``; one per input event."""

    CREDENTIAL_UPDATED = "credential_updated"
    REBIND_FAILED = "rebind_failed"
    DEAD_LETTERED = "dead_lettered"
    DEFERRED = "deferred"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class Output:
    """A record to produce in the transaction of the input partition it answers."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    outcome: OutcomeKind | None = None  # the outcome this record counts as, None for none
    partition: int | None = None  # explicit partition (co-partitioned service topics)
    timestamp_ms: int | None = None  # explicit record timestamp (a forwarded input keeps its own)
