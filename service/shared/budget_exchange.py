"""The application's call log, exchanged between replicas through Kafka (docs/budget.md).

Every replica publishes, keyed by its instance id, the epoch times of its own platform calls still
within the window (:meth:`RateBudget.grant_log`) to a compacted, single-partition topic: every
``publish_interval`` seconds, when its partitions are revoked, after each assignment, and a final
time when it stops. At each assignment it reads the topic to its end, builds the application's
global log (the union of every replica's calls in the window, its own taken live from its budget)
and calls :meth:`RateBudget.rebalance`: each logged call weighs ``share`` in this replica's window.
Summed over the replicas, the weighted preloads are the application's calls in the window, so the
replicas' new calls together stay within what the platform still allows.

aiokafka's group protocol is eager: at a rebalance every member's partitions are revoked and its
revocation callback runs *before* it re-joins, and the leader assigns only once every member has
re-joined. So every live member's revocation-time record is on the topic before any member's
assignment callback runs. Four rules make those records complete:

* **held**: from its revocation until its next assignment, a replica's budget grants nothing
  (:meth:`RateBudget.freeze`), and the record it publishes then says so (``held``). After the
  assignment it grants again only once a record with its new limit is acknowledged. A held record
  is therefore complete whenever it is read: the replica made no call since.
* **new generation**: a record published after its replica's assignment in *this* rebalance
  (``assigned_at`` not before my own revocation) is complete up to ``published_at``, and what that
  replica calls afterwards is bounded by its own new allowance.
* **lease**: a replica grants only while its last acknowledged record is younger than
  ``lease_seconds`` (:meth:`RateBudget.renew_lease`), so a replica that vanished made its last
  call before ``published_at + lease_seconds``.
* **slack**: any other record may belong to a dead replica (SIGKILL, or a member that could not
  publish at revocation) that called after publishing. It made at most ``limit - (its own grants
  that still counted at published_at + lease)`` more calls (its window never held more than its
  limit); that many phantom calls at ``published_at + lease`` join the global log.

A restarted process (same instance id) reads its previous incarnation's record before it publishes
its first one, and carries those calls (plus the slack) in its own records until they age out.

The budget stays held from :meth:`BudgetExchange.start` to the first assignment. Records are
scoped (``<group id>/<app id>``): groups never count each other's calls.

``announced_revocations=False`` is for a pipeline that does not call :meth:`on_revoked`: live
replicas then never publish held records, so a record published within the last
``publish_interval + 1`` s is taken as complete (best effort: calls made since are missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.config import Settings
from service.kafka import FatalPipelineError, client_options, ensure_compacted_topic
from service.metrics import Metrics
from service.platform.budget import DEFAULT_SAFETY_MARGIN_SECONDS, WINDOW_SECONDS, RateBudget

log = structlog.get_logger(__name__)

RECORD_VERSION: Final = 1
DEFAULT_PUBLISH_INTERVAL_SECONDS: Final = 2.0
LEASE_INTERVALS: Final = 3.0
"""The default lease: this many publication intervals (a publication may fail now and then)."""
TIME_RESOLUTION_SECONDS: Final = 0.01
"""Published times are rounded *up* to this (a call then ages out a little later: safe)."""
CATCH_UP_TIMEOUT_SECONDS: Final = 15.0
PUBLISH_TIMEOUT_SECONDS: Final = 10.0
READ_RETRY_SECONDS: Final = 1.0
SEGMENT_MS: Final = 600_000
"""Segments roll every 10 minutes, so compaction keeps the topic near one record per replica."""
SPAN_SECONDS: Final = WINDOW_SECONDS + DEFAULT_SAFETY_MARGIN_SECONDS
"""How long a call counts with the default window; the exchange uses its budget's span."""
LOG_APPEND_TIME: Final = 1
"""The timestamp type of a record the broker stamps (topic: LogAppendTime)."""
CLOCK_STEP_LOGGED_SECONDS: Final = 1.0
"""A re-anchoring that moves the epoch conversion by more than this is logged."""


class InvalidBudgetRecordError(Exception):
    """A budget-topic record that cannot be used (not JSON, wrong fields, other version)."""


@dataclass(frozen=True, slots=True)
class BudgetRecord:
    """What a replica publishes. Times are epoch seconds (they travel between hosts)."""

    instance: str
    scope: str
    published_at: float
    limit: int
    grants: tuple[float, ...]
    """Its calls still in the window (sorted), including a previous incarnation's."""
    held: bool
    """It makes no call until it publishes again (revoked, starting, or stopped)."""
    final: bool
    """Its last record: the process stopped."""
    assigned_at: float | None
    """When it last received an assignment."""
    counted_since: float
    """Its own grants from then on count 1 in its window (its last rebalance)."""


def _round_up(t: float) -> float:
    return math.ceil(round(t / TIME_RESOLUTION_SECONDS, 6)) * TIME_RESOLUTION_SECONDS


MAX_PACKED_ENTRIES = 4000
"""A record lists at most this many distinct times (about 100 kB): past it, times are rounded up
to a coarser grid (0.1 s, 1 s, 10 s). Rounding up only makes calls look later, so they count in
the others' windows a little longer: safe, and the record always fits a Kafka message."""


def pack_times(times: Iterable[float]) -> list[list[float]]:
    """``[[epoch, calls], ...]``: times rounded up to 10 ms (coarser when there are very many
    distinct times, see :data:`MAX_PACKED_ENTRIES`), equal ones counted once."""
    ordered = sorted(_round_up(t) for t in times)
    step = TIME_RESOLUTION_SECONDS
    while True:
        packed: list[list[float]] = []
        for t in ordered:
            if packed and packed[-1][0] == t:
                packed[-1][1] += 1
            else:
                packed.append([round(t, 2), 1])
        if len(packed) <= MAX_PACKED_ENTRIES or step >= 10.0:
            return packed
        step *= 10
        ordered = [math.ceil(round(t / step, 6)) * step for t in ordered]


def unpack_times(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise InvalidBudgetRecordError("grants is not a list")
    out: list[float] = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(_is_number(x) for x in item)
            or int(item[1]) != item[1]
            or not 0 < item[1] <= 10_000_000
        ):
            raise InvalidBudgetRecordError("grants entries must be [epoch, calls]")
        out.extend([float(item[0])] * int(item[1]))
    out.sort()
    return tuple(out)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def encode_record(record: BudgetRecord) -> bytes:
    payload = {
        "version": RECORD_VERSION,
        "instance": record.instance,
        "scope": record.scope,
        "published_at": record.published_at,
        "limit": record.limit,
        "held": record.held,
        "final": record.final,
        "assigned_at": record.assigned_at,
        "counted_since": record.counted_since,
        "grants": pack_times(record.grants),
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def decode_record(value: bytes | None) -> BudgetRecord:
    if not value:
        raise InvalidBudgetRecordError("empty")
    try:
        p = json.loads(value)
    except ValueError:
        raise InvalidBudgetRecordError("not JSON") from None
    if not isinstance(p, dict):
        raise InvalidBudgetRecordError("not an object")
    if p.get("version") != RECORD_VERSION:
        raise InvalidBudgetRecordError(f"unknown version {p.get('version')!r}")
    instance, scope, limit = p.get("instance"), p.get("scope"), p.get("limit")
    published_at, counted_since = p.get("published_at"), p.get("counted_since")
    assigned_at = p.get("assigned_at")
    if not isinstance(instance, str) or not instance or not isinstance(scope, str):
        raise InvalidBudgetRecordError("instance or scope missing")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise InvalidBudgetRecordError("limit missing")
    if not isinstance(published_at, int | float) or not isinstance(counted_since, int | float):
        raise InvalidBudgetRecordError("times missing")
    if not _is_number(published_at) or not _is_number(counted_since):
        raise InvalidBudgetRecordError("times missing")
    if assigned_at is not None and not (
        isinstance(assigned_at, int | float) and _is_number(assigned_at)
    ):
        raise InvalidBudgetRecordError("assigned_at is not a time")
    held, final = p.get("held"), p.get("final")
    if not isinstance(held, bool) or not isinstance(final, bool):
        raise InvalidBudgetRecordError("held or final missing")
    return BudgetRecord(
        instance=instance,
        scope=scope,
        published_at=float(published_at),
        limit=limit,
        grants=unpack_times(p.get("grants")),
        held=held or final,
        final=final,
        assigned_at=None if assigned_at is None else float(assigned_at),
        counted_since=float(counted_since),
    )


def is_complete(
    record: BudgetRecord, fresh_after: float, recent_after: float | None = None
) -> bool:
    """The record holds every call its replica made, or will be bounded by its new allowance.

    ``recent_after`` (only when revocations are not announced, see :class:`BudgetExchange`):
    a record published since then is taken as complete too, a best effort.
    """
    return (
        record.held
        or (record.assigned_at is not None and record.assigned_at >= fresh_after)
        or (recent_after is not None and record.published_at >= recent_after)
    )


def phantom_calls(
    record: BudgetRecord, lease_seconds: float, span_seconds: float = SPAN_SECONDS
) -> list[float]:
    """Calls a vanished replica may have made after ``record``, all at the latest possible time."""
    end = record.published_at + lease_seconds
    since = max(end - span_seconds, record.counted_since)
    counting = sum(1 for t in record.grants if t > since)
    return [end] * max(0, record.limit - counting)


@dataclass(frozen=True, slots=True)
class GlobalLog:
    calls: list[float]
    """Every call in the window (phantoms included), epoch seconds."""
    logged: int
    """Calls in the window that some record (or this replica) names."""
    phantom: int
    replicas: int
    """Records taken into account (this replica included)."""
    stale: tuple[str, ...]
    """Instances whose record may miss calls (phantoms were added for them)."""


def build_global_log(
    records: Iterable[BudgetRecord],
    *,
    own_instance: str,
    own_grants: Sequence[float],
    fresh_after: float,
    now: float,
    lease_seconds: float,
    recent_after: float | None = None,
    span_seconds: float = SPAN_SECONDS,
) -> GlobalLog:
    """The application's calls in the window ending ``now`` (epoch seconds).

    ``records``: the latest record of every instance of the scope. This instance's own record is
    replaced by ``own_grants`` (live). A record that is not :func:`is_complete` adds
    :func:`phantom_calls`.
    """
    horizon = now - span_seconds
    calls = [t for t in own_grants if t > horizon]
    logged = len(calls)
    phantom = 0
    replicas = 1
    stale: list[str] = []
    for record in records:
        if record.instance == own_instance:
            continue
        mine = [t for t in record.grants if t > horizon]
        extra: list[float] = []
        if not is_complete(record, fresh_after, recent_after):
            extra = [t for t in phantom_calls(record, lease_seconds, span_seconds) if t > horizon]
            if extra:
                stale.append(record.instance)
        if not mine and not extra:
            continue
        replicas += 1
        calls.extend(mine)
        calls.extend(extra)
        logged += len(mine)
        phantom += len(extra)
    return GlobalLog(calls, logged, phantom, replicas, tuple(stale))


class RecordLog(Protocol):
    """The topic without Kafka (tests, simulations): appended records, read back in order."""

    async def append(self, key: bytes, value: bytes) -> float | None:
        """Append; the broker's append time of the record (epoch seconds), if it stamps one."""
        ...

    def read_from(self, position: int) -> Sequence[tuple[bytes | None, bytes | None]]:
        """The records from ``position`` (0-based) to the current end."""
        ...


class _Phase(Enum):
    NEW = "new"
    STARTING = "starting"  # held until the first assignment
    REVOKED = "revoked"  # held until the next assignment
    ASSIGNED = "assigned"  # grants once a record of the assignment is acknowledged
    STOPPED = "stopped"  # held for good


_HELD_PHASES: Final = (_Phase.NEW, _Phase.STARTING, _Phase.REVOKED, _Phase.STOPPED)


async def send_stamped(
    producer: AIOKafkaProducer, topic: str, key: bytes, value: bytes, timeout: float
) -> float | None:
    """Send one record to partition 0 and wait for the broker's acknowledgement: the broker's
    append time in epoch seconds, or None when the topic keeps the producer's create time."""
    metadata = await asyncio.wait_for(
        producer.send_and_wait(topic, value, key=key, partition=0), timeout
    )
    return (
        metadata.timestamp / 1000.0
        if metadata.timestamp_type == LOG_APPEND_TIME and metadata.timestamp > 0
        else None
    )


class BudgetExchange:
    """Publishes this replica's calls, reads everyone's, and rebalances its :class:`RateBudget`."""

    def __init__(
        self,
        kafka_options: dict[str, Any],
        topic: str,
        instance_id: str,
        budget: RateBudget,
        metrics: Metrics | None = None,
        *,
        scope: str = "",
        publish_interval: float = DEFAULT_PUBLISH_INTERVAL_SECONDS,
        lease_seconds: float | None = None,
        catch_up_timeout: float = CATCH_UP_TIMEOUT_SECONDS,
        publish_timeout: float = PUBLISH_TIMEOUT_SECONDS,
        announced_revocations: bool = True,
        io: RecordLog | None = None,
    ) -> None:
        if publish_interval <= 0:
            raise ValueError("publish_interval must be > 0")
        self._options = kafka_options
        self._topic = topic
        self._tp = TopicPartition(topic, 0)
        self._instance = instance_id
        self._scope = scope
        self._key = f"{scope}/{instance_id}" if scope else instance_id
        self.budget = budget
        self._metrics = metrics  # the budget exports rebind_rate_limit_per_minute itself
        self.publish_interval = publish_interval
        self.lease_seconds = (
            lease_seconds if lease_seconds is not None else LEASE_INTERVALS * publish_interval
        )
        if self.lease_seconds < publish_interval:
            raise ValueError("lease_seconds must be >= publish_interval")
        self._catch_up_timeout = catch_up_timeout
        self._publish_timeout = publish_timeout
        self._announced = announced_revocations
        self._io = io
        # what the reader knows: the latest record of every instance of our scope
        self.records: dict[str, BudgetRecord] = {}
        self._position = 0
        self._progress = asyncio.Event()
        # our state
        self._phase = _Phase.NEW
        self._assignment = 0
        self._assigned_at: float | None = None
        self._fresh_after = 0.0
        self._inherited: list[float] = []
        self._publish_lock = asyncio.Lock()
        self._lease_lost = False
        self.broker_time = False
        """The budget's epoch times are anchored to the broker's append times (else to this
        host's wall clock, read again at every publication)."""
        self._unwired_warned = False
        self.publications = 0
        self.rebalances = 0
        self.last_log: GlobalLog | None = None
        # Kafka
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, budget: RateBudget, metrics: Metrics | None = None
    ) -> BudgetExchange:
        """The service's exchange: ``topics.budget``, scoped to the group and the application."""
        return cls(
            client_options(settings.kafka),
            settings.topics.budget,
            settings.kafka.instance_id,
            budget,
            metrics,
            scope=f"{settings.kafka.group_id}/{settings.platform.app_id}",
        )

    @property
    def key(self) -> str:
        return self._key

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Create the topic if missing, read it, take over a previous incarnation's calls,
        publish a first (held) record and start publishing periodically.

        The budget grants nothing from here until the first :meth:`on_assigned`.
        """
        self.budget.freeze()
        self._phase = _Phase.STARTING
        self._fresh_after = self.budget.wall_now()
        if self._io is not None:  # no Kafka, nothing in the background: the owner publishes
            await self.catch_up()
            self._inherit()
            await self.publish()
            return
        await self._ensure_topic()
        self._consumer = AIOKafkaConsumer(
            **self._options,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        await self._consumer.start()
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        self._reader = asyncio.create_task(self._read_loop(), name="budget-reader")
        if not await self.catch_up():
            raise FatalPipelineError(
                f"REBIND_TOPICS__BUDGET: topic {self._topic!r} could not be read to its end "
                f"within {self._catch_up_timeout:g} s"
            )
        self._inherit()
        self._producer = AIOKafkaProducer(
            **self._options, acks="all", enable_idempotence=True, linger_ms=0
        )
        await self._producer.start()
        if not await self.publish():
            raise FatalPipelineError(
                f"REBIND_TOPICS__BUDGET: could not publish to topic {self._topic!r}"
            )
        self._publisher = asyncio.create_task(self._publish_loop(), name="budget-publisher")

    async def stop(self) -> None:
        """Stop calling, publish a final record (its calls still count for the others), close."""
        self._phase = _Phase.STOPPED
        self.budget.freeze()
        await self._cancel(self._publisher)
        self._publisher = None
        if self._producer is not None or self._io is not None:
            published = await self.publish()
            log.info(
                "budget_final_record",
                instance=self._instance,
                published=published,
                calls=len(self._own_log()),
            )
        await self._cancel(self._reader)
        self._reader = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @staticmethod
    async def _cancel(task: asyncio.Task[None] | None) -> None:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _ensure_topic(self) -> None:
        # The broker stamps each record with its append time: the replicas' common clock.
        configs = {"segment.ms": str(SEGMENT_MS), "message.timestamp.type": "LogAppendTime"}
        if await ensure_compacted_topic(
            self._options, self._topic, setting="REBIND_TOPICS__BUDGET", configs=configs
        ):
            log.warning("budget_topic_created", topic=self._topic, cleanup_policy="compact")

    # ------------------------------------------------------------------ reader
    async def _read_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                batch = await consumer.getmany(self._tp, timeout_ms=500)
                for msg in batch.get(self._tp, ()):
                    self.receive(msg.key, msg.value, offset=msg.offset)
                self._position = await consumer.position(self._tp)
            except Exception as exc:  # noqa: BLE001 - a broker hiccup must not end the reader
                log.warning("budget_topic_read_failed", error=type(exc).__name__)
                await asyncio.sleep(READ_RETRY_SECONDS)
                continue
            self._progress.set()

    def receive(self, key: bytes | None, value: bytes | None, *, offset: int = -1) -> None:
        """Apply one record of the budget topic (in offset order)."""
        if key is None:
            return
        name = key.decode(errors="replace")
        if self._scope and not name.startswith(self._scope + "/"):
            return  # another group's or application's record
        if value is None:
            self.records.pop(name, None)  # a tombstone
            return
        try:
            record = decode_record(value)
        except InvalidBudgetRecordError as exc:
            log.warning("budget_record_ignored", offset=offset, reason=str(exc))
            return
        if record.scope != self._scope:
            return
        self.records[name] = record

    async def catch_up(self, timeout: float | None = None) -> bool:
        """Read the topic up to its current end (True), or give up after ``timeout``."""
        if self._io is not None:
            for key, value in self._io.read_from(self._position):
                self.receive(key, value, offset=self._position)
                self._position += 1
            return True
        if self._consumer is None:
            return True
        budget = self._catch_up_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        try:
            end = (await self._consumer.end_offsets([self._tp]))[self._tp]
            while self._position < end:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                self._progress.clear()
                waiter = asyncio.ensure_future(self._progress.wait())
                try:
                    await asyncio.wait({waiter}, timeout=remaining)
                finally:
                    waiter.cancel()
        except Exception as exc:  # noqa: BLE001 - a broker hiccup: the caller decides
            log.warning("budget_topic_catch_up_failed", error=type(exc).__name__)
            return False
        return True

    def _inherit(self) -> None:
        """A previous incarnation's calls (same instance id) still count: carry them on."""
        previous = self.records.get(self._key)
        if previous is None:
            return
        now = self.budget.wall_now()
        span = self.budget.span_seconds
        horizon = now - span
        extra = [] if previous.held else phantom_calls(previous, self.lease_seconds, span)
        self._inherited = sorted(t for t in (*previous.grants, *extra) if t > horizon)
        log.info(
            "budget_previous_incarnation",
            calls_in_window=sum(t > horizon for t in previous.grants),
            phantom_calls=sum(t > horizon for t in extra),
            stopped_cleanly=previous.final,
        )

    # ------------------------------------------------------------------ publishing
    def _own_log(self) -> list[float]:
        horizon = self.budget.wall_now() - self.budget.span_seconds
        self._inherited = [t for t in self._inherited if t > horizon]
        return sorted((*self._inherited, *self.budget.grant_log()))

    async def publish(self) -> bool:
        """Publish this replica's calls now and wait for the broker's acknowledgement."""
        producer, io = self._producer, self._io
        if producer is None and io is None:
            return False
        async with self._publish_lock:
            phase, assignment = self._phase, self._assignment
            self._anchor()
            sent_at = self.budget.now()
            record = BudgetRecord(
                instance=self._instance,
                scope=self._scope,
                published_at=self.budget.to_wall(sent_at),
                limit=self.budget.limit,
                grants=tuple(self._own_log()),
                held=phase in _HELD_PHASES,
                final=phase is _Phase.STOPPED,
                assigned_at=self._assigned_at,
                # rounded up like the grants: an earlier grant never looks later than it
                counted_since=_round_up(self.budget.counted_since()),
            )
            value = encode_record(record)
            try:
                if io is not None:
                    stamped = await io.append(self._key.encode(), value)
                else:
                    assert producer is not None
                    stamped = await send_stamped(
                        producer, self._topic, self._key.encode(), value, self._publish_timeout
                    )
            except Exception as exc:  # noqa: BLE001 - the lease runs out; the budget stops
                log.warning("budget_publish_failed", error=type(exc).__name__, held=record.held)
                return False
        self.publications += 1
        if stamped is not None:
            # Appended after we sent it: taking its stamp for the send time puts our clock a
            # round trip ahead of the broker's at most (our calls look younger: safe).
            self._anchor(stamped, at=sent_at)
        self.budget.renew_lease(sent_at + self.lease_seconds)
        if self._lease_lost:
            self._lease_lost = False
            log.info("budget_lease_renewed")
        if (
            phase is _Phase.ASSIGNED
            and self._phase is _Phase.ASSIGNED
            and assignment == self._assignment
            and self.budget.frozen
        ):
            self.budget.thaw()
        return True

    def _anchor(self, broker: float | None = None, *, at: float | None = None) -> None:
        """Re-anchor the budget's epoch conversion: to the broker's append time of a record just
        acknowledged, or (never anchored to the broker yet) to this host's wall clock now."""
        if broker is None and self.broker_time:
            return
        step = self.budget.reanchor(broker, at=at)
        first = broker is not None and not self.broker_time
        self.broker_time = self.broker_time or broker is not None
        if abs(step) > CLOCK_STEP_LOGGED_SECONDS or first:
            log.info(
                "budget_clock_anchored",
                anchor="broker" if broker is not None else "wall clock",
                step_seconds=round(step, 3),
            )

    async def _publish_loop(self) -> None:
        while True:
            await asyncio.sleep(self.publish_interval)
            if (
                not await self.publish()
                and not self._lease_lost
                and self.budget.now() >= self.budget.lease_until()
            ):
                self._lease_lost = True
                log.warning(
                    "budget_lease_expired",
                    detail="no publication acknowledged lately: platform calls wait",
                    lease_seconds=self.lease_seconds,
                )

    # ------------------------------------------------------------------ rebalances
    async def on_revoked(self) -> None:
        """The pipeline's partitions are being revoked (eager protocol: all of them): stop
        calling and publish, before the member re-joins the group."""
        self._phase = _Phase.REVOKED
        self.budget.freeze()
        self._fresh_after = self.budget.wall_now()
        published = await self.publish()
        log.info(
            "budget_revoked",
            instance=self._instance,
            published=published,
            calls=len(self._own_log()),
        )

    async def on_assigned(self, share: float) -> None:
        """The new assignment: rebalance the budget against the application's global log."""
        announced = self._announced
        if self._phase not in (_Phase.REVOKED, _Phase.STARTING, _Phase.NEW):
            if announced and not self._unwired_warned:
                self._unwired_warned = True
                log.warning(
                    "budget_revocation_not_announced",
                    detail="on_revoked was not called before this assignment; publishing now",
                )
            announced = False
            await self.on_revoked()
        self._assignment += 1
        self._anchor()
        self._assigned_at = self.budget.wall_now()
        caught_up = await self.catch_up()
        now = self.budget.wall_now()
        glog = build_global_log(
            [r for k, r in self.records.items() if k != self._key],
            own_instance=self._instance,
            own_grants=self._own_log(),
            fresh_after=self._fresh_after,
            now=now,
            lease_seconds=self.lease_seconds,
            # Without announced revocations, live replicas' latest records are periodic ones:
            # take the recent ones as complete (best effort; their last seconds are missed).
            recent_after=None if announced else now - self.publish_interval - 1.0,
            span_seconds=self.budget.span_seconds,
        )
        calls = glog.calls
        if not caught_up:
            # Unknown: assume the application spent its whole budget just now.
            calls = [*calls, *([now] * self.budget.total)]
        self.budget.rebalance(share, calls)
        self.budget.freeze()  # until a record of this assignment is acknowledged
        self._phase = _Phase.ASSIGNED
        self.rebalances += 1
        self.last_log = glog
        published = await self.publish()
        log.info(
            "budget_rebalanced",
            instance=self._instance,
            share=round(share, 4),
            limit=self.budget.limit,
            global_calls_in_window=glog.logged,
            phantom_calls=glog.phantom + (0 if caught_up else self.budget.total),
            replicas_seen=glog.replicas,
            stale_instances=list(glog.stale),
            allowance=round(self.budget.allowance(), 2),
            caught_up=caught_up,
            granting=published,
        )
