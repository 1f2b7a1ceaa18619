"""One token holder per application, fenced through Kafka (docs/tokens.md).

The platform keeps one valid access token per application: a login or a refreshToken replaces
it at once (calls still carrying the old one are answered 1010005) and spends the previous
refresh token. So exactly one replica, the *holder*, ever logs in or refreshes, and every
replica hands out the same token, read from a compacted, single-partition topic
(:mod:`service.platform.token_records`).

* **Who holds.** The member that owns partition 0 of the input topic becomes the holder
  (:meth:`SharedTokenProvider.set_holder`, at every assignment). Becoming the holder starts the
  group's token transactional producer (:class:`~service.platform.token_channel.HolderChannel`),
  which fences the previous holder; then the new holder reads the topic to its end and
  *adopts* the latest token (and its refresh token) instead of logging in
  (:class:`~service.platform.token_holder.TokenHolder`).
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

Neither the token nor the secret is ever logged or put in a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any, Final

import httpx
import structlog

from service.config import KafkaSettings, PlatformSettings
from service.metrics import Metrics
from service.platform.budget import RateBudget
from service.platform.client import CONNECT_TIMEOUT_MAX_SECONDS, build_ssl_context
from service.platform.errors import TIMEOUT, classify
from service.platform.token_channel import (
    Channel,
    HolderChannel,
    HookChannel,
    NoticeChannel,
    Publish,
    TokenReader,
    ensure_token_topic,
)
from service.platform.token_holder import (
    CATCH_UP_TIMEOUT_SECONDS,
    POLL_SECONDS,
    RETRY_SECONDS,
    HolderTokens,
    TokenHolder,
)
from service.platform.token_records import (
    InvalidRecordError,
    RecordSeal,
    SharedToken,
    TokenCodec,
    fingerprint,
    older,
)
from service.platform.token_state import Rotation, TokenState
from service.platform.tokens import AuthGate, SecretReader, TokenError

__all__ = ["SharedToken", "SharedTokenProvider", "TokenCodec", "fingerprint", "older"]

log = structlog.get_logger(__name__)

MAX_REASON_CHARS: Final = 600
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
        self._takeover_after = platform.token_takeover_seconds * (
            1.0 + random.uniform(0.0, TAKEOVER_JITTER)  # noqa: S311 - jitter, not crypto
        )
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
            published=self._take,
            window=window,
            wait_seconds=self._wait_seconds,
        )
        self.gate: AuthGate = manager.gate
        self.gate.subscribe(self._gate_changed)
        metrics.token_valid.set_function(lambda: 1.0 if self.valid() else 0.0)
        metrics.token_holder.set_function(lambda: 1.0 if self.is_holder else 0.0)
        self._notices: Channel | None = HookChannel(publish) if publish is not None else None
        self._notified: set[str] = set()
        self._starving_since: float | None = None
        self._holder_heard_at: float | None = None
        """When a holder's record (token, rotating, blocked) was last read."""
        self._overdue: int | None = None
        """The rotation whose hold ended without a token (logged once)."""
        self._probe: str | None = None
        self._confirmed: str | None = None
        """After an unfinished rotation: the token one call is trying, the token that worked."""
        self._draining: tuple[int, str] | None = None
        """(rotation, token): this replica said it has calls in flight on ``token``."""
        self._undecrypted: tuple[bytes | None, int] | None = None
        """The last token record that did not decrypt (another secret): tried again when the
        secret changes."""
        self._orphans: set[asyncio.Task[None]] = set()
        self._reader: TokenReader | None = None
        self.takeovers = 0
        self.stale_records = 0
        """Token records ignored because they are older than the token held (replays)."""

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
        if self._notices is None:
            self._notices = NoticeChannel(self._kafka, self._topic)
            await self._notices.start()

    async def aclose(self) -> None:
        await self.holder.stop()
        for task in self._orphans:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._reader is not None:
            await self._reader.stop()
        if self._notices is not None:
            await self._notices.stop()
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

    def _receive_at(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        self.receive(key, value, offset=offset)

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
        self._take(token)
        if previous is None or previous.access != token.access:
            log.info(
                "shared_token_received",
                holder=token.holder,
                offset=offset,
                expires_in=round(token.expires_at - state.wall(), 1),
            )
        if token.holder != self._instance and self.is_holder:
            self.holder.adopt(token)

    def _take(self, token: SharedToken) -> None:
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
        self._starving_since = None
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
            self._notice(
                self._seal.draining, {"rotation": seq, "by": self._instance, "done": False}
            )

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

    def _notice(self, key: bytes, payload: dict[str, Any]) -> None:
        """Send a notice (need, refused, draining) in the background."""

        async def send() -> None:
            try:
                assert self._notices is not None
                await self._notices.write([(key, self._seal.seal(key, payload))])
            except Exception as exc:  # noqa: BLE001 - the holder learns it later anyway
                log.warning(
                    "token_notice_failed", notice=key.decode()[-9:], error=type(exc).__name__
                )

        task = asyncio.get_running_loop().create_task(send())
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

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
            if fp not in self._notified:
                # Also as the holder: if it turns out to be fenced, the next holder knows.
                self._notified.add(fp)
                log.info("platform_token_rejected", action="notify_holder")
                self._notice(self._seal.refused, {"fingerprint": fp, "by": self._instance})
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
        draining = self._draining
        if draining is not None and draining[1] == token:
            self._draining = None
            self._notice(
                self._seal.draining, {"rotation": draining[0], "by": self._instance, "done": True}
            )
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
                self._starving_since = None
                return token
            now = state.clock()
            if self._holding_pause(now):
                deadline = max(deadline, now + POLL_SECONDS)  # bounded by the pause itself
            else:
                self._starving(now)
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

    def _starving(self, now: float) -> None:
        """No usable token: ask the holder; with no holder at all for the grace, take over."""
        self._state.demand = True
        if self.is_holder or self.holder.should_hold():
            self.holder.wake()
            return
        self._retry_undecrypted()
        if self._starving_since is None:
            self._starving_since = now
            self._notice(self._seal.need, {"by": self._instance})
        quiet_since = max(self._starving_since, self._holder_heard_at or self._starving_since)
        if now - quiet_since >= self._takeover_after:
            log.warning(
                "token_takeover",
                instance=self._instance,
                without_token_seconds=round(now - self._starving_since, 1),
            )
            self.takeovers += 1
            self._starving_since = None
            if self.gate.source == "holder":
                self.gate.unblock()
            self.holder.take_over()

    # ------------------------------------------------------------------ health
    def valid(self) -> bool:
        return self._state.usable(self._state.latest)

    def healthy(self) -> bool:
        if self.is_holder:
            return self.valid() or self.manager.healthy()
        return self.valid() or self._starving_since is None
