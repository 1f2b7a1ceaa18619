"""What waits, in one input partition, for a swap body to be read back from the ledger topic.

A waiting or watched swap's body (the swap's bytes and headers, up to the input limit) leaves
memory once the ledger record that holds it is committed (:meth:`DeviceLedger.committed`), or
when the record is loaded at a take-over: the entry keeps the record's offset (``body_at``).
Whatever needs the body then waits here until it is read back
(:class:`service.pipeline.bodies.BodyFetches`), and runs as it would have with the body in
memory, in the order it came:

* a waiting swap or a bind watch whose time came (the wake loop popped it): it counts as woken
  (the wake limits hold), and becomes its job or its poll once the body is back;
* a swap read from the input for the device (it may replace the kept swap, which is then
  answered from its body): held, as an unfinished record of the partition, with every later swap
  of the device, and admitted in the order read;
* a bind push that settles the device's watch (or is kept for its waiting swap): held, and the
  bind-notify offset committed stays before it, so a crash reads it again.

Nothing here does I/O. Every structure is bounded: held swaps by the input buffer (they are
unfinished records), held pushes by the pushes of the watched devices, woken ones by the wake
limits, and offsets wanted or asked by the devices those hold.

A record that cannot be read back (removed by compaction or retention: neither can happen while
the service is the ledger's only writer, as a newer record of the device would have changed the
entry too) is logged at ERROR (``ledger_body_lost``) and the swap goes on with a compact copy
built from its entry (its ids, source, time, device and nodeId; its outcome says
``contextTruncated``): a watched swap is still watched and ends with its event; a waiting swap,
whose call would need what is lost (its verifyCode, timeout, appId), is answered
``rebind-failed`` ``INTERNAL_ERROR`` at once, so its outcome is never lost silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

import orjson
import structlog

from service.pipeline.intake import COMPACT_HEADERS
from service.pipeline.ledger import DeviceLedger, Entry, State, rebuild_work
from service.pipeline.outbox import Outbox
from service.pipeline.records import ConsumedRecord
from service.pipeline.work import Answers, Outcome, Republish, Work
from service.platform.errors import INTERNAL_ERROR

log = structlog.get_logger(__name__)

Body = tuple[bytes, Sequence[tuple[str, bytes]]]

SWAP_TYPE: Final = "com.iot.asset.device.swapped.v1"


class BodyHolds:
    """The partition's swaps, polls and pushes waiting for a body to be read back."""

    def __init__(
        self,
        *,
        topic: str,
        partition: int,
        ledger: DeviceLedger,
        outbox: Outbox,
        answers: Answers,
        judge: Callable[[Work], Work | Republish | None],
        woken: Callable[[str, Entry], Work | None],
        due: Callable[[str, Entry, int], Work | None],
        notify: Callable[[ConsumedRecord], None],
        final: Callable[[Work, Outcome], None],
        now_ms: Callable[[], int],
    ) -> None:
        self.topic = topic
        self.partition = partition
        self._ledger = ledger
        self._outbox = outbox
        self._answers = answers
        self._judge = judge
        self._woken_job = woken
        self._due = due
        self._notify = notify
        self._final = final
        self._now_ms = now_ms
        self._wanted: dict[str, int] = {}  # device -> ledger offset of its body, not asked yet
        self._asked: dict[str, int] = {}  # asked, not come back yet
        self._works: dict[str, list[Work]] = {}  # swaps read and held, per device, in order
        self._pushes: dict[str, list[ConsumedRecord]] = {}  # pushes held, per device, in order
        self._woken: dict[str, tuple[Entry, bool]] = {}  # popped when due: (entry, a poll?)
        self.swaps_waking = 0  # woken swaps waiting for their body (count as woken)
        self.polls_waking = 0  # polls (or watch ends) waiting for their body
        self.lost = 0  # bodies that could not be read back
        self.on_want: Callable[[], None] = lambda: None  # set by the pipeline: a body is wanted

    # ---- holding ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Something waits for a body (the partition is not settled)."""
        return bool(self._wanted or self._asked or self._works or self._pushes or self._woken)

    @property
    def waking(self) -> int:
        """Woken swaps and polls popped from the due heaps, waiting for their body."""
        return self.swaps_waking + self.polls_waking

    @property
    def held(self) -> int:
        """Swaps read and held for a body."""
        return sum(len(works) for works in self._works.values())

    def hold(self, work: Work) -> bool:
        """Hold a swap read from the input while its device's kept swap has its body in the
        ledger topic, or an earlier swap of the device is held (True)."""
        device = work.device
        held = self._works.get(device)
        if held is not None:
            held.append(work)
            return True
        at = self._ledger.needs_body(device)
        if at is None:
            return False
        self._works[device] = [work]
        self._want(device, at)
        return True

    def hold_push(self, device: str, node_id: str, record: ConsumedRecord) -> bool:
        """Hold a bind push about the nodeId of the device's kept swap whose body is in the
        ledger topic (it settles the watch, or is kept with the waiting swap: both write)."""
        held = self._pushes.get(device)
        if held is not None:
            held.append(record)
            self._floor()
            return True
        entry = self._ledger.get(device)
        if entry is None or not entry.body_out or entry.node_id != node_id:
            return False
        assert entry.body_at is not None
        self._pushes[device] = [record]
        self._floor()
        self._want(device, entry.body_at)
        return True

    def wake(self, device: str, entry: Entry, *, poll: bool) -> None:
        """A waiting swap (or, ``poll``, a bind watch) popped when due, whose body is in the
        ledger topic: its job (or poll) is made once the body is back."""
        assert entry.body_at is not None
        self._woken[device] = (entry, poll)
        if poll:
            self.polls_waking += 1
        else:
            self.swaps_waking += 1
        self._want(device, entry.body_at)

    def _want(self, device: str, at: int) -> None:
        if device not in self._asked:
            self._wanted[device] = at
            self.on_want()

    def _floor(self) -> None:
        """The bind-notify offset committed stays before the first held push."""
        offsets = [r.offset for pushes in self._pushes.values() for r in pushes]
        self._outbox.notify_floor = min(offsets) if offsets else None

    # ---- reading back ----------------------------------------------------------------------

    def take(self) -> dict[str, int]:
        """The bodies to read (device -> ledger offset); they count as asked until
        :meth:`arrived` or :meth:`failed`."""
        wanted, self._wanted = self._wanted, {}
        self._asked.update(wanted)
        return wanted

    def failed(self, asked: dict[str, int]) -> None:
        """Reading ``asked`` failed: they are wanted again (the reader tries after a pause)."""
        for device in asked:
            at = self._asked.pop(device, None)
            if at is not None:
                self._wanted[device] = at

    def arrived(self, found: Mapping[str, Body], lost: set[str]) -> list[Work | Republish]:
        """The bodies read back (and those that could not be): what waited for them runs now.
        Returns the jobs and polls to start (and duplicates whose outcome to re-publish)."""
        jobs: list[Work | Republish] = []
        for device in [*found, *lost]:
            at = self._asked.pop(device, None)
            if at is None:
                continue
            if device in found:
                self._ledger.restore(device, at, *found[device])
            else:
                self._lost(device, at)
            again = self._ledger.needs_body(device)
            if again is not None:  # the entry keeps its body elsewhere now: read that
                self._want(device, again)
                continue
            jobs += self._release(device)
            self._ledger.drop(device)  # in its committed record still: out of memory again
        return jobs

    def _release(self, device: str) -> list[Work | Republish]:
        jobs: list[Work | Republish] = []
        woken = self._woken.pop(device, None)
        if woken is not None:
            entry, poll = woken
            current = self._ledger.get(device)
            job = None
            if current is entry and poll:  # unchanged since it was due
                job = self._due(device, entry, self._now_ms())
            elif current is entry:
                job = self._woken_job(device, entry)
            if poll:
                self.polls_waking -= 1
            else:
                self.swaps_waking -= 1
            if job is not None:
                jobs.append(job)
        for work in self._works.pop(device, []):  # judged again: a swap before may answer it
            judged = self._judge(work)
            if judged is not None:
                jobs.append(judged)
        pushes = self._pushes.pop(device, [])
        if pushes:
            self._floor()
        for record in pushes:
            self._notify(record)
        return jobs

    def _lost(self, device: str, at: int) -> None:
        """The record at ``at`` is gone: the swap goes on with a compact copy from its entry."""
        entry = self._ledger.get(device)
        if entry is None or entry.body_at != at:
            return
        self.lost += 1
        waiting = entry.state is State.WAITING
        log.error(
            "ledger_body_lost",
            action="answered rebind-failed INTERNAL_ERROR" if waiting else "watched on",
            device_id=device,
            event_id=entry.event_id,
            partition=self.partition,
            ledger_offset=at,
        )
        self._ledger.restore(device, at, *compact_body(device, entry))
        entry.body_at = None  # the compact copy stays in memory until a record holds it
        if not waiting:
            return
        work = rebuild_work(self.topic, self.partition, device, entry)
        if work is None:
            return
        desc = (
            f"the swap's copy kept in the ledger (offset {at}) could not be read back: it was not "
            "called again; replay it to apply it"
        )
        self._final(work, self._answers.bind_failed(work, INTERNAL_ERROR, desc))


def compact_body(device: str, entry: Entry) -> Body:
    """A swap rebuilt from what its entry knows (ids, source, time, device, nodeId), marked as a
    compact copy: its outcomes say ``contextTruncated``."""
    doc = {
        "specversion": "1.0",
        "id": entry.event_id,
        "source": entry.source,
        "type": SWAP_TYPE,
        "time": datetime.fromtimestamp(entry.order[0] / 1000, UTC).isoformat(),
        "data": {"deviceId": device, "nodeId": entry.node_id},
    }
    return orjson.dumps(doc), list(COMPACT_HEADERS)
