"""Backoff bounds, and the retry/defer/reconcile policy of one rebind against a scripted client."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from service.platform.budget import PRIORITY_FRESH
from service.platform.client import CallResult, DeviceQuery, RefreshRequest
from service.platform.errors import (
    ATTEMPTS_EXHAUSTED,
    CONNECTION_ERROR,
    DEADLINE_EXCEEDED,
    TIMEOUT,
    classify,
)
from service.platform.rebind import (
    Deferred,
    Failed,
    RebindPolicy,
    Succeeded,
    backoff_delay,
    build_request,
    defer_delay,
    rebind,
)


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 20, 1_000])
def test_backoff_delay_bounds(attempt: int) -> None:
    rng = random.Random(attempt)
    initial, cap = 0.5, 30.0
    ceiling = min(cap, initial * 2 ** (attempt - 1))
    samples = [backoff_delay(attempt, initial, cap, rng) for _ in range(500)]
    assert all(0.0 <= s <= ceiling for s in samples)
    assert max(samples) > 0.8 * ceiling  # full jitter uses the whole range
    assert min(samples) < 0.2 * ceiling


def test_backoff_grows_then_caps() -> None:
    rng = random.Random(1)
    means = [
        sum(backoff_delay(a, 1.0, 8.0, rng) for _ in range(2_000)) / 2_000 for a in range(1, 7)
    ]
    assert means[0] < means[1] < means[2] < means[3]
    assert means[4] == pytest.approx(4.0, rel=0.1)
    assert means[5] == pytest.approx(4.0, rel=0.1)


def test_backoff_zero_and_huge_attempts_are_safe() -> None:
    rng = random.Random(0)
    assert 0.0 <= backoff_delay(0, 0.5, 30.0, rng) <= 0.5
    assert backoff_delay(10**9, 0.5, 30.0, rng) <= 30.0


def test_defer_delay_never_collapses() -> None:
    rng = random.Random(3)
    for n in range(12):
        base = min(900.0, 30.0 * 2**n)
        d = defer_delay(n, 30.0, 900.0, rng)
        assert base / 2 <= d <= base


def test_build_request_is_deterministic() -> None:
    a = build_request("dev", "node-1", None, None, None, 0)
    assert a == RefreshRequest("dev", "node-1", "node-1", 0, None)
    assert a == build_request("dev", "node-1", None, None, None, 0)
    b = build_request("dev", "node-1", "VC", 300, "partner", 0)
    assert (b.verify_code, b.timeout, b.app_id) == ("VC", 300, "partner")
    assert build_request("dev", "n", None, 0, None, 180).timeout == 0


# ---------------------------------------------------------------- rebind against a script


def ok(verify: str = "node-1", timeout: int = 0) -> CallResult:
    return CallResult(True, 200, None, None, None, verify_code=verify, timeout=timeout)


def err(status: int | None, code: str, *, unknown: bool = False) -> CallResult:
    return CallResult(
        False,
        status,
        code,
        "desc",
        classify("refresh_device_key", status, code),
        outcome_unknown=unknown,
    )


class ScriptedClient:
    def __init__(self, answers: Sequence[CallResult], node: str | None = "old") -> None:
        self.answers = list(answers)
        self.node = node
        self.puts = 0
        self.queries = 0

    async def refresh_device_key(
        self, req: RefreshRequest, *, priority: int = PRIORITY_FRESH
    ) -> CallResult:
        self.puts += 1
        return self.answers.pop(0)

    async def query_device(
        self, device_id: str, app_id: str | None, *, priority: int = PRIORITY_FRESH
    ) -> DeviceQuery:
        self.queries += 1
        if self.node is None:
            return DeviceQuery(err(500, "50252"))
        return DeviceQuery(ok(), node_id=self.node, status="OFFLINE")


class Time:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


REQ = build_request("dev", "node-1", None, None, None, 0)
# Every backoff waits inline here; the hand-back of long waits is tested with SHORT_INLINE.
POLICY = RebindPolicy(
    max_attempts=4,
    backoff_initial_seconds=1.0,
    backoff_max_seconds=8.0,
    inline_backoff_max_seconds=1e9,
)
SHORT_INLINE = RebindPolicy(
    max_attempts=6,
    backoff_initial_seconds=1.0,
    backoff_max_seconds=60.0,
    inline_backoff_max_seconds=2.0,
)


async def run(
    client: ScriptedClient,
    *,
    is_repeat: bool = False,
    deadline: float = 1e9,
    t: Time | None = None,
    policy: RebindPolicy = POLICY,
    prior_attempts: int = 0,
) -> object:
    t = t or Time()
    return await rebind(
        REQ,
        client,
        policy,
        prior_attempts=prior_attempts,
        is_repeat=is_repeat,
        deadline=deadline,
        clock=t,
        sleep=t.sleep,
        rng=random.Random(0),
        wall_clock=t,
    )


async def test_transient_then_success_counts_attempts() -> None:
    t = Time()
    client = ScriptedClient([err(500, "50252"), err(500, "50252"), ok()])
    res = await run(client, t=t)
    assert res == Succeeded("node-1", 0, attempts=3, reconciled=False)
    assert len(t.slept) == 2
    assert all(0 <= s <= 2.0 for s in t.slept)


async def test_transient_exhausted_fails_with_last_error() -> None:
    client = ScriptedClient([err(500, "50252")] * 4)
    res = await run(client)
    assert isinstance(res, Failed)
    assert (res.error_code, res.category, res.attempts) == ("50252", "platform_error", 4)


async def test_html_502_exhausted_is_attempts_exhausted() -> None:
    res502 = CallResult(False, 502, None, "Bad Gateway", classify("refresh_device_key", 502, None))
    res = await run(ScriptedClient([res502] * 4))
    assert isinstance(res, Failed)
    assert (res.error_code, res.http_status) == (ATTEMPTS_EXHAUSTED, 502)


async def test_throttled_does_not_count_and_stops_at_deadline() -> None:
    client = ScriptedClient([err(403, "1010009")] * 3 + [ok()])
    res = await run(client)
    assert res == Succeeded("node-1", 0, attempts=1, reconciled=False)
    t = Time()
    res = await run(ScriptedClient([err(403, "1010009")] * 1000), deadline=20.0, t=t)
    assert isinstance(res, Failed)
    assert res.error_code == DEADLINE_EXCEEDED
    assert res.category == "deadline_exceeded"
    assert res.attempts == 0
    assert t.now >= 20.0


async def test_fail_codes_fail_at_once() -> None:
    client = ScriptedClient([err(404, "100403")])
    res = await run(client)
    assert isinstance(res, Failed)
    assert (res.error_code, res.category, res.http_status, res.attempts) == (
        "100403",
        "not_found",
        404,
        1,
    )
    assert res.first_attempt_at is not None


async def test_online_first_attempt_defers() -> None:
    client = ScriptedClient([err(400, "100611")])
    res = await run(client)
    assert isinstance(res, Deferred)
    assert (res.reason, res.last_code, res.attempts) == ("device_online", "100611", 1)
    assert res.retry_after_seconds >= 15.0
    assert client.queries == 0


async def test_online_defers_even_at_the_try_deadline() -> None:
    # the swap's online deadline is the caller's; ``deadline`` bounds one try only
    t = Time()

    class Late(ScriptedClient):
        async def refresh_device_key(
            self, req: RefreshRequest, *, priority: int = PRIORITY_FRESH
        ) -> CallResult:
            t.now = 100.0
            return await super().refresh_device_key(req, priority=priority)

    res = await run(Late([err(400, "100611")]), deadline=50.0, t=t)
    assert isinstance(res, Deferred)


@pytest.mark.parametrize("code", ["100611", "100426"])
async def test_repeat_meeting_online_or_duplicate_reconciles_to_success(code: str) -> None:
    client = ScriptedClient([err(400, code)], node="node-1")
    res = await run(client, is_repeat=True)
    assert res == Succeeded("node-1", 0, attempts=1, reconciled=True)
    assert client.queries == 1


async def test_duplicate_held_by_another_device_is_a_conflict() -> None:
    client = ScriptedClient([err(400, "100426")], node="old")
    res = await run(client)
    assert isinstance(res, Failed)
    assert (res.error_code, res.category) == ("100426", "conflict")


async def test_repeat_online_not_applied_defers() -> None:
    res = await run(ScriptedClient([err(400, "100611")], node="old"), is_repeat=True)
    assert isinstance(res, Deferred)


@pytest.mark.parametrize("code", [TIMEOUT, CONNECTION_ERROR])
async def test_outcome_unknown_reconciles(code: str) -> None:
    client = ScriptedClient([err(None, code, unknown=True)], node="node-1")
    res = await run(client)
    assert res == Succeeded("node-1", 0, attempts=1, reconciled=True)


async def test_outcome_unknown_not_applied_retries_then_online_reconciles() -> None:
    # the first call may have applied; the second meets 100611: that is a repeat now
    client = ScriptedClient([err(None, TIMEOUT, unknown=True), err(400, "100611")], node="old")
    res = await run(client)
    assert isinstance(res, Deferred)
    assert client.queries == 2


async def test_refused_connection_is_retried_without_reconciling() -> None:
    client = ScriptedClient([err(None, CONNECTION_ERROR), ok()])
    res = await run(client)
    assert res == Succeeded("node-1", 0, attempts=2, reconciled=False)
    assert client.queries == 0


async def test_unsettled_reconciliation_retries_the_same_call() -> None:
    client = ScriptedClient([err(None, TIMEOUT, unknown=True), ok()], node=None)
    res = await run(client)
    assert res == Succeeded("node-1", 0, attempts=2, reconciled=False)


async def test_deadline_already_passed() -> None:
    t = Time()
    t.now = 10.0
    res = await run(ScriptedClient([]), deadline=5.0, t=t)
    assert isinstance(res, Failed)
    assert (res.error_code, res.attempts, res.first_attempt_at) == (DEADLINE_EXCEEDED, 0, None)


async def test_a_backoff_longer_than_the_inline_maximum_is_handed_back_as_transient() -> None:
    """A sick device must not hold its slot and its partition: past a few seconds the wait
    happens in the ledger. Short waits stay inline; the hand-back carries the last code."""
    t = Time()
    client = ScriptedClient([err(500, "50252")] * 10)
    res = await run(client, t=t, policy=SHORT_INLINE)
    assert isinstance(res, Deferred)
    assert res.reason == "transient"
    assert res.last_code == "50252"
    assert res.retry_after_seconds > 2.0
    assert all(s <= 2.0 for s in t.slept)  # every inline wait was short
    assert res.attempts == len(t.slept) + 1


async def test_prior_attempts_count_toward_the_maximum() -> None:
    """A swap that already made attempts before it waited fails once the total reaches it."""
    client = ScriptedClient([err(500, "50252")] * 10)
    res = await run(client, policy=SHORT_INLINE, prior_attempts=5)
    assert isinstance(res, Failed)
    assert res.error_code == "50252"
    assert res.attempts == 1  # this try's own attempts; the caller adds the earlier ones


async def test_a_long_wait_is_inline_when_the_deadline_leaves_no_room_for_it() -> None:
    t = Time()
    client = ScriptedClient([err(500, "50252")] * 10)
    res = await run(client, t=t, policy=SHORT_INLINE, deadline=3.0)
    assert isinstance(res, Failed)
    assert res.error_code == DEADLINE_EXCEEDED
