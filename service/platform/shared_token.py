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
  *adopts* the latest token (and its refresh token) instead of logging in.
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
  and seen no record of any holder for ``token_takeover_seconds`` (jittered) does it become the
  holder itself, through the same fence, so at most one replica ever does.
* A holder whose login is refused for good (wrong or rotated secret) publishes a *blocked*
  notice: followers wait with it, and it retries the login with a capped backoff.

Neither the token nor the secret is ever logged or put in a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import httpx
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from service.config import KafkaSettings, PlatformSettings
from service.kafka import client_options
from service.metrics import Metrics
from service.platform.budget import RateBudget
from service.platform.client import CONNECT_TIMEOUT_MAX_SECONDS, build_ssl_context
from service.platform.errors import TIMEOUT, classify
from service.platform.token_channel import (
    Channel,
    HolderChannel,
    HolderFencedError,
    HookChannel,
    NoticeChannel,
    Publish,
    ensure_token_topic,
)
from service.platform.token_records import (
    BLOCKED_SUFFIX,
    DRAINING_SUFFIX,
    NEED_SUFFIX,
    REFUSED_SUFFIX,
    ROTATING_SUFFIX,
    InvalidRecordError,
    SharedToken,
    TokenCodec,
    fingerprint,
    older,
)
from service.platform.tokens import (
    AuthGate,
    SecretReader,
    TokenError,
    TokenManager,
    _Token,
)

__all__ = ["SharedToken", "SharedTokenProvider", "TokenCodec", "fingerprint", "older"]

log = structlog.get_logger(__name__)

MAX_REASON_CHARS: Final = 600
EXPIRY_GUARD_SECONDS: Final = 1.0
"""A token this close to its expiry is no longer handed out."""
CATCH_UP_TIMEOUT_SECONDS: Final = 15.0
RETRY_SECONDS: Final = 1.0
"""After a failed write or renewal the holder tries again this much later (doubling, capped)."""
RETRY_MAX_SECONDS: Final = 30.0
TAKEOVER_JITTER: Final = 0.5
"""The takeover grace is drawn from [grace, grace * (1 + jitter)] once per replica."""
POLL_SECONDS: Final = 0.25
REFRESH_REFUSED_CODE: Final = "100208"
"""A refreshToken answered this: the refresh token is spent or unknown."""


async def _wait_event(event: asyncio.Event, timeout: float) -> None:
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
class _Rotation:
    """A *rotating* record newer than the token held: hold new calls until the next token."""

    sequence: int
    by: str
    seen_at: float


class _HolderTokens(TokenManager):
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
        self._tp = TopicPartition(topic, 0)
        self._instance = kafka.instance_id
        self._clock = clock
        self._wall = wall
        self._metrics = metrics
        self._wait_seconds = wait_seconds or platform.request_timeout_seconds
        self._window = platform.token_rotation_window_seconds
        self._rotation_hold = 2 * (self._window + self._wait_seconds) + RETRY_SECONDS
        """The longest a replica holds its calls for a rotation (its holder may have died)."""
        self._takeover_after = platform.token_takeover_seconds * (
            1.0 + random.uniform(0.0, TAKEOVER_JITTER)  # noqa: S311 - jitter, not crypto
        )
        self._init_records(platform, f"{kafka.group_id}/{platform.app_id}")
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
        self.manager = _HolderTokens(
            platform,
            metrics,
            budget,
            self._http,
            clock=clock,
            secret=self._secret,
            retry_refused_login=False,
        )
        self.gate: AuthGate = self.manager.gate
        self.gate.subscribe(self._gate_changed)
        metrics.token_valid.set_function(lambda: 1.0 if self.valid() else 0.0)
        metrics.token_holder.set_function(lambda: 1.0 if self.is_holder else 0.0)
        self._publish_hook = publish
        self._notices: Channel | None = HookChannel(publish) if publish is not None else None
        # what every replica knows, fed by the reader
        self.latest: SharedToken | None = None
        self.rotation: _Rotation | None = None
        self._refused_fps: set[str] = set()
        """Fingerprints of tokens refused (by us or a notice): never handed out again."""
        self._notified: set[str] = set()
        self._changed = asyncio.Event()
        self._position = 0
        self._starving_since: float | None = None
        self._overdue: int | None = None
        """The rotation whose hold ended without a token (logged once)."""
        self._probe: str | None = None
        self._confirmed: str | None = None
        """After an unfinished rotation: the token one call is trying, the token that worked."""
        self._holder_seen_at: float | None = None
        """When a holder's record (token, rotating, blocked) was last read."""
        self._orphans: set[asyncio.Task[None]] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._inflight: Counter[str] = Counter()
        """Calls on the wire, by token."""
        self._draining: tuple[int, str] | None = None
        """(rotation, token): this replica said it has calls in flight on ``token``."""
        self._busy: dict[int, dict[str, bool]] = {}
        """Holder: per rotation, the replicas with calls in flight (True once they are done)."""
        self._init_holder()

    def _init_holder(self) -> None:
        """The holder's state (every replica may become the holder)."""
        self._elected = False
        self._acting = False
        self._fenced = False
        """Another replica started the holder's producer after this one: follow it."""
        self._holding = False
        self._rotating = False
        self._orphan = False
        """A rotation of an earlier holder has no token after it: its refresh may have spent
        the refresh token and replaced the access token, so the next renewal is a login."""
        self._refresh_spent = False
        self._renewal_failure: TokenError | None = None
        self._renewal_failures = 0
        """The holder's last failed renewal, and how many failed: a caller waiting for a token
        on the holder gets that error rather than a time-out."""
        self._republish = False
        self._holder_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._demand = False
        """Someone needs a token: until then a holder without one does not log in (lazily, so
        a single replica's wrong secret shows at its first swap)."""
        self.takeovers = 0
        self.elections = 0
        self.fenced = 0
        self.stale_records = 0
        """Token records ignored because they are older than the token held (replays)."""
        self._sequence = 0

    def _init_records(self, platform: PlatformSettings, scope: str) -> None:
        """The record keys of this group and application, and the codec of the secret."""
        (
            self._token_key,
            self._refused_key,
            self._need_key,
            self._blocked_key,
            self._rotating_key,
            self._draining_key,
        ) = (
            (scope + suffix).encode()
            for suffix in (
                "",
                REFUSED_SUFFIX,
                NEED_SUFFIX,
                BLOCKED_SUFFIX,
                ROTATING_SUFFIX,
                DRAINING_SUFFIX,
            )
        )
        self._app_id = platform.app_id
        # The records' key derives from the secret, which may change (a rotated, mounted file).
        self._secret = SecretReader(platform)
        self._codec_secret = self._secret.current()
        self._codec = TokenCodec(platform.app_id, self._codec_secret)
        self._undecrypted: tuple[bytes | None, int] | None = None
        """The last token record that did not decrypt (another secret): tried again when the
        secret changes."""
        self._blocked_seq: int | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Check/create the token topic, start the reader (from the beginning) and a producer."""
        await ensure_token_topic(self._kafka, self._topic)
        self._consumer = AIOKafkaConsumer(
            **client_options(self._kafka),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            fetch_max_wait_ms=100,
        )
        await self._consumer.start()
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        if self._notices is None:
            self._notices = NoticeChannel(self._kafka, self._topic)
            await self._notices.start()
        self._reader = asyncio.create_task(self._read_loop(), name="token-reader")

    async def aclose(self) -> None:
        """Stop; a rotation in progress first ends (its token published), within a bound: a
        renewal cut off after its call would leave the next holder an unfinished rotation."""
        self._elected = self._acting = False
        holder = self._holder_task
        if holder is not None and not holder.done():
            self._wake_holder()
            await asyncio.wait({holder}, timeout=self._window + 2 * self._wait_seconds)
        await self.manager.aclose()
        for task in (holder, self._reader, *self._orphans):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._consumer is not None:
            await self._consumer.stop()
        if self._notices is not None:
            await self._notices.stop()
        if self._own_http:
            await self._http.aclose()

    def _channel(self) -> Channel:
        if self._publish_hook is not None:
            return HookChannel(self._publish_hook)
        return HolderChannel(self._kafka, self._topic)

    # ------------------------------------------------------------------ reader
    async def _read_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                batch = await consumer.getmany(self._tp, timeout_ms=500)
                for msg in batch.get(self._tp, ()):
                    self.receive(msg.key, msg.value, offset=msg.offset)
                self._position = await consumer.position(self._tp)
            except Exception as exc:  # noqa: BLE001 - a broker hiccup must not end the reader
                log.warning("token_topic_read_failed", error=type(exc).__name__)
                await asyncio.sleep(RETRY_SECONDS)

    async def catch_up(self, timeout: float = CATCH_UP_TIMEOUT_SECONDS) -> bool:
        """Read the topic up to its (last stable) end (True), or give up after ``timeout``."""
        if self._consumer is None:
            return True
        try:
            end = (await self._consumer.end_offsets([self._tp]))[self._tp]
            deadline = self._clock() + timeout
            while self._position < end:
                if self._clock() >= deadline:
                    return False
                await asyncio.sleep(0.05)
        except Exception as exc:  # noqa: BLE001 - a broker hiccup: adopt what we have
            log.warning("token_topic_catch_up_failed", error=type(exc).__name__)
            return False
        return True

    def receive(self, key: bytes | None, value: bytes | None, *, offset: int = -1) -> None:
        """Apply one record of the token topic (in offset order)."""
        handlers: dict[bytes, Callable[[dict[str, Any], int], None]] = {
            self._refused_key: self._receive_refused,
            self._blocked_key: self._receive_blocked,
            self._need_key: self._receive_need,
            self._rotating_key: self._receive_rotating,
            self._draining_key: self._receive_draining,
        }
        if key == self._token_key:
            self._receive_token(value, offset)
            return
        handler = handlers.get(key or b"")
        if handler is None:
            return  # another group's or application's record
        try:
            notice = self._decrypt(value, key or b"")
        except InvalidRecordError as exc:
            log.warning("token_record_ignored", offset=offset, reason=str(exc))
            return
        handler(notice, offset)

    def _codec_now(self) -> TokenCodec:
        """The codec of the secret as it is now (read again from its file, if it has one)."""
        secret = self._secret.current()
        if secret != self._codec_secret:
            self._codec = TokenCodec(self._app_id, secret)
            self._codec_secret = secret
        return self._codec

    def _decrypt(self, value: bytes | None, key: bytes) -> dict[str, Any]:
        try:
            return self._codec.decrypt(value, key)
        except InvalidRecordError:
            codec = self._codec
            if self._codec_now() is codec:
                raise
            return self._codec.decrypt(value, key)  # the secret changed: its new key

    def _retry_undecrypted(self) -> None:
        """A token record that did not decrypt may be readable with a changed secret."""
        pending = self._undecrypted
        if pending is not None and self._codec_now().decrypts(pending[0], self._token_key):
            self._undecrypted = None
            self._receive_token(*pending)

    def _receive_token(self, value: bytes | None, offset: int) -> None:
        try:
            self._decrypt(value, self._token_key)
            token = self._codec.decode_token(value, self._token_key)
        except InvalidRecordError as exc:
            log.warning("token_record_ignored", offset=offset, reason=str(exc))
            self._undecrypted = (value, offset)
            return
        self._undecrypted = None
        self._holder_seen_at = self._clock()
        if token.holder == self._instance and (token.sequence or 0) <= self._sequence:
            return  # our own record, read back (maybe after a newer one we published)
        previous = self.latest
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
                self._republish = True
                self._wake_holder()
            return
        self._take(token)
        if previous is None or previous.access != token.access:
            log.info(
                "shared_token_received",
                holder=token.holder,
                offset=offset,
                expires_in=round(token.expires_at - self._wall(), 1),
            )
        if token.holder != self._instance and self.is_holder:
            # Written by another replica (one that held before us and committed before our
            # fence): the platform knows that token now. Hold it.
            self.manager.adopt(token, self._wall())

    def _take(self, token: SharedToken) -> None:
        """``token`` is the newest: hand it out; it ends a rotation it is newer than."""
        self.latest = token
        rotation = self.rotation
        if rotation is not None and (token.sequence is None or token.sequence > rotation.sequence):
            self.rotation = None
        if self.gate.source == "holder" and (
            self._blocked_seq is None
            or token.sequence is None
            or token.sequence > self._blocked_seq
        ):
            log.info("token_holder_login_accepted", action="input resumed")
            self.gate.unblock()  # the holder logged in again
        self._starving_since = None
        self._signal()

    def _receive_need(self, notice: dict[str, Any], offset: int) -> None:
        self._demand = True
        if self.is_holder:
            self._wake_holder()

    def _receive_rotating(self, notice: dict[str, Any], offset: int) -> None:
        seq, by = notice.get("seq"), notice.get("by")
        if not isinstance(seq, int) or not isinstance(by, str):
            return
        self._holder_seen_at = self._clock()
        held = self.latest.sequence if self.latest is not None else None
        if (held is not None and seq <= held) or (
            self.rotation is not None and self.rotation.sequence >= seq
        ):
            return  # that rotation is over or known (or a replay of an old one)
        self.rotation = _Rotation(seq, by, self._clock())
        log.info("token_rotation_announced", holder=by, rotation=seq)
        self._signal()
        old = self.latest.access if self.latest is not None else None
        if by != self._instance and old is not None and self._inflight.get(old, 0) > 0:
            self._draining = (seq, old)
            self._notice(self._draining_key, {"rotation": seq, "by": self._instance, "done": False})

    def _receive_draining(self, notice: dict[str, Any], offset: int) -> None:
        seq, by, done = notice.get("rotation"), notice.get("by"), notice.get("done")
        if not isinstance(seq, int) or not isinstance(by, str) or not isinstance(done, bool):
            return
        if self.is_holder:
            self._busy.setdefault(seq, {})[by] = done or self._busy.get(seq, {}).get(by, False)
            self._signal()

    def _receive_blocked(self, notice: dict[str, Any], offset: int) -> None:
        """The holder's login is refused for good: wait with it (unless this replica holds)."""
        seq, code, reason = notice.get("seq"), notice.get("code"), notice.get("reason")
        if notice.get("by") == self._instance or self.is_holder:
            return
        if not isinstance(seq, int) or not isinstance(code, str) or not isinstance(reason, str):
            return
        self._holder_seen_at = self._clock()
        held = self.latest.sequence if self.latest is not None else None
        if held is not None and seq <= held:
            return  # the holder published a token since (or a replay of an old notice)
        self._blocked_seq = seq
        log.warning("token_holder_login_refused", error_code=code, action="input paused")
        self.gate.block(code, f"{reason[:MAX_REASON_CHARS]} (on the token holder)", source="holder")

    def _receive_refused(self, notice: dict[str, Any], offset: int) -> None:
        fp = notice.get("fingerprint")
        if not isinstance(fp, str):
            return
        self._refused_fps.add(fp)
        if self.is_holder:
            latest = self.latest
            if latest is not None and fingerprint(latest.access) != fp:
                # A follower was refused a token that is not ours: it holds an older one.
                # Publish ours again; it is newer than whatever that follower holds.
                log.info("token_refused_notice_for_an_older_token", action="republish")
                self._republish = True
            self._wake_holder()
        self._signal()

    def _gate_changed(self, gate: AuthGate) -> None:
        """This replica's own login was refused: wake the holder loop (it tells the others)."""
        if gate.blocked and gate.source == "login" and self.is_holder:
            self._wake_holder()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _notice(self, key: bytes, payload: dict[str, Any]) -> None:
        """Send a follower's notice (need, refused, draining) in the background."""

        async def send() -> None:
            try:
                assert self._notices is not None
                await self._notices.write([(key, self._codec_now().encrypt(payload, key))])
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
        fp = fingerprint(token)
        self._refused_fps.add(fp)
        latest = self.latest
        if latest is None or latest.access == token:
            if self.is_holder:
                self._wake_holder()
            if fp not in self._notified:
                # Also as the holder: if it turns out to be fenced, the next holder knows.
                self._notified.add(fp)
                log.info("platform_token_rejected", action="notify_holder")
                self._notice(self._refused_key, {"fingerprint": fp, "by": self._instance})
        return await self._acquire(token)

    def release(self, token: str, *, refused: bool = False) -> None:
        if refused:  # at once: no other call may take it before the caller reports it
            self._refused_fps.add(fingerprint(token))
        left = self._inflight[token] - 1
        if self._probe == token:
            self._probe = None
            if not refused:
                self._confirmed = token
        if left > 0:
            self._inflight[token] = left
            return
        self._inflight.pop(token, None)
        draining = self._draining
        if draining is not None and draining[1] == token:
            self._draining = None
            self._notice(
                self._draining_key, {"rotation": draining[0], "by": self._instance, "done": True}
            )
        self._signal()

    async def _acquire(self, refused: str | None) -> str:
        deadline = self._clock() + self._wait_seconds
        failures = self._renewal_failures
        while True:
            if self.gate.blocked:
                await self.gate.wait_open()  # a refused login: wait with the holder
                deadline = self._clock() + self._wait_seconds
                continue
            token = self._candidate(refused)
            if token is not None:
                self._inflight[token] += 1
                self._starving_since = None
                return token
            now = self._clock()
            if self._holding_pause(now):
                deadline = max(deadline, now + POLL_SECONDS)  # bounded by the pause itself
            else:
                self._starving(now)
                failure = self._renewal_failure
                if self.is_holder and failure is not None and self._renewal_failures > failures:
                    raise failure  # this replica's renewal failed and it has no token: say why
            if now >= deadline:
                raise TokenError(
                    "shared_token",
                    None,
                    TIMEOUT,
                    "no usable shared token from the holder in time",
                    classify("login", None, TIMEOUT),
                )
            await _wait_event(self._changed, min(POLL_SECONDS, deadline - now))

    def _holding_pause(self, now: float) -> bool:
        """A rotation is under way: new calls wait (bounded, if the holder dies meanwhile)."""
        if self._rotating or self.is_holder:
            return self._rotating  # the holder knows when its own rotation ends
        rotation = self.rotation
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
        tok = self.latest
        if tok is None or tok.access == refused or not self._usable(tok, self._wall()):
            return None
        if self._holding_pause(self._clock()):
            return None
        if (
            self._overdue is not None
            and self.rotation is not None
            and self._confirmed != tok.access
        ):
            # The holder died mid-rotation: its renewal may have replaced this token. One call
            # tries it; the others wait for its answer instead of all meeting a 1010005.
            if self._probe is not None:
                return None
            self._probe = tok.access
        return tok.access

    def _usable(self, token: SharedToken | None, now_wall: float) -> bool:
        return (
            token is not None
            and now_wall < token.expires_at - EXPIRY_GUARD_SECONDS
            and fingerprint(token.access) not in self._refused_fps
        )

    def _starving(self, now: float) -> None:
        """No usable token: ask the holder; with no holder at all for the grace, take over."""
        self._demand = True
        if self.is_holder or self._should_hold():
            self._wake_holder()
            return
        self._retry_undecrypted()
        if self._starving_since is None:
            self._starving_since = now
            self._notice(self._need_key, {"by": self._instance})
        quiet_since = max(self._starving_since, self._holder_seen_at or self._starving_since)
        if now - quiet_since >= self._takeover_after:
            log.warning(
                "token_takeover",
                instance=self._instance,
                without_token_seconds=round(now - self._starving_since, 1),
            )
            self.takeovers += 1
            self._acting, self._fenced = True, False
            self._starving_since = None
            self._start_holding()

    # ------------------------------------------------------------------ holder election
    @property
    def is_holder(self) -> bool:
        """This replica holds the fence (its producer is the group's token producer)."""
        return self._holding

    @property
    def elected(self) -> bool:
        return self._elected

    def set_holder(self, elected: bool) -> None:
        """Called at every assignment: True when this replica owns input partition 0."""
        if elected == self._elected and not (elected and self._fenced):
            return
        self._elected = elected
        log.info("token_holder", holder=elected, instance=self._instance)
        if elected:
            self.elections += 1
            self._acting = self._fenced = False
            self._start_holding()
        elif not self._acting:
            self._wake_holder()  # the loop ends after a rotation in progress

    def _should_hold(self) -> bool:
        return (self._elected or self._acting) and not self._fenced

    def _start_holding(self) -> None:
        if self.gate.source == "holder":
            self.gate.unblock()  # this replica logs in itself now, and finds out by itself
        previous = self._holder_task
        self._holder_task = asyncio.get_running_loop().create_task(
            self._hold(previous), name="token-holder"
        )

    def _wake_holder(self) -> None:
        self._wake.set()

    async def _sleep_or_wake(self, seconds: float) -> None:
        if not self._wake.is_set():
            await _wait_event(self._wake, seconds)
        self._wake.clear()

    async def _hold(self, previous: asyncio.Task[None] | None) -> None:
        """One stint as holder: fence, catch up, adopt, then renew and publish until it ends."""
        if previous is not None and not previous.done():
            self._wake_holder()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await previous
        delay = RETRY_SECONDS
        while self._should_hold():
            channel = self._channel()
            try:
                await channel.start()  # fences the previous holder
                await self._serve_as_holder(channel)
            except HolderFencedError:
                # Another replica became the holder after us: a newer election (ours is stale
                # and the next assignment says so) or a takeover. Follow it; claim it again only
                # when elected anew or when no holder is heard for the takeover grace.
                self.fenced += 1
                self._metrics.token_rotations.labels(result="fenced").inc()
                log.warning("token_holder_fenced", instance=self._instance, action="follow")
                self._fenced = True
                self._acting = False
            except Exception as exc:  # noqa: BLE001 - Kafka unreachable: try again
                log.warning("token_holder_start_failed", error=type(exc).__name__)
                await self._sleep_or_wake(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
            else:
                return
            finally:
                self._holding = self._rotating = False
                self._signal()
                await channel.stop()

    async def _serve_as_holder(self, channel: Channel) -> None:
        caught_up = await self.catch_up()
        self._adopt(caught_up)
        self._holding = True
        self._busy.clear()
        log.info("token_holder_ready", instance=self._instance, orphan_rotation=self._orphan)
        self._signal()
        delay = RETRY_SECONDS
        while self._should_hold():
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
        self.manager.discard()
        latest, rotation = self.latest, self.rotation
        self._orphan = rotation is not None
        self.rotation = None
        self._refresh_spent = self._orphan
        if latest is None:
            return
        self.manager.adopt(latest, self._wall())
        self._republish = True  # a claim: the followers see a live holder
        log.info(
            "token_adopted",
            previous_holder=latest.holder,
            caught_up=caught_up,
            orphan_rotation=self._orphan,
            expires_in=round(latest.expires_at - self._wall(), 1),
        )

    async def _step(self, channel: Channel) -> bool:
        """One decision of the holder loop; False: nothing happened, sleep a little."""
        held = self.manager.current()
        now = self._clock()
        if self.gate.blocked:
            await self._sleep_or_wake(self._login_backoff())
            return await self._rotate(channel, login=True)
        if held is None:
            if self._demand:
                return await self._rotate(channel, login=True)
            await self._sleep_or_wake(CATCH_UP_TIMEOUT_SECONDS)  # woken by a need
        elif self._orphan or fingerprint(held.access) in self._refused_fps or now >= held.renew_at:
            expired = now >= held.expires_at - EXPIRY_GUARD_SECONDS
            can_refresh = self.manager.can_refresh() and not self._refresh_spent
            if expired and not can_refresh and not self._demand:
                self.manager.discard()  # nobody needs one: log in when someone does
                return True
            return await self._rotate(channel, login=self._orphan or not can_refresh)
        elif self._republish or self.latest is None or self.latest.access != held.access:
            await self._publish(channel, held)
        else:
            await self._sleep_or_wake(max(0.0, held.renew_at - now))
        return True

    def _login_backoff(self) -> float:
        settings = self.manager._settings
        return random.uniform(  # noqa: S311 - jitter
            settings.retry_backoff_initial_seconds, settings.retry_backoff_max_seconds
        )

    async def _rotate(self, channel: Channel, *, login: bool) -> bool:
        """Announce, let calls on the old token drain, renew once, publish."""
        old = self.latest
        was_blocked = self.gate.blocked
        seq = self._next_sequence()
        self._rotating = True
        self._signal()
        try:
            payload = {"seq": seq, "by": self._instance, "login": login}
            await channel.write(
                [(self._rotating_key, self._codec_now().encrypt(payload, self._rotating_key))]
            )  # fenced: raises before any platform call
            if old is not None and not await self._drain(seq, old.access):
                # No longer the holder: no call. Publish the old token again, which ends the
                # rotation (the next holder need not treat it as unfinished).
                held = self.manager.current()
                if held is not None:
                    await self._publish(channel, held)
                return True
            # The drain took a while: make sure nobody fenced us meanwhile, right before the
            # call (the same rotation, written again).
            await channel.write(
                [(self._rotating_key, self._codec_now().encrypt(payload, self._rotating_key))]
            )
            try:
                new = await self.manager.renew_once(login=login)
            except TokenError as exc:
                return await self._rotation_failed(
                    channel, exc, login=login, was_blocked=was_blocked
                )
            self._orphan = self._refresh_spent = False
            self._renewal_failure = None
            self._metrics.token_rotations.labels(result="renewed").inc()
            await self._publish(channel, new)
            return True
        finally:
            self._rotating = False
            self._busy.pop(seq, None)
            self._signal()

    async def _rotation_failed(
        self, channel: Channel, exc: TokenError, *, login: bool, was_blocked: bool
    ) -> bool:
        self._metrics.token_rotations.labels(result="failed").inc()
        self._renewal_failure = exc
        self._renewal_failures += 1
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
                await self._publish_blocked(channel, exc.error_code or "", self.gate.reason or "")
            return True  # the next step waits the login backoff
        held = self.manager.current()
        if held is not None and self._usable(self.latest, self._wall()):
            await self._publish(channel, held)  # ends the followers' hold: the old token works
        return False

    async def _drain(self, seq: int, old: str) -> bool:
        """Wait for the rotation window and for every call in flight on ``old`` (ours, and
        those of replicas that said they have some), bounded by the request timeout."""
        start = self._clock()
        hard = start + self._window + self._wait_seconds
        while True:
            if not self._should_hold():
                return False
            now = self._clock()
            busy = [who for who, done in self._busy.get(seq, {}).items() if not done]
            mine = self._inflight.get(old, 0)
            if now >= start + self._window and not busy and mine == 0:
                return True
            if now >= hard:
                log.warning("token_rotation_drain_timeout", replicas_busy=len(busy), own=mine)
                return True
            await _wait_event(self._changed, min(POLL_SECONDS, hard - now))

    async def _publish(self, channel: Channel, tok: _Token) -> None:
        offset = self._wall() - self._clock()
        shared = SharedToken(
            access=tok.access,
            refresh=tok.refresh,
            issued_at=tok.obtained_at + offset,
            expires_at=tok.expires_at + offset,
            renew_at=tok.renew_at + offset,
            holder=self._instance,
            sequence=self._next_sequence(),
        )
        await channel.write(
            [(self._token_key, self._codec_now().encode_token(shared, self._token_key))]
        )
        self._republish = False
        self._take(shared)
        log.info("shared_token_published", expires_in=round(tok.expires_at - self._clock(), 1))

    async def _publish_blocked(self, channel: Channel, code: str, reason: str) -> None:
        payload: dict[str, Any] = {"code": code, "reason": reason, "by": self._instance}
        payload["seq"] = self._next_sequence()
        await channel.write(
            [(self._blocked_key, self._codec_now().encrypt(payload, self._blocked_key))]
        )

    def _next_sequence(self) -> int:
        seen = self.latest.sequence if self.latest is not None else None
        rotation = self.rotation.sequence if self.rotation is not None else None
        self._sequence = max(self._sequence, seen or 0, rotation or 0, self._blocked_seq or 0) + 1
        return self._sequence

    # ------------------------------------------------------------------ health
    def valid(self) -> bool:
        return self._usable(self.latest, self._wall())

    def healthy(self) -> bool:
        if self.is_holder:
            return self.valid() or self.manager.healthy()
        return self.valid() or self._starving_since is None
