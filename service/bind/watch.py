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

from dataclasses import dataclass, replace

from service.config import BindSettings

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

    @classmethod
    def from_settings(cls, settings: BindSettings) -> WatchPolicy:
        return cls(
            poll=settings.poll,
            poll_initial_ms=int(settings.poll_initial_seconds * 1000),
            poll_max_ms=int(settings.poll_max_seconds * 1000),
            watch_deadline_ms=int(settings.watch_deadline_seconds * 1000),
            grace_ms=int(settings.expiry_grace_seconds * 1000),
        )

    def start(self, refreshed_ms: int, timeout_seconds: int) -> Watch:
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
            next_poll_ms=None if first is None else min(first, deadline),
        )

    def after_poll(self, watch: Watch, now_ms: int) -> Watch:
        """The watch after a poll that saw no bind: the next poll, doubling up to the maximum,
        never later than the deadline."""
        polls = watch.polls + 1
        interval = min(self.poll_max_ms, self.poll_initial_ms * 2 ** min(polls, 30))
        return replace(watch, polls=polls, next_poll_ms=min(now_ms + interval, watch.deadline_ms))


def near_expiry(watch: Watch, now_ms: int) -> bool:
    """True for a device whose registration the platform deletes soon if it does not bind."""
    if watch.expires_at_ms is None:
        return False
    total = watch.expires_at_ms - watch.refreshed_ms
    return watch.expires_at_ms - now_ms <= NEAR_EXPIRY_FRACTION * total
