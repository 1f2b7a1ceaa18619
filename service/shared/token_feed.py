"""What this replica reads from the token topic and tells it (docs/tokens.md): the records of
the holder (token, rotating, blocked) and of the other replicas (need, refused, draining) applied
to the shared :class:`~service.shared.token_state.TokenState`, the notices this replica sends,
and the takeover of a replica that has had no token and heard no holder for the grace.

Invariants:

- records are applied in offset order; a token record older than the token held (a replay) is
  never handed out, and a holder answers it with its current token;
- a token record that does not decrypt is kept (only the last) and tried again when the secret
  changes;
- a replica sends one *refused* notice per token fingerprint, one *need* notice per starvation,
  and a *draining* notice (then its *done*) only for a rotation it has calls in flight for;
- a takeover happens only after ``takeover_after`` seconds without a usable token and without a
  holder's record, and goes through the holder's fence, so at most one replica holds.

Neither the token nor the secret is ever logged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Final

import structlog

from service.platform.tokens import AuthGate
from service.shared.token_channel import Channel
from service.shared.token_holder import HolderTokens, TokenHolder
from service.shared.token_records import (
    InvalidRecordError,
    RecordSeal,
    SharedToken,
    fingerprint,
    older,
)
from service.shared.token_state import Rotation, TokenState

log = structlog.get_logger(__name__)

MAX_REASON_CHARS: Final = 600


class TokenFeed:
    """Applies the token topic's records to the shared state; sends this replica's notices."""

    def __init__(
        self,
        state: TokenState,
        seal: RecordSeal,
        holder: TokenHolder,
        gate: AuthGate,
        *,
        instance: str,
        takeover_after: float,
        notices: Channel | None,
    ) -> None:
        self._state = state
        self._seal = seal
        self.holder = holder
        self.gate = gate
        self._instance = instance
        self._takeover_after = takeover_after
        self.notices = notices
        self._notified: set[str] = set()
        self.starving_since: float | None = None
        """Since when this replica has had no usable token (None: it has one)."""
        self._holder_heard_at: float | None = None
        """When a holder's record (token, rotating, blocked) was last read."""
        self._draining: tuple[int, str] | None = None
        """(rotation, token): this replica said it has calls in flight on ``token``."""
        self._undecrypted: tuple[bytes | None, int] | None = None
        """The last token record that did not decrypt (another secret): tried again when the
        secret changes."""
        self._orphans: set[asyncio.Task[None]] = set()
        self.takeovers = 0
        self.stale_records = 0
        """Token records ignored because they are older than the token held (replays)."""
        gate.subscribe(self._gate_changed)

    @property
    def is_holder(self) -> bool:
        return self.holder.holding

    @property
    def manager(self) -> HolderTokens:
        return self.holder.manager

    async def aclose(self) -> None:
        """Cancel the notices still being sent."""
        for task in self._orphans:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ------------------------------------------------------------------ this replica's notices
    def refused(self, fp: str) -> None:
        """This replica's call was refused the token ``fp`` (the newest it knows): tell the
        holder, once per token."""
        if fp not in self._notified:
            # Also as the holder: if it turns out to be fenced, the next holder knows.
            self._notified.add(fp)
            log.info("platform_token_rejected", action="notify_holder")
            self.notice(self._seal.refused, {"fingerprint": fp, "by": self._instance})

    def drained(self, token: str) -> None:
        """The last call in flight on ``token`` ended: a draining notice for it is done."""
        draining = self._draining
        if draining is not None and draining[1] == token:
            self._draining = None
            self.notice(
                self._seal.draining, {"rotation": draining[0], "by": self._instance, "done": True}
            )

    # ------------------------------------------------------------------ records read
    def receive(self, key: bytes | None, value: bytes | None, *, offset: int = -1) -> None:
        """Apply one record of the token topic (in offset order)."""
        seal = self._seal
        if key == seal.token:
            self._receive_token(value, offset)
            return
        handlers: dict[bytes, Callable[[dict[str, Any]], None]] = {
            seal.refused: self._receive_refused,
            seal.blocked: self._receive_blocked,
            seal.need: self._receive_need,
            seal.rotating: self._receive_rotating,
            seal.draining: self._receive_draining,
        }
        handler = handlers.get(key or b"")
        if handler is None:
            return  # another group's or application's record
        try:
            notice = seal.open(value, key or b"")
        except InvalidRecordError as exc:
            log.warning("token_record_ignored", offset=offset, reason=str(exc))
            return
        handler(notice)

    def _retry_undecrypted(self) -> None:
        """A token record that did not decrypt may be readable with a changed secret."""
        pending = self._undecrypted
        if pending is not None and self._seal.opens(pending[0], self._seal.token):
            self._undecrypted = None
            self._receive_token(*pending)

    def _receive_token(self, value: bytes | None, offset: int) -> None:
        state = self._state
        try:
            token = self._seal.open_token(value)
        except InvalidRecordError as exc:
            # Lost (a tombstone), forged, corrupt or under another secret. On the holder: the
            # record compaction keeps, and the one a replica starting later reads last, must be
            # a readable token, so the holder writes its token again (rate-limited).
            holder = self.is_holder and self.manager.current() is not None
            log.warning(
                "token_record_ignored",
                offset=offset,
                reason=str(exc),
                action="republish" if holder else "ignored",
            )
            if holder:
                self.holder.republish("unreadable_record")
            else:
                self._undecrypted = (value, offset)
            return
        self._undecrypted = None
        self._holder_heard_at = state.clock()
        if token.holder == self._instance and (token.sequence or 0) <= state.sequence:
            return  # our own record, read back (maybe after a newer one we published)
        previous = state.latest
        if previous is not None and older(token, previous):
            # A record published before the one held: a captured record written again, or a
            # late duplicate. Using it would hand out a dead token. The holder answers it with
            # its current token, so the topic's last record (what compaction keeps, what a new
            # replica reads last) is the current one again.
            self.stale_records += 1
            log.warning(
                "token_record_stale",
                offset=offset,
                record_sequence=token.sequence,
                held_sequence=previous.sequence,
                record_holder=token.holder,
                action="republish" if self.is_holder else "ignored",
            )
            if self.is_holder:
                self.holder.republish("stale_record")
            return
        self.take(token)
        if previous is None or previous.access != token.access:
            log.info(
                "shared_token_received",
                holder=token.holder,
                offset=offset,
                expires_in=round(token.expires_at - state.wall(), 1),
            )
        if token.holder != self._instance and self.is_holder:
            self.holder.adopt(token)

    def take(self, token: SharedToken) -> None:
        """``token`` is the newest: hand it out; it ends a rotation it is newer than."""
        state = self._state
        state.latest = token
        rotation = state.rotation
        if rotation is not None and (token.sequence is None or token.sequence > rotation.sequence):
            state.rotation = None
        blocked = state.blocked_sequence
        if self.gate.source == "holder" and (
            blocked is None or token.sequence is None or token.sequence > blocked
        ):
            log.info("token_holder_login_accepted", action="input resumed")
            self.gate.unblock()  # the holder logged in again
        self.starving_since = None
        state.signal()

    def _receive_need(self, notice: dict[str, Any]) -> None:
        """A replica has no usable token (it started after the token record was lost, or could
        not read it): a holder with a token writes it again (rate-limited), one without logs in."""
        self._state.demand = True
        if self.is_holder:
            if self.manager.current() is not None:
                self.holder.republish("need")
            else:
                self.holder.wake()

    def _receive_rotating(self, notice: dict[str, Any]) -> None:
        state = self._state
        seq, by = notice.get("seq"), notice.get("by")
        if not isinstance(seq, int) or not isinstance(by, str):
            return
        self._holder_heard_at = state.clock()
        held = state.latest.sequence if state.latest is not None else None
        calling = notice.get("phase") != "announce"  # a record without phase: assume a call
        known = state.rotation
        if known is not None and known.sequence == seq and calling and not known.calling:
            state.rotation = Rotation(seq, by, known.seen_at, calling=True)
            return
        if (held is not None and seq <= held) or (known is not None and known.sequence >= seq):
            return  # that rotation is over or known (or a replay of an old one)
        state.rotation = Rotation(seq, by, state.clock(), calling=calling)
        log.info("token_rotation_announced", holder=by, rotation=seq)
        state.signal()
        old = state.latest.access if state.latest is not None else None
        if by != self._instance and old is not None and state.inflight.get(old, 0) > 0:
            self._draining = (seq, old)
            self.notice(self._seal.draining, {"rotation": seq, "by": self._instance, "done": False})

    def _receive_draining(self, notice: dict[str, Any]) -> None:
        seq, by, done = notice.get("rotation"), notice.get("by"), notice.get("done")
        if not (isinstance(seq, int) and isinstance(by, str) and isinstance(done, bool)):
            return
        if self.is_holder:
            self.holder.draining(seq, by, done)

    def _receive_blocked(self, notice: dict[str, Any]) -> None:
        """The holder's login is refused for good: wait with it (unless this replica holds)."""
        state = self._state
        seq, code, reason = notice.get("seq"), notice.get("code"), notice.get("reason")
        if notice.get("by") == self._instance or self.is_holder:
            return
        if not isinstance(seq, int) or not isinstance(code, str) or not isinstance(reason, str):
            return
        self._holder_heard_at = state.clock()
        held = state.latest.sequence if state.latest is not None else None
        if held is not None and seq <= held:
            return  # the holder published a token since (or a replay of an old notice)
        state.blocked_sequence = seq
        log.warning("token_holder_login_refused", error_code=code, action="input paused")
        self.gate.block(code, f"{reason[:MAX_REASON_CHARS]} (on the token holder)", source="holder")

    def _receive_refused(self, notice: dict[str, Any]) -> None:
        fp = notice.get("fingerprint")
        if not isinstance(fp, str):
            return
        state = self._state
        state.refused.add(fp)
        if self.is_holder:
            latest = state.latest
            if latest is not None and fingerprint(latest.access) != fp:
                # A follower was refused a token that is not ours: it holds an older one.
                # Publish ours again; it is newer than whatever that follower holds.
                log.info("token_refused_notice_for_an_older_token", action="republish")
                self.holder.republish("refused_older_token")
            self.holder.wake()
        state.signal()

    def _gate_changed(self, gate: AuthGate) -> None:
        """This replica's own login was refused: wake the holder loop (it tells the others)."""
        if gate.blocked and gate.source == "login" and self.is_holder:
            self.holder.wake()

    def notice(self, key: bytes, payload: dict[str, Any]) -> None:
        """Send a notice (need, refused, draining) in the background."""

        async def send() -> None:
            try:
                assert self.notices is not None
                await self.notices.write([(key, self._seal.seal(key, payload))])
            except Exception as exc:  # noqa: BLE001 - the holder learns it later anyway
                log.warning(
                    "token_notice_failed", notice=key.decode()[-9:], error=type(exc).__name__
                )

        task = asyncio.get_running_loop().create_task(send())
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    def starving(self, now: float) -> None:
        """No usable token: ask the holder; with no holder at all for the grace, take over."""
        self._state.demand = True
        if self.is_holder or self.holder.should_hold():
            self.holder.wake()
            return
        self._retry_undecrypted()
        if self.starving_since is None:
            self.starving_since = now
            self.notice(self._seal.need, {"by": self._instance})
        quiet_since = max(self.starving_since, self._holder_heard_at or self.starving_since)
        if now - quiet_since >= self._takeover_after:
            log.warning(
                "token_takeover",
                instance=self._instance,
                without_token_seconds=round(now - self.starving_since, 1),
            )
            self.takeovers += 1
            self.starving_since = None
            if self.gate.source == "holder":
                self.gate.unblock()
            self.holder.take_over()
