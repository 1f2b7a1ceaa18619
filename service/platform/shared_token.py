"""One token holder per application, elected through Kafka group membership (docs/tokens.md, B).

Each login (and each refreshToken) invalidates the application's previous access token, so only
one replica renews: the *holder*, the group member that owns partition 0 of the input topic
(:meth:`SharedTokenProvider.set_holder`, called at every assignment). The holder keeps the token
with a :class:`~service.platform.tokens.TokenManager` (renewal ahead of expiry, single flight) and
publishes every new token to a compacted, single-partition topic, AES-GCM encrypted with a key
derived from the app secret (:class:`TokenCodec`). Every replica reads that topic from the start
and keeps the latest token; followers never log in, they wait for the holder's next record.

Refinements over the plain design (see docs/tokens.md for the reasons):

* records are keyed by ``<group id>/<app id>``: one holder per group, and groups never see each
  other's records;
* followers stop using a token just before its ``renew_at`` (which is in the record) and wait
  briefly for the holder's fresh one, so a renewal does not meet calls in flight on the old one;
* a holder without a token logs in only on demand (its own call, or a follower's *need* notice),
  then renews proactively;
* a follower whose token is refused (1010005) publishes a *refused* notice (a token fingerprint,
  never the token); the holder renews once if the notice names its current token, and otherwise
  publishes its current token again (the follower holds an older one);
* every token record carries a sequence number (one more than the highest the publisher has
  seen) beside its issue time, and a replica never replaces the token it holds with an older
  record: a captured record written again (a replay) is ignored and logged, and the holder
  publishes its current token again so the topic's last record is the current one;
* a follower that has had no usable token for ``token_takeover_seconds`` (jittered) logs in once
  itself, publishes, and renews as an *acting* holder until any other replica publishes;
* a new holder reads the topic to its end and adopts a still-valid token (with its refresh
  token) instead of logging in; it republishes it under its own name, which retires an acting
  holder;
* a holder whose login is refused for good (a wrong or rotated secret: the manager's
  :class:`~service.platform.tokens.AuthGate` closes) publishes a *blocked* notice; followers close
  their gate too (their swaps wait, their input pauses) until the holder's next token; the key
  of the records follows the secret, read again from ``REBIND_PLATFORM__SECRET_FILE``.

Neither the token nor the secret is ever logged or put in a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import httpx
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service import logs
from service.config import KafkaSettings, PlatformSettings
from service.kafka import FatalPipelineError, kafka_client_options
from service.metrics import Metrics
from service.platform.budget import RateBudget
from service.platform.client import CONNECT_TIMEOUT_MAX_SECONDS, build_ssl_context
from service.platform.errors import TIMEOUT, classify
from service.platform.tokens import (
    REFRESH_TOKEN_LIFETIME_SECONDS,
    AuthGate,
    SecretReader,
    TokenError,
    TokenManager,
    _Token,
)

log = structlog.get_logger(__name__)

RECORD_VERSION: Final = 1
HKDF_SALT: Final = b"device-rebind/shared-token/v1"
HKDF_INFO: Final = b"AES-256-GCM key of the token topic"
NONCE_BYTES: Final = 12
"""A random 96-bit nonce per record (AES-GCM's standard nonce size)."""
REFUSED_SUFFIX: Final = "/refused"
NEED_SUFFIX: Final = "/need"
BLOCKED_SUFFIX: Final = "/blocked"
MAX_REASON_CHARS: Final = 600
HANDOVER_PAUSE_SECONDS: Final = 0.5
"""Followers stop taking a token this long before its renew_at (calls in flight can finish)."""
HANDOVER_WAIT_SECONDS: Final = 5.0
"""How long followers wait for the holder's renewal before using the old (unexpired) token."""
EXPIRY_GUARD_SECONDS: Final = 1.0
"""A token this close to its expiry is no longer handed out."""
CATCH_UP_TIMEOUT_SECONDS: Final = 15.0
PUBLISH_RETRY_SECONDS: Final = 1.0
TAKEOVER_JITTER: Final = 0.5
"""The takeover grace is drawn from [grace, grace * (1 + jitter)] once per replica."""
POLL_SECONDS: Final = 0.25
TOPIC_REPLICATION_MAX: Final = 3


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


def fingerprint(token: str) -> str:
    """A short, non-reversible name of a token (for refused notices; never logged with it)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class SharedToken:
    """What the holder publishes. Times are epoch seconds (they travel between hosts)."""

    access: str
    refresh: str | None
    issued_at: float
    expires_at: float
    renew_at: float
    holder: str
    sequence: int | None = None
    """One more than the highest sequence the publisher had seen (None: a record of a version
    without sequences). Records are ordered by (sequence, issued_at): see :func:`older`."""

    def __repr__(self) -> str:  # never print the token
        return (
            f"SharedToken(holder={self.holder!r}, sequence={self.sequence}, "
            f"expires_at={self.expires_at:.0f})"
        )

    def __post_init__(self) -> None:
        # A token read from the topic is masked in the logs like one obtained here.
        logs.register_secret(self.access)
        logs.register_secret(self.refresh)


def older(record: SharedToken, held: SharedToken) -> bool:
    """``record`` was published before ``held``: a lower sequence, or the same sequence and an
    earlier issue time (two publishers that had seen the same records: the later token is the
    one the platform knows). Without sequences (a record of an earlier version) the issue times
    decide. A record equal to ``held`` is not older (the same record read twice)."""
    if record.sequence is not None and held.sequence is not None:
        return (record.sequence, record.issued_at) < (held.sequence, held.issued_at)
    return record.issued_at < held.issued_at


class InvalidRecordError(Exception):
    """A token-topic record that cannot be used (wrong key, corrupt, other version)."""


class TokenCodec:
    """AES-GCM with a key derived from the app secret (HKDF-SHA256); the record key is the AAD.

    Layout: ``version (1 byte) | nonce (12 bytes) | ciphertext+tag``. Whoever can read the topic but
    lacks the secret learns nothing; whoever has the secret could log in anyway.
    """

    def __init__(self, app_id: str, secret: str) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=HKDF_SALT,
            info=HKDF_INFO + b"|" + app_id.encode(),
        ).derive(secret.encode())
        self._aead = AESGCM(key)

    def encrypt(self, payload: dict[str, Any], aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(payload, separators=(",", ":")).encode()
        return bytes([RECORD_VERSION]) + nonce + self._aead.encrypt(nonce, plain, aad)

    def decrypt(self, value: bytes | None, aad: bytes) -> dict[str, Any]:
        if not value or len(value) < 1 + NONCE_BYTES + 16:
            raise InvalidRecordError("too short")
        if value[0] != RECORD_VERSION:
            raise InvalidRecordError(f"unknown version {value[0]}")
        nonce, sealed = value[1 : 1 + NONCE_BYTES], value[1 + NONCE_BYTES :]
        try:
            plain = self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise InvalidRecordError("authentication failed (another secret?)") from None
        try:
            payload = json.loads(plain)
        except ValueError:
            raise InvalidRecordError("not JSON") from None
        if not isinstance(payload, dict):
            raise InvalidRecordError("not an object")
        return payload

    def decrypts(self, value: bytes | None, aad: bytes) -> bool:
        try:
            self.decrypt(value, aad)
        except InvalidRecordError:
            return False
        return True

    def encode_token(self, token: SharedToken, aad: bytes) -> bytes:
        return self.encrypt(
            {
                "accessToken": token.access,
                "refreshToken": token.refresh,
                "issuedAt": token.issued_at,
                "expiresAt": token.expires_at,
                "renewAt": token.renew_at,
                "holder": token.holder,
                "seq": token.sequence,
            },
            aad,
        )

    def decode_token(self, value: bytes | None, aad: bytes) -> SharedToken:
        p = self.decrypt(value, aad)
        access, refresh, holder = p.get("accessToken"), p.get("refreshToken"), p.get("holder")
        times = [p.get("issuedAt"), p.get("expiresAt"), p.get("renewAt")]
        if not isinstance(access, str) or not access or not isinstance(holder, str):
            raise InvalidRecordError("fields missing")
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
            raise InvalidRecordError("times missing")
        issued, expires, renew = (float(t) for t in times)  # type: ignore[arg-type]
        seq = p.get("seq")
        return SharedToken(
            access=access,
            refresh=refresh if isinstance(refresh, str) and refresh else None,
            issued_at=issued,
            expires_at=expires,
            renew_at=min(renew, expires),
            holder=holder,
            sequence=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        )


class _HolderTokens(TokenManager):
    """The holder's TokenManager: can adopt a shared token and reports every renewal."""

    def __init__(self, *args: Any, on_renewed: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_renewed = on_renewed

    async def _do_renew(self, *, force_login: bool) -> _Token:
        new = await super()._do_renew(force_login=force_login)
        self._on_renewed()
        return new

    def current(self) -> _Token | None:
        return self._token

    def valid(self) -> bool:
        return self._is_valid() == 1.0

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
        publish: Callable[[bytes, bytes], Awaitable[None]] | None = None,
    ) -> None:
        self._kafka = kafka
        self._topic = topic
        self._tp = TopicPartition(topic, 0)
        self._instance = kafka.instance_id
        self._clock = clock
        self._wall = wall
        self._wait_seconds = wait_seconds or platform.request_timeout_seconds
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
            on_renewed=self._renewed,
            secret=self._secret,
        )
        self.gate: AuthGate = self.manager.gate
        self.gate.subscribe(self._gate_changed)
        metrics.token_valid.set_function(lambda: 1.0 if self.valid() else 0.0)
        self._publish_hook = publish
        # shared state, fed by the reader
        self.latest: SharedToken | None = None
        self._refused_fps: set[str] = set()
        """Fingerprints of tokens refused (by us or a notice): never handed out again."""
        self._notified: set[str] = set()
        self._changed = asyncio.Event()
        self._position = 0
        self._caught_up = asyncio.Event()
        self._starving_since: float | None = None
        self._overdue: tuple[str, float] | None = None
        # holder state
        self._elected = False
        self._acting = False
        self._holder_task: asyncio.Task[None] | None = None
        self._holder_ready = asyncio.Event()
        self._holder_wake = asyncio.Event()
        self._wake_waiter: asyncio.Future[None] | None = None
        self._published: str | None = None
        self._demand = False
        """Someone needs a token: until then a holder without one does not log in (lazily, as
        a single replica always did, so a wrong secret shows at the first swap)."""
        self._orphans: set[asyncio.Task[None]] = set()
        self._takeover_lock = asyncio.Lock()
        # Kafka
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._reader: asyncio.Task[None] | None = None
        self.takeovers = 0
        self.stale_records = 0
        """Token records ignored because they are older than the token held (replays)."""
        self._sequence = 0
        """The highest sequence this replica published."""
        self.elections = 0
        """How often this replica became the elected holder."""

    def _init_records(self, platform: PlatformSettings, scope: str) -> None:
        """The record keys of this group and application, and the codec of the secret."""
        self._token_key, self._refused_key, self._need_key, self._blocked_key = (
            (scope + suffix).encode()
            for suffix in ("", REFUSED_SUFFIX, NEED_SUFFIX, BLOCKED_SUFFIX)
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
        options = kafka_client_options(self._kafka)
        await self._ensure_topic(options)
        self._consumer = AIOKafkaConsumer(
            **options,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        await self._consumer.start()
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        if self._publish_hook is None:
            self._producer = AIOKafkaProducer(**options, acks="all", linger_ms=0)
            await self._producer.start()
        self._reader = asyncio.create_task(self._read_loop(), name="token-reader")

    async def aclose(self) -> None:
        await self.manager.aclose()
        for task in (self._holder_task, self._reader, *self._orphans):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        if self._own_http:
            await self._http.aclose()

    async def _ensure_topic(self, options: dict[str, Any]) -> None:
        admin = AIOKafkaAdminClient(**options, request_timeout_ms=15_000)
        await admin.start()
        try:
            if self._topic in await admin.list_topics():
                return
            brokers = len((await admin.describe_cluster()).get("brokers", ())) or 1
            response = await admin.create_topics(
                [
                    NewTopic(
                        name=self._topic,
                        num_partitions=1,
                        replication_factor=min(TOPIC_REPLICATION_MAX, brokers),
                        topic_configs={"cleanup.policy": "compact"},
                    )
                ],
                timeout_ms=15_000,
            )
            for _topic, code, *_rest in response.topic_errors:
                if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (another replica was faster)
                    raise FatalPipelineError(
                        f"REBIND_TOPICS__TOKEN: topic {self._topic!r} is missing and could not "
                        f"be created (error {code}); create it compacted with one partition"
                    )
            log.warning("token_topic_created", topic=self._topic, cleanup_policy="compact")
        finally:
            await admin.close()

    # ------------------------------------------------------------------ reader
    async def _read_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        end: int | None = None
        while True:
            try:
                if end is None:
                    end = (await consumer.end_offsets([self._tp]))[self._tp]
                batch = await consumer.getmany(self._tp, timeout_ms=500)
                for msg in batch.get(self._tp, ()):
                    self.receive(msg.key, msg.value, offset=msg.offset)
                self._position = await consumer.position(self._tp)
            except Exception as exc:  # noqa: BLE001 - a broker hiccup must not end the reader
                log.warning("token_topic_read_failed", error=type(exc).__name__)
                await asyncio.sleep(PUBLISH_RETRY_SECONDS)
                continue
            if self._position >= end:
                self._caught_up.set()

    async def catch_up(self, timeout: float = CATCH_UP_TIMEOUT_SECONDS) -> bool:
        """Read the topic up to its current end (True), or give up after ``timeout``."""
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
        if key == self._refused_key:
            self._receive_refused(value, offset)
            return
        if key == self._blocked_key:
            self._receive_blocked(value, offset)
            return
        if key == self._need_key:
            try:
                self._decrypt(value, self._need_key)
            except InvalidRecordError as exc:
                log.warning("token_record_ignored", offset=offset, reason=str(exc))
                return
            self._demand = True
            if self.is_holder:
                self._wake_holder()
            return
        if key == self._token_key:
            self._receive_token(value, offset)
        # else: another group's or application's record

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
                action="ignored" if not self.is_holder else "republish",
            )
            if self.is_holder:
                self._published = None
                self._wake_holder()
            return
        self.latest = token
        if self.gate.source == "holder" and (
            self._blocked_seq is None
            or token.sequence is None
            or token.sequence > self._blocked_seq
        ):
            log.info("token_holder_login_accepted", action="input resumed")
            self.gate.unblock()  # the holder logged in again
        if previous is not None and previous.access == token.access:
            return  # a claim of the same token by a new holder
        log.info(
            "shared_token_received",
            holder=token.holder,
            offset=offset,
            expires_in=round(token.expires_at - self._wall(), 1),
        )
        if token.holder != self._instance:
            if self._acting and not self._elected:
                log.info("token_takeover_ends", holder=token.holder)
                self._acting = False
                self._stop_holding()
            if self.is_holder and self._newer_than_mine(token):
                # Someone else renewed (a late old holder, an acting follower): their token has
                # replaced ours on the platform. Hold it, and claim it under our name.
                self.manager.adopt(token, self._wall())
                self._published = None
                self._wake_holder()
        self._starving_since = None
        self._overdue = None
        self._signal()

    def _receive_blocked(self, value: bytes | None, offset: int) -> None:
        """The holder's login is refused for good: wait with it (unless this replica holds)."""
        try:
            notice = self._decrypt(value, self._blocked_key)
        except InvalidRecordError as exc:
            log.warning("token_record_ignored", offset=offset, reason=str(exc))
            return
        seq, code, reason = notice.get("seq"), notice.get("code"), notice.get("reason")
        if notice.get("by") == self._instance or self.is_holder:
            return
        if not isinstance(seq, int) or not isinstance(code, str) or not isinstance(reason, str):
            return
        held = self.latest.sequence if self.latest is not None else None
        if held is not None and seq <= held:
            return  # the holder published a token since (or a replay of an old notice)
        self._blocked_seq = seq
        log.warning("token_holder_login_refused", error_code=code, action="input paused")
        self.gate.block(code, f"{reason[:MAX_REASON_CHARS]} (on the token holder)", source="holder")

    def _gate_changed(self, gate: AuthGate) -> None:
        """This replica's own login was refused: as the holder, tell the followers."""
        if gate.blocked and gate.source == "login" and self.is_holder:
            code, reason = gate.code or "", gate.reason or ""
            task = asyncio.get_running_loop().create_task(self._publish_blocked(code, reason))
            self._orphans.add(task)
            task.add_done_callback(self._orphans.discard)

    async def _publish_blocked(self, code: str, reason: str) -> None:
        seq = self._next_sequence()
        payload = {"code": code, "reason": reason, "by": self._instance, "seq": seq}
        try:
            await self._send(
                self._blocked_key, self._codec_now().encrypt(payload, self._blocked_key)
            )
        except Exception as exc:  # noqa: BLE001 - followers find out by starving
            log.warning("token_blocked_notice_failed", error=type(exc).__name__)

    def _next_sequence(self) -> int:
        seen = self.latest.sequence if self.latest is not None else None
        self._sequence = max(self._sequence, seen or 0, self._blocked_seq or 0) + 1
        return self._sequence

    def _receive_refused(self, value: bytes | None, offset: int) -> None:
        try:
            notice = self._decrypt(value, self._refused_key)
        except InvalidRecordError as exc:
            log.warning("token_record_ignored", offset=offset, reason=str(exc))
            return
        fp = notice.get("fingerprint")
        if not isinstance(fp, str):
            return
        self._refused_fps.add(fp)
        if self.is_holder:
            current = self.manager.current()
            if current is not None and fingerprint(current.access) != fp:
                # A follower was refused a token that is not ours: it holds an older one (it
                # started after the current record was compacted away, or read a replay).
                # Publish ours again; it is newer than whatever that follower holds.
                log.info("token_refused_notice_for_an_older_token", action="republish")
                self._published = None
            self._wake_holder()
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ holder election
    @property
    def is_holder(self) -> bool:
        return self._elected or self._acting

    @property
    def elected(self) -> bool:
        return self._elected

    def set_holder(self, elected: bool) -> None:
        """Called at every assignment: True when this replica owns input partition 0."""
        if elected == self._elected:
            return
        self._elected = elected
        log.info("token_holder", holder=elected, instance=self._instance)
        if elected:
            self.elections += 1
            self._acting = False
            self._start_holding(adopt=True)
        elif not self._acting:
            self._stop_holding()

    def _start_holding(self, *, adopt: bool) -> None:
        if self.gate.source == "holder":
            self.gate.unblock()  # this replica logs in itself now, and finds out by itself
        if self._holder_task is not None and not self._holder_task.done():
            return
        self._holder_ready.clear()
        self._published = None
        self._holder_task = asyncio.get_running_loop().create_task(
            self._hold(adopt=adopt), name="token-holder"
        )

    def _stop_holding(self) -> None:
        # A renewal in flight is shielded by the manager: it still completes and is published
        # (see _renewed), and the next holder adopts it from the topic.
        if self._holder_task is not None:
            self._holder_task.cancel()
            self._holder_task = None
        self._holder_ready.clear()

    def _wake_holder(self) -> None:
        self._holder_wake.set()
        waiter = self._wake_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _renewed(self) -> None:
        """The manager has a new token: the holder loop publishes it, or (holding ended while
        the renewal was in flight) a one-off task does, since the platform now knows only it."""
        if self._holder_task is not None and not self._holder_task.done():
            self._wake_holder()
            return
        tok = self.manager.current()
        if tok is None:
            return
        task = asyncio.get_running_loop().create_task(self._publish_orphan(tok))
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    async def _publish_orphan(self, tok: _Token) -> None:
        try:
            await self._publish_token(tok)
        except Exception as exc:  # noqa: BLE001 - best effort; followers will report 1010005
            log.warning("token_publish_failed", error=type(exc).__name__)

    def _usable(self, token: SharedToken | None, now_wall: float) -> bool:
        return (
            token is not None
            and now_wall < token.expires_at - EXPIRY_GUARD_SECONDS
            and fingerprint(token.access) not in self._refused_fps
        )

    def _newer_than_mine(self, token: SharedToken) -> bool:
        """``token`` was issued after the one the manager holds (a later login/refresh)."""
        mine = self.manager.current()
        if mine is None:
            return True
        mine_issued = mine.obtained_at + (self._wall() - self._clock())
        return token.issued_at > mine_issued

    def _adoptable(self, token: SharedToken) -> bool:
        """Still valid, or renewable with its refresh token (a refreshToken, not a login)."""
        if fingerprint(token.access) in self._refused_fps:
            return False
        now = self._wall()
        return self._usable(token, now) or (
            token.refresh is not None and now < token.issued_at + REFRESH_TOKEN_LIFETIME_SECONDS
        )

    async def _hold(self, *, adopt: bool) -> None:
        if adopt:
            caught_up = await self.catch_up()
            latest = self.latest
            # What this manager holds (from an earlier stint, or a login while the catch-up was
            # slow) wins only when it is newer than the topic's latest.
            if latest is not None and self._newer_than_mine(latest):
                if self._adoptable(latest):
                    self.manager.adopt(latest, self._wall())
                    log.info(
                        "token_adopted",
                        previous_holder=latest.holder,
                        caught_up=caught_up,
                        expires_in=round(latest.expires_at - self._wall(), 1),
                    )
                else:
                    self.manager.discard()  # the newest token is dead; ours is older still
        self._holder_ready.set()
        while True:
            self._holder_wake.clear()
            if self.manager.current() is None and not self._demand:
                await self._sleep_or_wake(CATCH_UP_TIMEOUT_SECONDS)  # woken by a need notice
                continue
            try:
                current = self.manager.current()
                if current is not None and fingerprint(current.access) in self._refused_fps:
                    await self.manager.invalidated(current.access)
                await self.manager.get()
            except TokenError as exc:
                log.warning("token_holder_renewal_failed", error_code=exc.error_code)
                await self._sleep_or_wake(PUBLISH_RETRY_SECONDS)
                continue
            tok = self.manager.current()
            if tok is None:
                continue
            if tok.access != self._published:
                try:
                    await self._publish_token(tok)
                except Exception as exc:  # noqa: BLE001 - Kafka down: retry, keep serving
                    log.warning("token_publish_failed", error=type(exc).__name__)
                    await self._sleep_or_wake(PUBLISH_RETRY_SECONDS)
                    continue
                self._published = tok.access
            await self._sleep_or_wake(max(0.0, tok.renew_at - self._clock()))

    async def _sleep_or_wake(self, seconds: float) -> None:
        """Sleep ``seconds`` or until :meth:`_wake_holder` (a plain future and a timer: see
        :func:`_wait_event` for why not ``wait_for``)."""
        if self._holder_wake.is_set():
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._wake_waiter = waiter

        def release() -> None:
            if not waiter.done():
                waiter.set_result(None)

        timer = loop.call_later(seconds, release)
        try:
            await waiter
        finally:
            timer.cancel()
            self._wake_waiter = None

    async def _publish_token(self, tok: _Token) -> None:
        offset = self._wall() - self._clock()
        sequence = self._next_sequence()
        shared = SharedToken(
            access=tok.access,
            refresh=tok.refresh,
            issued_at=tok.obtained_at + offset,
            expires_at=tok.expires_at + offset,
            renew_at=tok.renew_at + offset,
            holder=self._instance,
            sequence=sequence,
        )
        await self._send(self._token_key, self._codec_now().encode_token(shared, self._token_key))
        log.info("shared_token_published", expires_in=round(tok.expires_at - self._clock(), 1))

    async def _send(self, key: bytes, value: bytes) -> None:
        if self._publish_hook is not None:
            await self._publish_hook(key, value)
            return
        if self._producer is None:
            raise RuntimeError("token producer not started")
        await self._producer.send_and_wait(self._topic, value, key=key, partition=0)

    # ------------------------------------------------------------------ TokenProvider
    async def get(self) -> str:
        if self.is_holder:
            return await self._holder_get()
        return await self._follower_get(None)

    async def invalidated(self, token: str) -> str:
        if self.is_holder:
            await self._await_holder_ready()
            return await self.manager.invalidated(token)
        fp = fingerprint(token)
        self._refused_fps.add(fp)
        if fp not in self._notified:
            self._notified.add(fp)
            log.info("platform_token_rejected", action="notify_holder")
            try:
                await self._send(
                    self._refused_key,
                    self._codec_now().encrypt(
                        {"fingerprint": fp, "by": self._instance}, self._refused_key
                    ),
                )
            except Exception as exc:  # noqa: BLE001 - the holder learns it later anyway
                log.warning("token_refused_notice_failed", error=type(exc).__name__)
        return await self._follower_get(token)

    async def _await_holder_ready(self) -> None:
        await _wait_event(self._holder_ready, self._wait_seconds)

    async def _holder_get(self) -> str:
        self._demand = True
        await self._await_holder_ready()
        return await self.manager.get()

    async def _follower_get(self, refused: str | None) -> str:
        deadline = self._clock() + self._wait_seconds
        while True:
            if self.is_holder:
                return await self._holder_get()
            if self.gate.blocked and self.gate.source == "holder":
                await self.gate.wait_open()  # the holder's login is refused: wait with it
                deadline = self._clock() + self._wait_seconds
                continue
            now_wall, now = self._wall(), self._clock()
            tok = self.latest
            if tok is not None and tok.access != refused and self._usable(tok, now_wall):
                self._starving_since = None
                if now_wall < tok.renew_at - HANDOVER_PAUSE_SECONDS:
                    return tok.access
                # The holder renews now: give it a moment, then use the old token while it lasts.
                if self._overdue is None or self._overdue[0] != tok.access:
                    self._overdue = (tok.access, now)
                if now - self._overdue[1] >= HANDOVER_WAIT_SECONDS:
                    return tok.access
            else:
                self._retry_undecrypted()
                if self._starving_since is None:
                    self._starving_since = now
                    self._ask_for_token()
                if now - self._starving_since >= self._takeover_after:
                    return await self._take_over()
            if now >= deadline:
                raise TokenError(
                    "shared_token",
                    None,
                    TIMEOUT,
                    "no usable shared token from the holder in time",
                    classify("login", None, TIMEOUT),
                )
            await _wait_event(self._changed, min(POLL_SECONDS, deadline - now))

    def _ask_for_token(self) -> None:
        """Tell the holder that a follower needs a token (once per time without one)."""

        async def ask() -> None:
            try:
                await self._send(
                    self._need_key,
                    self._codec_now().encrypt({"by": self._instance}, self._need_key),
                )
            except Exception as exc:  # noqa: BLE001 - the takeover is the fallback
                log.warning("token_need_notice_failed", error=type(exc).__name__)

        task = asyncio.get_running_loop().create_task(ask())
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    async def _take_over(self) -> str:
        """No usable token for the whole grace: log in once, publish, act as holder."""
        async with self._takeover_lock:
            if not self.is_holder:
                log.warning(
                    "token_takeover",
                    instance=self._instance,
                    without_token_seconds=round(self._takeover_after, 1),
                )
                self.takeovers += 1
                self._acting = True
                self.manager.discard()
                self._start_holding(adopt=False)
        return await self._holder_get()

    # ------------------------------------------------------------------ health
    def valid(self) -> bool:
        if self.is_holder:
            return self.manager.valid()
        return self._usable(self.latest, self._wall())

    def healthy(self) -> bool:
        if self.is_holder:
            return self.manager.healthy()
        return self.valid() or self._starving_since is None
