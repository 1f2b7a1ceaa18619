"""The bind watches of one input partition: after a refresh, the swap's device is watched until
its new hardware is seen to bind (a bindDevice push read back from the bind-notify topic, or a
poll), or the watch ends (expired, gone, not confirmed by its deadline).

Invariants:

- a watch ends at most once, with exactly one event: ``rebound`` (bound by push or poll) or
  ``bind_failed`` (BIND_EXPIRED / BIND_NOT_CONFIRMED), together with the device's ledger record,
  in the same transaction (:class:`~service.pipeline.outbox.Outbox`);
- a push settles a watch only when it names the watched swap's nodeId: a push about an older
  swap's hardware or without a nodeId changes nothing (only counted);
- a poll's result is applied only to the watch it was sent for (same swap, same refresh);
- ``polling`` counts the polls handed out and not come back or abandoned yet.

Time is read through the ``now_ms`` callable the partition gives (one clock for the partition).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import orjson
import structlog

from service.bind.schedule import PollSlots
from service.bind.watch import WatchPolicy
from service.pipeline.ledger import DeviceLedger, Entry, State, rebuild_work
from service.pipeline.outbox import Outbox
from service.pipeline.records import ConsumedRecord
from service.pipeline.work import Answers, PollResult, Work

log = structlog.get_logger(__name__)

_UNPROVEN_LOGGED_MAX = 10_000
"""Devices whose nodeId-less push was logged: a bound on memory (then the set starts again)."""

BIND_EXPIRED_CODE = "BIND_EXPIRED"
BIND_NOT_CONFIRMED_CODE = "BIND_NOT_CONFIRMED"


class BindWatches:
    """Starts nothing (the partition starts a watch with its refresh's outcome); settles watches
    from pushes and polls, and ends them."""

    def __init__(
        self,
        *,
        topic: str,
        partition: int,
        ledger: DeviceLedger,
        answers: Answers,
        outbox: Outbox,
        policy: WatchPolicy | None,
        now_ms: Callable[[], int],
        partitions: int = 1,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.ledger = ledger
        self.answers = answers
        self.outbox = outbox
        self.policy = policy
        self._now_ms = now_ms
        self.polling = 0  # polls handed out and not come back yet
        self.duplicate_pushes = 0  # pushes that matched no open watch (repeats, stale)
        self.unproven_pushes = 0  # pushes without a nodeId: they settle nothing
        self._unproven_logged: set[str] = set()  # devices logged once (bounded, then reset)
        # Holds a push that needs the body of the device's swap read back first (True): the
        # partition's BodyHolds, which hands it back to notify() once the body is read.
        self.hold_push: Callable[[str, str, ConsumedRecord], bool] = lambda _d, _n, _r: False
        # The partition's lane of the poll grid: one slot per watched device (released when its
        # watch ends; reconciled with the ledger's watches, so at most 2 x watched + 64 items).
        self.slots: PollSlots | None = (
            policy.slots(partition, partitions) if policy is not None else None
        )
        self.adopt_loaded()

    def poll_room(self, limit: int) -> int:
        """How many polls of the partition may be out at once (waiting for their budget slot
        or their answer): ``limit``, or the lane's slots in one window when more. Polls
        overdue behind a saturated budget must all be waiting when calls free up (a sliding
        window frees a whole burst at once), or the refreshes queued behind take what the
        share keeps for them. Bounded by the grid: no more polls fall due in a window."""
        slots = self.slots
        if slots is None:
            return limit
        grid = slots.grid
        return max(limit, math.ceil(grid.capacity / grid.lanes))

    def adopt_loaded(self) -> None:
        """Give the watches loaded from the ledger topic their slots: the one an earlier owner
        placed them on when it is free on this lane, else (a record from before the grid, or a
        grid changed with N, the share or the partition count) a slot by the rule, in memory
        only (the next poll writes it). Call it again for watches loaded later; it is idempotent."""
        slots, policy = self.slots, self.policy
        if slots is None or policy is None:
            return
        now = self._now_ms()
        unplaced = []
        for device in list(self.ledger.watching):  # first the slots earlier owners placed
            entry = self.ledger.get(device)
            watch = entry.watch if entry is not None else None
            if watch is None or watch.next_poll_ms is None or slots.slot_of(device) is not None:
                continue
            slots.adopt(device, watch.next_poll_ms)
            if slots.slot_of(device) is None and watch.next_poll_ms < watch.deadline_ms:
                unplaced.append((device, watch))
        unplaced.sort(key=lambda item: policy.is_old(item[1]))  # young and expiring first
        rank = 0
        for device, watch in unplaced:  # then the others, by the rule
            self.ledger.rewatch(device, policy.replace_loaded(watch, now, slots, device, rank))
            rank += policy.is_old(watch)

    def start(self, work: Work, refreshed_ms: int, timeout_seconds: int) -> Entry | None:
        """The swap's key was just refreshed: watch its device, the first poll on the
        partition's lane. None when a newer swap of the device replaced it meanwhile."""
        assert self.policy is not None
        if self.slots is not None:
            self.slots.reconcile(self.ledger.watching)
        watch = self.policy.start(refreshed_ms, timeout_seconds, self.slots, work.device)
        watched = self.ledger.watch(work, watch)
        if watched is None:
            self.release(work.device)
        return watched

    def release(self, device: str) -> None:
        """The device's watch ended or never started: its slot is free."""
        if self.slots is not None:
            self.slots.release(device)

    def due(self, device: str, entry: Entry, now_ms: int) -> Work | None:
        """A watched device needs attention: a poll job, or the end of the watch."""
        watch = entry.watch
        assert watch is not None
        policy = self.policy
        if policy is not None and policy.poll:
            work = rebuild_work(self.topic, self.partition, device, entry)
            return None if work is None else replace(work, wait=None, watch=watch)
        if now_ms >= watch.deadline_ms:
            self.end(device, entry, now_ms)
        else:  # polling was turned off since: wait for a push until the deadline
            self.ledger.rewatch(device, replace(watch, next_poll_ms=None))
            self.outbox.emit([self.ledger.record(device)], None)
        return None

    def polled(self, work: Work, result: PollResult) -> None:
        """A bind-watch poll came back."""
        self.polling -= 1
        entry = self.ledger.get(work.device)
        if (
            entry is None
            or entry.state is not State.WATCHING
            or entry.watch is None
            or entry.event_id != work.swap.id
            or entry.watch.refreshed_ms != (work.watch.refreshed_ms if work.watch else None)
        ):
            return  # settled meanwhile (a push), or replaced by a newer swap
        now = self._now_ms()
        if result.bound:
            self.bound(work.device, entry, "poll", now, work)
        elif result.gone or now >= entry.watch.deadline_ms:
            self.end(work.device, entry, now, gone=result.gone, work=work)
        else:
            assert self.policy is not None
            watch = self.policy.after_poll(entry.watch, now, self.slots, work.device)
            self.ledger.rewatch(work.device, watch, work)
            self.outbox.emit([self.ledger.record(work.device)], None)

    def notify(self, record: ConsumedRecord, *, held: bool = False) -> None:
        """A bindDevice push read back from the bind-notify topic. It settles a watch only when
        it names the watched swap's nodeId: a push about an older swap's hardware (late, or
        replayed) or without a nodeId (it proves nothing) changes nothing. ``held``: a push
        held for a swap body, handed back (the offset read is already past it)."""
        if not held:
            self.outbox.notify_offset = record.offset + 1
        try:
            doc = orjson.loads(record.value or b"")
            device, result = str(doc["deviceId"]), str(doc["resultCode"])
            node_id = doc.get("nodeId")
            at_ms = int(doc["receivedAtMs"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("bind_notification_unreadable", offset=record.offset)
            return
        if not isinstance(node_id, str) or not node_id:
            self.unproven_pushes += 1
            if device not in self._unproven_logged:
                if len(self._unproven_logged) >= _UNPROVEN_LOGGED_MAX:
                    self._unproven_logged.clear()
                self._unproven_logged.add(device)
                log.warning(
                    "bind_push_without_node_id", action="it settles nothing", device_id=device
                )
            return
        if self.hold_push(device, node_id, record):
            return
        entry = self.ledger.note_push(device, result, at_ms, node_id)
        if entry is None:
            early = self.ledger.get(device)
            if early is not None and early.early == (result, at_ms, node_id):
                log.info("bind_push_early", action="kept", device_id=device)
                # durable until the watch starts
                self.outbox.emit([self.ledger.record(device)], None)
            else:
                self.duplicate_pushes += 1  # a repeat, or about another (older) nodeId
            return
        if result == "succeeded":
            self.bound(device, entry, "push", at_ms)
        else:
            self.end(device, entry, at_ms, pushed_expired=True)

    def bound(
        self, device: str, entry: Entry, via: str, at_ms: int, poll: Work | None = None
    ) -> None:
        """The watched device bound (``via`` "push" or "poll"): its watch ends ``rebound``.
        ``poll``: the poll that saw it, which carries the swap (the entry's body may be in the
        ledger topic by now)."""
        work = self._swap(device, entry, poll)
        watch = entry.watch
        assert watch is not None
        self.release(device)
        self.ledger.end_watch(device, "bound")
        if work is None:
            return
        record = self.answers.rebound(work, via, at_ms, watch.refreshed_ms)
        self.outbox.emit([record, self.ledger.record(device)], None)
        self.outbox.bind_ended(f"bound_{via}", max(0.0, (at_ms - watch.refreshed_ms) / 1000))

    def end(
        self,
        device: str,
        entry: Entry,
        now_ms: int,
        *,
        gone: bool = False,
        pushed_expired: bool = False,
        work: Work | None = None,
    ) -> None:
        """The watch ends without a bind: BIND_EXPIRED or BIND_NOT_CONFIRMED (``work``: the
        poll that found it, as with :meth:`bound`)."""
        watch = entry.watch
        assert watch is not None
        work = self._swap(device, entry, work)
        expired = watch.expires or gone or pushed_expired
        self.release(device)
        self.ledger.end_watch(device, "expired" if expired else "unconfirmed")
        if work is None:
            return
        if pushed_expired:
            desc = "the platform reported that the verifyCode expired before the device bound"
        elif gone:
            desc = "the device no longer exists on the platform: its registration was deleted"
        elif expired:
            desc = f"the device did not bind within its timeout (expired at {watch.expires_at_ms})"
        else:
            desc = (
                f"no bind seen within the watch deadline ({(now_ms - watch.refreshed_ms) // 1000} "
                "s after the refresh)"
            )
        code = BIND_EXPIRED_CODE if expired else BIND_NOT_CONFIRMED_CODE
        outcome = self.answers.bind_failed(work, code, desc)
        self.outbox.emit([outcome.record, self.ledger.record(device)], None)
        self.outbox.bind_ended("expired" if expired else "unconfirmed", None)

    def _swap(self, device: str, entry: Entry, poll: Work | None) -> Work | None:
        """The watched swap as a job: the poll's own, else read back from its entry."""
        if poll is not None and entry.body_out:
            return replace(poll, watch=None)
        return rebuild_work(self.topic, self.partition, device, entry)
