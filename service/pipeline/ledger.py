"""The per-device ledger: the latest swap of every device, and where it stands.

It is what keeps "the latest swap of a device always wins" true across arrival orders, restarts
and rebalances. Durably, it is a compacted topic (``REBIND_TOPICS__LEDGER``) keyed by deviceId and
co-partitioned with the input: partition p of the ledger holds the devices of input partition p,
and its records are written in the same transactions as the outcomes and offsets of that input
partition. In memory, the owner of a partition holds one small entry per device of it, loaded from
the ledger when the partition is assigned: a ``done`` entry packed in a few dozen bytes
(:mod:`service.pipeline.packed`), an object only while the device's swap is pending, waiting or
watched. A ``done`` entry older than the retention is removed, with a tombstone
(:mod:`service.pipeline.expiry`).

Which swap is the latest: the one with the later CloudEvent ``time`` (the record's timestamp when
the event has none); of two with the same time, the one read later from the input. So a swap
replayed from an old failure, or produced late by another inventory system, never rolls a device
back to an older nodeId.

An entry is ``pending`` (accepted, its outcome not decided yet), ``waiting`` (deferred: the device
was online, or a transient error asked for a pause longer than a few seconds; the swap itself is
kept in the record, with its due time and history) or ``done``. Waiting swaps cost an entry and a
place in one heap ordered by due time: no timer, no buffer slot, no task.

Decisions (all pure, no I/O):

* :meth:`admit` a swap read from the input: run it, skip it (its outcome is already on Kafka), or
  answer it at once as superseded (an older swap), or as a duplicate; a waiting older swap that
  the new one replaces is handed back to be answered ``SUPERSEDED``.
* :meth:`claim` when its job runs: still the latest? (a newer swap may have arrived meanwhile.)
* :meth:`done` / :meth:`wait` when it is decided, :meth:`record` the ledger record to write.
* :func:`rebuild_work` reads a waiting or watched swap back from its entry as a job.
"""

from __future__ import annotations

import base64
import heapq
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any, Final

import orjson
import structlog

from service.events import InvalidEvent, decode_swap
from service.pipeline.packed import DoneFields, PackedEntries
from service.pipeline.records import Output
from service.pipeline.work import WaitState, Watch, Work

if TYPE_CHECKING:
    from service.pipeline.takeover import LedgerLoad

log = structlog.get_logger(__name__)

RECORD_VERSION: Final = 1


class State(StrEnum):
    PENDING = "pending"
    WAITING = "waiting"
    WATCHING = "watching"  # refreshed; waiting for the new hardware to bind
    DONE = "done"


@dataclass(slots=True)
class Entry:
    """The latest swap accepted for one device."""

    event_id: str
    source: str
    order: tuple[int, int]
    node_id: str
    state: State
    outcome: str | None = None
    wait: WaitState | None = None
    value: bytes | None = None  # the swap itself, while it waits or is watched and ...
    headers: Sequence[tuple[str, bytes]] = ()
    body_at: int | None = None
    """... until the ledger record holding it is committed: then its offset in the ledger
    partition, and ``value`` is None (the body is read back from there when it is needed)."""
    watch: Watch | None = None
    early: tuple[str, int, str] | None = None
    """A bind push (result, at ms, nodeId) about this swap's nodeId, seen before its watch."""

    @property
    def due_ms(self) -> int | None:
        """When the entry needs attention: a waiting swap's next try, a watch's next poll or
        deadline; None otherwise."""
        if self.state is State.WAITING and self.wait is not None:
            return self.wait.due_ms
        if self.state is State.WATCHING and self.watch is not None:
            return self.watch.due_ms
        return None

    def same_event(self, work: Work) -> bool:
        return self.event_id == work.swap.id and self.source == work.swap.source

    @property
    def body_out(self) -> bool:
        """A waiting or watched swap whose body is only in the ledger topic (at ``body_at``)."""
        return self.value is None and self.body_at is not None


class Verdict(Enum):
    RUN = "run"  # the latest swap: work on it
    SKIP = "skip"  # already decided by an earlier owner (waiting or done): nothing to do
    DUPLICATE = "duplicate"  # the same event again, read at another offset
    OLDER = "older"  # a newer swap of the device is known: answer SUPERSEDED


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Verdict
    newer_event_id: str | None = None  # with OLDER
    replaced: Entry | None = None  # a waiting or watched swap the admitted one supersedes
    repeat: bool = False  # with RUN: an earlier owner may have called the platform already


class Claim(Enum):
    CLAIMED = "claimed"  # still the latest: call the platform
    SUPERSEDED = "superseded"  # a newer swap arrived since: answer SUPERSEDED, no call
    GONE = "gone"  # already answered (a waiting swap superseded at admission): drop it


class DeviceLedger:
    """The ledger of one input partition."""

    def __init__(self, topic: str, partition: int, *, bodies_out: bool = False) -> None:
        self.topic = topic
        self.partition = partition
        # With ``bodies_out``, a waiting or watched swap's body leaves memory once the ledger
        # record holding it is committed (or when it is loaded from the topic): the entry keeps
        # the record's offset, and its owner reads the body back when the swap needs it
        # (PartitionCore's body holds, service.pipeline.bodies).
        self.bodies_out = bodies_out
        # The last ledger record written of each device whose entry keeps its body in memory
        # until that record commits: bounded by the records written and not committed yet.
        self._body_records: dict[str, tuple[Output, Entry]] = {}
        # Entries as objects: pending, waiting and watched swaps (bounded by the swaps not done
        # yet), and the rare done entry that does not pack. Every other done entry is packed.
        self._entries: dict[str, Entry] = {}
        # One record per device of the partition swapped within the retention (older ones are
        # swept: service.pipeline.expiry), plus replaced records' bytes until the blob is tidied.
        self._done = PackedEntries()
        # (due_ms, sequence, device), lazily cleaned: waiting swaps, and bind watches apart, so
        # the ones never queue behind the others (each has its own room in the wake loop).
        self._due: list[tuple[int, int, str]] = []
        self._watch_due: list[tuple[int, int, str]] = []
        self._sequence = 0
        # The sequence of each device's last pushed heap item: only that one is live. An earlier
        # item of the device can carry the same due time (a newer swap watched or waiting due
        # in the same millisecond, a record loaded twice) and would hand the entry out twice:
        # two bind-watch ends (two outcome records), or two polls or woken jobs for one entry.
        self._live: dict[str, int] = {}
        self._waiting = 0
        self.watching: set[str] = set()  # devices whose new hardware has not bound yet
        # Set while the ledger is read from its end back (a take-over): some devices are not
        # known yet, and their swaps are held (service.pipeline.takeover).
        self.loading: LedgerLoad | None = None
        # Devices whose entry changed since the last record written of it: the entry that
        # record holds (None: no entry). What undo() puts back. Bounded by the work open: the
        # swaps read and not decided (an admitted swap changes its device's entry and writes
        # nothing until its claim), woken swaps claimed, bind pushes noted on a pending or
        # waiting swap, and watches a load placed on the poll grid in memory; every other
        # change writes its record at once.
        self._written: dict[str, Entry | None] = {}

    # ---- loading ---------------------------------------------------------------------------

    def load(self, key: bytes | None, value: bytes | None, offset: int | None = None) -> bool:
        """Apply one ledger record read back from the topic (the last one of a key wins); True
        when the device has an entry after it (False: a tombstone, an unreadable record).
        ``offset``: the record's, so that a waiting or watched swap's body can stay in the topic
        (with ``bodies_out``)."""
        if key is None:
            return False
        device = key.decode("utf-8", "replace")
        self._body_records.pop(device, None)
        self._written.pop(device, None)  # a record read back is what is written
        old = self._entries.pop(device, None)
        if old is not None:
            if old.state is State.WAITING:
                self._waiting -= 1
            self.watching.discard(device)
        done = _done_fields(value) if value else None
        if done is not None and self._done.put(device, done):  # most records: no object
            self._live.pop(device, None)
            return True
        entry = decode_entry(value, shared=True) if value else None  # no value: a tombstone
        if entry is None:
            self._done.discard(device)
            return False
        if self.bodies_out and offset is not None and entry.value is not None:
            entry.value, entry.headers, entry.body_at = None, (), offset
        self._put(device, entry, change=False)
        return True

    # ---- bodies kept in the ledger topic ---------------------------------------------------

    def committed(self, output: Output, offset: int) -> None:
        """A ledger record written by this ledger committed at ``offset``: when it holds the
        body of the device's entry as it stands, the body leaves memory (with ``bodies_out``)."""
        device = (output.key or b"").decode("utf-8", "replace")
        kept = self._body_records.get(device)
        if kept is None or kept[0] is not output:
            return
        del self._body_records[device]
        entry = kept[1]
        if self._entries.get(device) is entry and entry.value is not None:
            entry.value, entry.headers, entry.body_at = None, (), offset

    def restore(
        self, device: str, at: int, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> bool:
        """Put back the body read from the ledger record at ``at``; False when the device's
        entry no longer keeps its body there (it changed meanwhile)."""
        entry = self._entries.get(device)
        if entry is None or entry.body_at != at or entry.value is not None:
            return False
        entry.value, entry.headers = value, list(headers)
        return True

    def drop(self, device: str) -> None:
        """Let a body put back by :meth:`restore` leave memory again, when the entry still
        keeps it in its committed record."""
        entry = self._entries.get(device)
        if entry is not None and entry.body_at is not None and entry.value is not None:
            entry.value, entry.headers = None, ()

    def needs_body(self, device: str) -> int | None:
        """The ledger offset of the device's swap body when it is not in memory, else None."""
        entry = self._entries.get(device)
        return entry.body_at if entry is not None and entry.body_out else None

    def _changing(self, device: str) -> None:
        """``device``'s entry is about to change without a record: keep the written one."""
        if device not in self._written:
            entry = self.get(device)
            self._written[device] = None if entry is None else replace(entry)

    def _put(self, device: str, entry: Entry, *, change: bool = True) -> None:
        if change:
            self._changing(device)
        old = self._entries.get(device)
        if old is not None and old.state is State.WAITING:
            self._waiting -= 1
        if _packable(entry) and self._done.put(
            device, (entry.event_id, entry.source, entry.order, entry.node_id, entry.outcome)
        ):
            if old is not None:
                del self._entries[device]
                self.watching.discard(device)
            self._live.pop(device, None)  # nothing of a done entry is due
            return
        self._done.discard(device)
        self._entries[device] = entry
        if entry.state is State.WAITING:
            self._waiting += 1
        if entry.state is State.WATCHING:
            self.watching.add(device)
        else:
            self.watching.discard(device)
        due = entry.due_ms
        if due is not None:
            self._sequence += 1
            self._live[device] = self._sequence
            heap = self._watch_due if entry.state is State.WATCHING else self._due
            heapq.heappush(heap, (due, self._sequence, device))

    # ---- decisions -------------------------------------------------------------------------

    def has(self, device: str) -> bool:
        """True when ``device`` has an entry (without building it)."""
        return device in self._entries or device in self._done

    def hold(self, work: Work) -> bool:
        """True when ``work``'s device is not known yet (the ledger is still being read): the
        swap is held, and handed back once its device's entry is read."""
        return self.loading is not None and self.loading.hold(work)

    def get(self, device: str) -> Entry | None:
        """The device's entry (a packed one is unpacked into a new object: change it through
        the ledger's methods only)."""
        entry = self._entries.get(device)
        if entry is not None:
            return entry
        done = self._done.get(device)
        if done is None:
            return None
        event_id, source, order, node_id, outcome = done
        return Entry(event_id, source, order, node_id, State.DONE, outcome=outcome)

    def _entry(self, device: str) -> Entry:
        entry = self.get(device)
        if entry is None:
            raise KeyError(device)
        return entry

    def admit(self, work: Work) -> Admission:
        """A swap read from the input: what to do with it."""
        entry = self.get(work.device)
        if entry is not None and entry.same_event(work):
            if entry.order[1] != work.order[1]:
                return Admission(Verdict.DUPLICATE)
            if entry.state is State.PENDING:  # accepted before a crash, never decided
                return Admission(Verdict.RUN, repeat=True)
            return Admission(Verdict.SKIP)
        if entry is not None and work.order < entry.order:
            return Admission(Verdict.OLDER, newer_event_id=entry.event_id)
        replaced = (
            entry if entry is not None and entry.state in (State.WAITING, State.WATCHING) else None
        )
        self._put(
            work.device,
            Entry(
                work.swap.id, work.swap.source, work.order, work.swap.data.node_id, State.PENDING
            ),
        )
        return Admission(Verdict.RUN, replaced=replaced)

    def claim(self, work: Work) -> tuple[Claim, str | None]:
        """When a job starts: is its swap still the one to apply? (and the newer event id)."""
        entry = self.get(work.device)
        if entry is None:
            return Claim.GONE, None
        if entry.same_event(work) and entry.order == work.order:
            if work.offset is None and entry.state is not State.WAITING:
                return Claim.GONE, None  # a woken swap that was answered meanwhile
            if entry.state is State.WAITING:
                claimed = _replace_state(entry, State.PENDING)
                claimed.early = entry.early
                self._put(work.device, claimed)
            return Claim.CLAIMED, None
        if work.offset is None:
            return Claim.GONE, None  # a woken swap superseded at admission was answered then
        return Claim.SUPERSEDED, entry.event_id

    def is_latest(self, work: Work) -> bool:
        entry = self.get(work.device)
        return entry is not None and entry.same_event(work) and entry.order == work.order

    def done(self, work: Work, outcome: str) -> bool:
        """The swap's outcome is decided; False when it is no longer the device's latest (its
        outcome stands, the ledger keeps the newer swap)."""
        if not self.is_latest(work):
            return False
        entry = self._entry(work.device)
        self._put(work.device, _replace_state(entry, State.DONE, outcome=outcome))
        return True

    def watch(self, work: Work, watch: Watch) -> Entry | None:
        """The swap's key was refreshed: watch the device until it binds. Returns the entry
        (whose ``early`` push, if any, settles the watch at once); None when a newer swap
        replaced it meanwhile."""
        if not self.is_latest(work):
            return None
        entry = self._entry(work.device)
        watched = _replace_state(entry, State.WATCHING, outcome="credential_updated")
        watched.watch = watch
        watched.early = entry.early
        watched.value = work.raw_value
        watched.headers = _with_lane(work)
        self._put(work.device, watched)
        return watched

    def rewatch(self, device: str, watch: Watch, work: Work | None = None) -> None:
        """The next poll of a watched device (``work``: the poll, whose swap is the body to
        keep when the entry's body is in the ledger topic)."""
        entry = self._entry(device)
        entry_next = _replace_state(entry, State.WATCHING, outcome=entry.outcome)
        entry_next.watch = watch
        if entry.body_out and work is not None and work.raw_value is not None:
            entry_next.value, entry_next.headers = work.raw_value, _with_lane(work)
        else:
            entry_next.value, entry_next.headers = entry.value, entry.headers
            entry_next.body_at = entry.body_at
        self._put(device, entry_next)

    def end_watch(self, device: str, result: str) -> None:
        """The watch of ``device`` ended (bound, expired or unconfirmed)."""
        entry = self._entry(device)
        self._put(device, _replace_state(entry, State.DONE, outcome=result))

    def note_push(self, device: str, result: str, at_ms: int, node_id: str) -> Entry | None:
        """A bind push for ``device`` about ``node_id``: returns the entry when it watches that
        very nodeId (settle it now). A push about the nodeId of a swap that is still running is
        kept in the entry (``early``) and settles the watch when it starts. A push about any
        other nodeId (an older swap's hardware, a forgery) changes nothing: None."""
        entry = self.get(device)
        if entry is None or entry.node_id != node_id:
            return None
        if entry.state is State.WATCHING:
            return entry
        if entry.state in (State.PENDING, State.WAITING):
            self._changing(device)
            entry.early = (result, at_ms, node_id)
        return None

    def wait(self, work: Work, state: WaitState) -> bool:
        """The swap waits for its next try; False when a newer swap replaced it meanwhile."""
        if not self.is_latest(work):
            return False
        entry = self._entry(work.device)
        waiting = _replace_state(entry, State.WAITING, wait=state)
        waiting.early = entry.early
        waiting.value = work.raw_value
        waiting.headers = _with_lane(work)
        self._put(work.device, waiting)
        return True

    # ---- waiting swaps ---------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return self._waiting

    def next_due_ms(self) -> int | None:
        dues = [heap[0][0] for heap in (self._due, self._watch_due) if self._clean(heap)]
        return min(dues) if dues else None

    def pop_due(self, now_ms: int, limit: int, *, watches: bool = False) -> list[tuple[str, Entry]]:
        """Up to ``limit`` waiting swaps (or, with ``watches``, bind watches) whose time has
        come. They stay as they are in the ledger until their job decides them, so a crash in
        between loses nothing."""
        heap = self._watch_due if watches else self._due
        found: list[tuple[str, Entry]] = []
        while len(found) < limit and self._clean(heap) and heap[0][0] <= now_ms:
            _, _, device = heapq.heappop(heap)
            del self._live[device]
            found.append((device, self._entries[device]))
        return found

    def requeue(self, device: str) -> None:
        """A woken swap or a poll handed out by :meth:`pop_due` was abandoned before it was
        decided: the entry is due again as it stands (its heap item was taken)."""
        entry = self.get(device)
        if entry is not None and entry.due_ms is not None:
            self._put(device, entry, change=False)  # its heap item again, nothing else

    def _clean(self, heap: list[tuple[int, int, str]]) -> bool:
        """Drop heap items whose device no longer waits for that due time, or whose device has
        a later item; True when a live item is left on top."""
        while heap:
            due_ms, sequence, device = heap[0]
            entry = self._entries.get(device)
            if entry is not None and entry.due_ms == due_ms and self._live.get(device) == sequence:
                return True
            heapq.heappop(heap)
        return False

    def __len__(self) -> int:
        return len(self._entries) + len(self._done)

    # ---- expiry ----------------------------------------------------------------------------

    def expire(self, horizon_ms: int, scan: int, limit: int) -> list[str]:
        """Remove up to ``limit`` packed ``done`` entries whose swap's time is before
        ``horizon_ms``, among the next ``scan`` slots of the packed table (a sweep: see
        :meth:`PackedEntries.older_than`); the devices removed, each owing a tombstone
        (:meth:`tombstone`). Only packed done entries expire: pending, waiting and watched
        swaps are objects, never swept (nor the rare done entry that does not pack)."""
        if self.loading is not None:  # an entry removed now would look unread to the load
            return []
        devices = self._done.older_than(horizon_ms, scan, limit)
        for device in devices:
            self._changing(device)
            self._done.discard(device)
        return devices

    # ---- records ---------------------------------------------------------------------------

    def record(self, device: str) -> Output:
        """The ledger record of ``device`` as it stands now (to be written)."""
        entry = self._entry(device)
        self._written.pop(device, None)
        output = Output(self.topic, device.encode(), encode_entry(entry), partition=self.partition)
        if entry.value is not None and self.bodies_out:
            # The body now belongs to this record: in memory until it commits (committed()).
            entry.body_at = None
            self._body_records[device] = (output, entry)
        return output

    def tombstone(self, device: str) -> Output:
        """The record that removes ``device`` from the ledger topic (an expired entry)."""
        self._written.pop(device, None)
        return Output(self.topic, device.encode(), None, partition=self.partition)

    # ---- keeping across a revocation ---------------------------------------------------------

    @property
    def unwritten(self) -> int:
        """Devices whose entry changed since the last record written of it."""
        return len(self._written)

    def undo(self) -> int:
        """Put every entry back as its last record written holds it (the partition's last
        transaction is committed: then the ledger is exactly what its topic says); returns how
        many entries changed. A revoked partition under a backlog has swaps read and not
        decided, each of which changed its device's entry at its admission; undone, the ledger
        can be kept for the partition's return, and the swaps are read again from the committed
        offset (:meth:`service.pipeline.partition_core.PartitionCore.keep_ledger`)."""
        written, self._written = self._written, {}
        for device, entry in written.items():
            if entry is not None:
                self._put(device, entry, change=False)
                continue
            old = self._entries.pop(device, None)
            if old is not None and old.state is State.WAITING:
                self._waiting -= 1
            self.watching.discard(device)
            self._live.pop(device, None)
            self._done.discard(device)
        return len(written)


_DONE_KEYS: Final = frozenset(
    ("v", "eventId", "source", "timeMs", "offset", "nodeId", "state", "outcome")
)


def _done_fields(value: bytes) -> DoneFields | None:
    """The fields of a record of a plain done entry (one :func:`decode_entry` would make a
    packable entry of), read without building the entry; None for any other record."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or doc.get("state") != "done" or not _DONE_KEYS.issuperset(doc):
        return None
    event_id, source, node_id = doc.get("eventId"), doc.get("source"), doc.get("nodeId")
    time_ms, offset, outcome = doc.get("timeMs"), doc.get("offset"), doc.get("outcome")
    if (
        type(event_id) is str
        and type(source) is str
        and type(node_id) is str
        and type(time_ms) is int
        and type(offset) is int
        and (outcome is None or type(outcome) is str)
    ):
        return event_id, source, (time_ms, offset), node_id, outcome
    return None


def _packable(entry: Entry) -> bool:
    """A done entry with nothing but what a done record holds (what :meth:`DeviceLedger.done`
    and :meth:`DeviceLedger.end_watch` write)."""
    return (
        entry.state is State.DONE
        and entry.wait is None
        and entry.watch is None
        and entry.early is None
        and entry.value is None
        and entry.body_at is None
        and not entry.headers
        and (entry.outcome is None or isinstance(entry.outcome, str))
    )


def _replace_state(
    entry: Entry, state: State, *, outcome: str | None = None, wait: WaitState | None = None
) -> Entry:
    return Entry(
        entry.event_id,
        entry.source,
        entry.order,
        entry.node_id,
        state,
        outcome=outcome,
        wait=wait,
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def encode_entry(entry: Entry) -> bytes:
    if entry.body_out:
        raise ValueError("a swap whose body is in the ledger topic cannot be written again")
    doc: dict[str, Any] = {
        "v": RECORD_VERSION,
        "eventId": entry.event_id,
        "source": entry.source,
        "timeMs": entry.order[0],
        "offset": entry.order[1],
        "nodeId": entry.node_id,
        "state": entry.state.value,
    }
    if entry.outcome is not None:
        doc["outcome"] = entry.outcome
    if entry.early is not None:
        doc["early"] = {
            "result": entry.early[0],
            "atMs": entry.early[1],
            "nodeId": entry.early[2],
        }
    if entry.watch is not None:
        v = entry.watch
        doc["watch"] = {
            "refreshedMs": v.refreshed_ms,
            "deadlineMs": v.deadline_ms,
            "expires": v.expires,
            "expiresAtMs": v.expires_at_ms,
            "nextPollMs": v.next_poll_ms,
            "polls": v.polls,
        }
        doc["value"] = _b64(entry.value or b"")
        doc["headers"] = [[k, _b64(v)] for k, v in entry.headers]
    if entry.wait is not None:
        w = entry.wait
        doc["wait"] = {
            "dueMs": w.due_ms,
            "deadlineMs": w.deadline_ms,
            "deferrals": w.deferrals,
            "attempts": w.attempts,
            "firstAttemptMs": w.first_attempt_ms,
            "lastCode": w.last_code,
            "reason": w.reason,
            "attemptDeadlineMs": w.attempt_deadline_ms,
        }
        doc["value"] = _b64(entry.value or b"")
        doc["headers"] = [[k, _b64(v)] for k, v in entry.headers]
    return orjson.dumps(doc)


def _copy(text: str) -> str:
    return text


def decode_entry(value: bytes, *, shared: bool = False) -> Entry | None:
    """An entry from its record; None for a record this version cannot read. ``shared``: the
    texts many entries repeat (a source, a code, a reason, an outcome) as one copy each (the
    ledger's own entries)."""
    _shared = sys.intern if shared else _copy
    try:
        doc = orjson.loads(value)
        wait = None
        if "wait" in doc:
            w = doc["wait"]
            wait = WaitState(
                due_ms=int(w["dueMs"]),
                deadline_ms=int(w["deadlineMs"]),
                deferrals=int(w["deferrals"]),
                attempts=int(w["attempts"]),
                first_attempt_ms=None if w["firstAttemptMs"] is None else int(w["firstAttemptMs"]),
                last_code=_shared(str(w["lastCode"])),
                reason=_shared(str(w["reason"])),
                attempt_deadline_ms=(
                    None if w.get("attemptDeadlineMs") is None else int(w["attemptDeadlineMs"])
                ),
            )
        watch = None
        if "watch" in doc:
            v = doc["watch"]
            watch = Watch(
                refreshed_ms=int(v["refreshedMs"]),
                deadline_ms=int(v["deadlineMs"]),
                expires=bool(v["expires"]),
                expires_at_ms=None if v["expiresAtMs"] is None else int(v["expiresAtMs"]),
                next_poll_ms=None if v["nextPollMs"] is None else int(v["nextPollMs"]),
                polls=int(v["polls"]),
            )
        early = doc.get("early")
        entry = Entry(
            str(doc["eventId"]),
            _shared(str(doc["source"])),
            (int(doc["timeMs"]), int(doc["offset"])),
            str(doc["nodeId"]),
            State(doc["state"]),
            outcome=_shared(outcome) if isinstance(outcome := doc.get("outcome"), str) else outcome,
            wait=wait,
            watch=watch,
            # A push kept by a version that did not record its nodeId proves nothing.
            early=(
                (str(early["result"]), int(early["atMs"]), str(early["nodeId"]))
                if early and early.get("nodeId") is not None
                else None
            ),
        )
        if entry.state is State.WATCHING and watch is None:
            return None
        if entry.state in (State.WAITING, State.WATCHING):
            if entry.state is State.WAITING and wait is None:
                return None
            entry.value = base64.b64decode(doc["value"])
            entry.headers = [(str(k), base64.b64decode(v)) for k, v in doc["headers"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return entry


LANE_HEADER = "rebind-lane-topic"
"""On a kept swap of the urgent lane: the lane's topic (its origin offset is an offset of it)."""


def _with_lane(work: Work) -> list[tuple[str, bytes]]:
    """The swap's headers as the ledger keeps them: a swap of the urgent lane says so, so that
    read back (woken, polled, superseded) its origin names the lane's topic and its offset."""
    headers = list(work.raw_headers)
    if work.urgent and all(name != LANE_HEADER for name, _ in headers):
        headers.append((LANE_HEADER, work.topic.encode()))
    return headers


def rebuild_work(topic: str, partition: int, device: str, entry: Entry) -> Work | None:
    """The job of a swap the ledger keeps (waiting or watched), read back from its entry; None
    when the kept swap cannot be read (logged). A swap of the urgent lane comes back with the
    lane's topic (``topic`` is the input's) and marked urgent."""
    if entry.body_out:
        raise ValueError("the swap's body is in the ledger topic: read it back first")
    try:
        swap = decode_swap(entry.value, entry.headers)
    except InvalidEvent as exc:  # written by this service: not expected
        log.error(  # noqa: TRY400 - the detail says it all
            "ledger_swap_unreadable", device_id=device, detail=exc.detail
        )
        return None
    lane = next((value for name, value in entry.headers if name == LANE_HEADER), None)
    return Work(
        swap=swap,
        raw_value=entry.value,
        raw_headers=list(entry.headers),
        topic=lane.decode("utf-8", "replace") if lane else topic,
        urgent=lane is not None,
        partition=partition,
        origin_offset=entry.order[1],
        order=entry.order,
        offset=None,
        wait=entry.wait,
    )
