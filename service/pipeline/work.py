"""One swap to work on, where it came from, and where it stands if it waited before."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from service.bind.watch import Watch
from service.events import SwapEvent
from service.pipeline.records import OutcomeKind, Output

# Watch is defined with its policy (service.bind.watch); the ledger reads it here.
__all__ = [
    "HandlerResult",
    "Outcome",
    "PollResult",
    "Republish",
    "WaitState",
    "Waiting",
    "Watch",
    "Work",
]


@dataclass(frozen=True, slots=True)
class WaitState:
    """A swap waiting in the ledger for its next try. Times are epoch milliseconds."""

    due_ms: int
    deadline_ms: int
    deferrals: int  # how often the device was online
    attempts: int  # platform attempts so far
    first_attempt_ms: int | None
    last_code: str
    reason: str  # "device_online" or "transient"
    attempt_deadline_ms: int | None = None  # with "transient": when this try must end


@dataclass(frozen=True, slots=True)
class Work:
    """One swap to handle.

    ``offset`` is its input record (None when the ledger wakes a waiting swap up: that record was
    committed when the swap started to wait). ``order`` decides which of two swaps of a device is
    the latest: the CloudEvent ``time`` (else the record's timestamp) in ms, then the offset.
    ``wait`` is set when the swap waited before (so the call may already have been applied);
    ``repeat`` is set when an earlier owner may have called the platform for it already.
    """

    swap: SwapEvent
    raw_value: bytes | None
    raw_headers: list[tuple[str, bytes]]
    topic: str
    partition: int
    origin_offset: int
    order: tuple[int, int]
    offset: int | None = None
    wait: WaitState | None = None
    repeat: bool = False
    watch: Watch | None = None  # set on a bind-watch poll (no refresh: only the poll is due)
    urgent: bool = False  # read from the urgent lane: served first by the scheduler and budget

    @property
    def device(self) -> str:
        return self.swap.data.device_id

    @property
    def origin(self) -> str:
        return f"{self.topic}:{self.partition}:{self.origin_offset}"

    @property
    def may_be_applied(self) -> bool:
        return self.repeat or self.wait is not None


@dataclass(frozen=True, slots=True)
class Republish:
    """An event answered before whose stored outcome must be read back (I/O) and re-published."""

    work: Work
    dedupe_offset: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """A swap's final answer: ``credential-updated`` or ``rebind-failed``."""

    kind: OutcomeKind
    record: Output
    timeout: int | None = None  # with credential-updated: the verifyCode's validity, seconds


@dataclass(frozen=True, slots=True)
class Waiting:
    """The swap waits in the ledger until ``state.due_ms`` (the handler's answer to the platform
    client's ``Deferred``: the one is why a call must wait, the other where the swap waits)."""

    state: WaitState


HandlerResult = Outcome | Waiting


@dataclass(frozen=True, slots=True)
class PollResult:
    """What a bind-watch poll learned: bound, gone (the registration was deleted), or neither."""

    bound: bool = False
    gone: bool = False


class Answers(Protocol):
    """Builds the answers a partition decides without calling the platform
    (:class:`service.pipeline.outcomes.OutcomeBuilder`)."""

    def superseded(self, work: Work, newer_event_id: str) -> Outcome: ...

    def rebound(self, work: Work, via: str, bound_at_ms: int, refreshed_ms: int) -> Output: ...

    def bind_failed(self, work: Work, code: str, desc: str) -> Outcome: ...
