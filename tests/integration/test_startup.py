"""Issue 12: start-up when the world is not ready, and ``device-rebind topics``.

* The service started before its broker keeps retrying (``/healthz`` 200, ``/readyz`` 503 with
  the reason, one log line per attempt), becomes ready when the broker comes, and works.
* Permanent problems end the start at once, with one line naming the cause and the variable.
* ``topics plan | create | check`` against the real broker: creates what is missing,
  co-partitioned and compacted, changes nothing that exists, and is idempotent.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from pathlib import Path

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from service import topics as topic_cli
from service.app import Service
from service.config import KafkaSettings, Settings, TopicSettings
from service.startup import StartupError
from tests.fixtures.kafka import Topics
from tests.fixtures.service import Harness
from tests.fixtures.simulator import SimulatorHandle
from tests.support.events import swap_event
from tests.support.kafka_broker import KafkaBroker, create_topics
from tests.support.logcapture import captured_logs
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

RETRIES_BEFORE_BROKER = 5
"""The broker comes once the service has failed this many attempts (and started the next): it
keeps trying, one log line per attempt, whatever the time it takes (backoff 0.5 s up to 2 s)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _patient(settings: Settings, **kafka: object) -> Settings:
    """The harness' settings with a short start-up backoff (the broker comes within seconds)."""
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={
                    "connect_backoff_initial_seconds": 0.5,
                    "connect_backoff_max_seconds": 2.0,
                    **kafka,
                }
            )
        }
    )


@pytest.mark.slow
async def test_started_before_the_broker_it_waits_then_works(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    port = _free_port()
    names = Topics.unique()
    h = Harness(f"127.0.0.1:{port}", names, sim)
    service = Service(_patient(h.settings()))
    broker = KafkaBroker(tmp_path / "late-kafka", port=port)
    with captured_logs() as cap:
        task = asyncio.create_task(service.run(), name="early-service")
        try:
            await wait_until(lambda: service.startup.attempts >= 2, timeout=30, what="retries")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.ops.port}") as web:
                health = await web.get("/healthz")
                ready = await web.get("/readyz")
            assert health.status_code == 200
            assert ready.status_code == 503
            assert "Kafka is not reachable" in ready.text
            assert f"REBIND_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:{port}" in ready.text

            # The broker comes after the service's fifth failed attempt; meanwhile it keeps trying.
            await wait_until(
                lambda: service.startup.attempts > RETRIES_BEFORE_BROKER,
                timeout=60,
                what=f"{RETRIES_BEFORE_BROKER} failed attempts",
            )
            assert not task.done()
            await broker.astart()
            await create_topics(broker.bootstrap, names.names(), names.partitions())
            await wait_until(
                lambda: service.readiness()[0] or task.done(), timeout=90, what="ready"
            )
            assert not task.done()

            await sim.control.seed_device("dev-late", "old-late")
            await h.produce([(b"dev-late", swap_event("dev-late", "new-late"))])
            [out] = await h.read(1, topics=[names.credential_updated, names.rebind_failed])
            assert out.topic == names.credential_updated
            assert out.data["deviceId"] == "dev-late"
        finally:
            service.stop()
            await asyncio.wait_for(task, 60)
            await broker.astop()
    retries = [line for line in cap.lines() if line["event"] == "not_ready_retrying"]
    assert len(retries) >= RETRIES_BEFORE_BROKER  # one line per attempt
    unreachable = [line for line in retries if "Kafka is not reachable" in line["cause"]]
    assert len(unreachable) >= RETRIES_BEFORE_BROKER
    # After the broker came and before the test created the topics, the cause said so.
    assert all(
        line in unreachable or "topics missing" in line["cause"] or "not ready" in line["cause"]
        for line in retries
    ), [line["cause"] for line in retries]
    # While starting, one line per attempt: the Kafka client's own complaints are left out. (After
    # the start, this test's own producer and reader log through the same pipeline.)
    lines = cap.lines()
    ready_at = next(i for i, line in enumerate(lines) if line["event"] == "kafka_ready")
    starting = lines[:ready_at]
    assert not [line for line in starting if line.get("logger", "").startswith("aiokafka")]
    assert not [line for line in starting if line.get("level") == "error"]
    assert not [line for line in lines if line["event"] == "cannot_start"]


async def test_missing_topics_end_the_start_after_the_grace_period(harness: Harness) -> None:
    settings = _patient(harness.settings(), topics_grace_seconds=2)
    settings = settings.model_copy(
        update={"topics": settings.topics.model_copy(update={"ledger": "no.such.ledger"})}
    )
    service = Service(settings)
    with captured_logs() as cap, pytest.raises(StartupError) as info:
        await asyncio.wait_for(service.run(), 30)
    message = str(info.value)
    assert "no.such.ledger (REBIND_TOPICS__LEDGER)" in message
    assert "REBIND_KAFKA__TOPICS_GRACE_SECONDS" in message
    assert "device-rebind topics create" in message
    waiting = [line for line in cap.lines() if line["event"] == "not_ready_retrying"]
    assert any("no.such.ledger (REBIND_TOPICS__LEDGER)" in line["cause"] for line in waiting)


async def test_topics_not_co_partitioned_end_the_start_at_once(
    harness: Harness, kafka_broker: KafkaBroker
) -> None:
    wrong = f"{harness.topics.ledger}.wrong"
    await create_topics(kafka_broker.bootstrap, [wrong], 1, configs={"cleanup.policy": "compact"})
    settings = _patient(harness.settings())
    settings = settings.model_copy(
        update={"topics": settings.topics.model_copy(update={"ledger": wrong})}
    )
    started = time.monotonic()
    with pytest.raises(StartupError) as info:
        await asyncio.wait_for(Service(settings).run(), 30)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert message.startswith("topics not co-partitioned")
    assert f"{wrong} (REBIND_TOPICS__LEDGER) has 1" in message
    assert "(REBIND_TOPICS__DEVICE_SWAPPED) has 3 partitions" in message


async def test_the_ops_port_in_use_is_one_line(harness: Harness) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = harness.settings()
        settings = settings.model_copy(
            update={"http": settings.http.model_copy(update={"port": taken.getsockname()[1]})}
        )
        with pytest.raises(StartupError) as info:
            await asyncio.wait_for(Service(settings).run(), 10)
    assert info.value.exit_code == 2
    assert str(info.value).startswith("REBIND_HTTP__PORT: port")
    assert "already in use" in str(info.value)


async def test_topics_create_is_idempotent_and_changes_nothing_existing(
    kafka_broker: KafkaBroker,
) -> None:
    suffix = Topics.unique().device_swapped.rsplit(".", 1)[1]
    names = TopicSettings(
        **{
            field: f"{default.default}.{suffix}"
            for field, default in TopicSettings.model_fields.items()
        }
    )
    kafka = KafkaSettings(bootstrap_servers=kafka_broker.bootstrap)
    # Someone created the input (4 partitions) and a dead-letter topic that deletes.
    await create_topics(kafka_broker.bootstrap, [names.device_swapped], 4)
    await create_topics(kafka_broker.bootstrap, [names.dead_letter], 2)

    out = io.StringIO()
    assert await topic_cli.run_command(kafka, names, "check", out) == 1
    assert await topic_cli.run_command(kafka, names, "plan", out) == 0
    plan_text = out.getvalue()
    assert f"{names.ledger}" in plan_text
    assert "to create" in plan_text

    out = io.StringIO()
    assert await topic_cli.run_command(kafka, names, "create", out, partitions=9) == 0
    created = [
        line.split()[1] for line in out.getvalue().splitlines() if line.startswith("created")
    ]
    assert names.device_swapped not in created
    assert names.dead_letter not in created
    assert names.ledger in created
    assert "asked for 9): kept" in out.getvalue()

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        found = await topic_cli.describe(admin, [n for _, n in topic_cli.specs_for(names)])
    finally:
        await admin.close()
    assert found[names.device_swapped].partitions == 4
    assert found[names.ledger].partitions == 4
    assert found[names.dedupe].partitions == 4
    assert found[names.token].partitions == 1
    assert found[names.dead_letter].partitions == 2  # existing: untouched
    assert found[names.ledger].configs["cleanup.policy"] == "compact"
    assert found[names.dedupe].configs["retention.ms"] == "604800000"

    again = io.StringIO()
    assert await topic_cli.run_command(kafka, names, "create", again) == 0
    assert "created" not in again.getvalue()
    assert "0 to create" in again.getvalue()
    assert await topic_cli.run_command(kafka, names, "check", io.StringIO()) == 0


async def test_a_listener_that_never_answers_is_waited_for_not_fatal(tmp_path: Path) -> None:
    """A port that accepts connections and never answers (a black hole, a proxy without its
    backend): each attempt ends after its deadline, the service stays up and says why."""
    from service.config import PlatformSettings  # noqa: PLC0415 - this test only
    from service.startup import StartupSupervisor  # noqa: PLC0415

    accepted: list[asyncio.StreamWriter] = []

    async def swallow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # keep it open, never answer

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = Settings(
        kafka=KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{port}",
            connect_backoff_initial_seconds=0.1,
            connect_backoff_max_seconds=0.2,
        ),
        platform=PlatformSettings(base_url="https://iot.example.test", app_id="a", secret="s"),
    )
    supervisor = StartupSupervisor(settings, attempt_timeout=1.0)
    started: list[bool] = []

    async def start() -> None:
        started.append(True)

    async def reset() -> None: ...

    with captured_logs() as cap:
        task = asyncio.create_task(supervisor.run(start, reset))
        try:
            await wait_until(lambda: supervisor.attempts >= 3, timeout=30, what="three attempts")
            assert not task.done()
            assert accepted, "the service never connected"
        finally:
            supervisor.stop()
            assert await asyncio.wait_for(task, 10) is False
            server.close()
            for writer in accepted:
                writer.close()
    assert started == []
    retries = [line for line in cap.lines() if line["event"] == "not_ready_retrying"]
    assert len(retries) >= 2
    assert all(f"REBIND_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:{port}" in r["cause"] for r in retries)
