"""One swap in, a typed result out: the bridge between the pipeline and the platform.

* success -> :class:`Outcome` ``credential-updated``;
* a terminal failure -> :class:`Outcome` ``rebind-failed`` with the platform's code, category and
  advice;
* device online (100611), or a transient error whose next retry is more than a few seconds away
  -> :class:`Waiting`: the swap waits in the per-device ledger (durably, in the same transaction
  that commits its input) and is tried again when due;
* an unexpected exception -> the device is queried (the call may have been applied): the swap
  ends ``credential-updated`` if the device holds the new nodeId, else ``rebind-failed``
  ``INTERNAL_ERROR``. The handler never raises (but for cancellation).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from typing import Final, Protocol

import structlog

from service.config import Settings
from service.metrics import Metrics
from service.pipeline.outcomes import OutcomeBuilder
from service.pipeline.work import (
    HandlerResult,
    Outcome,
    PollResult,
    Waiting,
    WaitState,
    Work,
)
from service.platform import (
    DEADLINE_EXCEEDED,
    PRIORITY_DEFERRED,
    PRIORITY_FRESH,
    PRIORITY_URGENT_LANE,
    ActivationQuery,
    Deferred,
    Failed,
    RebindClient,
    RebindPolicy,
    RefreshRequest,
    Succeeded,
    build_request,
    rebind,
)
from service.platform.budget import PRIORITY_POLL
from service.platform.errors import INTERNAL_ERROR
from service.platform.rebind import DEFERRAL_REASON_TRANSIENT

log = structlog.get_logger(__name__)

DEVICE_NOT_FOUND_CODE: Final = "100403"
"""The device does not exist (any more): after a non-zero timeout, its registration was deleted."""


class HandlerClient(RebindClient, Protocol):
    """What the handler asks of the platform: the refresh (with its reconciliation query) and,
    for the bind watch, the activation status."""

    async def query_activation(
        self, device_id: str, app_id: str | None, *, priority: int
    ) -> ActivationQuery: ...


class RebindHandler:
    def __init__(
        self,
        settings: Settings,
        client: HandlerClient,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
        outcomes: OutcomeBuilder | None = None,
    ) -> None:
        self._platform = settings.platform
        self._topics = settings.topics
        self._metrics = metrics
        self._policy = RebindPolicy.from_settings(settings.platform)
        self._client = client
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self.outcomes = outcomes or OutcomeBuilder(settings)
        """Builds the outcome events (also given to the partitions' cores)."""

    def _request(self, work: Work) -> RefreshRequest:
        d = work.swap.data
        return build_request(
            d.device_id,
            d.node_id,
            d.verify_code,
            d.timeout,
            d.app_id,
            self._platform.default_timeout,
        )

    async def handle(self, work: Work) -> HandlerResult:
        try:
            return await self._handle(work)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a defect, not an answer: end the swap, never wedge
            log.exception("swap_handling_failed")
            return await self._internal_error(work, exc)

    async def _handle(self, work: Work) -> HandlerResult:
        wait = work.wait
        req = self._request(work)
        now = time.time()
        event_deadline = (
            wait.deadline_ms / 1000
            if wait is not None
            else now + self._platform.online_retry_deadline_seconds
        )
        try_deadline = min(event_deadline, now + self._platform.attempt_deadline_seconds)
        if (
            wait is not None
            and wait.reason == DEFERRAL_REASON_TRANSIENT
            and wait.attempt_deadline_ms is not None
        ):
            try_deadline = min(event_deadline, wait.attempt_deadline_ms / 1000)
        result = await rebind(
            req,
            self._client,
            self._policy,
            is_repeat=work.may_be_applied,
            deadline=time.monotonic() + max(0.0, try_deadline - now),
            rng=self._rng,
            deferrals=wait.deferrals if wait is not None else 0,
            priority=_priority(work),
            prior_attempts=wait.attempts if wait is not None else 0,
        )
        prior_attempts = wait.attempts if wait is not None else 0
        first_ms = wait.first_attempt_ms if wait is not None else None
        if isinstance(result, Succeeded):
            return self.outcomes.succeeded(work, req, result, prior_attempts)
        if isinstance(result, Failed):
            first = first_ms / 1000 if first_ms is not None else result.first_attempt_at
            # A waiting swap whose deadline passed before this try made a call (e.g. the
            # service was down): the last platform code is the one of its earlier tries.
            earlier_code = (
                wait.last_code
                if wait is not None
                and result.attempts == 0
                and result.error_code == DEADLINE_EXCEEDED
                else None
            )
            return self.outcomes.failed(
                work,
                replace(result, attempts=prior_attempts + result.attempts, first_attempt_at=first),
                last_code=earlier_code,
            )
        return self._defer(work, result, prior_attempts, first_ms, event_deadline, try_deadline)

    def _defer(  # noqa: PLR0917 - one swap's whole history
        self,
        work: Work,
        result: Deferred,
        prior_attempts: int,
        first_ms: int | None,
        event_deadline: float,
        try_deadline: float,
    ) -> HandlerResult:
        now = time.time()
        attempts = prior_attempts + result.attempts
        first = first_ms if first_ms is not None else int(now * 1000)
        due = now + result.retry_after_seconds
        transient = result.reason == DEFERRAL_REASON_TRANSIENT
        deadline = try_deadline if transient else event_deadline
        if due >= deadline:
            what = "the try's deadline passes" if transient else "the device stayed online"
            log.info("deadline_before_next_try", last_code=result.last_code)
            return self.outcomes.service_failed(
                work,
                DEADLINE_EXCEEDED,
                f"{what} until the deadline; last platform code {result.last_code}",
                attempts=attempts,
                first_attempt_at=first / 1000,
                last_attempt_at=now,
                last_code=result.last_code,
            )
        deferrals = work.wait.deferrals if work.wait is not None else 0
        state = WaitState(
            due_ms=int(due * 1000),
            deadline_ms=int(event_deadline * 1000),
            deferrals=deferrals if transient else deferrals + 1,
            attempts=attempts,
            first_attempt_ms=first,
            last_code=result.last_code,
            reason=result.reason,
            attempt_deadline_ms=int(try_deadline * 1000) if transient else None,
        )
        log.info(
            "deferred_device_online" if not transient else "deferred_transient_error",
            retry_in_seconds=round(result.retry_after_seconds, 1),
            deferrals=state.deferrals,
            last_code=result.last_code,
        )
        return Waiting(state)

    async def poll(self, work: Work) -> PollResult:
        """Has the new hardware bound? One activation query, in the budget's poll share."""
        d = work.swap.data
        try:
            answer = await self._client.query_activation(
                d.device_id, d.app_id, priority=PRIORITY_POLL
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("bind_poll_failed", exc_info=True)
            return PollResult()
        if answer.ok:
            return PollResult(bound=answer.activated is True)
        return PollResult(gone=answer.result.error_code == DEVICE_NOT_FOUND_CODE)

    async def _internal_error(self, work: Work, exc: Exception) -> Outcome:
        """Settle a swap whose handling failed unexpectedly: the call may have been applied, so
        ask the device first."""
        req = self._request(work)
        try:
            query = await self._client.query_device(req.device_id, req.app_id)
            if query.ok and query.node_id == req.node_id:
                log.info("node_id_applied_despite_failure")
                return self.outcomes.succeeded(
                    work,
                    req,
                    Succeeded(req.verify_code, req.timeout, attempts=1, reconciled=True),
                    work.wait.attempts if work.wait else 0,
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("device_query_failed_after_error", exc_info=True)
        return self.outcomes.service_failed(
            work,
            INTERNAL_ERROR,
            f"{type(exc).__name__} inside the service",
            attempts=work.wait.attempts if work.wait else 0,
            last_attempt_at=time.time(),
        )


def _priority(work: Work) -> int:
    """The budget class of a swap's calls: a retry that waited in the ledger is deferred (an
    urgent one too: its person was answered that the device is online, or the platform failed),
    else a swap of the urgent lane goes before the bulk lane."""
    if work.wait is not None:
        return PRIORITY_DEFERRED
    return PRIORITY_URGENT_LANE if work.urgent else PRIORITY_FRESH
