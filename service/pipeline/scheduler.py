"""Per-device order, concurrency across devices.

Jobs with the same key run one after another in submission order; jobs with different keys
run in parallel, at most ``concurrency`` at a time. A key's queue lives only while it has work,
so memory follows the work in flight, not the number of devices ever seen.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import structlog

Job = Callable[[], Awaitable[None]]

log = structlog.get_logger(__name__)


class KeyedScheduler:
    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._slots = asyncio.Semaphore(concurrency)
        self._queues: dict[str, deque[Job]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = 0
        self._closing = False

    def close(self) -> None:
        """Start no new job: those running finish, those queued are left (never started)."""
        self._closing = True

    def submit(self, key: str, job: Job) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)
            return
        self._queues[key] = deque((job,))
        task = asyncio.get_running_loop().create_task(self._drain(key), name=f"device:{key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, key: str) -> None:
        queue = self._queues[key]
        try:
            while queue and not self._closing:
                job = queue[0]
                async with self._slots:
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
                queue.popleft()
        finally:
            del self._queues[key]

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
