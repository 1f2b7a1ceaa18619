"""The start-up supervisor: retry what may heal, stop at once on what will not."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    NodeNotReadyError,
    SaslAuthenticationFailed,
)

from service.config import KafkaSettings, PlatformSettings, Settings
from service.kafka import FatalPipelineError, classify_startup_error
from service.startup import StartupError, StartupSupervisor, TopicsMissingError
from tests.support.logcapture import captured_logs
from tests.support.waiting import wait_until


def settings(**kafka: float) -> Settings:
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers="kafka-0:9092",
            connect_backoff_initial_seconds=0.01,
            connect_backoff_max_seconds=0.02,
            **kafka,
        ),
        platform=PlatformSettings(base_url="https://iot.example.test", app_id="a", secret="s"),
    )


class Scripted:
    """A pre-flight check that fails with the given errors, then passes."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self, _: Settings) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


class Parts:
    def __init__(self, fail: list[BaseException] | None = None) -> None:
        self.fail = fail or []
        self.started = 0
        self.resets = 0

    async def start(self) -> None:
        self.started += 1
        if self.fail:
            raise self.fail.pop(0)

    async def reset(self) -> None:
        self.resets += 1


async def test_unreachable_kafka_is_retried_with_one_line_per_attempt() -> None:
    check = Scripted(
        KafkaConnectionError("Unable to bootstrap from [('kafka-0', 9092)]"),
        KafkaConnectionError("Unable to bootstrap from [('kafka-0', 9092)]"),
        NodeNotReadyError("coordinator loading"),
    )
    parts = Parts()
    supervisor = StartupSupervisor(settings(), check=check)
    with captured_logs() as cap:
        assert await supervisor.run(parts.start, parts.reset)
    assert check.calls == 4
    assert parts.started == 1
    retries = [line for line in cap.lines() if line["event"] == "not_ready_retrying"]
    assert [line["attempt"] for line in retries] == [1, 2, 3]
    assert "REBIND_KAFKA__BOOTSTRAP_SERVERS=kafka-0:9092" in retries[0]["cause"]
    assert "Unable to bootstrap" in retries[0]["cause"]
    assert [line["retry_in_seconds"] for line in retries] == [0.01, 0.02, 0.02]  # capped
    assert supervisor.reason is None


async def test_the_reason_is_exposed_while_waiting_and_stop_ends_the_wait() -> None:
    check = Scripted(*[KafkaConnectionError("Unable to bootstrap")] * 1000)
    parts = Parts()
    supervisor = StartupSupervisor(settings(), check=check)
    task = asyncio.create_task(supervisor.run(parts.start, parts.reset))
    await wait_until(lambda: supervisor.reason is not None, timeout=5, what="a reason")
    assert supervisor.reason is not None
    assert supervisor.reason.startswith("Kafka is not reachable (REBIND_KAFKA__BOOTSTRAP_SERVERS")
    supervisor.stop()
    assert await asyncio.wait_for(task, 5) is False
    assert parts.started == 0


async def test_a_failure_after_the_check_resets_the_parts_before_the_next_attempt() -> None:
    parts = Parts(fail=[KafkaConnectionError("broker went away")])
    supervisor = StartupSupervisor(settings(), check=Scripted())
    assert await supervisor.run(parts.start, parts.reset)
    assert (parts.started, parts.resets) == (2, 1)


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (SaslAuthenticationFailed("bad password"), "REBIND_KAFKA__SASL_USERNAME"),
        (FatalPipelineError("REBIND_TOPICS__TOKEN: topic could not be created"), "TOKEN"),
        (RuntimeError("a defect"), "unexpected error"),
    ],
)
async def test_permanent_errors_end_the_start_at_once(error: BaseException, words: str) -> None:
    check = Scripted(error)
    supervisor = StartupSupervisor(settings(), check=check)
    parts = Parts()
    with pytest.raises(StartupError, match=words):
        await supervisor.run(parts.start, parts.reset)
    assert check.calls == 1


async def test_missing_topics_are_waited_for_until_the_grace_period_ends() -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]

    class Missing(Scripted):
        async def __call__(self, s: Settings) -> None:
            now[0] += 10
            await super().__call__(s)

    missing = TopicsMissingError("topics missing: device-rebind.ledger.v1 (REBIND_TOPICS__LEDGER)")
    check = Missing(*[missing] * 100)
    supervisor = StartupSupervisor(settings(topics_grace_seconds=25), check=check, clock=clock)
    parts = Parts()
    with pytest.raises(StartupError) as info:
        await supervisor.run(parts.start, parts.reset)
    message = str(info.value)
    assert "REBIND_TOPICS__LEDGER" in message
    assert "still missing after 25 s (REBIND_KAFKA__TOPICS_GRACE_SECONDS)" in message
    assert check.calls == 4  # t=10 (first seen), 20, 30, 40: 30 s after the first > 25 s


async def test_topics_that_appear_within_the_grace_period_are_fine() -> None:
    check = Scripted(TopicsMissingError("topics missing: x"), TopicsMissingError("x"))
    parts = Parts()
    assert await StartupSupervisor(settings(), check=check).run(parts.start, parts.reset)


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (KafkaConnectionError("Unable to bootstrap"), False),
        (ConnectionRefusedError(111, "refused"), False),
        (TimeoutError(), False),
        (NodeNotReadyError(), False),
        (SaslAuthenticationFailed(), True),
        (ValueError("defect"), True),
    ],
)
def test_classification(error: BaseException, permanent: bool) -> None:
    verdict, message = classify_startup_error(error, bootstrap="k:1")
    assert verdict is permanent
    assert "\n" not in message
    if not permanent:
        assert "REBIND_KAFKA__BOOTSTRAP_SERVERS=k:1" in message


async def test_a_part_that_cannot_start_after_the_check_is_retried() -> None:
    """E.g. the budget exchange could not publish its first record: the broker is busy or
    settling; the parts are reset and started again."""
    parts = Parts(fail=[FatalPipelineError("REBIND_TOPICS__BUDGET: could not publish to topic")])
    supervisor = StartupSupervisor(settings(), check=Scripted())
    with captured_logs() as cap:
        assert await supervisor.run(parts.start, parts.reset)
    assert (parts.started, parts.resets) == (2, 1)
    [retry] = [line for line in cap.lines() if line["event"] == "not_ready_retrying"]
    assert retry["cause"] == "REBIND_TOPICS__BUDGET: could not publish to topic"


def test_overlapping_quiet_attempts_restore_the_library_level() -> None:
    """Two services starting in one process: the Kafka client's logger ends where it began."""
    import logging  # noqa: PLC0415 - this test only

    from service.startup import _quiet  # noqa: PLC0415

    lib = logging.getLogger("aiokafka.test-quiet")
    lib.setLevel(logging.NOTSET)
    first, second = _quiet("aiokafka.test-quiet"), _quiet("aiokafka.test-quiet")
    first.__enter__()
    second.__enter__()
    assert lib.level == logging.CRITICAL
    first.__exit__(None, None, None)
    assert lib.level == logging.CRITICAL  # the second attempt still runs
    second.__exit__(None, None, None)
    assert lib.level == logging.NOTSET
