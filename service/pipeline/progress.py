"""How far an input partition is finished, and what is finished beyond that point.

Work finishes out of order (devices run in parallel, one slow record must not hold the others'
outcomes back), so outcomes are published as soon as they are decided, while the committed
offset only moves up to the first unfinished record. What lies between is described in the
metadata string committed with that offset, in the same transaction as the outcomes: the set of
offsets beyond the committed one whose outcome is already on Kafka. After a crash or a rebalance
the next owner reads the committed offset and its metadata, and finishes those records again at
once: no platform call, no second output.

Metadata format: ``r1:`` + url-safe base64 (no padding) of zlib-compressed varints: pairs of
(gap, length) runs of finished offsets, relative to the committed offset. Runs that do not fit in
:data:`MAX_OFFSET_METADATA_CHARS` are left out (those records are redone; the per-device ledger and
the duplicate memory still keep that from calling the platform twice for the same swap).
"""

from __future__ import annotations

import base64
import binascii
import time
import zlib
from collections import deque
from dataclasses import dataclass

from service.kafka import MAX_OFFSET_METADATA_CHARS

_PREFIX = "r1:"


def _varints(numbers: list[int]) -> bytes:
    out = bytearray()
    for number in numbers:
        n = number
        while True:
            byte = n & 0x7F
            n >>= 7
            if n:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
    return bytes(out)


def _unvarints(data: bytes) -> list[int]:
    numbers: list[int] = []
    n = shift = 0
    for byte in data:
        n |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            numbers.append(n)
            n = shift = 0
    return numbers


def encode_finished(base: int, finished: list[int]) -> str:
    """The metadata of ``finished`` offsets (sorted, all > ``base``) relative to ``base``."""
    if not finished:
        return ""
    runs: list[int] = []
    cursor = base
    start = prev = finished[0]
    for offset in finished[1:]:
        if offset == prev + 1:
            prev = offset
            continue
        runs += [start - cursor, prev - start + 1]
        cursor = prev + 1
        start = prev = offset
    runs += [start - cursor, prev - start + 1]
    while runs:
        text = _PREFIX + base64.urlsafe_b64encode(zlib.compress(_varints(runs))).decode().rstrip(
            "="
        )
        if len(text) <= MAX_OFFSET_METADATA_CHARS:
            return text
        runs = runs[: max(0, (len(runs) // 4) * 2)]  # keep the lower half of the runs
    return ""


def decode_finished(base: int, metadata: str | None) -> set[int]:
    """The offsets that ``metadata`` (written with committed offset ``base``) says are finished.
    Unreadable metadata (another tool's, or damaged) means nothing is known finished."""
    if not metadata or not metadata.startswith(_PREFIX):
        return set()
    body = metadata[len(_PREFIX) :]
    try:
        runs = _unvarints(zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))
    except (ValueError, binascii.Error, zlib.error):
        return set()
    finished: set[int] = set()
    cursor = base
    for gap, length in zip(runs[::2], runs[1::2], strict=False):
        start = cursor + gap
        finished.update(range(start, start + length))
        cursor = start + length
    return finished


@dataclass(slots=True)
class _Entry:
    offset: int
    started_at: float
    produced_at_ms: int | None
    done: bool = False


class PartitionProgress:
    """The records of one input partition read and not yet behind the committed offset."""

    __slots__ = ("_by_offset", "_clock", "_entries", "_finished_before", "_unfinished", "base")

    def __init__(self, committed: int | None = None, metadata: str | None = None) -> None:
        self.base = committed  # the offset last committed (None: never)
        # Records finished by an earlier owner beyond the committed offset: skipped when read.
        self._finished_before = (
            decode_finished(committed, metadata) if committed is not None else set()
        )
        self._entries: deque[_Entry] = deque()
        self._by_offset: dict[int, _Entry] = {}
        self._unfinished = 0
        self._clock = time.monotonic

    def finished_before(self, offset: int) -> bool:
        """True when an earlier owner already published this record's outcome."""
        return offset in self._finished_before

    def start(self, offset: int, produced_at_ms: int | None = None) -> None:
        if self._entries and offset <= self._entries[-1].offset:
            raise ValueError(f"offset {offset} is not after {self._entries[-1].offset}")
        entry = _Entry(offset, self._clock(), produced_at_ms)
        self._entries.append(entry)
        self._by_offset[offset] = entry
        self._unfinished += 1

    def finish(self, offset: int) -> int | None:
        """Mark ``offset`` finished; returns its input timestamp (for the latency metric)."""
        entry = self._by_offset[offset]
        if entry.done:
            raise ValueError(f"offset {offset} finished twice")
        entry.done = True
        self._unfinished -= 1
        return entry.produced_at_ms

    def produced_at(self, offset: int) -> int | None:
        """The Kafka timestamp (ms) of the record at ``offset`` while it is not behind the
        committed offset."""
        entry = self._by_offset.get(offset)
        return entry.produced_at_ms if entry is not None else None

    def is_open(self, offset: int) -> bool:
        entry = self._by_offset.get(offset)
        return entry is not None and not entry.done

    def snapshot(self) -> tuple[int | None, str]:
        """The offset to commit now and its metadata (the finished records beyond it)."""
        entries = self._entries
        if self.base is None and entries:
            self.base = entries[0].offset  # never committed: we started at the log's beginning
        while entries and entries[0].done:
            entry = entries.popleft()
            del self._by_offset[entry.offset]
            self.base = entry.offset + 1
        if self.base is None:
            return None, ""
        self._finished_before = {o for o in self._finished_before if o >= self.base}
        finished = sorted({e.offset for e in entries if e.done} | self._finished_before)
        return self.base, encode_finished(self.base, finished)

    def oldest_unfinished_seconds(self) -> float:
        for entry in self._entries:
            if not entry.done:
                return max(0.0, self._clock() - entry.started_at)
        return 0.0

    @property
    def unfinished(self) -> int:
        return self._unfinished

    def __len__(self) -> int:
        return len(self._entries)
