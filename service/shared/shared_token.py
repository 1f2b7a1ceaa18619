"""One token holder per application, fenced through Kafka (docs/tokens.md).

The platform keeps one valid access token per application: a login or a refreshToken replaces
it at once (calls still carrying the old one are answered 1010005) and spends the previous
refresh token. So exactly one replica, the *holder*, ever logs in or refreshes, and every
replica hands out the same token, read from a compacted, single-partition topic
(:mod:`service.shared.token_records`).

* **Who holds.** The member that owns partition 0 of the input topic becomes the holder
  (:meth:`SharedTokenProvider.set_holder`, at every assignment). Becoming the holder starts the
  group's token transactional producer (:class:`~service.shared.token_channel.HolderChannel`),
  which fences the previous holder; then the new holder reads the topic to its end and
  *adopts* the latest token (and its refresh token) instead of logging in
  (:class:`~service.shared.token_holder.TokenHolder`).
* **Every platform call is fenced.** Before a login or refresh the holder commits a *rotating*
  record through that producer. A replica that has been fenced (a zombie after a GC pause, a
  network partition, a lost rebalance) fails that commit and steps down before it calls the
  platform.
* **Rotation without failed calls.** On a *rotating* record every replica stops handing out the
  old token; a replica with calls still in flight on it says so (*draining*, then *done*). The
  holder waits for the rotation window and those calls, then renews, then publishes the new
  token, which ends the hold everywhere.
* **Followers never log in while a holder lives.** A follower whose call is answered 1010005
  retries with the newest shared token if it used an older one, otherwise it tells the holder
  (*refused* notice) and waits for the next token record. Only when it has had no usable token
  and heard no holder for ``token_takeover_seconds`` (jittered) does it become the holder
  itself, through the same fence, so at most one replica ever does.
* A holder whose login is refused for good (wrong or rotated secret) publishes a *blocked*
  notice: followers wait with it, and it retries the login with a capped backoff.

Who owns what: :class:`SharedTokenProvider` (here) hands the shared token out to this replica's
calls (in-flight counts, the pause of a rotation, the probe after an unfinished one) and wires the
rest; :class:`~service.shared.token_feed.TokenFeed` applies the topic's records, sends this
replica's notices and takes over from a silent holder; :class:`~service.shared.token_holder.
TokenHolder` is the holder's loop.

Neither the token nor the secret is ever logged or put in a metric.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Final

import httpx
import structlog

from service.config import KafkaSettings, PlatformSettings
from service.metrics import Metrics
from service.platform.budget import RateBudget
from service.platform.client import CONNECT_TIMEOUT_MAX_SECONDS, build_ssl_context
from service.platform.errors import TIMEOUT, classify
from service.platform.tokens import AuthGate, SecretReader, TokenError
from service.shared.token_channel import (
    Channel,
    HolderChannel,
    HookChannel,
    NoticeChannel,
    Publish,
    TokenReader,
    ensure_token_topic,
)
from service.shared.token_feed import TokenFeed
from service.shared.token_holder import (
    CATCH_UP_TIMEOUT_SECONDS,
    POLL_SECONDS,
    RETRY_SECONDS,
    HolderTokens,
    TokenHolder,
)
from service.shared.token_records import (
    RecordSeal,
    SharedToken,
    TokenCodec,
    fingerprint,
    older,
)
from service.shared.token_state import TokenState

__all__ = ["SharedToken", "SharedTokenProvider", "TokenCodec", "TokenFeed", "fingerprint", "older"]

log = structlog.get_logger(__name__)

TAKEOVER_JITTER: Final = 0.5
"""The takeover grace is drawn from [grace, grace * (1 + jitter)] once per replica."""


class SharedTokenProvider:
    """A :class:`~service.platform.tokens.TokenProvider` whose token one replica renews for all."""

    def __init__(
        self,
        platform: PlatformSettings,
        kafka: KafkaSettings,
        topic: str,
        metrics: Metrics,
        budget: RateBudget,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        wait_seconds: float | None = None,
        publish: Publish | None = None,
    ) -> None:
        self._kafka = kafka
        self._topic = topic
        self._instance = kafka.instance_id
        self._state = state = TokenState(kafka.instance_id, clock=clock, wall=wall)
        self._wait_seconds = wait_seconds or platform.request_timeout_seconds
        window = platform.token_rotation_window_seconds
        self._rotation_hold = 2 * (window + self._wait_seconds) + RETRY_SECONDS
        """The longest a replica holds its calls for a rotation (its holder may have died)."""
        secret = SecretReader(platform)
        self._seal = RecordSeal(
            platform.app_id, f"{kafka.group_id}/{platform.app_id}", secret.current
        )
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(
            base_url=str(platform.base_url).rstrip("/"),
            verify=build_ssl_context(platform),
            timeout=httpx.Timeout(
                platform.request_timeout_seconds,
                connect=min(platform.request_timeout_seconds, CONNECT_TIMEOUT_MAX_SECONDS),
            ),
            follow_redirects=False,
            trust_env=False,
        )
        manager = HolderTokens(
            platform,
            metrics,
            budget,
            self._http,
            clock=clock,
            secret=secret,
            retry_refused_login=False,
        )
        self._publish_hook = publish
        self.holder = TokenHolder(
            state,
            self._seal,
            manager,
            metrics,
            platform,
            channel=self._channel,
            catch_up=self.catch_up,
            published=self._published,
            window=window,
            wait_seconds=self._wait_seconds,
        )
        self.gate: AuthGate = manager.gate
        metrics.token_valid.set_function(lambda: 1.0 if self.valid() else 0.0)
        metrics.token_holder.set_function(lambda: 1.0 if self.is_holder else 0.0)
        self.feed = TokenFeed(
            state,
            self._seal,
            self.holder,
            self.gate,
            instance=self._instance,
            takeover_after=platform.token_takeover_seconds
            * (1.0 + random.uniform(0.0, TAKEOVER_JITTER)),  # noqa: S311 - jitter, not crypto
            notices=HookChannel(publish) if publish is not None else None,
        )
        self._overdue: int | None = None
        """The rotation whose hold ended without a token (logged once)."""
        self._probe: str | None = None
        self._confirmed: str | None = None
        """After an unfinished rotation: the token one call is trying, the token that worked."""
        self._reader: TokenReader | None = None

    @property
    def takeovers(self) -> int:
        return self.feed.takeovers

    @property
    def stale_records(self) -> int:
        """Token records ignored because they are older than the token held (replays)."""
        return self.feed.stale_records

    def _published(self, token: SharedToken) -> None:
        """The holder published ``token`` (the feed is built after the holder)."""
        self.feed.take(token)

    def receive(self, key: bytes | None, value: bytes | None, *, offset: int = -1) -> None:
        """Apply one record of the token topic (in offset order)."""
        self.feed.receive(key, value, offset=offset)

    # ------------------------------------------------------------------ views
    @property
    def latest(self) -> SharedToken | None:
        return self._state.latest

    @property
    def manager(self) -> HolderTokens:
        return self.holder.manager

    @property
    def is_holder(self) -> bool:
        """This replica holds the fence (its producer is the group's token producer)."""
        return self.holder.holding

    @property
    def elected(self) -> bool:
        return self.holder.elected

    @property
    def elections(self) -> int:
        return self.holder.elections

    @property
    def fenced(self) -> int:
        """How often another replica fenced this one."""
        return self.holder.fences

    def set_holder(self, elected: bool) -> None:
        """Called at every assignment: True when this replica owns input partition 0."""
        if elected and self.gate.source == "holder":
            self.gate.unblock()  # this replica logs in itself now, and finds out by itself
        if self.holder.set_elected(elected):
            log.info("token_holder", holder=elected, instance=self._instance)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Check/create the token topic, start the reader (from the beginning) and a producer."""
        await ensure_token_topic(self._kafka, self._topic)
        self._reader = TokenReader(
            self._kafka,
            self._topic,
            lambda key, value, offset: self.receive(key, value, offset=offset),
        )
        await self._reader.start()
        if self.feed.notices is None:
            self.feed.notices = NoticeChannel(self._kafka, self._topic)
            await self.feed.notices.start()

    async def aclose(self) -> None:
        await self.holder.stop()
        await self.feed.aclose()
        if self._reader is not None:
            await self._reader.stop()
        if self.feed.notices is not None:
            await self.feed.notices.stop()
        if self._own_http:
            await self._http.aclose()

    def _channel(self) -> Channel:
        if self._publish_hook is not None:
            return HookChannel(self._publish_hook)
        return HolderChannel(self._kafka, self._topic)

    # ------------------------------------------------------------------ reader
    async def catch_up(self, timeout: float = CATCH_UP_TIMEOUT_SECONDS) -> bool:
        """Read the topic up to its (last stable) end (True), or give up after ``timeout``."""
        return await self._reader.catch_up(timeout) if self._reader is not None else True

    @property
    def read_position(self) -> int:
        """The offset of the next token-topic record this replica reads."""
        return self._reader.position if self._reader is not None else 0

    # ------------------------------------------------------------------ TokenProvider
    async def get(self) -> str:
        return await self._acquire(None)

    async def invalidated(self, token: str) -> str:
        """``token`` was answered 1010005. If a newer token is shared, that one is used;
        otherwise the holder is told (a follower never logs in for it) and its next token
        awaited."""
        state = self._state
        fp = fingerprint(token)
        state.refused.add(fp)
        if state.latest is None or state.latest.access == token:
            if self.is_holder:
                self.holder.wake()
            self.feed.refused(fp)
        return await self._acquire(token)

    def release(self, token: str, *, refused: bool = False, sent: bool = True) -> None:
        state = self._state
        if refused:  # at once: no other call may take it before the caller reports it
            state.refused.add(fingerprint(token))
        left = state.inflight[token] - 1
        if self._probe == token:
            self._probe = None
            if not refused and sent:  # a probe not sent proves nothing: the next call probes
                self._confirmed = token
        if left > 0:
            state.inflight[token] = left
            return
        state.inflight.pop(token, None)
        self.feed.drained(token)
        state.signal()

    async def _acquire(self, refused: str | None) -> str:
        state = self._state
        deadline = state.clock() + self._wait_seconds
        failures = self.holder.renewal_failures
        while True:
            if self.gate.blocked:
                await self.gate.wait_open()  # a refused login: wait with the holder
                deadline = state.clock() + self._wait_seconds
                continue
            token = self._candidate(refused)
            if token is not None:
                state.inflight[token] += 1
                self.feed.starving_since = None
                return token
            now = state.clock()
            if self._holding_pause(now):
                deadline = max(deadline, now + POLL_SECONDS)  # bounded by the pause itself
            else:
                self.feed.starving(now)
                failure = self.holder.renewal_failure
                if (
                    self.is_holder
                    and failure is not None
                    and self.holder.renewal_failures > failures
                ):
                    raise failure  # this replica's renewal failed and it has no token: say why
            if now >= deadline:
                raise TokenError(
                    "shared_token",
                    None,
                    TIMEOUT,
                    "no usable shared token from the holder in time",
                    classify("login", None, TIMEOUT),
                )
            await state.changed(min(POLL_SECONDS, deadline - now))

    def _holding_pause(self, now: float) -> bool:
        """A rotation is under way: new calls wait (bounded, if the holder dies meanwhile)."""
        if self.holder.rotating or self.is_holder:
            return self.holder.rotating  # the holder knows when its own rotation ends
        rotation = self._state.rotation
        if rotation is None:
            return False
        if now - rotation.seen_at < self._rotation_hold:
            return True
        # The holder went quiet mid-rotation: use the old token. The rotation stays known (a
        # next holder must treat it as unfinished).
        if self._overdue != rotation.sequence:
            self._overdue = rotation.sequence
            log.warning("token_rotation_unfinished", holder=rotation.by, action="old token used")
        return False

    def _candidate(self, refused: str | None) -> str | None:
        state = self._state
        tok = state.latest
        if tok is None or tok.access == refused or not state.usable(tok):
            return None
        if self._holding_pause(state.clock()):
            return None
        if (
            self._overdue is not None
            and state.rotation is not None
            and self._confirmed != tok.access
        ):
            # The holder died mid-rotation: its renewal may have replaced this token. One call
            # tries it; the others wait for its answer instead of all meeting a 1010005.
            if self._probe is not None:
                return None
            self._probe = tok.access
        return tok.access

    # ------------------------------------------------------------------ health
    def valid(self) -> bool:
        return self._state.usable(self._state.latest)

    def healthy(self) -> bool:
        if self.is_holder:
            return self.valid() or self.manager.healthy()
        return self.valid() or self.feed.starving_since is None
