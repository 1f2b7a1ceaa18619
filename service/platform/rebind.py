"""The decisions of ONE swap (one device key refresh), independent of Kafka.

:func:`build_request` makes the request deterministic: the same event always produces the same
call (verifyCode defaults to the nodeId, timeout to the configured default), so a repeated call is
the same call and can never produce a second, different credential.

:func:`rebind` makes the call and follows the error table:

* success -> :class:`Succeeded`;
* ``RETRY`` (50252, other 5xx, timeouts, refused or cut connections) -> capped exponential backoff
  with full jitter, within ``max_attempts`` and the deadline, then :class:`Failed` with the last
  error (``ATTEMPTS_EXHAUSTED`` when that error carried no code);
* ``THROTTLED`` (1010009) -> the client has already slowed the budget down; retried after a short
  backoff without consuming an attempt, until the deadline (then ``DEADLINE_EXCEEDED``);
* ``FAIL`` -> :class:`Failed` at once;
* ``DEFER_ONLINE`` (100611) on a call that cannot have been applied before -> :class:`Deferred`
  (whether the swap's online deadline allows another wait is the caller's decision);
* ambiguous answers -> reconcile: a call that may have reached the platform without an answer
  (read timeout, connection cut after sending), ``100426``, or ``100611`` on a repeat (``is_repeat``
  or after an earlier attempt of this call that may have been applied). The device is queried: when
  it holds the requested nodeId the swap is done (``Succeeded(reconciled=True)``); otherwise 100426
  is a genuine conflict (``Failed``), 100611 defers, and an unanswered call is retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from service.config import PlatformSettings
from service.platform.budget import PRIORITY_FRESH
from service.platform.client import CallResult, DeviceQuery, RefreshRequest
from service.platform.errors import (
    ATTEMPTS_EXHAUSTED,
    DEADLINE_EXCEEDED,
    HTTP_ERROR,
    Action,
    Category,
    ErrorSpec,
    classify,
)

DEFERRAL_REASON_DEVICE_ONLINE: Final = "device_online"
DEFERRAL_REASON_TRANSIENT: Final = "transient"
_OPERATION: Final = "refresh_device_key"
_MAX_EXPONENT: Final = 62


def build_request(  # noqa: PLR0917 - the positional signature the pipeline calls
    device_id: str,
    node_id: str,
    verify_code: str | None,
    timeout: int | None,
    app_id: str | None,
    default_timeout: int,
) -> RefreshRequest:
    """The deterministic request of a swap: verifyCode = given else nodeId; timeout = given else
    the configured default."""
    return RefreshRequest(
        device_id=device_id,
        node_id=node_id,
        verify_code=verify_code if verify_code else node_id,
        timeout=timeout if timeout is not None else default_timeout,
        app_id=app_id,
    )


@dataclass(frozen=True, slots=True)
class RebindPolicy:
    max_attempts: int = 6
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    online_retry_initial_seconds: float = 30.0
    """First ``retry_after_seconds`` of a deferred (device online) swap; doubled per deferral."""
    online_retry_max_seconds: float = 900.0
    inline_backoff_max_seconds: float = 2.0
    """A transient retry that must wait longer than this is handed back as a ``transient``
    :class:`Deferred`, so the swap waits in the ledger instead of holding its partition."""

    @classmethod
    def from_settings(cls, settings: PlatformSettings) -> RebindPolicy:
        return cls(
            max_attempts=settings.max_attempts,
            backoff_initial_seconds=settings.retry_backoff_initial_seconds,
            backoff_max_seconds=settings.retry_backoff_max_seconds,
            online_retry_initial_seconds=settings.online_retry_initial_seconds,
            online_retry_max_seconds=settings.online_retry_max_seconds,
            inline_backoff_max_seconds=settings.inline_backoff_max_seconds,
        )


@dataclass(frozen=True, slots=True)
class Succeeded:
    verify_code: str
    timeout: int
    attempts: int
    reconciled: bool


@dataclass(frozen=True, slots=True)
class Failed:
    error_code: str
    error_desc: str | None
    http_status: int | None
    category: str
    recommended_handling: str
    attempts: int
    first_attempt_at: float | None
    """Wall-clock (epoch seconds) of the first call; None when no call was made."""
    last_attempt_at: float | None


@dataclass(frozen=True, slots=True)
class Deferred:
    reason: str
    """``device_online`` (100611), or ``transient``: a retry whose backoff is longer than
    ``inline_backoff_max_seconds`` (the caller keeps the try's deadline)."""
    last_code: str
    attempts: int
    retry_after_seconds: float


RebindResult = Succeeded | Failed | Deferred


class RebindClient(Protocol):
    async def refresh_device_key(
        self, req: RefreshRequest, *, priority: int = PRIORITY_FRESH
    ) -> CallResult: ...

    async def query_device(
        self, device_id: str, app_id: str | None, *, priority: int = PRIORITY_FRESH
    ) -> DeviceQuery: ...


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter: uniform in [0, min(cap, initial * 2**(n-1))]
    for the ``attempt``-th retry (1-based)."""
    ceiling = min(cap, initial * 2.0 ** min(max(attempt - 1, 0), _MAX_EXPONENT))
    return rng.uniform(0.0, max(ceiling, 0.0))


def defer_delay(deferrals: int, initial: float, cap: float, rng: random.Random) -> float:
    """Backoff for a deferred swap: equal jitter (half fixed, half random), so it never collapses
    to zero and deferred swaps of many devices spread out."""
    base = min(cap, initial * 2.0 ** min(max(deferrals, 0), _MAX_EXPONENT))
    return base / 2.0 + rng.uniform(0.0, base / 2.0)


DeviceMatch = Literal["match", "mismatch", "unknown"]
"""What a reconciliation query found: the device carries the requested verifyCode (``match``),
another one (``mismatch``), or it cannot be told (``unknown``)."""


async def rebind(
    req: RefreshRequest,
    client: RebindClient,
    policy: RebindPolicy,
    *,
    is_repeat: bool,
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
    wall_clock: Callable[[], float] = time.time,
    deferrals: int = 0,
    priority: int = PRIORITY_FRESH,
    prior_attempts: int = 0,
) -> RebindResult:
    """Refresh one device's key; see the module documentation for the policy.

    ``is_repeat``: this swap may already have been applied (a redelivered or deferred event).
    ``deadline``: monotonic time after which no new call is started (bounds this try: retries,
    throttling and budget waits); the online-deferral deadline of the swap is the caller's.
    ``deferrals``: how often this swap was deferred already (scales ``retry_after_seconds``).
    ``priority``: the budget class of the calls (``PRIORITY_DEFERRED`` for deferred retries).
    ``prior_attempts``: attempts made by earlier tries of this swap (counted in ``max_attempts``
    and in the backoff's growth); the result's ``attempts`` counts this call's only.
    """
    run = _Rebind(
        req,
        client,
        policy,
        maybe_applied=is_repeat,
        deadline=deadline,
        clock=clock,
        sleep=sleep,
        rng=rng if rng is not None else random.Random(),  # noqa: S311 - jitter, not crypto
        wall_clock=wall_clock,
        deferrals=deferrals,
        priority=priority,
        prior_attempts=prior_attempts,
    )
    return await run.run()


class _Rebind:
    """The state of one :func:`rebind` call."""

    def __init__(
        self,
        req: RefreshRequest,
        client: RebindClient,
        policy: RebindPolicy,
        *,
        maybe_applied: bool,
        deadline: float,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        rng: random.Random,
        wall_clock: Callable[[], float],
        deferrals: int,
        priority: int,
        prior_attempts: int = 0,
    ) -> None:
        self.prior_attempts = prior_attempts
        self.req = req
        self.client = client
        self.policy = policy
        self.maybe_applied = maybe_applied
        self.deadline = deadline
        self.clock = clock
        self.sleep = sleep
        self.rng = rng
        self.wall_clock = wall_clock
        self.deferrals = deferrals
        self.priority = priority
        self.attempts = 0
        self.throttles = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.last: CallResult | None = None

    async def run(self) -> RebindResult:
        while True:
            if self.clock() >= self.deadline:
                return self.deadline_failed()
            res = await self.client.refresh_device_key(self.req, priority=self.priority)
            self.last_at = self.wall_clock()
            if self.first_at is None:
                self.first_at = self.last_at
            self.last = res
            if res.ok:
                self.attempts += 1
                return Succeeded(
                    verify_code=res.verify_code or self.req.verify_code,
                    timeout=res.timeout if res.timeout is not None else self.req.timeout,
                    attempts=self.attempts,
                    reconciled=False,
                )
            spec = res.spec if res.spec is not None else classify(_OPERATION, None, None)
            if spec.action is Action.THROTTLED:  # not an attempt; bounded by the deadline
                self.throttles += 1
                if (deferred := await self.pause(self.throttles, res)) is not None:
                    return deferred
                continue
            self.attempts += 1
            if res.outcome_unknown:
                self.maybe_applied = True
            settled = await self.settle(res, spec)
            if settled is not None:
                return settled
            # RETRY, a REAUTH the client's one repeat did not cure, or an unsettled reconciliation
            if self.prior_attempts + self.attempts >= self.policy.max_attempts:
                return self.failed(res, spec, exhausted=True)
            if (deferred := await self.pause(self.prior_attempts + self.attempts, res)) is not None:
                return deferred

    async def settle(self, res: CallResult, spec: ErrorSpec) -> RebindResult | None:
        """The result an error answer settles the swap with, or None to retry."""
        if spec.action is Action.FAIL:
            return self.failed(res, spec)
        if spec.action is Action.DEFER_ONLINE and not self.maybe_applied:
            return self.defer(res)
        if spec.action not in (Action.RECONCILE, Action.DEFER_ONLINE) and not res.outcome_unknown:
            return None
        return self.after_reconcile(await self.reconcile(), res, spec)

    def after_reconcile(
        self, found: DeviceMatch, res: CallResult, spec: ErrorSpec
    ) -> RebindResult | None:
        if found == "match":
            return Succeeded(
                verify_code=self.req.verify_code,
                timeout=self.req.timeout,
                attempts=self.attempts,
                reconciled=True,
            )
        if found == "mismatch" and spec.action is Action.RECONCILE:
            return self.failed(res, spec, category=Category.CONFLICT)
        if found == "mismatch" and spec.action is Action.DEFER_ONLINE:
            return self.defer(res)
        return None  # not applied (or cannot tell): retry the same, deterministic call

    async def reconcile(self) -> DeviceMatch:
        query = await self.client.query_device(
            self.req.device_id, self.req.app_id, priority=self.priority
        )
        if not query.ok:
            return "unknown"
        return "match" if query.node_id == self.req.node_id else "mismatch"

    async def pause(self, attempt: int, res: CallResult) -> Deferred | None:
        """Wait before the next try; a wait longer than the inline maximum is handed back as a
        ``transient`` deferral instead (when the deadline leaves room for it)."""
        delay = backoff_delay(
            attempt, self.policy.backoff_initial_seconds, self.policy.backoff_max_seconds, self.rng
        )
        remaining = self.deadline - self.clock()
        if delay > self.policy.inline_backoff_max_seconds and delay < remaining:
            return Deferred(
                reason=DEFERRAL_REASON_TRANSIENT,
                last_code=res.error_code or (str(res.http_status) if res.http_status else ""),
                attempts=self.attempts,
                retry_after_seconds=delay,
            )
        await self.sleep(max(0.0, min(delay, remaining)))
        return None

    def failed(
        self,
        res: CallResult,
        spec: ErrorSpec,
        *,
        exhausted: bool = False,
        category: str | None = None,
    ) -> Failed:
        return Failed(
            error_code=res.error_code or (ATTEMPTS_EXHAUSTED if exhausted else HTTP_ERROR),
            error_desc=res.error_desc,
            http_status=res.http_status,
            category=category if category is not None else spec.category,
            recommended_handling=spec.recommended_handling,
            attempts=self.attempts,
            first_attempt_at=self.first_at,
            last_attempt_at=self.last_at,
        )

    def deadline_failed(self) -> Failed:
        spec = classify(_OPERATION, None, DEADLINE_EXCEEDED)
        last = self.last
        if last is None:
            desc = "the deadline passed before the first call"
        else:
            desc = f"the deadline passed; last error {last.error_code or last.http_status}"
            if last.error_desc:
                desc += f": {last.error_desc}"
        return Failed(
            error_code=DEADLINE_EXCEEDED,
            error_desc=desc,
            http_status=last.http_status if last is not None else None,
            category=spec.category,
            recommended_handling=spec.recommended_handling,
            attempts=self.attempts,
            first_attempt_at=self.first_at,
            last_attempt_at=self.last_at,
        )

    def defer(self, res: CallResult) -> Deferred:
        # Always a deferral: whether the swap's own (online) deadline allows another wait is the
        # caller's decision; ``deadline`` here bounds this try only.
        return Deferred(
            reason=DEFERRAL_REASON_DEVICE_ONLINE,
            last_code=res.error_code or "",
            attempts=self.attempts,
            retry_after_seconds=defer_delay(
                self.deferrals,
                self.policy.online_retry_initial_seconds,
                self.policy.online_retry_max_seconds,
                self.rng,
            ),
        )
