"""The token holder: the one replica that logs in and refreshes (docs/tokens.md).

A stint as holder: start the group's token transactional producer (which fences the previous
holder), read the token topic to its end, adopt the newest token and its refresh token, then
renew ahead of expiry and publish. Every renewal is a *rotation*: announce it (a ``/rotating``
record, written through the fenced producer, so a fenced replica learns it before any platform
call), wait for the rotation window and for the calls still on the wire with the old token
(its own, and those other replicas report as ``/draining``), announce it again right before
the call, make exactly one call (a refreshToken, or a login when no usable refresh token is
left), publish the new token.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog

from service.config import PlatformSettings
from service.metrics import Metrics
from service.platform.rebind import defer_delay
from service.platform.tokens import TokenError, TokenManager, _Token
from service.shared.token_channel import Channel, HolderFencedError
from service.shared.token_records import RecordSeal, SharedToken
from service.shared.token_state import EXPIRY_GUARD_SECONDS, TokenState, wait_event

log = structlog.get_logger(__name__)

CATCH_UP_TIMEOUT_SECONDS: Final = 15.0
RETRY_SECONDS: Final = 1.0
"""After a failed write or renewal the holder tries again this much later (doubling, capped)."""
RETRY_MAX_SECONDS: Final = 30.0
POLL_SECONDS: Final = 0.25
REFRESH_REFUSED_CODE: Final = "100208"
"""A refreshToken answered this: the refresh token is spent or unknown."""
REPUBLISH_MIN_SECONDS: Final = 1.0
"""The holder writes its unchanged token again (for a /need, an unreadable record, a replay, a
follower refused an older token) at most once per this interval: a flood of notices or bad
records costs one record per interval, never a write loop."""


class HolderTokens(TokenManager):
    """The holder's TokenManager: one platform call per renewal, can adopt a shared token."""

    def current(self) -> _Token | None:
        return self._token

    def discard(self) -> None:
        self._token = None

    def adopt(self, shared: SharedToken, wall_now: float) -> None:
        """Hold ``shared`` as if this manager had obtained it (epoch -> this clock)."""
        offset = self._clock() - wall_now
        self._token = _Token(
            access=shared.access,
            refresh=shared.refresh,
            obtained_at=shared.issued_at + offset,
            expires_at=shared.expires_at + offset,
            renew_at=shared.renew_at + offset,
        )
        self._failure = None


class TokenHolder:
    """The holder side of one replica: elected (or acting after a takeover), fenced, renewing."""

    def __init__(
        self,
        state: TokenState,
        seal: RecordSeal,
        manager: HolderTokens,
        metrics: Metrics,
        platform: PlatformSettings,
        *,
        channel: Callable[[], Channel],
        catch_up: Callable[[], Awaitable[bool]],
        published: Callable[[SharedToken], None],
        window: float,
        wait_seconds: float,
    ) -> None:
        self._state = state
        self._seal = seal
        self.manager = manager
        self._metrics = metrics
        self._platform = platform
        self._channel = channel
        self._catch_up = catch_up
        self._published = published
        self._window = window
        self._wait_seconds = wait_seconds
        self.elected = False
        self.acting = False
        """Holding after a takeover (no holder was heard), not by election."""
        self.fenced = False
        """Another replica started the holder's producer after this one: follow it."""
        self.holding = False
        self.rotating = False
        self._orphan = False
        """A rotation of an earlier holder has no token after it: its refresh may have spent
        the refresh token and replaced the access token, so the next renewal is a login."""
        self._refresh_spent = False
        self._republish = False
        self._republish_reason = "claim"
        self._republished_at: float | None = None
        """When the unchanged token was last written again (the rate limit's start)."""
        self.republished = 0
        self.renewal_failure: TokenError | None = None
        self.renewal_failures = 0
        """The last failed renewal, and how many failed: a caller waiting for a token on the
        holder gets that error rather than a time-out."""
        self._login_attempts = 0
        self._busy: dict[int, dict[str, bool]] = {}
        """Per rotation, the replicas with calls in flight (True once they are done)."""
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._rng = random.Random()  # noqa: S311 - jitter, not crypto
        self.elections = 0
        self.fences = 0
        """How often this replica was fenced by another."""

    # ------------------------------------------------------------------ who holds
    def should_hold(self) -> bool:
        return (self.elected or self.acting) and not self.fenced

    def set_elected(self, elected: bool) -> bool:
        """The assignment says whether this replica owns input partition 0; True if that
        changes anything (a fenced replica elected again claims the token again)."""
        if elected == self.elected and not (elected and self.fenced):
            return False
        self.elected = elected
        if elected:
            self.elections += 1
            self.acting = self.fenced = False
            self._start()
        elif not self.acting:
            self.wake()  # the loop ends after a rotation in progress
        return True

    def take_over(self) -> None:
        """No holder was heard for the takeover grace: hold (fencing any other)."""
        self.acting, self.fenced = True, False
        self._start()

    def wake(self) -> None:
        self._wake.set()

    def republish(self, reason: str) -> None:
        """Publish the current token again (a follower needs one or holds an old one, a replay
        or an unreadable token record was read), at most once per ``REPUBLISH_MIN_SECONDS``;
        requests meanwhile are answered together, once the interval has passed."""
        if not self._republish:
            self._republish_reason = reason
        self._republish = True
        self.wake()

    def draining(self, rotation: int, by: str, done: bool) -> None:
        """A replica reports calls in flight on the old token (``done``: they are answered)."""
        seen = self._busy.setdefault(rotation, {})
        seen[by] = done or seen.get(by, False)
        self._state.signal()

    async def stop(self) -> None:
        """Stop holding; a rotation in progress ends first (within a bound): a renewal cut off
        after its call would leave the next holder an unfinished rotation."""
        self.elected = self.acting = False
        task = self._task
        if task is not None and not task.done():
            self.wake()
            await asyncio.wait({task}, timeout=self._window + 2 * self._wait_seconds)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.manager.aclose()

    def _start(self) -> None:
        previous = self._task
        self._task = asyncio.get_running_loop().create_task(
            self._hold(previous), name="token-holder"
        )

    async def _sleep_or_wake(self, seconds: float) -> None:
        if not self._wake.is_set():
            await wait_event(self._wake, seconds)
        self._wake.clear()

    # ------------------------------------------------------------------ a stint
    async def _hold(self, previous: asyncio.Task[None] | None) -> None:
        """One stint as holder: fence, catch up, adopt, then renew and publish until it ends."""
        if previous is not None and not previous.done():
            self.wake()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await previous
        delay = RETRY_SECONDS
        while self.should_hold():
            channel = self._channel()
            try:
                await channel.start()  # fences the previous holder
                await self._serve(channel)
            except HolderFencedError:
                # Another replica became the holder after us: a newer election (ours is stale
                # and the next assignment says so) or a takeover. Follow it; claim it again only
                # when elected anew or when no holder is heard for the takeover grace.
                self.fences += 1
                self._metrics.token_rotations.labels(result="fenced").inc()
                log.warning("token_holder_fenced", instance=self._state.instance, action="follow")
                self.fenced, self.acting = True, False
            except Exception as exc:  # noqa: BLE001 - Kafka unreachable: try again
                log.warning("token_holder_start_failed", error=type(exc).__name__)
                await self._sleep_or_wake(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
            else:
                return
            finally:
                self.holding = self.rotating = False
                self._state.signal()
                await channel.stop()

    async def _serve(self, channel: Channel) -> None:
        caught_up = await self._catch_up()
        self._adopt(caught_up)
        self.holding = True
        self._busy.clear()
        log.info("token_holder_ready", instance=self._state.instance, orphan_rotation=self._orphan)
        self._state.signal()
        delay = RETRY_SECONDS
        while self.should_hold():
            try:
                progressed = await self._step(channel)
            except HolderFencedError:
                raise
            except Exception as exc:  # noqa: BLE001 - Kafka hiccup: keep serving, try again
                log.warning("token_publish_failed", error=type(exc).__name__)
                progressed = False
            if progressed:
                delay = RETRY_SECONDS
            else:
                await self._sleep_or_wake(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    def _adopt(self, caught_up: bool) -> None:
        """Hold the newest token of the topic (and its refresh token) instead of logging in.
        A rotation with no token after it is an *orphan*: its refresh may have replaced the
        token and spent the refresh token, so the next renewal is a login."""
        state = self._state
        self.manager.discard()
        latest = state.latest
        self._orphan = state.rotation is not None and state.rotation.calling
        state.rotation = None
        self._refresh_spent = self._orphan
        if latest is None:
            return
        self.manager.adopt(latest, state.wall())
        self._republish, self._republish_reason = True, "claim"  # followers hear a live holder
        self._republished_at = None  # a claim is not rate-limited
        log.info(
            "token_adopted",
            previous_holder=latest.holder,
            caught_up=caught_up,
            orphan_rotation=self._orphan,
            expires_in=round(latest.expires_at - state.wall(), 1),
        )

    def adopt(self, token: SharedToken) -> None:
        """Another replica published ``token`` (it held before us and committed before our
        fence): the platform knows that one now."""
        self.manager.adopt(token, self._state.wall())

    async def _step(self, channel: Channel) -> bool:
        """One decision of the holder loop; False: nothing happened, sleep a little."""
        state = self._state
        held = self.manager.current()
        now = state.clock()
        if self.manager.gate.blocked:
            self._login_attempts += 1
            await self._sleep_or_wake(self._login_backoff())
            return await self._rotate(channel, login=True)
        if held is None:
            if state.demand:
                return await self._rotate(channel, login=True)
            await self._sleep_or_wake(CATCH_UP_TIMEOUT_SECONDS)  # woken by a need
        elif self._orphan or state.is_refused(held.access) or now >= held.renew_at:
            expired = now >= held.expires_at - EXPIRY_GUARD_SECONDS
            can_refresh = self.manager.can_refresh() and not self._refresh_spent
            if expired and not can_refresh and not state.demand:
                self.manager.discard()  # nobody needs one: log in when someone does
                return True
            return await self._rotate(channel, login=self._orphan or not can_refresh)
        elif state.latest is None or state.latest.access != held.access:
            await self._publish(channel, held)
        elif self._republish:
            since = self._republished_at
            if since is not None and now < since + REPUBLISH_MIN_SECONDS:
                await self._sleep_or_wake(since + REPUBLISH_MIN_SECONDS - now)
                return True  # woken by the next notice of a flood: nothing written
            self._republished_at = now
            self.republished += 1
            log.info("token_republished", reason=self._republish_reason)
            await self._publish(channel, held)
        else:
            await self._sleep_or_wake(max(0.0, held.renew_at - now))
        return True

    def _login_backoff(self) -> float:
        """Capped exponential, half of it jitter: a refused login is not retried per poll."""
        return defer_delay(
            self._login_attempts - 1,
            self._platform.retry_backoff_initial_seconds,
            self._platform.retry_backoff_max_seconds,
            self._rng,
        )

    # ------------------------------------------------------------------ a rotation
    async def _announce(self, channel: Channel, payload: dict[str, Any]) -> None:
        await channel.write([(self._seal.rotating, self._seal.seal(self._seal.rotating, payload))])

    async def _rotate(self, channel: Channel, *, login: bool) -> bool:
        """Announce, let calls on the old token drain, renew once, publish."""
        state = self._state
        old = state.latest
        was_blocked = self.manager.gate.blocked
        seq = state.next_sequence()
        self.rotating = True
        state.signal()
        try:
            payload = {"seq": seq, "by": state.instance, "login": login, "phase": "announce"}
            await self._announce(channel, payload)  # fenced: raises before any platform call
            if old is not None and not await self._drain(seq, old.access):
                # No longer the holder: no call. Publish the old token again, which ends the
                # rotation (if the next holder fenced us first, it sees no call announced).
                held = self.manager.current()
                if held is not None:
                    await self._publish(channel, held)
                return True

            async def calling() -> None:
                # Once the budget has granted the call, right before it is sent: still the
                # holder? (The drain or the budget may have taken a while.) The record also
                # tells a next holder that a call may have happened.
                await self._announce(channel, payload | {"phase": "call"})

            try:
                new = await self.manager.renew_once(login=login, before_call=calling)
            except TokenError as exc:
                return await self._failed(channel, exc, login=login, was_blocked=was_blocked)
            self._orphan = self._refresh_spent = False
            self.renewal_failure = None
            self._login_attempts = 0
            self._metrics.token_rotations.labels(result="renewed").inc()
            await self._publish(channel, new)
            return True
        finally:
            self.rotating = False
            self._busy.pop(seq, None)
            state.signal()

    async def _failed(
        self, channel: Channel, exc: TokenError, *, login: bool, was_blocked: bool
    ) -> bool:
        self._metrics.token_rotations.labels(result="failed").inc()
        self.renewal_failure = exc
        self.renewal_failures += 1
        log.warning(
            "token_holder_renewal_failed",
            operation=exc.operation,
            error_code=exc.error_code,
            http_status=exc.http_status,
        )
        if not login and exc.error_code == REFRESH_REFUSED_CODE:
            self._refresh_spent = True  # spent (someone refreshed or logged in): log in next
        if exc.blocking:
            if not was_blocked:  # once, when the platform starts refusing the login
                await self._publish_blocked(
                    channel, exc.error_code or "", self.manager.gate.reason or ""
                )
            return True  # the next step waits the login backoff
        held = self.manager.current()
        if held is not None and self._state.usable(self._state.latest):
            await self._publish(channel, held)  # ends the followers' hold: the old token works
        return False

    async def _drain(self, seq: int, old: str) -> bool:
        """Wait for the rotation window and for every call in flight on ``old`` (ours, and
        those of replicas that said they have some), bounded by the request timeout. False:
        this replica stopped holding meanwhile."""
        state = self._state
        start = state.clock()
        hard = start + self._window + self._wait_seconds
        while True:
            if not self.should_hold():
                return False
            now = state.clock()
            busy = [who for who, done in self._busy.get(seq, {}).items() if not done]
            mine = state.inflight.get(old, 0)
            if now >= start + self._window and not busy and mine == 0:
                return True
            if now >= hard:
                log.warning("token_rotation_drain_timeout", replicas_busy=len(busy), own=mine)
                return True
            await state.changed(min(POLL_SECONDS, hard - now))

    async def _publish(self, channel: Channel, tok: _Token) -> None:
        state = self._state
        offset = state.wall() - state.clock()
        shared = SharedToken(
            access=tok.access,
            refresh=tok.refresh,
            issued_at=tok.obtained_at + offset,
            expires_at=tok.expires_at + offset,
            renew_at=tok.renew_at + offset,
            holder=state.instance,
            sequence=state.next_sequence(),
        )
        await channel.write([(self._seal.token, self._seal.seal_token(shared))])
        self._republish = False
        self._published(shared)
        log.info("shared_token_published", expires_in=round(tok.expires_at - state.clock(), 1))

    async def _publish_blocked(self, channel: Channel, code: str, reason: str) -> None:
        payload: dict[str, Any] = {"code": code, "reason": reason, "by": self._state.instance}
        payload["seq"] = self._state.next_sequence()
        await channel.write([(self._seal.blocked, self._seal.seal(self._seal.blocked, payload))])
