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
from dataclasses import replace

import structlog

from service.bind.watch import WatchPolicy
from service.events import DEFAULT_MAX_RECORD_BYTES
from service.pipeline.bind_watches import BIND_NOT_CONFIRMED_CODE, BindWatches
from service.pipeline.body_holds import BodyHolds
from service.pipeline.dedupe import DedupeIndex, dedupe_key
from service.pipeline.expiry import Retention
from service.pipeline.intake import DeadLetter, Forward, Routing, read_record
from service.pipeline.ledger import Claim, DeviceLedger, Entry, State, Verdict, rebuild_work
from service.pipeline.outbox import Commit, Outbox
from service.pipeline.progress import PartitionProgress
from service.pipeline.records import ConsumedRecord, OutcomeKind, Output
from service.pipeline.work import (
    Answers,
    HandlerResult,
    Outcome,
    PollResult,
    Republish,
    Waiting,
    Work,
)
from service.platform.errors import SWAP_TOO_OLD

log = structlog.get_logger(__name__)


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
        urgent: tuple[str, PartitionProgress] | None = None,
    ) -> None:
        self.topic = topic
        self.urgent_topic = urgent[0] if urgent else None  # the urgent lane, when it is read
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
        self.outbox = Outbox(
            progress=progress,
            ledger_topic=ledger.topic,
            dedupe=dedupe,
            urgent=urgent[1] if urgent else None,
        )
        self.watches = BindWatches(
            topic=topic,
            partition=partition,
            ledger=ledger,
            answers=answers,
            outbox=self.outbox,
            policy=watch,
            now_ms=_now_ms,
            partitions=routing.partitions if routing is not None else 1,
        )
        self.bodies = _body_holds(self)  # what waits for a swap body read back from the ledger
        self.closed = False  # revoked: results of its jobs are dropped
        self.closing = False  # being revoked: its queued jobs do not start
        self.skipped = 0  # records finished by an earlier owner, skipped without any work
        self._woken = 0
        # Woken swaps claimed and not decided yet (at most the wake limit): a newer swap read
        # meanwhile does not answer them (their entry was no longer waiting), so one abandoned
        # here must answer itself SUPERSEDED, as its decision would have.
        self._claimed_woken: set[tuple[str, tuple[int, int]]] = set()
        # Fresh swaps admitted while their device had nothing open (one lane read): their claim
        # need not be durable before their call (note_claim). Bounded by the swaps handed out.
        self._quiet: set[tuple[str, tuple[int, int]]] = set()
        # Events handed out as jobs (read or woken) and not decided yet. A duplicate of one of
        # them is neither in the duplicate memory (no outcome yet) nor, once a newer swap of the
        # device arrived, the ledger's latest entry: the ledger would judge it a swap of its own,
        # ordered by its own offset, so it could supersede newer swaps (and re-apply the old
        # nodeId) or be answered SUPERSEDED while the original succeeds (two distinct outcomes).
        self._undecided: Counter[str] = Counter()

    # ---- input -----------------------------------------------------------------------------

    def intake(self, record: ConsumedRecord, urgent: bool = False) -> Work | Republish | None:
        """One record read from the input (``urgent``: from the urgent lane, whose partition p has
        a progress of its own and shares the ledger); returns the job to run, if any."""
        offset, progress = record.offset, self.outbox.lane(urgent)
        progress.start(offset, record.timestamp)
        if progress.finished_before(offset):
            self.skipped += 1
            self._finish(offset, urgent, counted=False)
            return None
        read = read_record(
            record,
            self.urgent_topic if urgent and self.urgent_topic else self.topic,
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
            self._finish(offset, urgent, counted=False)
            return None
        if isinstance(read, DeadLetter):
            self._emit([read.output], OutcomeKind.DEAD_LETTERED)
            self._finish(offset, urgent)
            return None
        return self.judge(replace(read, urgent=True) if urgent else read)

    def judge(self, work: Work) -> Work | Republish | None:
        """A swap read (or handed back after a hold): answered before, running, or judged by
        its device's ledger entry."""
        offset, urgent = work.origin_offset, work.urgent
        seen = self.dedupe.seen(work.swap.source, work.swap.id)
        if seen is not None:
            if seen.pending is not None:
                log.info(
                    "duplicate_input", action="not calling the platform", event_id=work.swap.id
                )
                self._emit([replace(seen.pending, outcome=OutcomeKind.DUPLICATE)], None)
                self._finish(offset, urgent)
                return None
            assert seen.offset is not None
            return Republish(work, seen.offset)
        if self._undecided[_event_key(work)]:  # its outcome will be the original's
            log.info("duplicate_of_running_swap", action="not calling the platform")
            self._emit([], OutcomeKind.DUPLICATE)
            self._finish(offset, urgent)
            return None
        return None if self.ledger.hold(work) else self.admit(work)  # held: entry still unread

    def admit(self, work: Work) -> Work | None:
        """A swap read, judged by its device's ledger entry (once read, when it was held; held
        while the device's kept swap has its body in the ledger topic: BodyHolds)."""
        if self.bodies.hold(work):
            return None
        prior = self.ledger.get(work.device)
        if self.retention is not None and self.retention.stale(work, prior, now := _now_ms()):
            self.too_old += 1
            desc = self.retention.describe(work, now)
            self._final(work, self.answers.bind_failed(work, SWAP_TOO_OLD, desc))
            return None
        admission = self.ledger.admit(work)
        if admission.replaced is not None:
            supersede_kept(self, work.device, admission.replaced, work.swap.id)
        if admission.verdict is Verdict.SKIP:
            self.skipped += 1
            self._finish(work.origin_offset, work.urgent, counted=False)
            return None
        if admission.verdict is Verdict.DUPLICATE:
            log.info("duplicate_of_latest_swap", action="not calling the platform")
            self._emit([], OutcomeKind.DUPLICATE)
            self._finish(work.origin_offset, work.urgent)
            return None
        if admission.verdict is Verdict.OLDER:
            assert admission.newer_event_id is not None
            self._final(work, self.answers.superseded(work, admission.newer_event_id))
            return None
        self._undecided[_event_key(work)] += 1
        if (prior is None or prior.state is State.DONE) and self.urgent_topic is None:
            self._quiet.add((_event_key(work), work.order))
        return replace(work, repeat=True) if admission.repeat else work

    def republished(self, job: Republish, found: tuple[Output, int | None] | None) -> None:
        """The stored outcome of a duplicate was read back (None: compacted away)."""
        if self.closed or not self.outbox.lane(job.work.urgent).is_open(job.work.origin_offset):
            return
        offset = job.work.origin_offset
        if found is not None and found[1] == offset:  # this very record, answered before
            self.skipped += 1
            self._finish(offset, job.work.urgent, counted=False)
            return
        log.info(
            "duplicate_input", action="not calling the platform", republished=found is not None
        )
        self._emit([found[0]] if found is not None else [], OutcomeKind.DUPLICATE)
        self._finish(offset, job.work.urgent)

    # ---- jobs ------------------------------------------------------------------------------

    def note_claim(self, work: Work) -> bool:
        """Put the device's ledger record, naming the claimed swap as its latest, into the next
        transaction; True when the platform may be called only once that transaction committed.

        The wait is what keeps a crash after the call from undoing a newer swap: the next owner
        never applies an older swap of the device before reading this one again. The only older
        swaps it could apply before re-reading this one are those the committed ledger holds
        open (waiting or watched swaps, woken before the first fetch; a claimed swap), and, with
        two lanes, any older swap the other lane holds unread. So the wait is needed unless one
        lane is read, the swap was admitted while the device had nothing open, and every ledger
        record of the device is committed. Otherwise the record still rides the next
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
            self._finish(work.offset, work.urgent, counted=False)
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
                self._finish(work.offset, work.urgent)
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
        bodies = self.bodies  # a swap whose body is in the ledger topic waits for it there
        room = max(0, limit - self._woken - bodies.swaps_waking)
        for device, entry in self.ledger.pop_due(now_ms, room):
            if entry.body_out:
                bodies.wake(device, entry, poll=False)
            elif (work := self._woken_job(device, entry)) is not None:
                woken.append(work)
        polls = poll_limit if poll_limit is not None else limit
        room = max(0, polls - self.watches.polling - bodies.polls_waking)
        for device, entry in self.ledger.pop_due(now_ms, room, watches=True):
            if entry.body_out:
                bodies.wake(device, entry, poll=True)
                continue
            poll = self.watches.due(device, entry, now_ms)
            if poll is not None:
                woken.append(poll)
                self.watches.polling += 1
        return woken

    @property
    def woken(self) -> int:
        """Woken swaps and polls handed out (or waiting for their body) and not decided yet."""
        return self._woken + self.watches.polling + self.bodies.swaps_waking

    def _woken_job(self, device: str, entry: Entry) -> Work | None:
        """The job of a waiting swap whose time came (its body in memory)."""
        work = rebuild_work(self.topic, self.partition, device, entry)
        if work is not None:
            self._woken += 1
            self._undecided[_event_key(work)] += 1
        return work

    # ---- bind watches (theirs) -------------------------------------------------------------

    def polled(self, work: Work, result: PollResult) -> None:
        """A bind-watch poll came back."""
        self.watches.polled(work, result)

    def notify(self, record: ConsumedRecord) -> None:
        """A bindDevice push read back from the bind-notify topic."""
        self.watches.notify(record)

    # ---- job bookkeeping -------------------------------------------------------------------

    def _settled(self, work: Work) -> None:
        """A job handed out by :meth:`intake` or :meth:`wake` ended."""
        key = _event_key(work)
        self._quiet.discard((key, work.order))
        self._undecided[key] -= 1
        if self._undecided[key] <= 0:
            del self._undecided[key]

    # ---- decisions -------------------------------------------------------------------------

    def _final(self, work: Work, outcome: Outcome) -> None:
        outputs = [
            outcome.record,
            self.dedupe.record(work.swap.source, work.swap.id, outcome.record, work.origin_offset),
        ]
        watched = None
        unwatched: Outcome | None = None
        if outcome.kind is OutcomeKind.CREDENTIAL_UPDATED and self.watches.policy is not None:
            watched = self.watches.start(work, _now_ms(), outcome.timeout or 0)
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
        elif (
            work.offset is None and (latest := self.ledger.get(work.device)) and not latest.body_out
        ):
            # A woken swap answered after a newer swap of the device arrived: the ledger topic
            # still holds it as waiting, so the next owner would wake it and answer it (and
            # call the platform for it) again. The device's record now names the newer swap.
            # (A newer swap whose body left memory has its record committed already.)
            outputs.append(self.ledger.record(work.device))
        if unwatched is not None:
            outputs.append(unwatched.record)
            self.outbox.bind_ended("unconfirmed", None)
        self._emit(outputs, outcome.kind)
        if work.offset is not None:
            self._finish(work.offset, work.urgent)
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

    def _finish(self, offset: int, urgent: bool = False, *, counted: bool = True) -> None:
        self.outbox.finish(offset, counted=counted, urgent=urgent)

    # ---- commits (the outbox's) ------------------------------------------------------------

    def take_commit(self) -> Commit | None:
        """What the next transaction writes; None when there is nothing new."""
        return self.outbox.take()

    def committed(self, commit: Commit, written: list[int]) -> None:
        self.outbox.committed(commit, written)

    def keep_ledger(self) -> bool:
        """After a revocation's last transaction: True when the ledger is kept, undone to its
        committed records (undecided swaps are read again); not with woken swaps or polls out
        (or waiting for a body), outputs not committed, or a ledger being read."""
        out = self._woken or self.watches.polling or self._claimed_woken or self.bodies.waking
        if out or not self.outbox.settled() or self.ledger.loading is not None:
            return False
        self.ledger.undo()
        return True

    def restore(self, commit: Commit) -> None:
        """The transaction failed: its outputs go into the next one."""
        self.outbox.restore(commit)


def supersede_kept(core: PartitionCore, device: str, entry: Entry, newer_event_id: str) -> None:
    """A newer swap replaced the device's waiting or watched swap: answer that one."""
    old = rebuild_work(core.topic, core.partition, device, entry)
    if old is None:
        return
    if entry.state is State.WATCHING:  # refreshed, not bound yet: its watch ends here
        core.watches.release(device)
        failed = core.answers.bind_failed(
            old,
            BIND_NOT_CONFIRMED_CODE,
            f"a newer swap of the device ({newer_event_id}) replaced this one before its "
            "new hardware was seen to bind",
        )
        core.outbox.emit([failed.record, core.ledger.record(device)], None)
        core.outbox.bind_ended("unconfirmed", None)
        return
    outcome = core.answers.superseded(old, newer_event_id)
    core.outbox.emit(
        [
            outcome.record,
            core.dedupe.record(old.swap.source, old.swap.id, outcome.record, old.origin_offset),
            core.ledger.record(device),
        ],
        outcome.kind,
    )


def _body_holds(core: PartitionCore) -> BodyHolds:
    """The partition's holds for swap bodies, wired to its ledger, outbox and decisions."""
    core.outbox.ledger_committed = core.ledger.committed  # a committed record may hold a body
    holds = BodyHolds(
        topic=core.topic,
        partition=core.partition,
        ledger=core.ledger,
        outbox=core.outbox,
        answers=core.answers,
        judge=core.judge,
        woken=core._woken_job,
        due=lambda device, entry, now_ms: _poll(core, device, entry, now_ms),
        notify=lambda record: core.watches.notify(record, held=True),
        final=core._final,
        now_ms=_now_ms,
    )
    core.watches.hold_push = holds.hold_push
    return holds


def _poll(core: PartitionCore, device: str, entry: Entry, now_ms: int) -> Work | None:
    """A watched device's due poll (counted as out), or the end of its watch."""
    poll = core.watches.due(device, entry, now_ms)
    if poll is not None:
        core.watches.polling += 1
    return poll


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
