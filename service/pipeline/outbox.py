"""What one input partition writes in its next transaction: the outputs decided since the last
one, the outcome counts and timestamps for the metrics, the ends of bind watches, and the offsets
the transaction commits with them.

Invariants:

- every output decided is in exactly one place: this buffer, or a :class:`Commit` taken and not
  yet settled (:meth:`Outbox.committed`) or given back (:meth:`Outbox.restore`), so a failed
  transaction loses nothing and a committed one is never written twice;
- :meth:`Outbox.take` returns None only when nothing changed since the last commit (no output,
  no count, the same offset and metadata, the same bind-notify offset);
- a device's ledger records written and not committed yet are counted (:meth:`Outbox.unsettled`)
  from :meth:`Outbox.emit` until the transaction that carries them commits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from service.pipeline.dedupe import DedupeIndex
from service.pipeline.progress import PartitionProgress
from service.pipeline.records import OutcomeKind, Output


@dataclass(slots=True)
class Commit:
    """What one transaction of the partition writes."""

    outputs: list[Output]
    offset: int | None
    metadata: str
    counts: list[OutcomeKind] = field(default_factory=list)
    stamps: list[int] = field(default_factory=list)
    binds: list[tuple[str, float | None]] = field(default_factory=list)
    """Ends of bind watches: (result, seconds from the refresh to the bind)."""
    notify_offset: int | None = None
    """The bind-notify partition's offset to commit (pushes read up to there are settled)."""
    urgent_offset: int | None = None
    """The urgent lane's partition: its offset to commit and that offset's metadata."""
    urgent_metadata: str = ""
    answered: tuple[int, int] = (0, 0)
    """Input records answered since the last transaction: (bulk lane, urgent lane)."""


class Outbox:
    """The partition's next transaction, filled by its decisions and taken by the committer."""

    def __init__(
        self,
        *,
        progress: PartitionProgress,
        ledger_topic: str,
        dedupe: DedupeIndex,
        urgent: PartitionProgress | None = None,
    ) -> None:
        self.progress = progress
        self.urgent = urgent  # the urgent lane's partition p, when the lane is on
        self.ledger_topic = ledger_topic
        self.dedupe = dedupe
        self.notify_offset: int | None = None  # next offset of the bind-notify partition
        # The first bind push held for a swap body (service.pipeline.body_holds): the offset
        # committed stays there until it is settled.
        self.notify_floor: int | None = None
        # Told of every ledger record committed, with its offset (DeviceLedger.committed).
        self.ledger_committed: Callable[[Output, int], None] = lambda _output, _offset: None
        self._notify_committed: int | None = None
        self._outputs: list[Output] = []
        self._counts: list[OutcomeKind] = []
        self._stamps: list[int] = []
        self._binds: list[tuple[str, float | None]] = []
        self._answered = (0, 0)  # (bulk, urgent) records answered since the last take
        self._last: tuple[int | None, str] = (progress.base, "")
        self._urgent_last: tuple[int | None, str] = (urgent.base if urgent else None, "")
        # Devices with ledger records written but not committed yet (with how many), bounded by
        # the outputs of the transaction on its way and the next one.
        self._unsettled: Counter[bytes] = Counter()

    def emit(self, outputs: list[Output], kind: OutcomeKind | None) -> None:
        """Outputs (and the outcome they count as, if any) for the next transaction."""
        self._outputs.extend(outputs)
        for output in outputs:
            if output.topic == self.ledger_topic and output.key is not None:
                self._unsettled[output.key] += 1
        if kind is not None:
            self._counts.append(kind)

    def lane(self, urgent: bool) -> PartitionProgress:
        """The progress of the bulk input's partition, or of the urgent lane's."""
        if urgent:
            assert self.urgent is not None, "a record of the urgent lane without the lane"
            return self.urgent
        return self.progress

    @property
    def unfinished(self) -> int:
        """Input records read and not finished, both lanes."""
        return self.progress.unfinished + (self.urgent.unfinished if self.urgent else 0)

    def finish(self, offset: int, *, counted: bool = True, urgent: bool = False) -> None:
        """The input record at ``offset`` (of the urgent lane: ``urgent``) needs nothing more;
        ``counted``: its latency is measured."""
        stamp = self.lane(urgent).finish(offset)
        if counted:
            bulk, fast = self._answered
            self._answered = (bulk, fast + 1) if urgent else (bulk + 1, fast)
        if counted and stamp is not None:
            self._stamps.append(stamp)

    def bind_ended(self, result: str, seconds: float | None) -> None:
        """A bind watch ended (its result, and the seconds from the refresh to the bind)."""
        self._binds.append((result, seconds))

    def unsettled(self, device: str) -> bool:
        """True while a ledger record of ``device`` is written and not committed."""
        return self._unsettled[device.encode()] > 0

    def settled(self) -> bool:
        """Everything emitted is committed: no output, count or ledger record waits, and the
        input and bind-notify positions are those of the last transaction."""
        return not self._unsettled and self._nothing_new(
            self.progress.snapshot(), self._urgent_snapshot()
        )

    def _urgent_snapshot(self) -> tuple[int | None, str]:
        return self.urgent.snapshot() if self.urgent is not None else (None, "")

    def _nothing_new(
        self, position: tuple[int | None, str], urgent: tuple[int | None, str]
    ) -> bool:
        """No output or count waits, and the input (both lanes) and bind-notify positions are
        those of the last transaction."""
        return (
            not (self._outputs or self._counts)
            and position == self._last
            and urgent == self._urgent_last
            and self._notify_position() == self._notify_committed
        )

    def _notify_position(self) -> int | None:
        """The bind-notify offset the next transaction commits."""
        if self.notify_floor is None or self.notify_offset is None:
            return self.notify_offset
        return min(self.notify_offset, self.notify_floor)

    @property
    def pending_outputs(self) -> int:
        return len(self._outputs)

    def take(self) -> Commit | None:
        """What the next transaction writes; None when there is nothing new."""
        offset, metadata = self.progress.snapshot()
        urgent = self._urgent_snapshot()
        if self._nothing_new((offset, metadata), urgent):
            return None
        commit = Commit(
            self._outputs,
            offset,
            metadata,
            self._counts,
            self._stamps,
            self._binds,
            self._notify_position(),
            *urgent,
            self._answered,
        )
        self._outputs, self._counts, self._stamps, self._binds = [], [], [], []
        self._answered = (0, 0)
        return commit

    def committed(self, commit: Commit, written: list[int]) -> None:
        """The transaction carrying ``commit`` committed; ``written``: its outputs' offsets."""
        self._last = (commit.offset, commit.metadata)
        self._urgent_last = (commit.urgent_offset, commit.urgent_metadata)
        self._notify_committed = commit.notify_offset
        for output, offset in zip(commit.outputs, written, strict=True):
            if output.topic == self.dedupe.topic and output.key is not None:
                self.dedupe.committed(output.key, offset)
            elif output.topic == self.ledger_topic and output.key is not None:
                self.ledger_committed(output, offset)
                self._unsettled[output.key] -= 1
                if self._unsettled[output.key] <= 0:
                    del self._unsettled[output.key]

    def restore(self, commit: Commit) -> None:
        """The transaction failed: its outputs go into the next one."""
        self._outputs = commit.outputs + self._outputs
        self._counts = commit.counts + self._counts
        self._stamps = commit.stamps + self._stamps
        self._binds = commit.binds + self._binds
        self._answered = _add(commit.answered, self._answered)


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]
