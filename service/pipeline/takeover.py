"""Taking a partition over without waiting for its whole ledger.

A member given a partition it did not have must know each device's latest ledger entry before it
decides a swap of that device. Reading the whole ledger first (a million devices: seconds of
fetch and decoding) would hold every swap of the partition back until the last record. Instead
the ledger is read **from its end back to its beginning**, in chunks: the ledger is keyed by
deviceId and the last record of a key is the one that counts, so once the records from some
offset to the end have been applied newest first (a device applied once, at its newest record),
every device met in that suffix has its final entry, whatever the older records say. A swap of a
device met already is decided at once; a swap of a device not met yet is *held*
(:meth:`LedgerLoad.hold`) until the read passes the device's entry, or reaches the beginning (a
device with no record at all: known only then), and then admitted in the order it was read.

Nothing else writes the partition's ledger meanwhile: its owner fenced the earlier owner before
taking the end offset, and its own records land after that end. Devices this member changes
during the load (an admitted swap, its outcome) were known before their change, so their entry in
memory is newer than any record still unread, and the read skips them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

if TYPE_CHECKING:
    from service.pipeline.work import Work

log = structlog.get_logger(__name__)


class LoadedLedger(Protocol):
    """What a take-over needs of the partition's ledger (``DeviceLedger``, which names this
    module's :class:`LedgerLoad`: a protocol here keeps the import one way)."""

    def load(self, key: bytes | None, value: bytes | None, offset: int | None = None) -> bool: ...

    def has(self, device: str) -> bool: ...


LedgerRecord = tuple[bytes | None, bytes | None, int]
"""A ledger record read back: key, value, offset."""

FIRST_CHUNK = 16_384
"""Records of the first chunk (the newest): small, so the newest devices are known soon."""
MAX_CHUNK = 65_536
"""Records of a chunk at most: the chunk's raw records are held until applied (~20 MB)."""
APPLY_SLICE = 2_048
"""Records applied between two yields to the event loop (about 15 ms of CPU): heartbeats, the
consume loop and the jobs keep running while a partition loads."""
_RETRY_INITIAL_SECONDS = 0.5
_RETRY_MAX_SECONDS = 15.0


class LedgerLoad:
    """The state of a ledger being read backwards: how far it has come, the devices met with no
    entry, and the swaps held until their device is met."""

    def __init__(self, ledger: LoadedLedger, beginning: int, end: int) -> None:
        self.ledger = ledger
        self.beginning = beginning
        self.end = end
        self.read_from = end  # every record at or after this offset is applied
        self.records = 0  # records read and applied
        self.started = time.monotonic()
        # Devices met in the suffix whose newest record left no entry (a tombstone, a record
        # this version cannot read): known to have none. Bounded by the partition's tombstones
        # still in the log (compaction drops them after delete.retention.ms); dropped at the end.
        self._absent: set[str] = set()
        # Swaps read from the input whose device is not met yet, in the order read. Bounded by
        # the input buffer: each is an unfinished record, counted by the backpressure.
        self._held: deque[Work] = deque()
        self._held_devices: Counter[str] = Counter()

    @property
    def done(self) -> bool:
        return self.read_from <= self.beginning

    def known(self, device: str) -> bool:
        """True when ``device``'s entry in memory is its final one (a swap of it may be decided):
        the read is done, or met the device, and no earlier swap of it is still held."""
        if self._held_devices[device]:
            return False
        return self.done or device in self._absent or self.ledger.has(device)

    def hold(self, work: Work) -> bool:
        """Hold ``work`` when its device is not known yet (True), to be admitted when it is."""
        if self.known(work.device):
            return False
        self._held.append(work)
        self._held_devices[work.device] += 1
        return True

    @property
    def held(self) -> int:
        return len(self._held)

    def apply(self, records: list[LedgerRecord]) -> None:
        """Apply ``records`` (the next ones before :attr:`read_from`, in offset order: key,
        value, offset) newest first: a device met already (in a newer record, or changed by
        this member since) is skipped. Call :meth:`release` right after, before any other input
        is read."""
        ledger, absent = self.ledger, self._absent
        for key, value, offset in reversed(records):
            if key is None:
                continue
            device = key.decode("utf-8", "replace")
            if device in absent or ledger.has(device):
                continue
            if not ledger.load(key, value, offset):
                absent.add(device)
        self.records += len(records)

    def passed(self, start: int) -> None:
        """Every record from ``start`` on is applied."""
        self.read_from = start
        if self.done:
            self._absent.clear()

    def release(self) -> list[Work]:
        """The held swaps whose device is now known, in the order they were read (a device's
        swaps are released together, so its order is kept)."""
        if not self._held:
            return []
        released: list[Work] = []
        kept: deque[Work] = deque()
        for work in self._held:
            device = work.device
            if self.done or device in self._absent or self.ledger.has(device):
                released.append(work)
            else:
                kept.append(work)
        self._held = kept
        for work in released:
            self._held_devices[work.device] -= 1
            if self._held_devices[work.device] <= 0:
                del self._held_devices[work.device]
        return released


async def read_range(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, stop: int
) -> list[LedgerRecord]:
    """The (key, value, offset) of ``tp``'s records from ``start`` up to (excluding) ``stop``,
    in order. ``consumer`` is assigned ``tp`` alone."""
    consumer.seek(tp, start)
    found: list[LedgerRecord] = []
    while await consumer.position(tp) < stop:
        fetched = await consumer.getmany(tp, timeout_ms=500, max_records=MAX_CHUNK)
        found.extend(
            (record.key, record.value, record.offset)
            for record in fetched.get(tp, ())
            if start <= record.offset < stop
        )
    return found


async def load_backwards(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    load: LedgerLoad,
    released: Callable[[list[Work]], None],
) -> None:
    """Read ``tp`` (the partition's ledger) from ``load.end`` back to ``load.beginning`` into
    ``load``; after every slice applied, ``released`` gets the held swaps whose device became
    known (synchronously: no input is read in between). A failed fetch is tried again with a
    growing pause, from the chunk it failed in; cancel the task to stop it."""
    consumer.assign([tp])
    chunk = FIRST_CHUNK
    pause = 0.0
    while not load.done:
        start = max(load.beginning, load.read_from - chunk)
        try:
            records = await read_range(consumer, tp, start, load.read_from)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broker hiccup: the chunk is read again
            pause = min(max(pause * 2, _RETRY_INITIAL_SECONDS), _RETRY_MAX_SECONDS)
            log.warning(
                "ledger_chunk_failed", partition=tp.partition, error=repr(exc), retry_in=pause
            )
            await asyncio.sleep(pause)
            continue
        pause = 0.0
        for at in range(len(records), 0, -APPLY_SLICE):
            load.apply(records[max(0, at - APPLY_SLICE) : at])
            if at - APPLY_SLICE <= 0:
                load.passed(start)
            released(load.release())
            await asyncio.sleep(0)  # let heartbeats, the consume loop and the jobs run
        if not records:
            load.passed(start)
            released(load.release())
        chunk = min(chunk * 2, MAX_CHUNK)
