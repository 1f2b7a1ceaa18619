"""What the pipeline reads (a consumed record, as typed here) and writes (a record to produce, and
the kind of outcome it carries)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class ConsumedRecord(Protocol):
    """A record read from Kafka, as the pipeline uses it: aiokafka's ``ConsumerRecord`` of bytes
    is one (and so are the tests' fake records). Read only: the pipeline never changes it."""

    @property
    def offset(self) -> int: ...

    @property
    def timestamp(self) -> int:
        """Milliseconds since the epoch (the producer's, or the broker's append time)."""
        ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


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
