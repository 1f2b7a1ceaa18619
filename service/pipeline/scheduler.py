"""Per-device order, concurrency across devices, urgent devices first.

Jobs with the same key run one after another in submission order; jobs with different keys
run in parallel, at most ``concurrency`` at a time. A key's queue lives only while it has work,
so memory follows the work in flight, not the number of devices ever seen.

A key with an urgent job queued (a swap of the urgent lane) waits for its slot before every other
key, and may take one of ``urgent_extra`` slots beyond ``concurrency``: bulk jobs hold their slots
while they wait for the platform budget, so under a bulk backlog every ordinary slot is taken,
and an urgent swap must not wait for one of them to finish. A key's earlier (bulk) jobs ride
its urgent slot: per-device order holds, and an older swap is answered ``SUPERSEDED`` at its claim
without a call when the urgent swap is newer.

Ordinary slots go round the groups (input partitions) that have keys waiting, one key of each in
turn; within a group, first come first served. A backlog read a partition at a time (the consumer
fills the buffer from one partition's fetch before the next) would otherwise be worked a
partition at a time: one partition's devices for a minute while the others wait, and every bind
watch of that minute in its partition's lane of the poll grid, polled at a sixth of the poll
share while the other lanes' slots went unused (``make bench`` section 16).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Awaitable, Callable

import structlog

Job = Callable[[], Awaitable[None]]

log = structlog.get_logger(__name__)


Waiter = tuple[str, asyncio.Future[None]]


class _Slots:
    """``concurrency`` slots, plus ``extra`` that only urgent keys take; urgent waiters first,
    then the groups' waiters in turn. Waiters: one per key at most (its drain), so bounded by
    the keys queued; groups: those with a key waiting."""

    def __init__(self, concurrency: int, extra: int) -> None:
        self._n = concurrency
        self._extra = extra
        self.used = 0
        self._bulk: dict[int, deque[Waiter]] = {}  # group -> its waiters; order: whose turn
        self._urgent: deque[Waiter] = deque()
        self._waiting: dict[str, tuple[asyncio.Future[None], int]] = {}

    def _room(self, urgent: bool) -> bool:
        return self.used < self._n + (self._extra if urgent else 0)

    async def acquire(self, key: str, urgent: bool, group: int = 0) -> None:
        if self._room(urgent) and not self._urgent and (urgent or not self._bulk):
            self.used += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if urgent:
            self._urgent.append((key, fut))
        else:
            self._bulk.setdefault(group, deque()).append((key, fut))
        self._waiting[key] = (fut, group)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as it was cancelled: give it back
            raise
        finally:
            self._waiting.pop(key, None)

    def promote(self, key: str) -> None:
        """The key now has an urgent job: if it waits for an ordinary slot, it waits first."""
        fut, group = self._waiting.get(key, (None, 0))
        queue = self._bulk.get(group)
        if fut is None or queue is None or (key, fut) not in queue:
            return
        queue.remove((key, fut))
        if not queue:
            del self._bulk[group]
        self._urgent.append((key, fut))
        self._wake()

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def _wake(self) -> None:
        queue = self._urgent
        while queue and (queue[0][1].done() or self._room(True)):
            self._grant(queue.popleft()[1])
        if queue:
            return  # urgent waiters are left: no ordinary one goes before them
        while self._bulk and self._room(False):
            group, waiters = next(iter(self._bulk.items()))
            del self._bulk[group]
            while waiters and waiters[0][1].done():
                waiters.popleft()
            if waiters:
                self._grant(waiters.popleft()[1])
            if waiters:
                self._bulk[group] = waiters  # its next key waits for the other groups' turn

    def _grant(self, fut: asyncio.Future[None]) -> None:
        if not fut.done():
            self.used += 1
            fut.set_result(None)


class KeyedScheduler:
    def __init__(self, concurrency: int, urgent_extra: int | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        extra = max(1, concurrency // 4) if urgent_extra is None else urgent_extra
        self._slots = _Slots(concurrency, extra)
        self._queues: dict[str, deque[tuple[Job, bool]]] = {}
        self._groups: dict[str, int] = {}  # key -> its group, while it has work (as _queues)
        self._urgent: Counter[str] = Counter()  # urgent jobs queued, per key (bounded by them)
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = 0
        self._closing = False

    def close(self) -> None:
        """Start no new job: those running finish, those queued are left (never started)."""
        self._closing = True

    def submit(self, key: str, job: Job, *, urgent: bool = False, group: int = 0) -> None:
        """Queue ``job`` behind the key's earlier ones. ``group``: the key's input partition
        (ordinary slots go round the groups); a key keeps the group of its first queued job."""
        if urgent:
            self._urgent[key] += 1
        queue = self._queues.get(key)
        if queue is not None:
            queue.append((job, urgent))
            if urgent:
                self._slots.promote(key)
            return
        self._queues[key] = deque(((job, urgent),))
        self._groups[key] = group
        task = asyncio.get_running_loop().create_task(self._drain(key), name=f"device:{key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, key: str) -> None:
        queue = self._queues[key]
        try:
            while queue and not self._closing:
                job, urgent = queue[0]
                await self._slots.acquire(key, self._urgent[key] > 0, self._groups[key])
                try:
                    if self._closing:
                        break
                    self._running += 1
                    try:
                        await job()
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # a job reports its own failures; never stop the key
                        log.exception("job_failed", key=key)
                    finally:
                        self._running -= 1
                finally:
                    self._slots.release()
                queue.popleft()
                self._unmark(key, urgent)
        finally:
            for _, urgent in queue:
                self._unmark(key, urgent)
            del self._queues[key]
            del self._groups[key]

    def _unmark(self, key: str, urgent: bool) -> None:
        if urgent:
            self._urgent[key] -= 1
            if self._urgent[key] <= 0:
                del self._urgent[key]

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued_keys(self) -> int:
        return len(self._queues)

    async def join(self, timeout: float | None = None) -> bool:
        """Wait until every job has run; False if the timeout passed first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._tasks:  # jobs submitted while waiting are waited for too
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        # On Python 3.11 a cancellation can be swallowed (``asyncio.wait_for`` returns an inner
        # result that is ready at the same moment, gh-86296): a job would go on retrying. Repeat
        # the request until every task has ended.
        pending = tasks
        while pending:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.1)
            pending = [task for task in pending if not task.done()]
            if pending:
                log.warning("jobs_still_running", action="cancelling again", jobs=len(pending))
        await asyncio.gather(*tasks, return_exceptions=True)
