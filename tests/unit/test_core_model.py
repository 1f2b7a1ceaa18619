"""Model-based test of one input partition's decisions: the real :class:`PartitionCore`,
:class:`DeviceLedger`, :class:`PartitionProgress`, :class:`DedupeIndex` and :class:`RebindHandler`,
driven through random interleavings against an in-memory Kafka and an in-memory platform.

"Kafka" is the input partition's records and the durable state that transactions write (outcome
topics, dead letters, ledger and dedupe records with their offsets, the committed offset and its
metadata). A member is a core built from that durable state exactly as
:meth:`service.pipeline.pipeline.Pipeline._open` builds it, plus its read position, its per-device
FIFO job queues (the :class:`KeyedScheduler`) and its pending re-publications. A job runs in three
steps (claim, the handler's platform call, decide) so that records, commits, wakes, crashes and
rebalances can fall between them, as they do while a call is in flight. Each run chooses whether
refreshed devices are watched until their new hardware binds (the runner's default: activation
polls; bind pushes are not modelled) or not.

The platform holds each device's nodeId, an online flag and whether the hardware of that nodeId
has bound: an offline device takes the new nodeId (200 with verifyCode), an online one answers
400 100611, a repeat of an applied call answers 100426 (or 200), and faults (timeouts with or
without the call applied, 50252, 1010009, refused connections) can be injected. Every swap
carries a verifyCode of its own, so the platform knows which swap each applied call came from.
Time: the handler's and the core's wall clock is the model's (``ModelClock``); ``wake`` takes
the model's time or a far-future one.

Invariants (checked after every step or transaction where they can be, and at the end after a
drain: all devices offline and bound, everything read, run, woken and committed):

1. one distinct answer per input event: all committed credential-updated / rebind-failed records
   of a (source, id) carry one CloudEvent id and one kind, there are no more of them than input
   records of that event, and, once drained, at least one; with the bind watch, an event
   answered credential-updated ends with exactly one more event (device-rebound or rebind-failed
   BIND_*), none otherwise; a malformed record has exactly one dead letter;
2. each device ends with the nodeId of its latest swap (by CloudEvent time, then the offset of
   the event's first record), and the platform never applies an older swap after a newer one
   (a claim is committed before its call, see the end of this file);
3. no offset is committed past unfinished work: every record below the committed offset, or
   listed as finished in its metadata, has its answer (or dead letter) committed, waits in the
   committed ledger, or repeats an earlier input;
4. no outcome record is written twice for an event sent once (part of 1);
5. accounting: every record read is finished, queued or being re-published, and the core's
   count of woken swaps matches the woken jobs queued or running;
6. state that expires (``REBIND_LEDGER__RETENTION_DAYS``): the ``age`` rule moves the wall
   clock past the retention while the partition is quiet. Once drained, no done entry older
   than the retention (and its margin) is left, in memory or as the device's last committed
   ledger record (a tombstone replaced it); a swap answered ``SWAP_TOO_OLD`` was never applied;
7. a take-over (``take_over``) reads the ledger from its end back while the partition works
   (``load_step``): a swap is decided (admitted, handed out as a job) before the read ends only
   when its device's newest ledger record is among those read; the others are held, and the
   end state (2 above) shows that the held ones, once admitted, kept "the latest wins".

``CORE_MODEL_PROFILE`` picks the hypothesis profile (``core-model``, the default;
``core-model-quick``; ``core-model-long``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pydantic import SecretStr

import service.handler as handler_module
import service.pipeline.partition_core as partition_module
from service.bind.watch import WatchPolicy
from service.config import PlatformSettings, Settings
from service.events import SOURCE_OFFSET_HEADER, SOURCE_TOPIC_HEADER
from service.handler import RebindHandler
from service.metrics import Metrics
from service.pipeline.dedupe import (
    ORIGIN_OFFSET_HEADER,
    OUTCOME_KEY_HEADER,
    OUTCOME_TOPIC_HEADER,
    DedupeIndex,
    id_hash,
)
from service.pipeline.expiry import Retention
from service.pipeline.ledger import DeviceLedger, Entry, State, decode_entry
from service.pipeline.outbox import Commit
from service.pipeline.partition_core import PartitionCore
from service.pipeline.progress import PartitionProgress, decode_finished
from service.pipeline.records import OutcomeKind, Output
from service.pipeline.takeover import LedgerLoad
from service.pipeline.work import HandlerResult, PollResult, Republish, Work
from service.platform import PRIORITY_FRESH, CallResult, DeviceQuery, RefreshRequest, classify
from service.platform.client import ActivationQuery
from service.platform.errors import (
    BIND_EXPIRED,
    BIND_NOT_CONFIRMED,
    CONNECTION_ERROR,
    INTERNAL_ERROR,
    SWAP_TOO_OLD,
    TIMEOUT,
)
from tests.support.events import swap_event

PARTITION: Final = 3
# One deviceId of each form the ledger packs: text, and a canonical UUID (kept in 16 bytes).
DEVICES: Final = ("dev-a", "5b0c3d2e-8f41-4a6b-9c1d-2e3f4a5b6c7d")
SOURCE: Final = "/inventory/model"
T0: Final = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
CLOCK_START_MS: Final = int(datetime(2026, 11, 25, 10, 0, tzinfo=UTC).timestamp() * 1000)
FAR_FUTURE_MS: Final = 2**62
WAKE_LIMIT: Final = 2  # the runner's bound on woken swaps being worked on at once
DEDUPE_ENTRIES: Final = 10_000  # never reached: duplicates are always within the window here
# The ledger's retention. Only the ``age`` rule moves the clock that far, so it is the only
# step after which entries expire and swaps are too old.
RETENTION: Final = Retention(86_400_000)
AGE_MS: Final = RETENTION.retention_ms + RETENTION.margin_ms + 1_000

SETTINGS: Final = Settings(
    platform=PlatformSettings(
        base_url="https://iot.example.test:8743",
        app_id="app-1",
        secret=SecretStr("model-secret"),
        max_attempts=100,  # transient faults are injected a few at a time: never exhausted
        retry_backoff_initial_seconds=0.5,
        retry_backoff_max_seconds=2.0,
        inline_backoff_max_seconds=0.0,  # every transient retry waits in the ledger
        online_retry_initial_seconds=1.0,
        online_retry_max_seconds=4.0,
        attempt_deadline_seconds=3600.0,  # the model clock advances at most a few minutes
    )
)
TOPICS: Final = SETTINGS.topics
OUTCOME_TOPICS: Final = (TOPICS.credential_updated, TOPICS.rebind_failed, TOPICS.device_rebound)
BIND_CODES: Final = frozenset((BIND_EXPIRED, BIND_NOT_CONFIRMED))
# The bind watch as the runner builds it: from the default settings (activation polls), or with
# polling off (REBIND_BIND__POLL=false with a callback URL: pushes, not modelled here, or the
# watch deadline). Swaps carry no ``timeout``, so no watch expires before its deadline.
# "poll" is the runner's: polls on the partition's lane of the poll grid (service.bind.schedule);
# "backoff" is the plain doubling backoff without the grid.
WATCHES: Final = {
    "poll": WatchPolicy.from_settings(SETTINGS.bind, SETTINGS.platform),
    "backoff": WatchPolicy.from_settings(SETTINGS.bind),
    "no_poll": replace(WatchPolicy.from_settings(SETTINGS.bind), poll=False),
}
METRICS: Final = Metrics()

Fault = Literal["timeout_lost", "timeout_applied", "refused", "50252", "1010009"]
FAULTS: Final[tuple[Fault, ...]] = (
    "timeout_lost",
    "timeout_applied",
    "refused",
    "50252",
    "1010009",
)
OWNER_CHANGES: Final = ("crash", "crash_in_commit", "rebalance", "rebalance_cancel")
MAX_INPUTS: Final = 16  # records per run: enough for every interleaving of two devices
URGENT_TOPIC: Final = TOPICS.device_swapped_urgent  # the urgent lane: partition PARTITION of it


class ModelClock:
    """Stands in for the ``time`` module inside :mod:`service.handler` and
    :mod:`service.pipeline.partition_core`: wall-clock time is the model's (due times, deadlines and
    watches are deterministic), monotonic time is real."""

    def __init__(self) -> None:
        self.now_ms = CLOCK_START_MS

    def time(self) -> float:
        return self.now_ms / 1000

    @staticmethod
    def monotonic() -> float:
        return asyncio.get_event_loop().time()


# ---- the platform --------------------------------------------------------------------------


@dataclass
class PlatformDevice:
    node_id: str
    online: bool = False
    activated: bool = True  # the hardware of the current nodeId has bound
    history: list[tuple[str, int]] = field(default_factory=list)  # (verifyCode, owner) applied


class FakePlatform:
    """The IoT platform, in memory (a :class:`service.handler.HandlerClient`)."""

    def __init__(
        self,
        orders: dict[str, tuple[int, int]],
        durable_order: Callable[[str], tuple[int, int] | None],
    ) -> None:
        self.devices = {d: PlatformDevice(f"{d}-node-orig") for d in DEVICES}
        self.orders = orders  # verifyCode -> order of its swap
        self.durable_order = durable_order  # device -> order of its committed ledger record
        self.owner = 0  # the partition's owner (generation) making the calls
        self.faults: deque[Fault] = deque()
        self.repeat_ok = False  # a repeat of an applied call answers 200 instead of 100426
        self.rollbacks: list[str] = []
        self.calls = 0

    async def refresh_device_key(  # noqa: PLR0911 - one return per kind of answer
        self, req: RefreshRequest, *, priority: int = PRIORITY_FRESH
    ) -> CallResult:
        self.calls += 1
        device = self.devices[req.device_id]
        fault = self.faults.popleft() if self.faults else None
        if fault == "timeout_lost":
            return _error(None, TIMEOUT, outcome_unknown=True)
        if fault == "refused":
            return _error(None, CONNECTION_ERROR)
        if fault == "50252":
            return _error(500, "50252")
        if fault == "1010009":
            return _error(403, "1010009")
        if device.online:
            return _error(400, "100611")
        if device.node_id == req.node_id and not self.repeat_ok:
            return _error(400, "100426")
        if device.node_id != req.node_id:
            self._apply(req, device)
        if fault == "timeout_applied":
            return _error(None, TIMEOUT, outcome_unknown=True)
        return CallResult(
            ok=True,
            http_status=200,
            error_code=None,
            error_desc=None,
            spec=None,
            verify_code=req.verify_code,
            timeout=req.timeout,
            body={"verifyCode": req.verify_code, "timeout": req.timeout},
        )

    def _apply(self, req: RefreshRequest, device: PlatformDevice) -> None:
        order = self.orders[req.verify_code]
        # Any rollback fails: a later owner may not roll back either (the claim is durable).
        for earlier, _owner in device.history:
            if self.orders[earlier] <= order:
                continue
            what = (
                f"{req.device_id}: swap {req.verify_code} {order} applied after the newer "
                f"swap {earlier} {self.orders[earlier]}"
            )
            self.rollbacks.append(what)
        device.node_id = req.node_id
        device.activated = False  # until the new hardware binds
        device.history.append((req.verify_code, self.owner))

    async def query_device(
        self, device_id: str, app_id: str | None, *, priority: int = PRIORITY_FRESH
    ) -> DeviceQuery:
        device = self.devices[device_id]
        status = "ONLINE" if device.online else "OFFLINE"
        info = {"deviceInfo": {"nodeId": device.node_id, "status": status}}
        return DeviceQuery(
            result=CallResult(True, 200, None, None, None, body=info),
            node_id=device.node_id,
            status=status,
        )

    async def query_activation(
        self, device_id: str, app_id: str | None, *, priority: int
    ) -> ActivationQuery:
        activated = self.devices[device_id].activated
        ok = CallResult(True, 200, None, None, None, body={"activated": activated})
        return ActivationQuery(result=ok, activated=activated)


def _error(status: int | None, code: str, *, outcome_unknown: bool = False) -> CallResult:
    spec = classify("refresh_device_key", status, code)
    return CallResult(
        ok=False,
        http_status=status,
        error_code=code,
        error_desc=spec.description,
        spec=spec,
        outcome_unknown=outcome_unknown,
    )


# ---- Kafka ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputRecord:
    """A record of the input partition, as aiokafka hands it over."""

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class Sent:
    """What the model knows of an input record."""

    offset: int
    event: tuple[str, str] | None = None  # (source, id); None: malformed
    device: str | None = None
    node_id: str | None = None
    verify_code: str | None = None


@dataclass(frozen=True)
class Stored:
    """A record of an output topic, committed."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass
class Job:
    """A job of the scheduler: queued, claimed (its call not made yet), or called. A bind-watch
    poll (``work.watch`` set) is not claimed: queued, then called."""

    work: Work
    phase: Literal["queued", "claimed", "called"] = "queued"
    result: HandlerResult | PollResult | None = None


@dataclass
class Member:
    core: PartitionCore
    position: int
    queues: dict[str, deque[Job]] = field(default_factory=dict)
    republishes: deque[Republish] = field(default_factory=deque)
    ledger_next: int = 0  # the ledger offset up to which it saw every record (committer)
    urgent_position: int = 0  # the next offset of the urgent lane's partition to read


Outcomes = dict[tuple[str, str], list[tuple[str, str]]]


def _event_time(seconds: int) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time_ms(seconds: int) -> int:
    return int((T0 + timedelta(seconds=seconds)).timestamp() * 1000)


class CoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._busy = False  # a step is running (teardown after a failure must not drain)
        self.loop = asyncio.new_event_loop()
        self.clock = ModelClock()
        self._real_times = [(m, vars(m)["time"]) for m in (handler_module, partition_module)]
        for module, _ in self._real_times:
            setattr(module, "time", self.clock)  # noqa: B010 - a module attribute
        self.watch: WatchPolicy | None = None  # the bind watch: chosen by ``setup``
        self.orders: dict[str, tuple[int, int]] = {}
        self.platform = FakePlatform(self.orders, self._durable_order)
        self.handler = RebindHandler(SETTINGS, self.platform, METRICS, rng=random.Random(7))
        self.inputs: list[InputRecord] = []
        self.sent: list[Sent] = []
        self.first: dict[tuple[str, str], int] = {}  # event -> offset of its first record
        self.event_seconds: dict[str, int] = {}  # device -> `time` of its last swap
        self.base_seconds = 100  # `time` of a device's first swap (from T0); moved by ``age``
        self.serial = 0
        self.topics: dict[str, list[Stored]] = {}
        self.committed_offset: tuple[int, str] | None = None
        # The urgent lane (issue 23): swaps only, co-partitioned, sharing the ledger; its own
        # offsets, committed in the same transactions.
        self.urgent_inputs: list[InputRecord] = []
        self.urgent_sent: list[Sent] = []
        self.urgent_committed: tuple[int, str] | None = None
        self.lanes = True  # the partition reads the urgent lane too (``setup`` may turn it off)
        # Waiting and watched swaps keep their body in the ledger topic once it is committed,
        # read back by ``read_bodies`` (the runner's BodyFetches); chosen by ``setup``.
        self.bodies_out = True
        self.member = self._open()

    # ---- the durable state and members ---------------------------------------------------

    def _log(self, topic: str) -> list[Stored]:
        return self.topics.setdefault(topic, [])

    def _open(
        self, kept: DeviceLedger | None = None, seen: int = 0, *, backwards: bool = False
    ) -> Member:
        """A new owner of the partition, built from what Kafka holds (runner ``_open``); with
        ``kept``, the ledger of a member the partition comes back to, read from ``seen`` on;
        with ``backwards``, a take-over whose ledger is read from its end back while the
        partition works (``OpenPartitions``, :mod:`service.pipeline.takeover`): nothing is
        read yet, ``load_step`` reads on."""
        ledger = (
            kept
            if kept is not None
            else DeviceLedger(TOPICS.ledger, PARTITION, bodies_out=self.bodies_out)
        )
        if backwards and kept is None:
            load = LedgerLoad(ledger, 0, len(self._log(TOPICS.ledger)))
            ledger.loading = None if load.done else load
        else:
            for stored in self._log(TOPICS.ledger)[seen if kept is not None else 0 :]:
                ledger.load(stored.key, stored.value, stored.offset)
        dedupe = DedupeIndex(TOPICS.dedupe, PARTITION, DEDUPE_ENTRIES)
        for stored in self._log(TOPICS.dedupe)[-DEDUPE_ENTRIES:]:
            if stored.key is not None:
                dedupe.add(id_hash(stored.key.decode("utf-8", "replace")), stored.offset)
        committed = self.committed_offset
        progress = PartitionProgress(
            committed[0] if committed is not None else None,
            committed[1] if committed is not None else None,
        )
        lane = self.urgent_committed
        urgent = PartitionProgress(lane[0], lane[1]) if lane is not None else PartitionProgress()
        core = PartitionCore(
            topic=TOPICS.device_swapped,
            partition=PARTITION,
            dead_letter_topic=TOPICS.dead_letter,
            progress=progress,
            ledger=ledger,
            dedupe=dedupe,
            answers=self.handler.outcomes,
            watch=self.watch,
            retention=RETENTION,
            urgent=(URGENT_TOPIC, urgent) if self.lanes else None,
        )
        position = committed[0] if committed is not None else 0
        return Member(
            core,
            position,
            ledger_next=len(self._log(TOPICS.ledger)),
            urgent_position=lane[0] if lane is not None else 0,
        )

    def _durable_order(self, device: str) -> tuple[int, int] | None:
        """The order of the swap named by the device's last committed ledger record."""
        for stored in reversed(self._log(TOPICS.ledger)):
            if stored.key == device.encode():
                entry = decode_entry(stored.value or b"")
                return entry.order if entry is not None else None
        return None

    def _transact(self, commit: Commit) -> list[int]:
        """One successful transaction: the outputs, then the offset and its metadata."""
        written: list[int] = []
        for output in commit.outputs:
            log = self._log(output.topic)
            log.append(Stored(len(log), output.key, output.value, list(output.headers)))
            written.append(len(log) - 1)
        if commit.offset is not None:
            self.committed_offset = (commit.offset, commit.metadata)
        if commit.urgent_offset is not None:
            self.urgent_committed = (commit.urgent_offset, commit.urgent_metadata)
        return written

    def _commit(self) -> bool:
        core = self.member.core
        commit = core.take_commit()
        if commit is None:
            return False
        written = self._transact(commit)
        for output, offset in zip(commit.outputs, written, strict=True):
            if output.topic == TOPICS.ledger:
                self.member.ledger_next = max(self.member.ledger_next, offset + 1)
        core.committed(commit, written)
        self._check_durable()
        return True

    def _fetch(self, offset: int) -> tuple[Output, int | None] | None:
        """The stored outcome of a duplicate (:meth:`DedupeReader.fetch`)."""
        log = self._log(TOPICS.dedupe)
        if offset >= len(log):
            return None
        stored = log[offset]
        headers = dict(stored.headers)
        topic = headers.get(OUTCOME_TOPIC_HEADER, b"").decode()
        if not topic or stored.value is None:
            return None
        origin = headers.get(ORIGIN_OFFSET_HEADER)
        service_headers = {OUTCOME_TOPIC_HEADER, OUTCOME_KEY_HEADER, ORIGIN_OFFSET_HEADER}
        output = Output(
            topic,
            headers.get(OUTCOME_KEY_HEADER) or None,
            stored.value,
            [(k, v) for k, v in stored.headers if k not in service_headers],
            outcome=OutcomeKind.DUPLICATE,
        )
        return output, (int(origin) if origin else None)

    # ---- producing -------------------------------------------------------------------------

    def _append(self, key: bytes | None, value: bytes, sent: Sent) -> None:
        offset = len(self.inputs)
        self.inputs.append(InputRecord(offset, key, value, CLOCK_START_MS + offset))
        self.sent.append(sent)

    def _produce_swap(self, device: str, node: int, delta: int, *, urgent: bool = False) -> None:
        """A swap; a negative ``delta`` makes it older than the device's previous swap;
        ``urgent``: on the urgent lane."""
        self.serial += 1
        # event ids of both forms the ledger packs, as for deviceIds ("evt-N" in the comments
        # below: the N-th swap produced, whichever form its id has)
        event_id = f"evt-{self.serial}" if self.serial % 2 else str(uuid.UUID(int=self.serial))
        verify = f"vc-{self.serial}"
        base = self.base_seconds
        seconds = self.event_seconds.get(device, base) + delta
        self.event_seconds[device] = max(seconds, self.event_seconds.get(device, base))
        node_id = f"{device}-node-{node}"
        value = swap_event(
            device,
            node_id,
            event_id=event_id,
            source=SOURCE,
            # An urgent swap is dated half a second later than a bulk one of the same second: two
            # swaps of a device with the very same time in both lanes are ordered by offsets of
            # unrelated logs, which is arbitrary (docs/core.md, two lanes); not what this checks.
            ce_time=_event_time(seconds)[:-1] + (".500Z" if urgent else "Z"),
            verifyCode=verify,
        )
        inputs = self.urgent_inputs if urgent else self.inputs
        offset = len(inputs)
        if not urgent:
            self.first[(SOURCE, event_id)] = offset
        self.orders[verify] = (_time_ms(seconds) + (500 if urgent else 0), offset)
        sent = Sent(offset, (SOURCE, event_id), device, node_id, verify)
        if urgent:
            self.urgent_inputs.append(
                InputRecord(offset, device.encode(), value, CLOCK_START_MS + offset)
            )
            self.urgent_sent.append(sent)
            return
        self._append(device.encode(), value, sent)

    def _produce_malformed(self, device: str, kind: int) -> None:
        if kind == 0:
            value = b"{not json"
        elif kind == 1:
            value = orjson.dumps({"data": {"deviceId": device, "nodeId": "n"}})
        else:  # a valid swap of another device under this device's key
            self.serial += 1
            value = swap_event("dev-other", "n-1", event_id=f"evt-{self.serial}")
        self._append(device.encode(), value, Sent(len(self.inputs)))

    def _produce_duplicate(self, pick: int) -> None:
        """The same event (same source and id, same bytes) sent again."""
        swaps = [s for s in self.sent if s.event is not None and self.first[s.event] == s.offset]
        if not swaps:
            return
        original = swaps[pick % len(swaps)]
        record = self.inputs[original.offset]
        assert record.value is not None
        self._append(
            record.key,
            record.value,
            Sent(
                len(self.inputs),
                original.event,
                original.device,
                original.node_id,
                original.verify_code,
            ),
        )

    # ---- the member ------------------------------------------------------------------------

    def _poll(self, count: int) -> None:
        member = self.member
        end = min(len(self.inputs), member.position + count)
        while member.position < end:
            job = member.core.intake(self.inputs[member.position])
            member.position += 1
            if isinstance(job, Work):
                self._check_known(job.device)
                member.queues.setdefault(job.device, deque()).append(Job(job))
            elif isinstance(job, Republish):
                member.republishes.append(job)

    def _check_known(self, device: str) -> None:
        """A swap decided while the ledger is still read: its device's newest ledger record
        (before the load's end) is among those read, or it has none and the read is done."""
        load = self.member.core.ledger.loading
        if load is None:
            return
        key = device.encode()
        last = max(
            (s.offset for s in self._log(TOPICS.ledger)[: load.end] if s.key == key), default=None
        )
        assert last is not None or load.done, f"{device}: decided before the load ended"
        assert last is None or last >= load.read_from, (
            f"{device}: decided with its newest record {last} unread (read from {load.read_from})"
        )

    def _load_step(self, count: int) -> None:
        """The take-over reads the ``count`` ledger records before where it stopped, newest
        first (``load_backwards``), and admits the held swaps whose device became known."""
        member = self.member
        ledger = member.core.ledger
        load = ledger.loading
        if load is None:
            return
        start = max(load.beginning, load.read_from - count)
        records = self._log(TOPICS.ledger)[start : load.read_from]
        load.apply([(s.key, s.value, s.offset) for s in records])
        load.passed(start)
        released = load.release()
        for work in released:
            self._check_known(work.device)
        if load.done:
            ledger.loading = None
        for work in released:
            job = member.core.admit(work)
            if job is not None:
                member.queues.setdefault(job.device, deque()).append(Job(job))

    def _finish_load(self) -> None:
        self._load_step(len(self._log(TOPICS.ledger)))

    def _poll_urgent(self, count: int) -> None:
        member = self.member
        end = min(len(self.urgent_inputs), member.urgent_position + count)
        while member.urgent_position < end:
            job = member.core.intake(self.urgent_inputs[member.urgent_position], True)
            member.urgent_position += 1
            if isinstance(job, Work):
                member.queues.setdefault(job.device, deque()).append(Job(job))
            elif isinstance(job, Republish):
                member.republishes.append(job)

    def _run_head(self, device: str) -> None:
        queue = self.member.queues.get(device)
        if not queue:
            return
        head = queue[0]
        while self.member.queues.get(device) and self.member.queues[device][0] is head:
            self._advance(device)

    def _advance(self, device: str) -> None:
        member = self.member
        queue = member.queues.get(device)
        if not queue:
            return
        job = queue[0]
        if job.work.watch is not None:  # a bind-watch poll
            if job.phase == "queued":
                job.result = self.loop.run_until_complete(self.handler.poll(job.work))
                job.phase = "called"
            else:
                assert isinstance(job.result, PollResult)
                member.core.polled(job.work, job.result)
                queue.popleft()
        elif job.phase == "queued":
            if member.core.claim(job.work):
                job.phase = "claimed"
            else:
                queue.popleft()
        elif job.phase == "claimed":
            # As the runner does: the claim's ledger record commits before the call, when the
            # device had a swap open (PartitionCore.note_claim).
            if job.work.offset is not None and member.core.note_claim(job.work):
                self._commit()
            job.result = self.loop.run_until_complete(self.handler.handle(job.work))
            job.phase = "called"
        else:
            assert job.result is not None
            assert not isinstance(job.result, PollResult)
            member.core.decide(job.work, job.result)
            queue.popleft()
        if not queue:
            del member.queues[device]

    def _republish(self) -> None:
        if self.member.republishes:
            job = self.member.republishes.popleft()
            self.member.core.republished(job, self._fetch(job.dedupe_offset))

    def _wake(self, now_ms: int) -> int:
        woken = self.member.core.wake(now_ms, WAKE_LIMIT)
        for work in woken:
            self.member.queues.setdefault(work.device, deque()).append(Job(work))
        return len(woken)

    def _read_bodies(self, *, fail: bool = False) -> int:
        """The bodies the partition wants are read back from the ledger log at their offsets
        (``BodyFetches``), or the read fails (``fail``: asked again later); what waited for
        them (woken swaps, polls, held swaps) is queued."""
        bodies = self.member.core.bodies
        wanted = bodies.take()
        if fail:
            bodies.failed(wanted)
            return 0
        log = self._log(TOPICS.ledger)
        found = {}
        for device, at in wanted.items():
            entry = decode_entry(log[at].value or b"")
            assert log[at].key == device.encode(), (device, at)
            assert entry is not None, (device, at)
            assert entry.value is not None, (device, at)
            found[device] = (entry.value, entry.headers)
        for job in bodies.arrived(found, set()):
            if isinstance(job, Republish):
                self.member.republishes.append(job)
                continue
            if job.offset is not None:
                self._check_known(job.device)
            self.member.queues.setdefault(job.device, deque()).append(Job(job))
        return len(wanted)

    # ---- transactions, crashes, rebalances -------------------------------------------------

    def _new_owner(self, kind: str, *, backwards: bool = False) -> None:
        self._revoke(kind)
        self.member = self._open(backwards=backwards)
        self.platform.owner += 1

    def _revoke(self, kind: str) -> None:
        """The member loses the partition (``kind``: see :meth:`new_owner`)."""
        member = self.member
        if kind == "crash_in_commit":
            member.core.take_commit()
        elif kind.startswith("rebalance"):
            member.core.closing = True
            for device, queue in list(member.queues.items()):
                if queue[0].phase == "queued":
                    continue
                if kind == "rebalance":
                    self._run_head(device)
                else:
                    member.core.abandoned(queue.popleft().work)
                    if not queue:
                        del member.queues[device]
            self._commit()
        member.core.closed = True

    def _work_all(self) -> None:
        """The member reads everything, runs every job to its end, wakes what is due, commits."""
        self._finish_load()
        for _ in range(MAX_INPUTS):
            self._poll(len(self.inputs))
            self._poll_urgent(len(self.urgent_inputs))
            while self._read_bodies():
                pass
            while self.member.republishes:
                self._republish()
            for device in sorted(self.member.queues):
                self._run_head(device)
            self._wake(self.clock.now_ms)
            self._read_bodies()
            if (
                not self.member.queues
                and not self.member.core.bodies.busy
                and self.member.position == len(self.inputs)
                and self.member.urgent_position == len(self.urgent_inputs)
            ):
                break
        self._commit()

    def _check_kept(self, kept: DeviceLedger) -> None:
        """A kept ledger and its tail hold what a ledger read from the beginning holds."""
        loaded = self._open().core.ledger
        assert len(kept) == len(loaded)
        assert kept.waiting == loaded.waiting
        assert kept.watching == loaded.watching
        assert kept.next_due_ms() == loaded.next_due_ms()
        for device in DEVICES:  # where a body is (memory or topic) may differ, not what it is
            assert _bodiless(kept.get(device)) == _bodiless(loaded.get(device)), device

    # ---- rules -----------------------------------------------------------------------------

    @initialize(
        online=st.sets(st.sampled_from(DEVICES)),
        watch=st.sampled_from(("poll", "backoff", "no_poll", "off")),
        lanes=st.booleans(),
        bodies_out=st.sampled_from((True, True, False)),
    )
    def setup(
        self, online: set[str], watch: str, lanes: bool = True, bodies_out: bool = False
    ) -> None:
        """Which devices are online at the start; whether refreshed devices are watched until
        their new hardware binds, with activation polls (the runner's default) or without
        (the watch ends at its deadline), or not watched at all (the bind watch disabled);
        whether the partition reads the urgent lane beside the input (``lanes``); whether kept
        swaps' bodies leave memory once committed (the runner's way) or stay."""
        with self._step():
            for device in online:
                self.platform.devices[device].online = True
            self.watch = WATCHES.get(watch)
            self.lanes = lanes
            self.bodies_out = bodies_out
            self.member = self._open()

    @precondition(lambda self: len(self.inputs) < MAX_INPUTS)
    @rule(
        kind=st.sampled_from(("swap", "swap", "swap", "duplicate", "malformed")),
        device=st.sampled_from(DEVICES),
        node=st.integers(0, 2),
        delta=st.integers(-2, 2),
        pick=st.integers(0, MAX_INPUTS),
    )
    def produce(self, kind: str, device: str, node: int, delta: int, pick: int) -> None:
        """An input record: a ``swap`` of ``device`` to nodeId ``node``, its ``time`` the
        device's latest so far + ``delta`` seconds (negative: an out-of-order arrival); an exact
        ``duplicate`` of the ``pick``-th swap (same source, id and bytes); or a ``malformed``
        record (``pick`` % 3: not JSON, not a CloudEvent, a key that is not the deviceId)."""
        with self._step():
            if kind == "swap":
                self._produce_swap(device, node, delta)
            elif kind == "duplicate":
                self._produce_duplicate(pick)
            else:
                self._produce_malformed(device, pick % 3)

    @rule(
        change=st.sampled_from(
            ("online", "offline", "online", "offline", "bind", "fault", "repeat", "clock")
        ),
        device=st.sampled_from(DEVICES),
        pick=st.integers(0, len(FAULTS) - 1),
    )
    def platform_change(self, change: str, device: str, pick: int) -> None:
        """``device`` goes ``online`` / ``offline``; its new hardware ``bind``s (activated);
        the next refresh call meets the fault ``FAULTS[pick]``; a repeat of an applied call
        answers 100426 (``pick`` even) or 200; the wall clock moves on by 1 s (``pick`` even)
        or 15 s (a bind watch first polls 15 s after the refresh)."""
        with self._step():
            if change in ("online", "offline"):
                self.platform.devices[device].online = change == "online"
            elif change == "bind":
                self.platform.devices[device].activated = True
            elif change == "fault":
                self.platform.faults.append(FAULTS[pick])
            elif change == "repeat":
                self.platform.repeat_ok = pick % 2 == 1
            else:
                self.clock.now_ms += 1000 if pick % 2 == 0 else 15_000

    @precondition(
        lambda self: (
            self.member.position == len(self.inputs)
            and self.member.urgent_position == len(self.urgent_inputs)
            and not self.member.queues
            and not self.member.republishes
            and self.member.core.ledger.waiting == 0
            and not self.member.core.ledger.watching
            and self.member.core.ledger.loading is None  # else waiting swaps may be unread
        )
    )
    @rule(forget=st.booleans())
    def age(self, forget: bool) -> None:
        """The wall clock moves past the ledger's retention (and its margin) while the partition
        is quiet (everything read and decided: a waiting swap or a watch would only meet its
        deadline, which is not what this rule is about). Done entries become due to expire
        (the sweep runs in ``wake`` and ``sweep``). ``forget``: swaps produced from now on are
        dated now (fresh swaps of devices whose entry expires); otherwise they keep the dates
        of the device's earlier swaps, so they are older than the retention: SWAP_TOO_OLD."""
        with self._step():
            # Committed first: a swap whose call was made but whose answer was lost in a crash
            # and only re-read after the retention is answered SWAP_TOO_OLD although its call
            # may have been applied (docs/core.md, limits); that is not what this rule tests.
            self._commit()
            self.clock.now_ms += AGE_MS
            if forget:
                self.base_seconds = (self.clock.now_ms - _time_ms(0)) // 1000
                self.event_seconds.clear()

    @rule()
    def sweep(self) -> None:
        """The wake loop at the model's time with nothing due: the retention sweep's step."""
        with self._step():
            self._wake(self.clock.now_ms)

    @precondition(
        lambda self: self.lanes and len(self.inputs) + len(self.urgent_inputs) < MAX_INPUTS
    )
    @rule(
        device=st.sampled_from(DEVICES),
        node=st.integers(0, 2),
        delta=st.integers(-2, 2),
    )
    def produce_urgent(self, device: str, node: int, delta: int) -> None:
        """A swap on the urgent lane (issue 23): the same contract, the same ledger; its ``time``
        decides against the device's swaps of both lanes (``delta`` as in ``produce``)."""
        with self._step():
            self._produce_swap(device, node, delta, urgent=True)

    @precondition(lambda self: self.member.urgent_position < len(self.urgent_inputs))
    @rule(count=st.sampled_from((1, 2)))
    def poll_urgent(self, count: int) -> None:
        """Intake of the urgent lane's next ``count`` records (never held back by the bulk)."""
        with self._step():
            self._poll_urgent(count)

    @precondition(lambda self: self.member.position < len(self.inputs))
    @rule(count=st.sampled_from((1, 1, 2, 3)))
    def poll(self, count: int) -> None:
        """Intake of the next ``count`` records: jobs, re-publications, or nothing."""
        with self._step():
            self._poll(count)

    @precondition(lambda self: bool(self.member.queues))
    @rule(pick=st.integers(0, len(DEVICES) - 1), to_end=st.booleans())
    def job(self, pick: int, to_end: bool) -> None:
        """The head job of the ``pick``-th device with work: its next step (claim, the
        handler's platform call, decide), or all of them."""
        with self._step():
            busy = sorted(self.member.queues)
            device = busy[pick % len(busy)]
            if to_end:
                self._run_head(device)
            else:
                self._advance(device)

    @precondition(lambda self: bool(self.member.queues))
    @rule(
        pick=st.integers(0, len(DEVICES) - 1),
        count=st.integers(1, 3),
        newer=st.booleans(),
        delta=st.integers(-1, 2),
    )
    def job_overtaken(self, pick: int, count: int, newer: bool, delta: int) -> None:
        """The head job of the ``pick``-th device with work runs to its end while records
        arrive during its platform call: (``newer``) a swap of the same device, its ``time``
        the device's latest + ``delta``, is produced; then the next ``count`` records are read
        before the job's decision."""
        with self._step():
            busy = sorted(self.member.queues)
            device = busy[pick % len(busy)]
            head = self.member.queues[device][0]
            while self.member.queues.get(device) and self.member.queues[device][0] is head:
                if head.phase == "called":
                    if newer and len(self.inputs) < MAX_INPUTS:
                        self._produce_swap(device, len(self.inputs) % 3, delta)
                    self._poll(count)
                self._advance(device)

    @precondition(
        lambda self: self.member.core.ledger.waiting > 0 or bool(self.member.core.ledger.watching)
    )
    @rule(far=st.booleans())
    def wake(self, far: bool) -> None:
        """The wake loop, at the model's time or (``far``) far in the future: waiting swaps
        whose time has come, and bind-watch polls."""
        with self._step():
            self._wake(FAR_FUTURE_MS if far else self.clock.now_ms)

    @precondition(lambda self: any(q[0].work.offset is None for q in self.member.queues.values()))
    @rule(pick=st.integers(0, len(DEVICES) - 1))
    def job_abandoned(self, pick: int) -> None:
        """The head job of a woken swap or a bind-watch poll is abandoned before its answer is
        decided (queued, waiting for the budget, or its call on the wire: the input held, the
        call cancelled) while the partition stays with this member: the member must not forget
        it (it is due again), and nothing is written for it."""
        with self._step():
            heads = sorted(d for d, q in self.member.queues.items() if q[0].work.offset is None)
            device = heads[pick % len(heads)]
            queue = self.member.queues[device]
            self.member.core.abandoned(queue.popleft().work)
            if not queue:
                del self.member.queues[device]

    @precondition(lambda self: self.member.core.bodies.busy)
    @rule(fail=st.sampled_from((False, False, True)))
    def read_bodies(self, fail: bool) -> None:
        """The bodies wanted (woken swaps, polls, swaps held for a kept swap's body) are read
        back from the ledger topic, or the read fails and they are asked again later."""
        with self._step():
            self._read_bodies(fail=fail)

    @precondition(lambda self: bool(self.member.republishes))
    @rule()
    def republish(self) -> None:
        """A duplicate's stored outcome is read back from the dedupe topic and re-published."""
        with self._step():
            self._republish()

    @precondition(
        lambda self: (
            self.member.core.outbox.pending_outputs > 0
            or len(self.member.core.progress) > self.member.core.progress.unfinished
        )
    )
    @rule(abort=st.sampled_from((False, False, True)))
    def commit(self, abort: bool) -> None:
        """A transaction; ``abort``: it fails, and its outputs go into the next one."""
        with self._step():
            if not abort:
                self._commit()
                return
            commit = self.member.core.take_commit()
            if commit is not None:
                self.member.core.restore(commit)

    @precondition(lambda self: bool(self.inputs))
    @rule(kind=st.sampled_from(OWNER_CHANGES))
    def new_owner(self, kind: str) -> None:
        """The partition gets a new owner, built from what Kafka holds; calls made stay made.
        ``crash``: nothing uncommitted survives; ``crash_in_commit``: the member dies between
        ``take_commit`` and the transaction; ``rebalance``: queued jobs never start, in-flight
        ones finish, the member commits; ``rebalance_cancel``: in-flight jobs are cancelled
        (the drain timed out), the member commits."""
        with self._step():
            self._new_owner(kind)

    @precondition(lambda self: bool(self.inputs))
    @rule(kind=st.sampled_from(OWNER_CHANGES))
    def take_over(self, kind: str) -> None:
        """A new owner (as ``new_owner``) that reads the ledger from its end back while the
        partition works: swaps of devices not read yet are held (``load_step``)."""
        with self._step():
            self._new_owner(kind, backwards=True)

    @precondition(lambda self: self.member.core.ledger.loading is not None)
    @rule(count=st.sampled_from((1, 2, 3, 5)))
    def load_step(self, count: int) -> None:
        with self._step():
            self._load_step(count)

    @precondition(lambda self: bool(self.inputs))
    @rule(kind=st.sampled_from(("rebalance", "rebalance_cancel")), other=st.booleans())
    def reassigned(self, kind: str, other: bool) -> None:
        """A rebalance revokes the partition (as ``new_owner``'s rebalances) and assigns it to
        this member again. When its ledger can be put back to its committed state
        (``PartitionCore.keep_ledger``: swaps read and not decided, queued, are undone) the
        member keeps it and reads only the ledger records after the last one it saw
        (``OpenPartitions.park`` / ``open``): none, unless (``other``) another member owned
        the partition in between and worked (read everything, ran every job, woke what was due,
        committed) before it came back. Otherwise it reloads, as a new owner. Either way the
        swaps it had read and not finished are read again from the committed offset."""
        with self._step():
            member = self.member
            self._revoke(kind)
            settled = member.core.keep_ledger()
            if other:
                self.member = self._open()
                self.platform.owner += 1
                self._work_all()
                self._revoke("rebalance")
            if settled:
                tail = len(self._log(TOPICS.ledger)) - member.ledger_next
                assert other or tail == 0, f"{tail} ledger records re-read"
                self.member = self._open(member.core.ledger, member.ledger_next)
                self._check_kept(self.member.core.ledger)
            else:
                self.member = self._open()
            self.platform.owner += 1

    # Hypothesis picks uniformly among the enabled rules: a rule bound to more names runs more
    # often (the steps print under the rule's own name).
    produce_2 = produce
    poll_2 = poll
    job_2 = job
    job_3 = job
    job_overtaken_2 = job_overtaken
    commit_2 = commit

    # ---- invariants ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        """Marks a step as running; left marked when it fails, so teardown does not drain."""
        was = self._busy
        self._busy = True
        yield
        self._busy = was

    @invariant()
    def accounting(self) -> None:
        """Every record read is finished, queued, or being re-published; woken swaps are
        counted exactly while their job is queued or running."""
        with self._step():
            member = self.member
            queued = [job.work for queue in member.queues.values() for job in queue]
            fresh = sum(1 for work in queued if work.offset is not None)
            load = member.core.ledger.loading
            held = (load.held if load is not None else 0) + member.core.bodies.held
            assert member.core.outbox.unfinished == fresh + len(member.republishes) + held
            waking = member.core.bodies.swaps_waking  # woken, their body not read back yet
            assert member.core.woken - waking == len(queued) - fresh
            ledger = member.core.ledger  # what a revocation would undo: bounded by the work
            open_work = member.core.outbox.unfinished + member.core.woken
            assert ledger.unwritten <= open_work + ledger.waiting + len(ledger.watching)
            assert not self.platform.rollbacks, self.platform.rollbacks

    def _outcomes(self) -> tuple[Outcomes, Outcomes]:
        """For each input event (source, id), the (topic, CloudEvent id) of each committed
        record that answers it (credential-updated, rebind-failed), and of each committed bind
        result (device-rebound, rebind-failed BIND_EXPIRED / BIND_NOT_CONFIRMED)."""
        answers: Outcomes = {}
        binds: Outcomes = {}
        for topic in OUTCOME_TOPICS:
            for stored in self._log(topic):
                event = self._origin(stored).event
                assert event is not None, (
                    f"an outcome answers the malformed record {dict(stored.headers)}"
                )
                assert stored.value is not None
                body = orjson.loads(stored.value)
                code = body["data"].get("errorCode")
                assert code != INTERNAL_ERROR, body
                bind = topic == TOPICS.device_rebound or code in BIND_CODES
                (binds if bind else answers).setdefault(event, []).append((topic, body["id"]))
        return answers, binds

    def _origin(self, stored: Stored) -> Sent:
        """The input record an outcome answers: its lane by the source topic header."""
        headers = dict(stored.headers)
        offset = int(headers[SOURCE_OFFSET_HEADER])
        lane = self.urgent_sent if headers[SOURCE_TOPIC_HEADER].decode() == URGENT_TOPIC else None
        return (lane if lane is not None else self.sent)[offset]

    def _dead_letters(self) -> Counter[int]:
        return Counter(
            int(dict(stored.headers)["rebind-source-offset"])
            for stored in self._log(TOPICS.dead_letter)
        )

    def _waiting_events(self) -> set[tuple[str, str]]:
        """Events waiting in the committed ledger (each device's last record)."""
        last: dict[bytes | None, Stored] = {}
        for stored in self._log(TOPICS.ledger):
            last[stored.key] = stored
        waiting: set[tuple[str, str]] = set()
        for stored in last.values():
            entry = decode_entry(stored.value or b"")
            if entry is not None and entry.state is State.WAITING:
                waiting.add((entry.source, entry.event_id))
        return waiting

    def _check_durable(self) -> None:
        """Invariants 1, 3 and 4 on what is committed."""
        outcomes, binds = self._outcomes()
        inputs = Counter(s.event for s in [*self.sent, *self.urgent_sent] if s.event is not None)
        for event, records in outcomes.items():
            assert len(set(records)) == 1, f"{event}: distinct outcomes {records}"
            assert len(records) <= inputs[event], (
                f"{event}: {len(records)} outcome records for {inputs[event]} input records"
            )
        for event, records in binds.items():
            # A bind result follows a committed credential-updated, once (never re-published).
            assert self.watch is not None, f"{event}: bind result without a watch {records}"
            assert len(records) == 1, f"{event}: bind results {records}"
            assert [t for t, _ in outcomes.get(event, [])][:1] == [TOPICS.credential_updated], (
                f"{event}: bind result {records} without credential-updated"
            )
        dead = self._dead_letters()
        for offset, count in dead.items():
            assert self.sent[offset].event is None, f"valid record {offset} dead-lettered"
            assert count == 1, f"record {offset} dead-lettered {count} times"
        waiting = self._waiting_events()
        if self.urgent_committed is not None:
            base, metadata = self.urgent_committed
            for offset in sorted(set(range(base)) | decode_finished(base, metadata)):
                sent = self.urgent_sent[offset]
                assert sent.event in outcomes or sent.event in waiting, (
                    f"urgent offset {offset} ({sent.event}) committed unanswered"
                )
        if self.committed_offset is None:
            return
        base, metadata = self.committed_offset
        for offset in sorted(set(range(base)) | decode_finished(base, metadata)):
            sent = self.sent[offset]
            if sent.event is None:
                assert dead[offset] == 1, f"offset {offset} committed without its dead letter"
                continue
            assert (
                sent.event in outcomes or sent.event in waiting or self.first[sent.event] < offset
            ), f"offset {offset} ({sent.event}) committed ({base}, {metadata!r}) unanswered"

    # ---- the end ---------------------------------------------------------------------------

    def drain(self) -> None:
        """All devices offline, no faults, all new hardware binding: read, run, wake (far in
        the future) and commit until nothing is left."""
        self.platform.faults.clear()
        for _ in range(100):
            for platform_device in self.platform.devices.values():
                platform_device.online = False
                platform_device.activated = True
            self._finish_load()
            self._poll(len(self.inputs))
            self._poll_urgent(len(self.urgent_inputs))
            while self.member.republishes:
                self._republish()
            read = self._read_bodies()
            for device in list(self.member.queues):
                while self.member.queues.get(device):
                    self._run_head(device)
            woken = self._wake(FAR_FUTURE_MS)
            committed = self._commit()
            read += self._read_bodies()
            if not (read or woken or committed or self.member.queues or self.member.republishes):
                break
        else:
            raise AssertionError("the partition never went quiet")
        self.accounting()
        self.check_final()

    def check_final(self) -> None:
        core = self.member.core
        assert core.outbox.unfinished == 0
        assert core.ledger.waiting == 0
        assert not core.ledger.watching
        assert self.committed_offset is not None or not self.inputs
        if self.committed_offset is not None:
            assert self.committed_offset[0] == len(self.inputs), self.committed_offset
        if self.urgent_inputs:
            assert self.urgent_committed is not None
            assert self.urgent_committed[0] == len(self.urgent_inputs), self.urgent_committed
        outcomes, binds = self._outcomes()
        dead = self._dead_letters()
        latest: dict[str, tuple[tuple[int, int], str]] = {}
        too_old = self._too_old()
        applied = {verify for d in self.platform.devices.values() for verify, _ in d.history}
        for sent in [*self.sent, *self.urgent_sent]:
            if sent.event is None:
                assert dead[sent.offset] == 1, f"record {sent.offset}: no dead letter"
                continue
            assert sent.event in outcomes, f"{sent.event} has no outcome"
            if sent.event in too_old:
                # Expiry relaxes invariant 2 here, and only here: a swap older than the
                # retention is answered without a call (nothing proves it is the latest), so
                # it is never applied, and the device keeps the latest swap it could prove.
                assert sent.verify_code not in applied, f"{sent.event}: too old, yet applied"
                continue
            if self.watch is not None and outcomes[sent.event][0][0] == TOPICS.credential_updated:
                assert sent.event in binds, f"{sent.event}: refreshed, its watch never ended"
            assert sent.device is not None
            assert sent.node_id is not None
            assert sent.verify_code is not None
            order = self.orders[sent.verify_code]
            if sent.device not in latest or latest[sent.device][0] < order:
                latest[sent.device] = (order, sent.node_id)
        for device, (_, node_id) in latest.items():
            assert self.platform.devices[device].node_id == node_id, (
                f"{device} holds {self.platform.devices[device].node_id}, latest swap {node_id}"
            )
        self._check_expired()

    def _too_old(self) -> set[tuple[str, str]]:
        """Events answered rebind-failed SWAP_TOO_OLD."""
        found: set[tuple[str, str]] = set()
        for stored in self._log(TOPICS.rebind_failed):
            assert stored.value is not None
            if orjson.loads(stored.value)["data"]["errorCode"] == SWAP_TOO_OLD:
                event = self._origin(stored).event
                assert event is not None
                found.add(event)
        return found

    def _check_expired(self) -> None:
        """Invariant 6: no done entry past the retention is left, in memory or committed."""
        horizon = RETENTION.horizon_ms(self.clock.now_ms) - RETENTION.margin_ms
        ledger = self.member.core.ledger
        last: dict[bytes, Stored] = {}
        for stored in self._log(TOPICS.ledger):
            assert stored.key is not None
            last[stored.key] = stored
        for device in DEVICES:
            entry = ledger.get(device)
            assert entry is None or entry.state is not State.DONE or entry.order[0] >= horizon, (
                f"{device}: done entry {entry} past the retention kept in memory"
            )
            record = last.get(device.encode())
            durable = decode_entry(record.value) if record and record.value else None
            assert (
                durable is None or durable.state is not State.DONE or (durable.order[0] >= horizon)
            ), f"{device}: done entry {durable} past the retention still committed"

    def teardown(self) -> None:
        try:
            if not self._busy:
                self.drain()
        finally:
            self.release()

    def release(self) -> None:
        """The modules' real clocks back, the loop closed (idempotent): also for a test that
        stops before ``teardown``, so the model's clock never leaks into the next test."""
        for module, real in self._real_times:
            setattr(module, "time", real)  # noqa: B010
        if not self.loop.is_closed():
            self.loop.close()


# The CI profile: about 15 s here when nothing fails (a failure is shrunk, which takes longer).
# CORE_MODEL_PROFILE=core-model-quick: a smaller, derandomized run; core-model-long: a hunt.
settings.register_profile(
    "core-model",
    max_examples=1000,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "core-model-quick",
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "core-model-long",
    max_examples=5000,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TestCoreModel = CoreModel.TestCase


@pytest.fixture
def model() -> Iterator[Callable[[], CoreModel]]:
    """A maker of models for the minimal examples below, each released after the test, whether
    or not it reached ``teardown``."""
    made: list[CoreModel] = []

    def make() -> CoreModel:
        made.append(CoreModel())
        return made[-1]

    yield make
    for state in made:
        state.release()


TestCoreModel.settings = settings.get_profile(os.environ.get("CORE_MODEL_PROFILE", "core-model"))


def _bodiless(entry: Entry | None) -> Entry | None:
    """The entry without where its body is kept (in memory, or at an offset of the topic)."""
    return None if entry is None else replace(entry, value=None, headers=(), body_at=None)


# ---- examples the model found, kept as regular tests ------------------------------------------


def test_a_duplicate_of_an_undecided_swap_is_not_a_newer_swap(
    model: Callable[[], CoreModel],
) -> None:
    """Minimal example found by the model. evt-1 and evt-2 of one device have the same
    ``time``; evt-1 is sent again (offset 2) before either is decided. The duplicate was not in
    the duplicate memory (no outcome yet) nor the ledger's latest entry (evt-2), so the ledger
    ordered it by its own offset: newer than evt-2. evt-2 was answered SUPERSEDED by a copy of
    an older event, evt-1 both SUPERSEDED (by itself) and credential-updated, and the platform
    ended with evt-1's nodeId."""
    state = model()
    state.produce(kind="swap", device="dev-a", node=0, delta=0, pick=0)
    state.produce(kind="swap", device="dev-a", node=1, delta=0, pick=0)
    state.produce(kind="duplicate", device="dev-a", node=0, delta=0, pick=0)
    state.teardown()  # reads all three, runs every job, commits, checks the invariants


def test_a_duplicate_read_while_its_swap_is_in_flight_gets_no_answer_of_its_own(
    model: Callable[[], CoreModel],
) -> None:
    """The same defect with a newer swap in between: the duplicate was judged OLDER and
    answered SUPERSEDED while the original's call succeeded (two outcomes of one event)."""
    state = model()
    state.produce(kind="swap", device="dev-a", node=0, delta=0, pick=0)
    state.poll(count=1)
    state.job(pick=0, to_end=False)  # claimed: its call is about to be made
    state.produce(kind="swap", device="dev-a", node=1, delta=1, pick=0)
    state.produce(kind="duplicate", device="dev-a", node=0, delta=0, pick=0)
    state.poll(count=2)
    state.job(pick=0, to_end=True)  # evt-1 is applied: credential-updated
    state.commit(abort=False)
    state.teardown()


def test_a_woken_swap_answered_after_a_newer_one_arrived_does_not_wait_again(
    model: Callable[[], CoreModel],
) -> None:
    """Minimal example found by the model. A waiting swap is woken and claimed; a newer swap of
    the device is read during its call; the call meets 100611 again, so the woken swap is
    answered SUPERSEDED. No ledger record was written for that answer, so the ledger topic
    still said "evt-1 waiting": the next owner answered evt-1 a second time (and could have
    woken it and called the platform for it again)."""
    state = model()
    state.setup(online={"dev-a"}, watch="off")
    state.produce(kind="swap", device="dev-a", node=0, delta=0, pick=0)
    state.poll(count=1)
    state.job(pick=0, to_end=True)  # 100611: waits in the ledger
    state.wake(far=True)
    state.job(pick=0, to_end=False)  # the woken swap is claimed
    state.produce(kind="swap", device="dev-a", node=1, delta=1, pick=0)
    state.poll(count=1)
    state.job(pick=0, to_end=True)  # 100611 again, but a newer swap exists: SUPERSEDED
    state.commit(abort=False)
    state.new_owner(kind="crash")
    state.poll(count=1)  # evt-2 again: the ledger must not hold evt-1 as waiting any more
    state.commit(abort=False)
    state.teardown()


def test_a_watch_ends_once_when_a_replaced_watch_had_the_same_deadline(
    model: Callable[[], CoreModel],
) -> None:
    """Minimal example found by the model (bind watch without polls). evt-1 is refreshed and
    watched; evt-2 and evt-3 replace it and evt-3 is refreshed at the same (model) time, so its
    watch has evt-1's deadline. The ledger handed dev-a out twice at that deadline (the replaced
    watch's heap item looked live), and evt-3 ended BIND_NOT_CONFIRMED twice."""
    state = model()
    state.setup(online=set(), watch="no_poll")
    for _ in range(3):
        state.produce(kind="swap", device="dev-a", node=0, delta=0, pick=0)
    state.poll(count=1)
    state.job(pick=0, to_end=True)
    state.commit(abort=False)
    state.teardown()  # evt-2 and evt-3 read, evt-3 refreshed; the watch deadline passes


# ---- the crash window this model found, closed -----------------------------------------------
#
# (Before the fix) a platform call was made before the swap's claim was durable: the ledger
# topic learned of a swap only with its outcome (or when it supersedes a waiting swap). When an
# owner applies a newer
# swap and dies (or is fenced) before its transaction, the next owner does not know the newer
# swap was applied, and can apply an older swap of the device before it reads the newer one
# again (an older swap read in an earlier fetch, or a waiting one woken before the first fetch):
# the device holds the older nodeId until the newer swap is re-read and re-applied. The model
# tolerates exactly this (an older swap applied by a later owner while the committed ledger does
# not name the newer one) and reported every other rollback.
#
# The fix needs the runner: claim() would add the device's ledger record naming the claimed swap
# (pending) to the next transaction, and the job would make its call only once a transaction
# carrying it has committed (at most one commit interval more per swap; calls are budget-bound
# anyway). A new owner then loads the newer swap: older ones read later are OLDER, the waiting
# one it replaced is gone. With it, the model's job step commits between claim and call, and the
# two minimal cases below pass. The fix is in (PartitionCore.note_claim, Pipeline._claim_durably);
# the model's job step commits between claim and call, and any rollback fails the test.


def test_a_new_owner_does_not_apply_an_older_swap_after_a_lost_newer_one(
    model: Callable[[], CoreModel],
) -> None:
    state = model()
    state.produce(kind="swap", device="dev-a", node=0, delta=0, pick=0)  # evt-1
    state.produce(kind="swap", device="dev-a", node=1, delta=0, pick=0)  # evt-2: newer
    state.poll(count=2)
    state.job(pick=0, to_end=True)  # evt-1: SUPERSEDED at its claim, no call
    state.job(pick=0, to_end=True)  # evt-2: applied
    state.new_owner(kind="crash")  # before any transaction
    state.poll(count=1)  # the next owner's first fetch ends before evt-2
    state.job(pick=0, to_end=True)  # evt-1: answered SUPERSEDED at its claim, no call
    assert not state.platform.rollbacks, state.platform.rollbacks


def test_a_new_owner_does_not_wake_a_waiting_swap_a_lost_newer_one_replaced(
    model: Callable[[], CoreModel],
) -> None:
    state = model()
    state.setup(online={"dev-a"}, watch="off")
    state.produce(kind="swap", device="dev-a", node=0, delta=0, pick=0)  # evt-1
    state.poll(count=1)
    state.job(pick=0, to_end=True)  # 100611: waits
    state.commit(abort=False)  # the ledger topic: evt-1 waiting
    state.platform_change(change="offline", device="dev-a", pick=0)
    state.produce(kind="swap", device="dev-a", node=1, delta=1, pick=0)  # evt-2: newer
    state.poll(count=1)  # supersedes the waiting evt-1 (not committed yet)
    state.job(pick=0, to_end=True)  # evt-2: applied
    state.new_owner(kind="crash")
    state.wake(far=True)  # the wake loop runs before the first fetch
    # The committed ledger names evt-2 (its claim was durable before its call): evt-1 is no
    # longer waiting, nothing is woken, so nothing can be applied over evt-2.
    assert not state.member.queues
    assert not state.platform.rollbacks, state.platform.rollbacks


def test_a_refresh_overtaken_during_its_call_still_ends_with_a_bind_result(
    model: Callable[[], CoreModel],
) -> None:
    """Minimal example found by the model (bind watch on). evt-1's call refreshes the key while
    the newer evt-2 is read: evt-1 ends credential-updated but is never watched (the ledger holds
    evt-2), and got no further event, although the README promises exactly one more after
    credential-updated (device-rebound, or rebind-failed BIND_EXPIRED / BIND_NOT_CONFIRMED; a
    watched swap that a newer one replaces ends BIND_NOT_CONFIRMED)."""
    state = model()
    state.setup(online=set(), watch="poll")
    state.produce(kind="swap", device="dev-a", node=0, delta=0, pick=0)
    state.poll(count=1)
    state.produce(kind="swap", device="dev-a", node=1, delta=0, pick=0)
    state.job_overtaken(pick=0, count=1, newer=False, delta=0)  # evt-2 read during the call
    state.commit(abort=False)
    state.teardown()  # evt-2 is applied and bound; evt-1 must have ended BIND_NOT_CONFIRMED


def test_an_abandoned_woken_swap_overtaken_by_a_newer_one_is_answered_superseded(
    model: Callable[[], CoreModel],
) -> None:
    """Minimal example found by the model in CI. dev-b's swap evt-1 waits (device online); it is
    woken and claimed; the newer evt-3 of dev-b is read meanwhile (evt-1's entry was no longer
    waiting, so intake does not answer it); then evt-1's job is abandoned while the partition
    stays. evt-3's claim then replaces evt-1 in the ledger topic: unless the abandoned evt-1 is
    answered SUPERSEDED, as its decision would have been, its offset is committed unanswered."""
    state = model()
    state.setup(online=set(), watch="poll")
    state.platform_change(change="online", device="dev-a", pick=0)
    state.platform_change(change="online", device="dev-a", pick=0)
    state.platform_change(change="online", device=DEVICES[1], pick=0)
    state.produce(delta=0, device=DEVICES[1], kind="swap", node=0, pick=0)
    state.poll(count=1)
    state.job(pick=0, to_end=False)
    state.job(pick=0, to_end=False)
    state.job(pick=0, to_end=False)
    state.produce(delta=0, device="dev-a", kind="swap", node=0, pick=0)
    state.wake(far=True)
    state.commit(abort=False)
    state.job(pick=0, to_end=False)
    state.produce(delta=0, device=DEVICES[1], kind="swap", node=0, pick=0)
    state.poll(count=2)
    state.job_abandoned(pick=0)
    state.accounting()
    state.job(pick=1, to_end=False)
    state.accounting()
    state.job(pick=1, to_end=False)
    state.accounting()
    state.teardown()


def test_a_claim_waits_for_its_transaction_when_another_lane_may_hold_an_older_swap(
    model: Callable[[], CoreModel],
) -> None:
    """Minimal example found by the model. A bulk swap evt-1 and a newer urgent swap evt-2 of
    one device; the urgent lane is read first, and evt-2 is applied at once, its claim riding
    the next transaction (the device had nothing open). The member crashes before that
    transaction: the next owner reads the bulk lane's evt-1 with nothing in the ledger and
    applied it after the newer evt-2. Within one lane an older swap has a lower offset and was
    read first; across two lanes it may be unread, so with two lanes every claim is durable
    before its call."""
    state = model()
    state.setup(online=set(), watch="poll", lanes=True)
    state.produce(delta=0, device="dev-a", kind="swap", node=0, pick=0)  # evt-1, bulk
    state.produce_urgent(delta=0, device="dev-a", node=1)  # evt-2, urgent: half a second newer
    state.poll_urgent(count=1)
    state.job_overtaken(count=1, delta=0, newer=False, pick=0)  # evt-2 applied
    state.new_owner(kind="crash")
    state.poll(count=1)  # evt-1, read by the next owner: older than the ledger's evt-2 now
    if state.member.queues:  # it was a job of its own before the fix
        state.job(pick=0, to_end=True)
    assert not state.platform.rollbacks, state.platform.rollbacks
    state.teardown()
