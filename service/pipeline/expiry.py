"""Ledger entries that expire: the ledger follows a retention, not the fleet's history.

A device's ``done`` entry only answers "is a new swap of this device the latest?". Once the
entry's swap is older than the retention (``REBIND_LEDGER__RETENTION_DAYS``), the owner of the
partition removes it: a tombstone for the device's key in the partition's transaction, and the
entry dropped from memory. In exchange, a swap whose own ``time`` is older than the retention is
not worked on: its device's entry may be gone, so nothing proves it is the latest any more, and
applying it could roll the device back to an older nodeId. It is answered ``rebind-failed``
``SWAP_TOO_OLD`` without a call (``device-rebind replay --fresh-time`` re-issues it on purpose).

An entry's age is its swap's CloudEvent ``time`` (its order's first half), not the time it was
decided: the time is in the ledger record, so every owner judges an entry the same way, and it is
the very time the stale-swap check compares. Hence the argument of safety: an entry expires only
when its time is before ``now - retention - margin``; any swap of the device older than that entry
is older still, so it arrives too old and is answered ``SWAP_TOO_OLD``, never applied. The margin
(an hour) covers clocks of two replicas that disagree: the replica that expires and the one that
later judges a swap may read different wall clocks.

The sweep is incremental: each wake step looks at a bounded number of slots of the packed table
(:data:`SWEEP_SCAN`) and removes at most :data:`SWEEP_LIMIT` entries, so a step never scans the
partition and never writes more than a batch of tombstones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from service.pipeline.ledger import DeviceLedger, Entry
from service.pipeline.records import Output
from service.pipeline.work import Work

EXPIRY_MARGIN_MS: Final = 3_600_000
"""An entry expires an hour after a swap of its time starts being answered too old."""
SWEEP_SCAN: Final = 2_048
"""Slots of the packed table looked at per wake step (4 steps a second: a partition of 1M
devices, 2 to 4M slots, is swept in about 4 to 8 minutes)."""
SWEEP_LIMIT: Final = 128
"""Entries removed per wake step at most (so at most that many tombstones per step)."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the ledger remembers a device whose swap is done."""

    retention_ms: int
    margin_ms: int = EXPIRY_MARGIN_MS
    scan: int = SWEEP_SCAN
    limit: int = SWEEP_LIMIT

    def horizon_ms(self, now_ms: int) -> int:
        """Swaps dated before this are too old to be worked on."""
        return now_ms - self.retention_ms

    def too_old(self, time_ms: int, now_ms: int) -> bool:
        return time_ms < self.horizon_ms(now_ms)

    def stale(self, work: Work, prior: Entry | None, now_ms: int) -> bool:
        """Is ``work`` (a swap read from the input) too old to be worked on? Not when the
        ledger still knows enough to judge it: the same event (a repeat, accepted while it was
        young) or a newer swap of the device (it is answered SUPERSEDED, as before)."""
        if not self.too_old(work.order[0], now_ms):
            return False
        return prior is None or not (prior.same_event(work) or work.order < prior.order)

    def describe(self, work: Work, now_ms: int) -> str:
        days = self.retention_ms / 86_400_000
        return (
            f"the swap's time ({work.order[0]} ms) is older than the ledger's retention "
            f"({days:g} days, REBIND_LEDGER__RETENTION_DAYS; horizon {self.horizon_ms(now_ms)} "
            "ms): the device's entry may have expired, so this swap cannot be proven the latest"
        )

    def sweep(self, ledger: DeviceLedger, now_ms: int) -> list[Output]:
        """One step of the sweep: tombstones of the entries it removed from ``ledger``."""
        horizon = self.horizon_ms(now_ms) - self.margin_ms
        return [ledger.tombstone(d) for d in ledger.expire(horizon, self.scan, self.limit)]
