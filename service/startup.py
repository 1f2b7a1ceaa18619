"""Start-up when the world is not ready: Kafka not reachable yet, topics not created yet.

:class:`StartupSupervisor` repeats a start attempt (a pre-flight check of Kafka and the topics,
then the caller's start of its Kafka clients) with a capped exponential backoff, logging one line
per failed attempt that names the cause and the variable to look at, and exposing that cause as
the ``/readyz`` reason meanwhile (``/healthz`` stays 200: the process is fine, the world is not).

Permanent errors end the start at once with :class:`StartupError` (one line, naming the cause
and the variable): topics that are still missing after ``REBIND_KAFKA__TOPICS_GRACE_SECONDS``,
topics that are not co-partitioned, and whatever :func:`service.kafka.classify_startup_error`
calls permanent (credentials refused, ACLs, an untrusted certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import structlog

from service import topics
from service.config import Settings
from service.kafka import FatalPipelineError, classify_startup_error
from service.kafka_access import check_access

log = structlog.get_logger(__name__)

ATTEMPT_TIMEOUT_SECONDS: Final = 20.0
"""A pre-flight check that gets no answer for this long (a listener that never answers) fails."""

# Topic creation errors that no retry can cure: authorization, bad replication factor or config,
# a policy refusing the topic.
_PERMANENT_CREATE_ERRORS: Final = frozenset({29, 31, 38, 40, 44})


class StartupError(Exception):
    """The service cannot start and waiting will not help; the message is one line naming the
    cause and the variable. ``exit_code`` 2 for configuration (like a bad variable), else 1."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TopicsMissingError(Exception):
    """Required topics do not exist (yet)."""


def _named(item: topics.Planned) -> str:
    return f"{item.name} ({item.spec.variable})"


async def preflight(settings: Settings) -> None:
    """Kafka answers; the topics the service needs exist and are co-partitioned; the single-
    partition topics the service owns (token, budget) are created when missing.

    Raises :class:`TopicsMissingError`, :class:`StartupError` (permanent) or the Kafka client's
    error.
    """
    # TLS, SASL and ACLs first, each refusal named: a topic the principal may not see would
    # look missing below.
    await check_access(settings.kafka, settings.topics, settings.bind)
    admin = topics.admin_client(settings.kafka)
    try:
        await admin.start()
        plan = await topics.current_plan(admin, settings.topics)
        _check_co_partitioned(plan)
        create = [
            i
            for i in plan.missing
            if i.spec.created_by_service and i.spec.partitions is topics.Partitions.ONE
        ]
        if create:
            try:
                created = await topics.create_missing(admin, plan, only=create)
            except topics.TopicCreationError as exc:
                names = ", ".join(_named(i) for i in create)
                message = f"{names}: missing and {exc}; create with 'device-rebind topics create'"
                if set(exc.codes) & _PERMANENT_CREATE_ERRORS:
                    raise StartupError(message) from None
                raise TopicsMissingError(message) from None
            for name in created:
                log.warning("topic_created", topic=name, partitions=1, cleanup_policy="compact")
        missing = [
            i for i in plan.missing if i.spec.required_at_start and not i.spec.created_by_service
        ]
        if missing:
            raise TopicsMissingError(
                f"topics missing: {', '.join(_named(i) for i in missing)}; create them with "
                "'device-rebind topics create' (docs/deploying.md, Topics)"
            )
        for item in plan.items:
            for note in item.problems:
                log.warning("topic_differs", topic=item.name, setting=item.spec.variable, note=note)
    finally:
        await admin.close()


def _check_co_partitioned(plan: topics.Plan) -> None:
    source = next(i for i in plan.items if i.spec.partitions is topics.Partitions.INPUT)
    if source.existing is None:
        return
    wrong = [
        i
        for i in plan.items
        if i.spec.partitions is topics.Partitions.CO_PARTITIONED
        and i.existing is not None
        and i.existing.partitions != source.existing.partitions
    ]
    if wrong:
        others = ", ".join(
            f"{_named(i)} has {i.existing.partitions}" for i in wrong if i.existing is not None
        )
        raise StartupError(
            f"topics not co-partitioned: {_named(source)} has {source.existing.partitions} "
            f"partitions, {others}; they must be equal (docs/deploying.md, Topics)"
        )


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """The Kafka client logs every failed connection; during a start attempt our one line per
    attempt says it better. Counted, so overlapping attempts (several services in one process)
    restore the level the logger had before the first of them."""
    lib = logging.getLogger(logger)
    if _quieted.get(logger, (0, 0))[0] == 0:
        _quieted[logger] = (1, lib.level)
        lib.setLevel(logging.CRITICAL)
    else:
        count, saved = _quieted[logger]
        _quieted[logger] = (count + 1, saved)
    try:
        yield
    finally:
        count, saved = _quieted[logger]
        if count == 1:
            del _quieted[logger]
            lib.setLevel(saved)
        else:
            _quieted[logger] = (count - 1, saved)


_quieted: dict[str, tuple[int, int]] = {}
"""Loggers quieted now: (attempts in progress, the level to restore)."""


class StartupSupervisor:
    """Repeats the start until it succeeds, a permanent error ends it, or :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        *,
        check: Callable[[Settings], Awaitable[None]] = preflight,
        clock: Callable[[], float] = time.monotonic,
        attempt_timeout: float = ATTEMPT_TIMEOUT_SECONDS,
    ) -> None:
        self._settings = settings
        self._check = check
        self._clock = clock
        self._attempt_timeout = attempt_timeout
        self._stopping = asyncio.Event()
        self.reason: str | None = None
        """Why the service is not started yet (the ``/readyz`` reason), or None."""
        self.attempts = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(
        self, start: Callable[[], Awaitable[None]], reset: Callable[[], Awaitable[None]]
    ) -> bool:
        """Pre-flight, then ``start()``; on a transient failure ``reset()`` and try again.

        Returns True once started, False when stopped before. Raises :class:`StartupError`.
        """
        kafka = self._settings.kafka
        delay = kafka.connect_backoff_initial_seconds
        missing_since: float | None = None
        while not self._stopping.is_set():
            self.attempts += 1
            started_parts = False

            async def attempt() -> None:
                nonlocal started_parts
                with _quiet("aiokafka"):
                    async with asyncio.timeout(self._attempt_timeout):
                        await self._check(self._settings)
                    started_parts = True
                    await start()

            try:
                if not await self._unless_stopped(attempt()):
                    if started_parts:
                        await reset()
                    return False
            except TopicsMissingError as exc:
                now = self._clock()
                missing_since = now if missing_since is None else missing_since
                cause = self._missing(exc, now - missing_since)
            except Exception as exc:  # noqa: BLE001 - classified: permanent ends, others retry
                cause = self._transient(exc, starting_parts=started_parts)  # or StartupError
                if started_parts:
                    await reset()
            else:
                self.reason = None
                if self.attempts > 1:
                    log.info("kafka_ready", attempt=self.attempts)
                return True
            self.reason = cause
            log.warning(
                "not_ready_retrying",
                attempt=self.attempts,
                cause=cause,
                retry_in_seconds=round(delay, 3),
            )
            if not await self._unless_stopped(asyncio.sleep(delay)):
                return False
            delay = min(delay * 2, kafka.connect_backoff_max_seconds)
        return False

    def _missing(self, exc: TopicsMissingError, waited: float) -> str:
        grace = self._settings.kafka.topics_grace_seconds
        if waited >= grace:
            raise StartupError(
                f"{exc}; still missing after {grace:g} s (REBIND_KAFKA__TOPICS_GRACE_SECONDS)"
            ) from None
        return f"{exc}; giving up in {grace - waited:.0f} s"

    def _transient(self, exc: Exception, *, starting_parts: bool = False) -> str:
        """The cause of a failed attempt, or StartupError when retrying cannot help.

        Once the pre-flight check passed (Kafka answers, the topics are there), a part that
        cannot start (the budget topic not read or written in time, a topic that vanished) meets
        a broker that is busy or still settling: retried like a connection error."""
        if isinstance(exc, StartupError):
            raise exc
        if starting_parts and isinstance(exc, FatalPipelineError):
            return str(exc)
        bootstrap = self._settings.kafka.bootstrap_servers
        permanent, cause = classify_startup_error(exc, bootstrap=bootstrap)
        if permanent:
            raise StartupError(cause) from exc
        if isinstance(exc, TimeoutError) and not str(exc):
            cause = (
                f"Kafka is not reachable (REBIND_KAFKA__BOOTSTRAP_SERVERS={bootstrap}): "
                f"no answer within {self._attempt_timeout:g} s"
            )
        return cause

    async def _unless_stopped(self, work: Awaitable[None]) -> bool:
        """Run ``work``; False if :meth:`stop` came first (``work`` is then cancelled)."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            task.result()  # raises what the attempt raised
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False
