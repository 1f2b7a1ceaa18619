"""A bind watch (:class:`Watch`): when to look at a refreshed device again, and when to give up
(pure; no I/O).

After ``credential-updated`` the new hardware must connect and bind with the verifyCode. With a
non-zero ``timeout`` the platform deletes the registration of a device that has not bound when
the timeout passes, so the watch ends then (after a short grace for the platform's own
``expired`` push): ``BIND_EXPIRED``. With ``timeout`` 0 nothing expires, and the watch gives up
after ``REBIND_BIND__WATCH_DEADLINE_SECONDS``: ``BIND_NOT_CONFIRMED``. In between, when polling is
on, the activation status is read at growing intervals (in the budget's poll share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from service.bind.schedule import REPEAT_SPACING, PollGrid, PollSlots
from service.config import BindSettings, PlatformSettings

NEAR_EXPIRY_FRACTION = 0.2
"""A watched device with this fraction of its timeout left, or less, is near expiry."""


@dataclass(frozen=True, slots=True)
class Watch:
    """A refreshed device watched until its new hardware binds. Times are epoch milliseconds.

    ``expires``: the refresh set a non-zero ``timeout``, so at ``expires_at_ms`` the platform
    deletes the registration of a device that has not bound; otherwise the watch gives up at
    ``deadline_ms``. ``next_poll_ms`` is None when the service does not poll.
    """

    refreshed_ms: int
    deadline_ms: int
    expires: bool
    expires_at_ms: int | None
    next_poll_ms: int | None
    polls: int = 0

    @property
    def due_ms(self) -> int:
        if self.next_poll_ms is None:
            return self.deadline_ms
        return min(self.next_poll_ms, self.deadline_ms)


@dataclass(frozen=True, slots=True)
class WatchPolicy:
    poll: bool
    poll_initial_ms: int
    poll_max_ms: int
    watch_deadline_ms: int
    grace_ms: int
    grid: PollGrid | None = None
    """The application's poll slots (:mod:`service.bind.schedule`); None: the plain backoff."""

    @classmethod
    def from_settings(
        cls, settings: BindSettings, platform: PlatformSettings | None = None
    ) -> WatchPolicy:
        grid = (
            PollGrid.for_budget(
                poll_share=settings.poll_budget_share,
                rate_limit=platform.rate_limit_per_minute,
                window_seconds=platform.rate_window_seconds,
            )
            if platform is not None and settings.poll_schedule == "grid"
            else None
        )
        return cls(
            poll=settings.poll,
            poll_initial_ms=int(settings.poll_initial_seconds * 1000),
            poll_max_ms=int(settings.poll_max_seconds * 1000),
            watch_deadline_ms=int(settings.watch_deadline_seconds * 1000),
            grace_ms=int(settings.expiry_grace_seconds * 1000),
            grid=grid,
        )

    def slots(self, partition: int, partitions: int) -> PollSlots | None:
        """The lane of input partition ``partition`` of ``partitions`` (None without a grid)."""
        if self.grid is None or not self.poll:
            return None
        return PollSlots(self.grid.with_lanes(partitions), partition)

    def start(
        self,
        refreshed_ms: int,
        timeout_seconds: int,
        slots: PollSlots | None = None,
        device: str = "",
    ) -> Watch:
        expires = timeout_seconds > 0
        expires_at = refreshed_ms + timeout_seconds * 1000 if expires else None
        deadline = (
            expires_at + self.grace_ms
            if expires_at is not None
            else refreshed_ms + self.watch_deadline_ms
        )
        first = refreshed_ms + self.poll_initial_ms if self.poll else None
        return Watch(
            refreshed_ms=refreshed_ms,
            deadline_ms=deadline,
            expires=expires,
            expires_at_ms=expires_at,
            next_poll_ms=None if first is None else _slotted(first, deadline, slots, device),
        )

    def after_poll(
        self, watch: Watch, now_ms: int, slots: PollSlots | None = None, device: str = ""
    ) -> Watch:
        """The watch after a poll that saw no bind: the next poll, doubling up to the maximum,
        never later than the deadline. With ``slots``, on the first free slot at or after that;
        an old watch of timeout 0 also waits for the lane's spacing (:meth:`_spaced`)."""
        polls = watch.polls + 1
        interval = self._interval(polls)
        target = now_ms + interval
        if slots is not None and self._spaced(watch, interval):
            target = max(target, now_ms + math.ceil(slots.spacing_ms(device)))
        return replace(
            watch, polls=polls, next_poll_ms=_slotted(target, watch.deadline_ms, slots, device)
        )

    def _interval(self, polls: int) -> int:
        return int(min(self.poll_max_ms, self.poll_initial_ms * 2 ** min(polls, 30)))

    def _spaced(self, watch: Watch, interval: int) -> bool:
        """An old watch of timeout 0 (its backoff has reached ``poll_max``) is spaced by the
        count of watches; a young one (still doubling: most devices bind within minutes) and
        one that expires keep their backoff."""
        return not watch.expires and interval >= self.poll_max_ms

    def replace_loaded(
        self, watch: Watch, now_ms: int, slots: PollSlots, device: str, rank: int
    ) -> Watch:
        """A loaded watch whose next poll is on no free slot of its lane: a young or expiring
        one on the first free slot at or after its time (now at the earliest); an old one of
        timeout 0, the ``rank``-th of those placed again, on every other slot of the lane from
        now (:data:`~service.bind.schedule.REPEAT_SPACING`), so they spread as they would at
        their steady state and leave the near slots half free."""
        target = max(watch.next_poll_ms or now_ms, now_ms)
        if self._spaced(watch, self._interval(watch.polls)):
            spread = REPEAT_SPACING * rank * slots.grid.lane_period_ms
            target = max(target, now_ms + math.ceil(spread))
        return replace(watch, next_poll_ms=_slotted(target, watch.deadline_ms, slots, device))

    def is_old(self, watch: Watch) -> bool:
        """An old watch of timeout 0: spaced by the count of watches (:meth:`_spaced`)."""
        return self._spaced(watch, self._interval(watch.polls))


def _slotted(target_ms: int, deadline_ms: int, slots: PollSlots | None, device: str) -> int:
    """The next poll's time: ``target_ms`` (or, with ``slots``, the first free slot at or
    after it), never later than the deadline; a poll at the deadline holds no slot."""
    if slots is None:
        return min(target_ms, deadline_ms)
    if target_ms < deadline_ms:
        at = slots.place(device, target_ms)
        if at < deadline_ms:
            return at
    slots.release(device)
    return deadline_ms


def near_expiry(watch: Watch, now_ms: int) -> bool:
    """True for a device whose registration the platform deletes soon if it does not bind."""
    if watch.expires_at_ms is None:
        return False
    total = watch.expires_at_ms - watch.refreshed_ms
    return watch.expires_at_ms - now_ms <= NEAR_EXPIRY_FRACTION * total
