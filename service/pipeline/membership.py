"""The proof that the group still counts this member: the call guard of every job's calls.

The last heartbeat the coordinator accepted (or the last assignment) proves membership. A call
of a swap leaves only while that proof is younger than the session timeout less one heartbeat
interval (and a second): until then the group cannot have given the partition away
(:mod:`service.ownership`). :meth:`MembershipProof.wait_owner` is the guard: it returns while
the proof is fresh, waits while it is stale (a frozen or cut-off member: the next heartbeat
says), and cancels the call once the partition moves away or the pipeline stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import structlog

from service.pipeline.input_hold import WAKE_INTERVAL_SECONDS
from service.pipeline.partition_core import PartitionCore

log = structlog.get_logger(__name__)


class MembershipProof:
    """When this member was last counted by the group, and whether that is recent enough."""

    def __init__(
        self,
        session_timeout_ms: int,
        *,
        cores: dict[int, PartitionCore],
        stopping: asyncio.Event,
    ) -> None:
        session = session_timeout_ms / 1000
        self.heartbeat_seconds = max(1.0, session / 10)
        self.bound = max(1.0, session - max(1.0, self.heartbeat_seconds))
        self.at = -math.inf
        self._event = asyncio.Event()
        self._cores = cores
        self._stopping = stopping

    def proved(self, at: float | None = None) -> None:
        """The group accepted a heartbeat sent at ``at`` (or assigned partitions: now): still a
        member as of then."""
        self.at = max(self.at, time.monotonic() if at is None else at)
        self._event.set()

    def unobservable(self) -> None:
        """Heartbeats cannot be observed: assignments are the only proof, and never go stale."""
        self.bound = math.inf

    def fresh(self) -> bool:
        """True while this member has recent proof that the group still counts it."""
        return time.monotonic() - self.at < self.bound

    async def wait_owner(self, core: PartitionCore) -> None:
        """The call guard of ``core``'s jobs: return while the member owns the partition with
        fresh proof; wait while the proof is stale (frozen, cut off: the next heartbeat says);
        CancelledError once the partition moves away or the pipeline stops."""
        warned = False
        while True:
            if (
                core.closed
                or core.closing
                or self._stopping.is_set()
                or self._cores.get(core.partition) is not core  # dropped, or opened anew
            ):
                raise asyncio.CancelledError
            if self.fresh():
                return
            if not warned:
                warned = True
                log.warning(
                    "ownership_proof_stale",
                    action="the call waits",
                    partition=core.partition,
                    proof_age=round(time.monotonic() - self.at, 1),
                )
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), WAKE_INTERVAL_SECONDS)
