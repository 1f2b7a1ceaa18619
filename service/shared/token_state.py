"""What one replica knows of the shared token (docs/tokens.md): shared by its reader, its
followers' side and, while it holds, its holder loop."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from service.shared.token_records import SharedToken, fingerprint

EXPIRY_GUARD_SECONDS: Final = 1.0
"""A token this close to its expiry is no longer handed out."""


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait until ``event`` is set or ``timeout`` passes.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that arrives just as the
    awaited event fires, which left a cancelled waiter looping on.
    """
    if event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
    finally:
        waiter.cancel()


@dataclass(frozen=True, slots=True)
class Rotation:
    """A *rotating* record newer than the token held: hold new calls until the next token."""

    sequence: int
    by: str
    seen_at: float
    calling: bool = True
    """The holder announced its platform call (not only the rotation): if no token follows,
    the refresh may have replaced the token and spent the refresh token."""


class TokenState:
    """The newest token, a rotation under way, the refused tokens, the calls on the wire."""

    def __init__(
        self,
        instance: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.instance = instance
        self.clock = clock
        self.wall = wall
        self.latest: SharedToken | None = None
        self.rotation: Rotation | None = None
        self.refused: set[str] = set()
        """Fingerprints of tokens refused (by us or a notice): never handed out again."""
        self.inflight: Counter[str] = Counter()
        """Calls on the wire, by token."""
        self.sequence = 0
        """The highest sequence this replica wrote."""
        self.blocked_sequence: int | None = None
        self.demand = False
        """Someone needs a token: until then a holder without one does not log in (lazily, so
        a single replica's wrong secret shows at its first swap)."""
        self._changed = asyncio.Event()

    def signal(self) -> None:
        """Something changed: wake everyone waiting for a token or a drain."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> None:
        await wait_event(self._changed, timeout)

    def usable(self, token: SharedToken | None) -> bool:
        return (
            token is not None
            and self.wall() < token.expires_at - EXPIRY_GUARD_SECONDS
            and fingerprint(token.access) not in self.refused
        )

    def is_refused(self, access: str) -> bool:
        return fingerprint(access) in self.refused

    def next_sequence(self) -> int:
        """One more than the highest sequence seen or written."""
        seen = self.latest.sequence if self.latest is not None else None
        rotation = self.rotation.sequence if self.rotation is not None else None
        self.sequence = max(self.sequence, seen or 0, rotation or 0, self.blocked_sequence or 0) + 1
        return self.sequence
