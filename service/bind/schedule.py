"""The poll schedule of bind watches (pure; no I/O): polls fit the budget's poll share whatever
the number of watched devices.

**The grid.** The application may make ``capacity = floor(poll_share * N)`` polls in a window of
``window_ms`` (N calls per window, the platform's flow control). Time is cut into slots, slot
``k`` at ``k * window_ms // capacity`` epoch milliseconds: any half-open window of
``window_ms`` holds at most ``capacity`` slots. A poll is only ever scheduled on a free slot,
one poll per slot, so the polls due in any window never exceed the share, for 10 or 100,000
watched devices: more devices make the polls of each one rarer, never the polls more numerous.

**Lanes.** Slot ``k`` belongs to input partition ``k % lanes`` (``lanes``: the input's partition
count). Each partition schedules on its own lane, alone, with no coordination: whichever replica
owns it, the application's polls still fit the grid, and a partition that moves keeps its
slots (the next poll's time travels in the ledger record).

**Which slot.** A poll asks for the first free slot of its lane at or after a target time:

* the first poll of a refreshed device targets ``refresh + poll_initial`` (most devices bind
  within minutes, so the first look is early and nothing spaced-out is put before it);
* after a poll that saw no bind, a young watch (its interval still doubling from
  ``poll_initial`` to ``poll_max``: 15 s, 30 s, ... 240 s, the first ~8 minutes at the
  defaults, when most devices bind) and a watch with a non-zero timeout (the platform deletes
  such a device at its timeout) target ``now + backoff``: looked at as closely as the lane
  allows;
* an old watch with timeout 0 (its interval at ``poll_max``; given up only at the 24 h
  deadline, the ones that pile up) targets
  ``now + max(backoff, REPEAT_SPACING * n * lane_period)``, ``n`` the other watches of the lane
  holding a slot and ``lane_period = lanes * window_ms / capacity`` (so ``n * lane_period`` is
  the time the lane needs to poll every one of them once). With ``REPEAT_SPACING`` 2 the old
  watches hold at most about half of the lane's slots: the other half stays free near ``now``
  for first polls, young watches and watches that expire, whatever the count;
* a target at or beyond the watch's deadline takes no slot: the watch's last look is at its
  deadline (one poll per watch ending; the budget's cap still holds it to the share).

The state is one slot per watched device of the partition (:class:`PollSlots`), released when
its watch ends, and reconciled against the partition's watches when it holds more than twice as
many (plus 64): at most ``2 * watched + 64`` items.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

REPEAT_SPACING = 2
"""Timeout-0 repeats are spaced by this many turns of the lane over the other watches: they
leave about half of the slots free for first polls and for watches that expire."""

RECONCILE_SLACK = 64
"""Items kept beyond twice the watched devices before the table is reconciled with them."""


@dataclass(frozen=True, slots=True)
class PollGrid:
    """The application-wide slots: ``capacity`` polls per ``window_ms``, cut in ``lanes``."""

    window_ms: int
    capacity: int
    lanes: int = 1

    def __post_init__(self) -> None:
        if self.window_ms < 1 or self.capacity < 1 or self.lanes < 1:
            raise ValueError("window_ms, capacity and lanes must be at least 1")

    @classmethod
    def for_budget(
        cls, *, poll_share: float, rate_limit: int, window_seconds: float, lanes: int = 1
    ) -> PollGrid:
        """The grid of a poll share of ``rate_limit`` calls per ``window_seconds``: the same
        floor as the budget's cap."""
        capacity = max(1, math.floor(poll_share * rate_limit + 1e-9))
        return cls(window_ms=int(window_seconds * 1000), capacity=capacity, lanes=max(1, lanes))

    def slot_ms(self, k: int) -> int:
        """The time of slot ``k`` (epoch ms)."""
        return k * self.window_ms // self.capacity

    def first_slot(self, at_least_ms: int) -> int:
        """The first slot whose time is at or after ``at_least_ms``."""
        return -(-at_least_ms * self.capacity // self.window_ms)

    @property
    def lane_period_ms(self) -> float:
        """Time between two slots of one lane."""
        return self.lanes * self.window_ms / self.capacity

    def with_lanes(self, lanes: int) -> PollGrid:
        return PollGrid(self.window_ms, self.capacity, max(1, lanes))


class PollSlots:
    """One input partition's lane of the grid: which device holds which slot."""

    def __init__(self, grid: PollGrid, lane: int) -> None:
        self.grid = grid
        self.lane = lane % grid.lanes
        self._device_of: dict[int, str] = {}  # slot -> device (one slot per device)
        self._slot_of: dict[str, int] = {}  # device -> slot
        # Taken slot -> a later slot of the lane to look at next (path-compressed skips over
        # runs of taken slots); only taken slots have one.
        self._skip: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._slot_of)

    def slot_of(self, device: str) -> int | None:
        return self._slot_of.get(device)

    def _lane_slot(self, at_least_ms: int) -> int:
        k = self.grid.first_slot(at_least_ms)
        lanes = self.grid.lanes
        return k + (self.lane - k) % lanes

    def _free_from(self, k: int) -> int:
        path: list[int] = []
        while k in self._device_of:
            path.append(k)
            k = self._skip.get(k, k + self.grid.lanes)
        for taken in path:
            self._skip[taken] = k
        return k

    def place(self, device: str, at_least_ms: int) -> int:
        """Give ``device`` the first free slot of the lane at or after ``at_least_ms`` (its
        previous slot is released); returns the slot's time."""
        self.release(device)
        k = self._free_from(self._lane_slot(at_least_ms))
        self._device_of[k] = device
        self._slot_of[device] = k
        return self.grid.slot_ms(k)

    def adopt(self, device: str, at_ms: int) -> None:
        """A watch loaded with its next poll already on a slot of this lane (set by an earlier
        owner of the partition): the slot is taken again, unless another device holds it."""
        k = self.grid.first_slot(at_ms)
        if self.grid.slot_ms(k) != at_ms or k % self.grid.lanes != self.lane:
            return
        if k not in self._device_of:
            self.release(device)
            self._device_of[k] = device
            self._slot_of[device] = k

    def release(self, device: str) -> None:
        k = self._slot_of.pop(device, None)
        if k is not None:
            del self._device_of[k]
            self._skip.pop(k, None)

    def spacing_ms(self, device: str) -> float:
        """The spacing of a timeout-0 repeat: :data:`REPEAT_SPACING` times the time the lane
        needs to poll once every other device that holds a slot."""
        others = len(self._slot_of) - (device in self._slot_of)
        return REPEAT_SPACING * others * self.grid.lane_period_ms

    def reconcile(self, watched: Collection[str]) -> None:
        """Release the slots of devices no longer watched, when the table has grown past twice
        the watched devices (plus :data:`RECONCILE_SLACK`): keeps it bounded by them."""
        if len(self._slot_of) <= 2 * len(watched) + RECONCILE_SLACK:
            return
        for device in [d for d in self._slot_of if d not in watched]:
            self.release(device)

    def slot_times(self) -> list[int]:
        """The times of the taken slots (for tests)."""
        return sorted(self.grid.slot_ms(k) for k in self._device_of)
