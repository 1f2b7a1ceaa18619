"""No Kafka client of the service is left on PLAINTEXT.

Every connection aiokafka opens is recorded (``AIOKafkaConnection``, which every consumer,
producer and admin client uses) while the service runs against a broker that has no PLAINTEXT
listener at all (TLS only): the consumer, the per-partition transactional producers, the ledger
and duplicate-memory readers, the token and budget topics, the start-up checks, then ``replay``
and ``topics``. Each connection must use TLS with the service's SSL context. A static check
backs it: every client constructor in ``service/`` is given the shared client options.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import conn as aiokafka_conn

from service import replay, topics
from service.app import Service
from service.config import (
    HttpSettings,
    KafkaOnlySettings,
    LogSettings,
    PlatformSettings,
    Settings,
)
from service.kafka_access import replay_acls, service_acls, topics_acls
from tests.fixtures.simulator import SimulatorHandle
from tests.support.events import LONG_RETENTION, swap_event
from tests.support.secured_kafka import (
    AclAdmin,
    OutputReader,
    SecuredKafka,
    SecuredTopics,
    produce,
)
from tests.support.waiting import wait_until

SERVICE = Path(__file__).resolve().parents[2] / "service"
CLIENTS = ("AIOKafkaConsumer(", "AIOKafkaProducer(", "AIOKafkaAdminClient(", "AIOKafkaClient(")


@dataclass(frozen=True)
class Opened:
    host: str
    port: int
    security_protocol: str
    ssl_context: Any


def test_every_client_constructor_in_the_service_takes_the_shared_options() -> None:
    found = 0
    for path in sorted(SERVICE.rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"\b(" + "|".join(re.escape(c) for c in CLIENTS) + ")", text):
            call = text[match.end() : match.end() + 200]
            found += 1
            # ``**client_options(kafka)`` or a variable holding them (``**options``,
            # ``**self._options``, ``**kafka_options``), first or after positional topics
            assert re.match(r"\s*(?:[^()]*,\s*)?\*\*(?:self\.)?\w*options\b", call), (
                f"{path.relative_to(SERVICE.parent)}: a Kafka client without the shared "
                f"options: {match.group(0)}{call[:80]}"
            )
    assert found >= 10


@pytest.mark.integration
@pytest.mark.slow
async def test_no_connection_is_plaintext(
    secured_kafka: SecuredKafka,
    sim: SimulatorHandle,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    names = SecuredTopics.unique()
    await names.create(secured_kafka)
    kafka = secured_kafka.kafka_settings(
        "tls",
        group_id=f"rebind-tls-only-{tmp_path.name[-8:]}",
        session_timeout_ms=3_000,
        commit_interval_ms=100,
    )
    settings = Settings(
        kafka=kafka,
        topics=names.settings(),
        platform=PlatformSettings(base_url=sim.url, app_id=sim.app_id, secret=sim.secret),
        http=HttpSettings(host="127.0.0.1", port=0),
        ledger=LONG_RETENTION,
        log=LogSettings(level="INFO", format="console"),
    )
    async with AclAdmin(secured_kafka.admin_options()) as admin:
        await admin.grant(
            "User:ANONYMOUS",
            [
                *service_acls(kafka, settings.topics, settings.bind),
                *replay_acls(settings.topics),
                *topics_acls(settings.topics),
            ],
        )
    await sim.control.seed_device("dev-tls-only", "old")

    opened: list[Opened] = []
    original = aiokafka_conn.AIOKafkaConnection.__init__

    def recording(self: Any, host: str, port: int, **kwargs: Any) -> None:
        opened.append(
            Opened(
                host,
                port,
                kwargs.get("security_protocol", "PLAINTEXT"),
                kwargs.get("ssl_context"),
            )
        )
        original(self, host, port, **kwargs)

    monkeypatch.setattr(aiokafka_conn.AIOKafkaConnection, "__init__", recording)

    service = Service(settings)
    task = asyncio.create_task(service.run(), name="service")
    try:
        await wait_until(lambda: service.readiness()[0] or task.done(), 60, "the service ready")
        assert not task.done()
        async with OutputReader(secured_kafka, names.outputs) as outputs:
            await produce(
                secured_kafka,
                names.device_swapped,
                [
                    (b"dev-tls-only", swap_event("dev-tls-only", "new")),
                    (b"ghost-tls-only", swap_event("ghost-tls-only", "new")),
                ],
            )
            await outputs.wait_for(lambda r: len(r) >= 2, "both outcomes")
            await sim.control.seed_device("ghost-tls-only", "old")
            tool = KafkaOnlySettings(kafka=kafka, topics=settings.topics)
            out = io.StringIO()
            assert (
                await replay.replay(tool, "rebind-failed", replay.Filters(), dry_run=False, out=out)
                == 1
            )
            assert await topics.run_command(kafka, settings.topics, "check", out) == 0
            await outputs.wait_for(lambda r: len(r) >= 3, "the replayed swap's outcome")
    finally:
        service.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 60)

    ports = {int(secured_kafka.address(name).rsplit(":", 1)[1]) for name in ("TLS", "MTLS")}
    assert len(opened) >= 10, opened
    plaintext = [o for o in opened if o.security_protocol not in ("SSL", "SASL_SSL")]
    assert plaintext == []
    assert all(isinstance(o.ssl_context, ssl.SSLContext) for o in opened)
    assert {o.port for o in opened} <= ports  # the service's TLS listener, the harness's mTLS
