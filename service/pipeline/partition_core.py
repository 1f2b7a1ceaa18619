"""Every decision about one input partition, without I/O: the pipeline feeds it records and job
results, and takes from it what to write in the partition's next transaction.

    record -> progress (skip what an earlier owner finished) -> intake (dead letter?)
           -> duplicate memory (answered before?) -> ledger (latest swap of the device?) -> job
    job    -> claim (still the latest?) -> handler -> decide: outcome / wait in the ledger
    commit <- outputs decided since the last transaction + committed offset and its metadata

The model-based test drives this class through random interleavings; the Kafka side
(:mod:`service.pipeline.pipeline`, :mod:`service.pipeline.committer`) only moves bytes.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace

import structlog

from service.bind.watch import WatchPolicy
from service.events import DEFAULT_MAX_RECORD_BYTES
from service.pipeline.bind_watches import BIND_NOT_CONFIRMED_CODE, BindWatches
from service.pipeline.dedupe import DedupeIndex, dedupe_key
from service.pipeline.expiry import Retention
from service.pipeline.intake import DeadLetter, Forward, Routing, read_record
from service.pipeline.ledger import Claim, DeviceLedger, Entry, State, Verdict, rebuild_work
from service.pipeline.outbox import Commit, Outbox
from service.pipeline.progress import PartitionProgress
from service.pipeline.records import ConsumedRecord, OutcomeKind, Output
from service.pipeline.work import Answers, HandlerResult, Outcome, PollResult, Waiting, Work
from service.platform.errors import SWAP_TOO_OLD

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Republish:
    """An event answered before whose stored outcome must be read back (I/O) and re-published."""

    work: Work
    dedupe_offset: int


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
        watch: WatchPolicy | None = None,
        max_input_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        max_clock_skew_ms: int | None = None,
        routing: Routing | None = None,
        retention: Retention | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.dead_letter_topic = dead_letter_topic
        self.progress = progress
        self.ledger = ledger
        self.dedupe = dedupe
        self.answers = answers
        self.max_input_bytes = max_input_bytes
        self.max_clock_skew_ms = max_clock_skew_ms
        self.routing = routing
        self.retention = retention  # None: ledger entries never expire
        self.expired = 0  # done entries removed by the retention sweep
        self.too_old = 0  # swaps answered SWAP_TOO_OLD
        self.misrouted = 0  # records forwarded to their key's partition
        self.outbox = Outbox(progress=progress, ledger_topic=ledger.topic, dedupe=dedupe)
        self.watches = BindWatches(
            topic=topic,
            partition=partition,
            ledger=ledger,
            answers=answers,
            outbox=self.outbox,
            policy=watch,
            now_ms=_now_ms,
        )
        self.closed = False  # revoked: results of its jobs are dropped
        self.closing = False  # being revoked: its queued jobs do not start
        self.skipped = 0  # records finished by an earlier owner, skipped without any work
        self._woken = 0
        # Woken swaps claimed and not decided yet (at most the wake limit): a newer swap read
        # meanwhile does not answer them (their entry was no longer waiting), so one abandoned
        # here must answer itself SUPERSEDED, as its decision would have.
        self._claimed_woken: set[tuple[str, tuple[int, int]]] = set()
        # Fresh swaps admitted while their device had no open swap in the ledger (no entry, or
        # its last swap done): their claim need not be durable before their call (note_claim).
        # Bounded by the swaps handed out and not settled.
        self._quiet: set[tuple[str, tuple[int, int]]] = set()
        # Events handed out as jobs (read or woken) and not decided yet. A duplicate of one of
        # them is neither in the duplicate memory (no outcome yet) nor, once a newer swap of the
        # device arrived, the ledger's latest entry: the ledger would judge it a swap of its own,
        # ordered by its own offset, so it could supersede newer swaps (and re-apply the old
        # nodeId) or be answered SUPERSEDED while the original succeeds (two distinct outcomes).
        self._undecided: Counter[str] = Counter()

    # ---- input -----------------------------------------------------------------------------

    def intake(self, record: ConsumedRecord) -> Work | Republish | None:  # noqa: PLR0911 - one per verdict
        """One record read from the input; returns the job to run, if any."""
        offset = record.offset
        self.progress.start(offset, record.timestamp)
        if self.progress.finished_before(offset):
            self.skipped += 1
            self._finish(offset, counted=False)
            return None
        read = read_record(
            record,
            self.topic,
            self.partition,
            self.dead_letter_topic,
            max_bytes=self.max_input_bytes,
            max_clock_skew_ms=self.max_clock_skew_ms,
            routing=self.routing,
        )
        if isinstance(read, Forward):  # finished here: its copy is worked on where it belongs
            self.misrouted += 1
            note_misrouted(read, self.topic, self.partition, offset)
            self._emit([read.output], None)
            self._finish(offset, counted=False)
            return None
        if isinstance(read, DeadLetter):
            self._emit([read.output], OutcomeKind.DEAD_LETTERED)
            self._finish(offset)
            return None
        work = read
        seen = self.dedupe.seen(work.swap.source, work.swap.id)
        if seen is not None:
            if seen.pending is not None:
                log.info(
                    "duplicate_input", action="not calling the platform", event_id=work.swap.id
                )
                self._emit([replace(seen.pending, outcome=OutcomeKind.DUPLICATE)], None)
                self._finish(offset)
                return None
            assert seen.offset is not None
            return Republish(work, seen.offset)
        if self._undecided[_event_key(work)]:  # its outcome will be the original's
            log.info("duplicate_of_running_swap", action="not calling the platform")
            self._emit([], OutcomeKind.DUPLICATE)
            self._finish(offset)
            return None
        prior = self.ledger.get(work.device)
        if self.retention is not None and self.retention.stale(work, prior, now := _now_ms()):
            self.too_old += 1
            desc = self.retention.describe(work, now)
            self._final(work, self.answers.bind_failed(work, SWAP_TOO_OLD, desc))
            return None
        admission = self.ledger.admit(work)
        if admission.replaced is not None:
            self._supersede_waiting(work.device, admission.replaced, work.swap.id)
        if admission.verdict is Verdict.SKIP:
            self.skipped += 1
            self._finish(offset, counted=False)
            return None
        if admission.verdict is Verdict.DUPLICATE:
            log.info("duplicate_of_latest_swap", action="not calling the platform")
            self._emit([], OutcomeKind.DUPLICATE)
            self._finish(offset)
            return None
        if admission.verdict is Verdict.OLDER:
            assert admission.newer_event_id is not None
            self._final(work, self.answers.superseded(work, admission.newer_event_id))
            return None
        self._undecided[_event_key(work)] += 1
        if prior is None or prior.state is State.DONE:
            self._quiet.add((_event_key(work), work.order))
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
        log.info(
            "duplicate_input", action="not calling the platform", republished=found is not None
        )
        self._emit([found[0]] if found is not None else [], OutcomeKind.DUPLICATE)
        self._finish(offset)

    # ---- jobs ------------------------------------------------------------------------------

    def note_claim(self, work: Work) -> bool:
        """Put the device's ledger record, naming the claimed swap as its latest, into the next
        transaction; True when the platform may be called only once that transaction committed.

        The wait is what keeps a crash after the call from undoing a newer swap: the next owner
        never applies an older swap of the device before reading this one again. The only older
        swaps it could apply before re-reading this one are those the committed ledger holds
        open (waiting or watched swaps, woken before the first fetch; a claimed swap). So the
        wait is needed unless the swap was admitted while the device had nothing open, and every
        ledger record of the device is committed. Otherwise the record still rides the next
        transaction, so that after most crashes the next owner knows the call may have been
        made (a repeat); when it does not, a repeat's 100611 defers once and the woken retry
        reconciles (docs/core.md)."""
        key = (_event_key(work), work.order)
        quiet = key in self._quiet
        self._quiet.discard(key)
        unsettled = self.outbox.unsettled(work.device)
        if self.ledger.is_latest(work):
            self._emit([self.ledger.record(work.device)], None)
        return not quiet or unsettled

    def claim(self, work: Work) -> bool:
        """Called when the job starts: True when the platform must be called for it."""
        verdict, newer = self.ledger.claim(work)
        if verdict is Claim.CLAIMED:
            if work.offset is None:
                self._claimed_woken.add((_event_key(work), work.order))
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
            self._claimed_woken.discard((_event_key(work), work.order))
        if isinstance(result, Outcome):
            self._final(work, result)
            return
        assert isinstance(result, Waiting)
        if self.ledger.wait(work, result.state):
            self._emit([self.ledger.record(work.device)], OutcomeKind.DEFERRED)
            if work.offset is not None:
                self._finish(work.offset)
            return
        entry = self.ledger.get(work.device)
        newer = entry.event_id if entry is not None else "unknown"
        self._final(work, self.answers.superseded(work, newer))

    def abandoned(self, work: Work) -> None:
        """A job that could not run to its end (cancelled, or handed over before it ran): the
        next owner redoes it. A woken swap or a poll is due again here too, as the ledger holds
        it, so a partition that stays with this member does not forget it."""
        if work.watch is not None:
            self.watches.polling -= 1
        else:
            self._settled(work)
        if work.offset is None:
            if work.watch is None:
                self._woken -= 1
            entry = self.ledger.get(work.device)
            claimed = (_event_key(work), work.order)
            if work.watch is None and claimed in self._claimed_woken:
                self._claimed_woken.discard(claimed)
                if entry is not None and not self.ledger.is_latest(work):
                    # A newer swap was read while this one was claimed: nothing else answers it.
                    self._final(work, self.answers.superseded(work, entry.event_id))
                    return
            if not self.ledger.is_latest(work) or entry is None:
                return
            if entry.state is State.PENDING and work.wait is not None:
                # Claimed, then abandoned before its answer: it waits again as the ledger
                # topic still holds it (a woken swap's claim writes nothing).
                self.ledger.wait(work, work.wait)
            else:
                self.ledger.requeue(work.device)

    def wake(self, now_ms: int, limit: int, poll_limit: int | None = None) -> list[Work]:
        """Waiting swaps whose time has come, while fewer than ``limit`` woken swaps are being
        worked on, and bind-watch polls that are due, while fewer than ``poll_limit`` (default
        ``limit``) polls are out. The two have rooms and queues of their own: polls waiting for
        their budget share never hold back a waiting swap, nor the reverse."""
        if self.closed:
            return []
        if self.retention is not None and not self.closing:
            # The wall clock, not ``now_ms`` (which may be set ahead to wake every due swap):
            # the same clock as the stale-swap check in intake.
            tombstones = self.retention.sweep(self.ledger, _now_ms())
            self.expired += len(tombstones)
            self._emit(tombstones, None)
        woken: list[Work] = []
        for device, entry in self.ledger.pop_due(now_ms, max(0, limit - self._woken)):
            work = rebuild_work(self.topic, self.partition, device, entry)
            if work is not None:
                woken.append(work)
                self._undecided[_event_key(work)] += 1
        self._woken += len(woken)
        polls = poll_limit if poll_limit is not None else limit
        room = max(0, polls - self.watches.polling)
        for device, entry in self.ledger.pop_due(now_ms, room, watches=True):
            poll = self.watches.due(device, entry, now_ms)
            if poll is not None:
                woken.append(poll)
                self.watches.polling += 1
        return woken

    @property
    def woken(self) -> int:
        """Woken swaps and polls handed out and not decided yet."""
        return self._woken + self.watches.polling

    # ---- bind watches (theirs) -------------------------------------------------------------

    def polled(self, work: Work, result: PollResult) -> None:
        """A bind-watch poll came back."""
        self.watches.polled(work, result)

    def notify(self, record: ConsumedRecord) -> None:
        """A bindDevice push read back from the bind-notify topic."""
        self.watches.notify(record)

    @property
    def duplicate_pushes(self) -> int:
        """Pushes that matched no open watch (repeats, stale)."""
        return self.watches.duplicate_pushes

    @property
    def unproven_pushes(self) -> int:
        """Pushes without a nodeId: they settle nothing."""
        return self.watches.unproven_pushes

    # ---- job bookkeeping -------------------------------------------------------------------

    def _settled(self, work: Work) -> None:
        """A job handed out by :meth:`intake` or :meth:`wake` ended."""
        key = _event_key(work)
        self._quiet.discard((key, work.order))
        self._undecided[key] -= 1
        if self._undecided[key] <= 0:
            del self._undecided[key]

    # ---- decisions -------------------------------------------------------------------------

    def _supersede_waiting(self, device: str, entry: Entry, newer_event_id: str) -> None:
        old = rebuild_work(self.topic, self.partition, device, entry)
        if old is None:
            return
        if entry.state is State.WATCHING:  # refreshed, not bound yet: its watch ends here
            failed = self.answers.bind_failed(
                old,
                BIND_NOT_CONFIRMED_CODE,
                f"a newer swap of the device ({newer_event_id}) replaced this one before its "
                "new hardware was seen to bind",
            )
            self._emit([failed.record, self.ledger.record(device)], None)
            self.outbox.bind_ended("unconfirmed", None)
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
        watched = None
        unwatched: Outcome | None = None
        if outcome.kind is OutcomeKind.CREDENTIAL_UPDATED and self.watches.policy is not None:
            watch = self.watches.policy.start(_now_ms(), outcome.timeout or 0)
            watched = self.ledger.watch(work, watch)
            if watched is None:
                # A newer swap of the device arrived during the call: this refresh is never
                # watched. Its swap still ends with exactly one more event, as when a newer
                # swap replaces a watched one (_supersede_waiting): BIND_NOT_CONFIRMED, now.
                newer = self.ledger.get(work.device)
                unwatched = self.answers.bind_failed(
                    work,
                    BIND_NOT_CONFIRMED_CODE,
                    f"a newer swap of the device ({newer.event_id if newer else 'unknown'}) "
                    "replaced this one before its new hardware was seen to bind",
                )
        if watched is not None or self.ledger.done(work, outcome.kind.value):
            outputs.append(self.ledger.record(work.device))
        elif work.offset is None and self.ledger.get(work.device) is not None:
            # A woken swap answered after a newer swap of the device arrived: the ledger topic
            # still holds it as waiting, so the next owner would wake it and answer it (and
            # call the platform for it) again. The device's record now names the newer swap.
            outputs.append(self.ledger.record(work.device))
        if unwatched is not None:
            outputs.append(unwatched.record)
            self.outbox.bind_ended("unconfirmed", None)
        self._emit(outputs, outcome.kind)
        if work.offset is not None:
            self._finish(work.offset)
        if (
            watched is not None
            and watched.early is not None
            and watched.early[2] == watched.node_id  # the push came first, about this swap
        ):
            result, at_ms, _ = watched.early
            if result == "succeeded":
                self.watches.bound(work.device, watched, "push", at_ms)
            else:
                self.watches.end(work.device, watched, at_ms, pushed_expired=True)

    def _emit(self, outputs: list[Output], kind: OutcomeKind | None) -> None:
        self.outbox.emit(outputs, kind)

    def _finish(self, offset: int, *, counted: bool = True) -> None:
        self.outbox.finish(offset, counted=counted)

    # ---- commits (the outbox's) ------------------------------------------------------------

    @property
    def pending_outputs(self) -> int:
        return self.outbox.pending_outputs

    def take_commit(self) -> Commit | None:
        """What the next transaction writes; None when there is nothing new."""
        return self.outbox.take()

    def committed(self, commit: Commit, written: list[int]) -> None:
        self.outbox.committed(commit, written)

    def settled(self) -> bool:
        """The state in memory is exactly what the committed records say: all decided is
        committed, every record read finished, no job, woken swap or poll out (a swap read and
        not finished changed its device's entry without a record). OpenPartitions.park."""
        out = self._woken or self.watches.polling or self._undecided or self._claimed_woken
        return not out and self.progress.unfinished == 0 and self.outbox.settled()

    def restore(self, commit: Commit) -> None:
        """The transaction failed: its outputs go into the next one."""
        self.outbox.restore(commit)


MAX_MISROUTING_PRODUCERS = 256
_misrouting_producers: set[str] = set()


def note_misrouted(forward: Forward, topic: str, partition: int, offset: int) -> None:
    """Log a misrouted record once per producer (its CloudEvent ``source``), for a bounded number
    of producers; the metric counts every one."""
    producer = forward.producer
    if producer in _misrouting_producers:
        return
    if len(_misrouting_producers) >= MAX_MISROUTING_PRODUCERS:
        producer = "(other producers)"
        if producer in _misrouting_producers:
            return
    _misrouting_producers.add(producer)
    log.warning(
        "misrouted_input",
        action="forwarded to its key's partition; set the producer's partitioner "
        "(docs/deploying.md, upstream producers)",
        producer=producer[:256],
        topic=topic,
        partition=partition,
        offset=offset,
        expected_partition=forward.right,
    )


def _event_key(work: Work) -> str:
    return dedupe_key(work.swap.source, work.swap.id)


def _now_ms() -> int:
    return int(time.time() * 1000)
