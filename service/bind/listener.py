"""The listener for the platform's ``bindDevice`` pushes.

A push is answered 2xx only once it is durably on Kafka: produced (acks=all, idempotent) to the
bind-notify topic, keyed by deviceId, to the partition ``REBIND_KAFKA__PARTITIONER`` names for it:
the partition of the device's swaps, whichever client produced them. The
owner of that partition correlates it with the device's watch in the ledger, so nothing depends
on which replica received the push, and a push acknowledged just before a crash is not lost. The
platform may retry a push that was not answered, so the same notification can arrive several
times: correlation makes repeats harmless.

Pushes are not signed, so the listener is closed by default (:class:`service.config.BindSettings`
refuses to start otherwise): a secret path segment of at least 128 bits
(``REBIND_BIND__PATH_SECRET``, compared in constant time; any other path answers 404), or client
certificates signed by ``REBIND_BIND__CLIENT_CA`` (mutual TLS, checked in the handshake). Every
request is bounded before it costs anything: a token bucket per peer address and one for all
peers (429 past them; the peer table is bounded, the oldest peer forgotten first), a body of at
most 64 KiB (413). Malformed or unknown pushes answer 400. Each answer is counted by result in
``rebind_bind_notifications_total`` (:data:`RESULTS_COUNTED`, a closed set); refusals that a
flood repeats (404, 429) are not logged, so a flood grows neither memory, nor the logs, nor the
bind-notify topic beyond ``REBIND_BIND__MAX_REQUESTS_PER_SECOND``.
"""

from __future__ import annotations

import contextlib
import hmac
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
import structlog
from aiohttp import web
from aiokafka import AIOKafkaProducer

from service.config import BindSettings
from service.events import device_id_problem
from service.httpserver import MAX_HEADERS, MAX_LINE_BYTES, new_guard, serve_guarded
from service.metrics import Metrics
from service.partitioner import Partitioner, partition_for

log = structlog.get_logger(__name__)

MAX_PUSH_BYTES: Final = 64 * 1024
MAX_PEERS: Final = 4096
"""Peer addresses with a token bucket of their own; past it the least recently seen is dropped."""
RESULTS: Final = frozenset({"succeeded", "expired"})
RESULTS_COUNTED: Final = (
    "accepted",
    "duplicate",
    "unproven",  # counted by the partition's owner: a push without a nodeId settles nothing
    "rejected",
    "wrong_path",
    "too_large",
    "rate_limited",
)
"""The ``result`` label of ``rebind_bind_notifications_total``: a closed set."""


def secret_path_matches(settings: BindSettings, path: str) -> bool:
    """True when ``path`` is the listener's path; compared in constant time (the path holds the
    secret segment)."""
    expected = listener_path(settings).rstrip("/").encode()
    return hmac.compare_digest(path.rstrip("/").encode("utf-8", "surrogateescape"), expected)


class PeerLimiter:
    """Token buckets: one per peer address (at most ``max_peers``, least recently seen dropped
    first) and one for all peers together; each holds one second of its rate."""

    def __init__(
        self,
        *,
        per_peer: float,
        total: float,
        max_peers: int = MAX_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_peer, self._total, self._max_peers, self._clock = (
            per_peer,
            total,
            max_peers,
            clock,
        )
        self._peers: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._all = (total, clock())

    def __len__(self) -> int:
        return len(self._peers)

    def allow(self, peer: str) -> bool:
        now = self._clock()
        tokens, at = self._peers.pop(peer, (self._per_peer, now))
        tokens = min(self._per_peer, tokens + (now - at) * self._per_peer)
        all_tokens, all_at = self._all
        all_tokens = min(self._total, all_tokens + (now - all_at) * self._total)
        allowed = tokens >= 1 and all_tokens >= 1
        if allowed:
            tokens -= 1
            all_tokens -= 1
        self._all = (all_tokens, now)
        self._peers[peer] = (tokens, now)
        while len(self._peers) > self._max_peers:
            self._peers.popitem(last=False)
        return allowed


class BadPushError(ValueError):
    """A push this service cannot use."""


def listener_path(settings: BindSettings) -> str:
    """The path the listener serves: the callback URL's path, plus the secret segment."""
    assert settings.callback_url is not None
    path = (urlsplit(str(settings.callback_url)).path or "/").rstrip("/")
    if settings.path_secret is not None:
        path = f"{path}/{settings.path_secret.get_secret_value()}"
    return path or "/"


def subscription_url(settings: BindSettings) -> str:
    """The callback URL given to the platform (with the secret segment)."""
    assert settings.callback_url is not None
    parts = urlsplit(str(settings.callback_url))
    return parts._replace(path=listener_path(settings), query="", fragment="").geturl()


def parse_push(body: bytes) -> dict[str, Any]:
    """The notification record to produce, from a push body; raises :class:`BadPushError`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadPushError("not JSON") from None
    if not isinstance(doc, dict):
        raise BadPushError("not a JSON object")
    if doc.get("notifyType") != "bindDevice":
        raise BadPushError("notifyType is not bindDevice")
    device = doc.get("deviceId")
    if not isinstance(device, str) or not 1 <= len(device) <= 256 or device_id_problem(device):
        raise BadPushError("deviceId is missing or invalid")
    result = doc.get("resultCode")
    if result not in RESULTS:
        raise BadPushError("resultCode is not succeeded or expired")
    info = doc.get("deviceInfo")
    node_id = info.get("nodeId") if isinstance(info, dict) else None
    status = info.get("status") if isinstance(info, dict) else None
    return {
        "deviceId": device,
        "resultCode": result,
        "nodeId": node_id if isinstance(node_id, str) else None,
        "status": status if isinstance(status, str) else None,
        "receivedAtMs": int(time.time() * 1000),
    }


class BindListener:
    """Serves ``POST <listener path>`` on its own port; each push goes to the bind-notify topic."""

    def __init__(
        self,
        settings: BindSettings,
        topic: str,
        kafka_options: dict[str, Any],
        metrics: Metrics,
        partitioner: Partitioner = "murmur2",
    ) -> None:
        self._settings = settings
        self._partitioner: Partitioner = partitioner
        self._partitions = 0  # of the bind-notify topic, read at start
        self._topic = topic
        self._metrics = metrics
        self._path = listener_path(settings)
        self._producer = AIOKafkaProducer(
            **kafka_options, enable_idempotence=True, acks="all", linger_ms=2
        )
        self._runner: web.AppRunner | None = None
        self._server: Any = None
        self._guard = new_guard()
        self._limiter = PeerLimiter(
            per_peer=settings.max_requests_per_second_per_peer,
            total=settings.max_requests_per_second,
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        await self._producer.start()
        self._partitions = len(await self._producer.partitions_for(self._topic))
        app = web.Application(client_max_size=MAX_PUSH_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            max_headers=MAX_HEADERS,
            shutdown_timeout=2.0,
        )
        await runner.setup()
        self._runner = runner
        context = None
        if self._settings.tls_cert is not None and self._settings.tls_key is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self._settings.tls_cert), str(self._settings.tls_key))
            if self._settings.client_ca is not None:  # mutual TLS: no certificate, no request
                context.load_verify_locations(cafile=str(self._settings.client_ca))
                context.verify_mode = ssl.CERT_REQUIRED
        self._server = await serve_guarded(
            runner, self._guard, self._settings.host, self._settings.port, context
        )
        log.info(
            "bind_listener_started",
            port=self.port,
            tls=context is not None,
            client_certificates=self._settings.client_ca is not None,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._guard.close_all()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(Exception):
            await self._producer.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:  # noqa: PLR0911 - one per refusal
        self._guard.request_started(request.transport)
        if not self._limiter.allow(request.remote or "unknown"):
            return self._refused(429, "too many requests", "rate_limited")
        if not secret_path_matches(self._settings, request.path):
            return self._refused(404, "not found", "wrong_path")
        if request.method != "POST":
            return _answer(405, "method not allowed")
        if (request.content_length or 0) > MAX_PUSH_BYTES:
            return self._refused(413, "push too large", "too_large")
        try:
            body = await request.read()
            notice = parse_push(body)
        except web.HTTPRequestEntityTooLarge:
            return self._refused(413, "push too large", "too_large")
        except BadPushError as exc:
            return self._rejected(400, str(exc))
        key = notice["deviceId"].encode()
        try:
            await (
                await self._producer.send(
                    self._topic,
                    orjson.dumps(notice),
                    key=key,
                    # the partition of the device's swaps, by the producers' partitioner
                    partition=partition_for(key, self._partitions, self._partitioner),
                )
            )
        except Exception:
            log.warning("bind_push_not_stored", action="answering 503", exc_info=True)
            return _answer(503, "try again")
        self._metrics.bind_notifications.labels(result="accepted").inc()
        log.info("bind_push_stored", device_id=notice["deviceId"], result=notice["resultCode"])
        return _answer(200, "ok")

    def _refused(self, status: int, why: str, result: str) -> web.StreamResponse:
        """Refused before the body is read: counted, not logged (a flood repeats it)."""
        self._metrics.bind_notifications.labels(result=result).inc()
        return _answer(status, why)

    def _rejected(self, status: int, why: str) -> web.StreamResponse:
        self._metrics.bind_notifications.labels(result="rejected").inc()
        log.warning("bind_push_rejected", reason=why)
        return _answer(status, why)


def _answer(status: int, text: str) -> web.StreamResponse:
    response = web.Response(status=status, text=text + "\n", content_type="text/plain")
    response.force_close()
    return response
