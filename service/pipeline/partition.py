"""Every decision about one input partition, without I/O: the pipeline feeds it records and job
results, and takes from it what to write in the partition's next transaction.

    record -> progress (skip what an earlier owner finished) -> intake (dead letter?)
           -> duplicate memory (answered before?) -> ledger (latest swap of the device?) -> job
    job    -> claim (still the latest?) -> handler -> decide: outcome / wait in the ledger
    commit <- outputs decided since the last transaction + committed offset and its metadata

The model-based test drives this class through random interleavings; the Kafka side
(:mod:`service.pipeline.runner`, :mod:`service.pipeline.committer`) only moves bytes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from service.events import InvalidEvent, decode_swap
from service.pipeline.dedupe import DedupeIndex, dedupe_key
from service.pipeline.intake import DeadLetter, read_record
from service.pipeline.ledger import Claim, DeviceLedger, Entry, Verdict
from service.pipeline.progress import PartitionProgress
from service.pipeline.records import OutcomeKind, Output
from service.pipeline.work import Deferral, HandlerResult, Outcome, Work

log = structlog.get_logger(__name__)


class Answers(Protocol):
    """Builds the answers the partition decides without calling the platform."""

    def superseded(self, work: Work, newer_event_id: str) -> Outcome: ...


@dataclass(frozen=True, slots=True)
class Republish:
    """An event answered before whose stored outcome must be read back (I/O) and re-published."""

    work: Work
    dedupe_offset: int


@dataclass(slots=True)
class Commit:
    """What one transaction of the partition writes."""

    outputs: list[Output]
    offset: int | None
    metadata: str
    counts: list[OutcomeKind] = field(default_factory=list)
    stamps: list[int] = field(default_factory=list)


class PartitionCore:
    def __init__(
        self,
        *,
        topic: str,
        partition: int,
        dead_letter_topic: str,
        progress: PartitionProgress,
        ledger: DeviceLedger,
        dedupe: DedupeIndex,
        answers: Answers,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.dead_letter_topic = dead_letter_topic
        self.progress = progress
        self.ledger = ledger
        self.dedupe = dedupe
        self.answers = answers
        self.closed = False  # revoked: results of its jobs are dropped
        self.closing = False  # being revoked: its queued jobs do not start
        self.skipped = 0  # records finished by an earlier owner, skipped without any work
        self._outputs: list[Output] = []
        self._counts: list[OutcomeKind] = []
        self._stamps: list[int] = []
        self._last: tuple[int | None, str] = (progress.base, "")
        self._woken = 0
        # Events handed out as jobs (read or woken) and not decided yet. A duplicate of one of
        # them is neither in the duplicate memory (no outcome yet) nor, once a newer swap of the
        # device arrived, the ledger's latest entry: the ledger would judge it a swap of its own,
        # ordered by its own offset, so it could supersede newer swaps (and re-apply the old
        # nodeId) or be answered SUPERSEDED while the original succeeds (two distinct outcomes).
        self._undecided: Counter[str] = Counter()

    # ---- input -----------------------------------------------------------------------------

    def intake(self, record: Any) -> Work | Republish | None:  # noqa: PLR0911 - one per verdict
        """One record read from the input; returns the job to run, if any."""
        offset = record.offset
        self.progress.start(offset, record.timestamp)
        if self.progress.finished_before(offset):
            self.skipped += 1
            self._finish(offset, counted=False)
            return None
        read = read_record(record, self.topic, self.partition, self.dead_letter_topic)
        if isinstance(read, DeadLetter):
            self._emit([read.output], OutcomeKind.DEAD_LETTERED)
            self._finish(offset)
            return None
        work = read
        seen = self.dedupe.seen(work.swap.source, work.swap.id)
        if seen is not None:
            if seen.pending is not None:
                log.info("duplicate input: not calling the platform", event_id=work.swap.id)
                self._emit([replace(seen.pending, outcome=OutcomeKind.DUPLICATE)], None)
                self._finish(offset)
                return None
            assert seen.offset is not None
            return Republish(work, seen.offset)
        if self._undecided[_event_key(work)]:  # its outcome will be the original's
            log.info("duplicate of a swap being worked on: not calling the platform")
            self._emit([], OutcomeKind.DUPLICATE)
            self._finish(offset)
            return None
        admission = self.ledger.admit(work)
        if admission.replaced is not None:
            self._supersede_waiting(work.device, admission.replaced, work.swap.id)
        if admission.verdict is Verdict.SKIP:
            self.skipped += 1
            self._finish(offset, counted=False)
            return None
        if admission.verdict is Verdict.DUPLICATE:
            log.info("duplicate of a device's latest swap: not calling the platform")
            self._emit([], OutcomeKind.DUPLICATE)
            self._finish(offset)
            return None
        if admission.verdict is Verdict.OLDER:
            assert admission.newer_event_id is not None
            self._final(work, self.answers.superseded(work, admission.newer_event_id))
            return None
        self._undecided[_event_key(work)] += 1
        return replace(work, repeat=True) if admission.repeat else work

    def republished(self, job: Republish, found: tuple[Output, int | None] | None) -> None:
        """The stored outcome of a duplicate was read back (None: compacted away)."""
        if self.closed or not self.progress.is_open(job.work.origin_offset):
            return
        offset = job.work.origin_offset
        if found is not None and found[1] == offset:  # this very record, answered before
            self.skipped += 1
            self._finish(offset, counted=False)
            return
        log.info("duplicate input: not calling the platform", republished=found is not None)
        self._emit([found[0]] if found is not None else [], OutcomeKind.DUPLICATE)
        self._finish(offset)

    # ---- jobs ------------------------------------------------------------------------------

    def claim(self, work: Work) -> bool:
        """Called when the job starts: True when the platform must be called for it."""
        verdict, newer = self.ledger.claim(work)
        if verdict is Claim.CLAIMED:
            return True
        self._settled(work)
        if verdict is Claim.SUPERSEDED:
            assert newer is not None
            self._final(work, self.answers.superseded(work, newer))
        elif work.offset is not None:
            self._finish(work.offset, counted=False)
        if work.offset is None:
            self._woken -= 1
        return False

    def decide(self, work: Work, result: HandlerResult) -> None:
        self._settled(work)
        if work.offset is None:
            self._woken -= 1
        if isinstance(result, Outcome):
            self._final(work, result)
            return
        assert isinstance(result, Deferral)
        if self.ledger.wait(work, result.state):
            self._emit([self.ledger.record(work.device)], OutcomeKind.DEFERRED)
            if work.offset is not None:
                self._finish(work.offset)
            return
        entry = self.ledger.get(work.device)
        newer = entry.event_id if entry is not None else "unknown"
        self._final(work, self.answers.superseded(work, newer))

    def abandoned(self, work: Work) -> None:
        """A job that could not run to its end (cancelled): the next owner redoes it."""
        self._settled(work)
        if work.offset is None:
            self._woken -= 1

    def wake(self, now_ms: int, limit: int) -> list[Work]:
        """Waiting swaps whose time has come, at most ``limit`` (and while fewer than ``limit``
        woken swaps are being worked on)."""
        room = limit - self._woken
        if room <= 0 or self.closed:
            return []
        woken: list[Work] = []
        for device, entry in self.ledger.pop_due(now_ms, room):
            work = self._rebuild(device, entry)
            if work is not None:
                woken.append(work)
                self._undecided[_event_key(work)] += 1
        self._woken += len(woken)
        return woken

    @property
    def woken(self) -> int:
        return self._woken

    def _rebuild(self, device: str, entry: Entry) -> Work | None:
        try:
            swap = decode_swap(entry.value, entry.headers)
        except InvalidEvent as exc:  # written by this service: not expected
            log.error(  # noqa: TRY400 - the detail says it all
                "unreadable waiting swap in the ledger", device_id=device, detail=exc.detail
            )
            return None
        return Work(
            swap=swap,
            raw_value=entry.value,
            raw_headers=list(entry.headers),
            topic=self.topic,
            partition=self.partition,
            origin_offset=entry.order[1],
            order=entry.order,
            offset=None,
            wait=entry.wait,
        )

    def _settled(self, work: Work) -> None:
        """A job handed out by :meth:`intake` or :meth:`wake` ended."""
        key = _event_key(work)
        self._undecided[key] -= 1
        if self._undecided[key] <= 0:
            del self._undecided[key]

    # ---- decisions -------------------------------------------------------------------------

    def _supersede_waiting(self, device: str, entry: Entry, newer_event_id: str) -> None:
        old = self._rebuild(device, entry)
        if old is None:
            return
        outcome = self.answers.superseded(old, newer_event_id)
        self._emit(
            [
                outcome.record,
                self.dedupe.record(old.swap.source, old.swap.id, outcome.record, old.origin_offset),
                self.ledger.record(device),
            ],
            outcome.kind,
        )

    def _final(self, work: Work, outcome: Outcome) -> None:
        outputs = [
            outcome.record,
            self.dedupe.record(work.swap.source, work.swap.id, outcome.record, work.origin_offset),
        ]
        if self.ledger.done(work, outcome.kind.value):
            outputs.append(self.ledger.record(work.device))
        self._emit(outputs, outcome.kind)
        if work.offset is not None:
            self._finish(work.offset)

    def _emit(self, outputs: list[Output], kind: OutcomeKind | None) -> None:
        self._outputs.extend(outputs)
        if kind is not None:
            self._counts.append(kind)

    def _finish(self, offset: int, *, counted: bool = True) -> None:
        stamp = self.progress.finish(offset)
        if counted and stamp is not None:
            self._stamps.append(stamp)

    # ---- commits ---------------------------------------------------------------------------

    @property
    def pending_outputs(self) -> int:
        return len(self._outputs)

    def take_commit(self) -> Commit | None:
        """What the next transaction writes; None when there is nothing new."""
        offset, metadata = self.progress.snapshot()
        if not self._outputs and not self._counts and (offset, metadata) == self._last:
            return None
        commit = Commit(self._outputs, offset, metadata, self._counts, self._stamps)
        self._outputs, self._counts, self._stamps = [], [], []
        return commit

    def committed(self, commit: Commit, written: list[int]) -> None:
        self._last = (commit.offset, commit.metadata)
        for output, offset in zip(commit.outputs, written, strict=True):
            if output.topic == self.dedupe.topic and output.key is not None:
                self.dedupe.committed(output.key, offset)

    def restore(self, commit: Commit) -> None:
        """The transaction failed: its outputs go into the next one."""
        self._outputs = commit.outputs + self._outputs
        self._counts = commit.counts + self._counts
        self._stamps = commit.stamps + self._stamps


def _event_key(work: Work) -> str:
    return dedupe_key(work.swap.source, work.swap.id)
