"""One swap in, the records that answer it out: the bridge between the pipeline and the platform.

* success -> ``credential-updated`` on its topic;
* a terminal failure -> ``rebind-failed`` with the platform's code, category and advice;
* device online (100611) -> the swap is deferred: written to the retry topic with its due time,
  deadline and history, in the same transaction that commits the input offset. The pipeline
  reads it back when it is due and calls :meth:`RebindHandler.handle` again with that state.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

import structlog

from service.config import Settings
from service.events import SwapEvent, credential_updated, rebind_failed
from service.metrics import Metrics
from service.pipeline.tracker import Output
from service.platform import (
    DEADLINE_EXCEEDED,
    PRIORITY_DEFERRED,
    PRIORITY_FRESH,
    SUPERSEDED,
    Deferred,
    Failed,
    RebindClient,
    RebindPolicy,
    Succeeded,
    build_request,
    classify,
    rebind,
)

log = structlog.get_logger(__name__)

RETRY_PREFIX: Final = "rebind-retry-"
_DUE, _DEADLINE, _DEFERRALS, _ATTEMPTS, _FIRST, _LAST_CODE, _ORIGIN = (
    f"{RETRY_PREFIX}{name}"
    for name in ("due", "deadline", "deferrals", "attempts", "first-attempt", "last-code", "origin")
)
_RETRY_HEADERS: Final = frozenset(
    (_DUE, _DEADLINE, _DEFERRALS, _ATTEMPTS, _FIRST, _LAST_CODE, _ORIGIN)
)


class BadRetryRecordError(ValueError):
    """A retry-topic record whose service headers are missing or unreadable."""


@dataclass(frozen=True, slots=True)
class RetryState:
    """Where a deferred swap stands. Times are epoch milliseconds."""

    due_ms: int
    deadline_ms: int
    deferrals: int
    attempts: int
    first_attempt_ms: int | None
    last_code: str
    origin: str

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (_DUE, str(self.due_ms).encode()),
            (_DEADLINE, str(self.deadline_ms).encode()),
            (_DEFERRALS, str(self.deferrals).encode()),
            (_ATTEMPTS, str(self.attempts).encode()),
            (_FIRST, str(self.first_attempt_ms or "").encode()),
            (_LAST_CODE, self.last_code.encode()),
            (_ORIGIN, self.origin.encode()),
        ]

    @classmethod
    def from_headers(cls, headers: list[tuple[str, bytes]]) -> RetryState:
        found = {k: v.decode("utf-8", "replace") for k, v in headers if k in _RETRY_HEADERS}
        try:
            first = found.get(_FIRST, "")
            return cls(
                due_ms=int(found[_DUE]),
                deadline_ms=int(found[_DEADLINE]),
                deferrals=int(found[_DEFERRALS]),
                attempts=int(found[_ATTEMPTS]),
                first_attempt_ms=int(first) if first else None,
                last_code=found.get(_LAST_CODE, ""),
                origin=found.get(_ORIGIN, ""),
            )
        except (KeyError, ValueError) as exc:
            raise BadRetryRecordError(f"retry record without a readable {exc}") from None


def strip_retry_headers(headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in headers if k not in _RETRY_HEADERS]


SOURCE_TOPIC_HEADER: Final = "rebind-source-topic"
SOURCE_PARTITION_HEADER: Final = "rebind-source-partition"
SOURCE_OFFSET_HEADER: Final = "rebind-source-offset"


def source_headers(origin: str) -> list[tuple[str, bytes]]:
    """Where the swap was read (``topic:partition:offset``), so an outcome can be traced back
    and ``device-rebind replay`` can find the original event."""
    topic, _, rest = origin.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    if not topic:
        return []
    return [
        (SOURCE_TOPIC_HEADER, topic.encode()),
        (SOURCE_PARTITION_HEADER, partition.encode()),
        (SOURCE_OFFSET_HEADER, rest.encode()),
    ]


def _dt(epoch_seconds: float | None) -> datetime | None:
    return None if epoch_seconds is None else datetime.fromtimestamp(epoch_seconds, UTC)


@dataclass(frozen=True, slots=True)
class Work:
    """One swap to handle, and where it comes from."""

    swap: SwapEvent
    raw_value: bytes | None
    raw_headers: list[tuple[str, bytes]]
    origin: str
    retry: RetryState | None = None


class RebindHandler:
    def __init__(
        self,
        settings: Settings,
        client: RebindClient,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._platform = settings.platform
        self._topics = settings.topics
        self._metrics = metrics
        self._policy = RebindPolicy.from_settings(settings.platform)
        self._client = client
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._source = f"/device-rebind/{settings.kafka.group_id}"

    async def handle(self, work: Work) -> list[Output]:
        swap, retry = work.swap, work.retry
        d = swap.data
        req = build_request(
            d.device_id,
            d.node_id,
            d.verify_code,
            d.timeout,
            d.app_id,
            self._platform.default_timeout,
        )
        now = time.time()
        event_deadline = (
            retry.deadline_ms / 1000
            if retry is not None
            else now + self._platform.online_retry_deadline_seconds
        )
        call_deadline = time.monotonic() + min(
            self._platform.attempt_deadline_seconds, max(0.0, event_deadline - now)
        )
        result = await rebind(
            req,
            self._client,
            self._policy,
            is_repeat=retry is not None,
            deadline=call_deadline,
            rng=self._rng,
            deferrals=retry.deferrals if retry is not None else 0,
            priority=PRIORITY_DEFERRED if retry is not None else PRIORITY_FRESH,
        )
        prior_attempts = retry.attempts if retry is not None else 0
        first_ms = retry.first_attempt_ms if retry is not None else None
        if isinstance(result, Succeeded):
            attempts = prior_attempts + result.attempts
            log.info(
                "credential updated",
                attempts=attempts,
                reconciled=result.reconciled,
            )
            # The platform echoes what we sent; should it answer something out of contract,
            # the outcome carries what was sent rather than break the output schema.
            verify_code = (
                result.verify_code if 1 <= len(result.verify_code) <= 256 else req.verify_code
            )
            timeout = result.timeout if 0 <= result.timeout <= 2_147_483_647 else req.timeout
            event = credential_updated(
                swap,
                verify_code=verify_code,
                timeout=timeout,
                attempts=max(1, attempts),
                source=self._source,
                time=datetime.now(UTC),
            )
            return [
                Output(
                    self._topics.credential_updated,
                    event.key,
                    event.value,
                    event.headers + source_headers(work.origin),
                    "credential_updated",
                )
            ]
        if isinstance(result, Failed):
            first = first_ms / 1000 if first_ms is not None else result.first_attempt_at
            # A deferred swap whose deadline passed before this try made a call (e.g. the
            # service was down): the last platform code is the one of its earlier tries.
            earlier_code = (
                retry.last_code
                if retry is not None
                and result.attempts == 0
                and result.error_code == DEADLINE_EXCEEDED
                else None
            )
            return [
                self._failed(
                    work,
                    replace(
                        result, attempts=prior_attempts + result.attempts, first_attempt_at=first
                    ),
                    last_code=earlier_code,
                )
            ]
        return [self._defer(work, result, prior_attempts, first_ms, event_deadline)]

    def _defer(
        self,
        work: Work,
        result: Deferred,
        prior_attempts: int,
        first_ms: int | None,
        event_deadline: float,
    ) -> Output:
        now = time.time()
        attempts = prior_attempts + result.attempts
        first = first_ms if first_ms is not None else int(now * 1000)
        due = now + result.retry_after_seconds
        if due >= event_deadline:
            spec = classify("refresh_device_key", None, DEADLINE_EXCEEDED)
            log.info("deadline passes while the device is online", last_code=result.last_code)
            return self._failed(
                work,
                Failed(
                    error_code=DEADLINE_EXCEEDED,
                    error_desc=f"the device stayed online until the deadline; last platform code "
                    f"{result.last_code}",
                    http_status=None,
                    category=spec.category,
                    recommended_handling=spec.recommended_handling,
                    attempts=attempts,
                    first_attempt_at=first / 1000,
                    last_attempt_at=now,
                ),
                last_code=result.last_code,
            )
        state = RetryState(
            due_ms=int(due * 1000),
            deadline_ms=int(event_deadline * 1000),
            deferrals=(work.retry.deferrals if work.retry is not None else 0) + 1,
            attempts=attempts,
            first_attempt_ms=first,
            last_code=result.last_code,
            origin=work.origin,
        )
        log.info(
            "deferred: device is online",
            retry_in_seconds=round(result.retry_after_seconds, 1),
            deferrals=state.deferrals,
        )
        return Output(
            self._topics.retry,
            work.swap.data.device_id.encode(),
            work.raw_value,
            strip_retry_headers(work.raw_headers) + state.headers(),
            "deferred",
        )

    def superseded(self, work: Work, newer_event_id: str) -> Output:
        """The answer to a waiting swap that a newer swap of the same device replaced."""
        spec = classify("refresh_device_key", None, SUPERSEDED)
        retry = work.retry
        log.info("superseded by a newer swap", newer_event_id=newer_event_id)
        return self._failed(
            work,
            Failed(
                error_code=SUPERSEDED,
                error_desc=f"a newer swap of the device ({newer_event_id}) replaced this one",
                http_status=None,
                category=spec.category,
                recommended_handling=spec.recommended_handling,
                attempts=retry.attempts if retry else 0,
                first_attempt_at=(retry.first_attempt_ms or 0) / 1000 if retry else None,
                last_attempt_at=None,
            ),
            last_code=retry.last_code if retry else None,
        )

    def _failed(self, work: Work, failed: Failed, last_code: str | None = None) -> Output:
        swap = work.swap
        log.info(
            "rebind failed",
            error_code=failed.error_code,
            http_status=failed.http_status,
            category=failed.category,
            attempts=failed.attempts,
        )
        desc = failed.error_desc or failed.error_code
        if last_code and last_code not in desc:
            desc = f"{desc} (last platform code {last_code})"
        event = rebind_failed(
            swap,
            error_code=failed.error_code,
            error_desc=desc,
            http_status=failed.http_status,
            category=failed.category,
            recommended_handling=failed.recommended_handling,
            attempts=failed.attempts,
            first_attempt_at=_dt(failed.first_attempt_at),
            last_attempt_at=_dt(failed.last_attempt_at),
            source=self._source,
            time=datetime.now(UTC),
        )
        return Output(
            self._topics.rebind_failed,
            event.key,
            event.value,
            event.headers + source_headers(work.origin),
            "rebind_failed",
        )
