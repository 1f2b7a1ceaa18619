"""Accounting of a run: every input against the committed outcomes, and the platform's record.

Fault tests end with one line per run::

    FAULT sigkill: in=1200 out=1200 lost=0 duplicated=0 distinct_key_violations=0

* ``in``: input records produced (each with a unique event id, or a poison record identified by
  its partition and offset).
* ``out``: committed outcome records (``read_committed``) on credential-updated, rebind-failed and
  the dead-letter topic that answer one of the inputs.
* ``lost``: inputs without any outcome; ``duplicated``: inputs with more than one outcome record.
* ``distinct_key_violations``: devices whose platform history holds more than one distinct
  (nodeId, verifyCode) pair, or whose applied pair is not the one requested (one swap per device).

The outcome reader reads the output topics up to their end *after the services have stopped*
(every transaction then is committed or aborted), so the count is exact and needs no sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.simulator.control import SimulatorControl
from tests.support.events import Received
from tests.support.waiting import wait_until

InputKey = tuple[int, int]  # (partition, offset) of an input record


@dataclass(frozen=True)
class Produced:
    """One input record as written: where it landed and what it was."""

    partition: int
    offset: int
    key: bytes | None
    event_id: str | None  # None for poison input
    device_id: str | None = None
    node_id: str | None = None


@dataclass
class Inputs:
    """What a test produced on the input topic."""

    records: list[Produced] = field(default_factory=list)

    @property
    def good(self) -> list[Produced]:
        return [r for r in self.records if r.event_id is not None]

    @property
    def poison(self) -> list[Produced]:
        return [r for r in self.records if r.event_id is None]

    def __len__(self) -> int:
        return len(self.records)


async def produce_inputs(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None, list[tuple[str, bytes]], Any]],
) -> Inputs:
    """Produce ``(key, value, headers, meta)`` records; ``meta`` is ``(event_id, device, node)``
    for a good swap or ``None`` for poison. Returns where each landed."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    try:
        pending = []
        for key, value, headers, meta in records:
            fut = await producer.send(topic, value, key=key, headers=headers)
            pending.append((fut, key, meta))
        inputs = Inputs()
        for fut, key, meta in pending:
            md = await fut
            event_id, device, node = meta if meta is not None else (None, None, None)
            inputs.records.append(Produced(md.partition, md.offset, key, event_id, device, node))
        return inputs
    finally:
        await producer.stop()


class OutcomeReader:
    """Reads the committed outcome records (``read_committed``) in the background."""

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.records: list[Received] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=self.bootstrap,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            request_timeout_ms=15_000,
            retry_backoff_ms=200,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._loop(), name="outcome-reader")

    async def _poll(self, timeout_ms: int) -> None:
        assert self._consumer is not None
        async with self._lock:
            batch = await self._consumer.getmany(timeout_ms=timeout_ms)
        for tp, msgs in batch.items():
            self.records.extend(
                Received(tp.topic, tp.partition, m.offset, m.key, m.value, tuple(m.headers or ()))
                for m in msgs
            )

    async def _loop(self) -> None:
        while True:
            try:
                await self._poll(200)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.2)

    @property
    def count(self) -> int:
        return len(self.records)

    async def wait_for(self, count: int, timeout: float, what: str = "") -> None:
        await wait_until(
            lambda: self.count >= count,
            timeout=timeout,
            what=what or f"{count} committed outcomes (have {self.count})",
        )

    def answered(self) -> set[str]:
        """The distinct input event ids (``data.swapEventId``) the outcomes read so far answer."""
        ids: set[str] = set()
        for rec in self.records:
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                ids.add(str(orjson.loads(rec.value or b"")["data"]["swapEventId"]))
        return ids

    async def wait_answered(self, inputs: Inputs, timeout: float) -> None:
        """Wait until every good input has at least one committed outcome (duplicates do not
        count twice, unlike :meth:`wait_for`)."""
        wanted = {r.event_id for r in inputs.good if r.event_id is not None}

        def done() -> bool:
            return wanted <= self.answered()

        await wait_until(done, timeout, f"outcomes for all {len(wanted)} inputs")

    async def read_to_end(self, timeout: float = 60) -> list[Received]:
        """Stop the background loop and read every partition up to its current end.

        Call it when no producer is active any more: then the end offsets are final.
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        consumer = self._consumer
        assert consumer is not None
        parts = [
            TopicPartition(t, p)
            for t in self.topics
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        ends = await consumer.end_offsets(parts)

        async def done() -> bool:
            await self._poll(200)
            for tp, end in ends.items():
                if await _position(consumer, tp) < end:
                    return False
            return True

        await wait_until(done, timeout=timeout, what="outcome topics read to their end")
        return self.records

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


async def _position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
    return int(await consumer.position(tp))


@dataclass
class Accounting:
    label: str
    inputs: int
    outputs: int
    lost: int
    duplicated: int
    distinct_key_violations: int
    unmatched_outputs: int
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"FAULT {self.label}: in={self.inputs} out={self.outputs} lost={self.lost} "
            f"duplicated={self.duplicated} distinct_key_violations={self.distinct_key_violations}"
        )

    def line_with(self, **figures: object) -> str:
        """The accounting line followed by a test's own figures (``name=value`` each)."""
        extra = " ".join(f"{k}={_figure(v)}" for k, v in figures.items())
        return f"{self.line()} {extra}".rstrip()

    def assert_clean(self) -> None:
        assert self.lost == 0, f"{self.line()}: lost inputs {self.details.get('lost_sample')}"
        assert self.duplicated == 0, (
            f"{self.line()}: duplicated inputs {self.details.get('duplicated_sample')}"
        )
        assert self.distinct_key_violations == 0, (
            f"{self.line()}: {self.details.get('violation_sample')}"
        )
        assert self.unmatched_outputs == 0, (
            f"{self.line()}: outputs answering no input {self.details.get('unmatched_sample')}"
        )
        assert self.outputs == self.inputs, self.line()


def _figure(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace(" ", "")


def duplicate_outcome_ids(outcomes: Iterable[Received]) -> list[str]:
    """Outcome event ids (the CloudEvent ``id`` of credential-updated / rebind-failed records)
    that were committed more than once."""
    ids: Counter[str] = Counter()
    for rec in outcomes:
        with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
            ids[str(orjson.loads(rec.value or b"")["id"])] += 1
    return sorted(i for i, n in ids.items() if n > 1)


def outcome_input(rec: Received, dead_letter_topic: str, by_event: dict[str, InputKey]) -> Any:
    """The input a committed outcome record answers: ``(partition, offset)`` or None."""
    if rec.topic == dead_letter_topic:
        partition, offset = (
            rec.header("rebind-source-partition"),
            rec.header("rebind-source-offset"),
        )
        if partition is None or offset is None:
            return None
        return (int(partition), int(offset))
    try:
        event = orjson.loads(rec.value or b"")
        swap_id = event["data"]["swapEventId"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return by_event.get(swap_id)


async def device_violations(
    control: SimulatorControl, inputs: Inputs
) -> tuple[int, list[dict[str, Any]]]:
    """Devices with more than one distinct applied (nodeId, verifyCode), or a wrong one."""
    wanted: dict[str, set[tuple[str, str]]] = {}
    for r in inputs.good:
        if r.device_id is not None and r.node_id is not None:
            wanted.setdefault(r.device_id, set()).add((r.node_id, r.node_id))
    devices = {d["device_id"]: d for d in await control.devices()}
    bad: list[dict[str, Any]] = []
    for device_id, pairs in wanted.items():
        dev = devices.get(device_id)
        if dev is None:
            continue
        applied = {(p[0], p[1]) for p in dev["applied_pairs"]}
        if len(applied) > 1 or not applied <= pairs:
            bad.append({"device": device_id, "applied": sorted(applied), "wanted": sorted(pairs)})
    return len(bad), bad


async def account(
    label: str,
    inputs: Inputs,
    outcomes: Sequence[Received],
    *,
    dead_letter_topic: str,
    control: SimulatorControl | None,
) -> Accounting:
    """Match the committed outcomes to the inputs; print and return the accounting line."""
    by_event = {r.event_id: (r.partition, r.offset) for r in inputs.good if r.event_id}
    keys = {(r.partition, r.offset) for r in inputs.records}
    per_input: Counter[InputKey] = Counter()
    unmatched: list[str] = []
    for rec in outcomes:
        target = outcome_input(rec, dead_letter_topic, by_event)
        if target is None or target not in keys:
            unmatched.append(f"{rec.topic}:{rec.partition}:{rec.offset}")
            continue
        per_input[target] += 1
    lost = sorted(keys - set(per_input))
    duplicated = sorted(k for k, n in per_input.items() if n > 1)
    violations, bad = (0, []) if control is None else await device_violations(control, inputs)
    result = Accounting(
        label=label,
        inputs=len(inputs),
        outputs=len(outcomes),
        lost=len(lost),
        duplicated=len(duplicated),
        distinct_key_violations=violations,
        unmatched_outputs=len(unmatched),
        details={
            "lost_sample": lost[:10],
            "duplicated_sample": duplicated[:10],
            "violation_sample": bad[:5],
            "unmatched_sample": unmatched[:10],
            "by_topic": dict(Counter(r.topic.split(".t-")[0] for r in outcomes)),
        },
    )
    print(f"\n{result.line()}  outcomes_by_topic={result.details['by_topic']}", flush=True)
    return result
