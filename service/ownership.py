"""Who may call the platform for a swap: only the member that owns its partition right now.

A replica frozen past its session timeout (a paused pod, a long GC, a cut network) is dropped from
the consumer group and its partitions go to another member, but nothing tells the frozen process
until its next heartbeat fails. When it wakes, every timer that ran out meanwhile fires at once: a
retry of swap A could reach the platform after the new owner applied swap B, leaving the device on
the older nodeId. The pipeline therefore binds a *call guard* to every job (a context variable),
and the platform client awaits it right before each call leaves: the guard returns while the
member has proof that it still owns the partition (a recent successful heartbeat or assignment),
waits while it has none, and raises ``CancelledError`` once the partition moves away (the job is
then abandoned, as at any hand-over, and the next owner does it).

It lives here, below both the pipeline (which binds it) and the platform client (which awaits it),
so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar

CallGuard = Callable[[], Awaitable[None]]

CALL_GUARD: ContextVar[CallGuard | None] = ContextVar("rebind_call_guard", default=None)
"""The guard of the job running in this task; None: calls that belong to no partition (logins,
token refreshes, the bind subscription) are not guarded."""


async def await_call_guard() -> None:
    """Return when the current job may call the platform; raise CancelledError when it may not
    any more (its partition moved away)."""
    guard = CALL_GUARD.get()
    if guard is not None:
        await guard()
