"""Which offsets of a partition are finished, and how far the partition may be committed.

Work finishes out of order (devices run in parallel), but a partition is committed only up to
its first unfinished offset, so nothing is ever committed for unfinished work. The outputs of
finished work wait here until they can be committed together with that frontier: publishing
them earlier could publish an outcome twice after a crash.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Output:
    """A record to produce in the same transaction as the offset it answers."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    outcome: str = ""  # the metrics label of the outcome this record carries, "" for none
    partition: int | None = None  # explicit partition (co-partitioned service topics)


@dataclass(slots=True)
class _Entry:
    offset: int
    done: bool = False
    outputs: tuple[Output, ...] = ()
    produced_at_ms: int | None = None


class PartitionTracker:
    """Offsets of one partition handed to workers, in the order they were read."""

    __slots__ = ("_by_offset", "_entries", "_unfinished")

    def __init__(self) -> None:
        self._entries: deque[_Entry] = deque()
        self._by_offset: dict[int, _Entry] = {}
        self._unfinished = 0

    def start(self, offset: int, produced_at_ms: int | None = None) -> None:
        if self._entries and offset <= self._entries[-1].offset:
            raise ValueError(f"offset {offset} is not after {self._entries[-1].offset}")
        entry = _Entry(offset, produced_at_ms=produced_at_ms)
        self._entries.append(entry)
        self._by_offset[offset] = entry
        self._unfinished += 1

    def finish(self, offset: int, outputs: Iterable[Output] = ()) -> None:
        entry = self._by_offset[offset]
        if entry.done:
            raise ValueError(f"offset {offset} finished twice")
        entry.done = True
        entry.outputs = tuple(outputs)
        self._unfinished -= 1

    def take_committable(self) -> tuple[int | None, list[Output], list[int]]:
        """Pop the finished prefix: (offset to commit, its outputs, produce timestamps)."""
        outputs: list[Output] = []
        stamps: list[int] = []
        last: int | None = None
        entries = self._entries
        while entries and entries[0].done:
            entry = entries.popleft()
            del self._by_offset[entry.offset]
            outputs.extend(entry.outputs)
            if entry.produced_at_ms is not None:
                stamps.append(entry.produced_at_ms)
            last = entry.offset
        return (None if last is None else last + 1), outputs, stamps

    @property
    def unfinished(self) -> int:
        return self._unfinished

    @property
    def finished_waiting(self) -> int:
        """Finished entries held back by an unfinished one before them."""
        return len(self._entries) - self._unfinished

    def __len__(self) -> int:
        return len(self._entries)
