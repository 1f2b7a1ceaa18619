"""Replicas of the service's budget on virtual time: real RateBudgets and BudgetExchanges, an
in-memory topic, eager rebalances, kills and restarts, every replica granting greedily.

Only the platform side is left out: every grant is a call, counted at the time it was granted.
Each replica has its own monotonic clock (a random offset) and converts to one shared wall clock,
as hosts with synchronised clocks do.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.platform.budget import RateBudget
from service.shared.budget_exchange import BudgetExchange

WALL0 = 1_700_000_000.0
"""Wall-clock epoch seconds at virtual time 0."""
SCOPE = "group/app"


class MemoryTopic:
    """The compacted budget topic, uncompacted: records in order."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes | None]] = []

    async def append(self, key: bytes, value: bytes) -> float | None:
        self.records.append((key, value))
        return None  # no broker append time: the replicas anchor to their wall clocks

    def read_from(self, position: int) -> Sequence[tuple[bytes | None, bytes | None]]:
        return self.records[position:]


def max_in_any_window(times: Sequence[float], window: float = 60.0) -> int:
    """The largest number of calls in any half-open window [t, t + window)."""
    ts = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ts):
        while t - ts[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def range_assign(members: Sequence[str], partitions: int) -> dict[str, int]:
    """Partitions per member, as Kafka's range assignor gives them (sorted member ids)."""
    ordered = sorted(members)
    per, extra = divmod(partitions, len(ordered))
    return {m: per + (1 if i < extra else 0) for i, m in enumerate(ordered)}


@dataclass
class Replica:
    name: str
    budget: RateBudget
    exchange: BudgetExchange
    mono_offset: float
    alive: bool = True
    next_publish: float = 0.0
    grants: list[float] = field(default_factory=list)


class Simulation:
    """Virtual time in seconds from 0; ``calls`` are every replica's grants, in true time."""

    def __init__(
        self,
        limit: int,
        partitions: int,
        *,
        seed: int = 0,
        publish_interval: float = 2.0,
        session_timeout: float = 10.0,
    ) -> None:
        self.limit = limit
        self.partitions = partitions
        self.rng = random.Random(seed)
        self.publish_interval = publish_interval
        self.session_timeout = session_timeout
        self.now = 0.0
        self.topic = MemoryTopic()
        self.replicas: dict[str, Replica] = {}
        self.calls: list[float] = []
        self.incarnations = 0

    # ---------------------------------------------------------------- membership
    def members(self) -> list[str]:
        return sorted(n for n, r in self.replicas.items() if r.alive)

    def dead(self) -> list[str]:
        return sorted(n for n, r in self.replicas.items() if not r.alive)

    async def start(self, name: str) -> Replica:
        """A process starts (new, or again after a kill with the same instance id)."""
        mono = self.rng.uniform(0.0, 10_000.0)
        budget = RateBudget(
            self.limit,
            clock=lambda: self.now + mono,
            wall_offset=WALL0 - mono,
        )
        exchange = BudgetExchange(
            {},
            "budget",
            name,
            budget,
            scope=SCOPE,
            publish_interval=self.publish_interval,
            io=self.topic,
        )
        replica = Replica(
            name, budget, exchange, mono, next_publish=self.now + self.publish_interval
        )
        self.replicas[name] = replica
        self.incarnations += 1
        await exchange.start()
        return replica

    async def rebalance(self, *, stagger: float = 0.0, sync_delay: float = 0.0) -> None:
        """An eager rebalance among the live members: each revokes (at a random moment within
        ``stagger``), then, ``sync_delay`` after the last revocation, each is assigned."""
        members = self.members()
        if not members:
            return
        revoke_at = sorted((self.now + self.rng.uniform(0.0, stagger), m) for m in members)
        for at, name in revoke_at:
            await self.advance_to(at)
            replica = self.replicas[name]
            if replica.alive:
                await replica.exchange.on_revoked()
        await self.advance_to(self.now + sync_delay)
        members = self.members()
        shares = range_assign(members, self.partitions)
        order = list(members)
        self.rng.shuffle(order)
        for name in order:
            share = max(shares[name] / self.partitions, 1e-6)
            await self.replicas[name].exchange.on_assigned(share)
            self._grant(self.replicas[name])

    async def join(self, name: str, **kw: float) -> None:
        await self.start(name)
        await self.rebalance(**kw)

    async def leave(self, name: str, **kw: float) -> None:
        """A graceful stop: final record, then the group rebalances at once."""
        replica = self.replicas[name]
        await replica.exchange.stop()
        replica.alive = False
        await self.rebalance(**kw)

    async def kill(self, name: str, **kw: float) -> None:
        """SIGKILL: nothing more is published; the group notices after the session timeout."""
        self.replicas[name].alive = False
        await self.advance_to(self.now + self.session_timeout)
        await self.rebalance(**kw)

    # ---------------------------------------------------------------- time
    def _grant(self, replica: Replica) -> None:
        while replica.alive and replica.budget.try_acquire():
            replica.grants.append(self.now)
            self.calls.append(self.now)

    async def advance_to(self, until: float) -> None:
        """Run every replica greedily (and its periodic publication) up to ``until``."""
        while True:
            live = [self.replicas[n] for n in self.members()]
            for replica in live:
                if replica.next_publish <= self.now + 1e-12:
                    await replica.exchange.publish()
                    replica.next_publish = self.now + self.publish_interval
                self._grant(replica)
            nxt = until
            for replica in live:
                nxt = min(nxt, replica.next_publish)
                free = replica.budget.next_free_at() - replica.mono_offset
                nxt = min(nxt, max(free, self.now + 1e-3))
            if self.now >= until:
                return
            self.now = min(max(nxt, self.now), until)

    # ---------------------------------------------------------------- figures
    def per_minute(self, start: float, minutes: int) -> list[int]:
        return [
            sum(start + 60 * k <= t < start + 60 * (k + 1) for t in self.calls)
            for k in range(minutes)
        ]
