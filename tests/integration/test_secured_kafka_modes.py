"""The service end to end against a secured Apache Kafka broker, one test per security mode.

Each mode (TLS, mutual TLS with an encrypted key, SASL_SSL SCRAM-SHA-512, SASL_SSL OAUTHBEARER
with a token file) runs ``python -m service run`` configured only through its ``REBIND_KAFKA__*``
variables, against a broker with an authorizer that denies everything not granted
(``allow.everyone.if.no.acl.found=false``): the principal gets exactly the documented ACLs of the
service, of ``replay`` and of ``topics check``, nothing else. Then:

* one swap becomes ``credential-updated``;
* two replicas share a burst of swaps; one is SIGKILLed while its calls are on the wire, the
  other takes its partitions over, the killed one is restarted: every swap is answered exactly
  once (nothing lost, nothing doubled);
* ``device-rebind replay`` (same settings) sends a failed swap again and it succeeds;
* ``device-rebind topics check`` (same settings) sees every topic;
* SIGTERM stops it cleanly, and no secret (password, key password, token) is in its logs.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from service.config import HttpSettings, KafkaSettings, LogSettings, PlatformSettings, Settings
from service.kafka_access import missing_acls, replay_acls, service_acls, topics_acls
from tests.fixtures.simulator import SimulatorHandle
from tests.support.events import LONG_RETENTION, Received, swap_event
from tests.support.secured_kafka import (
    MODES,
    PRINCIPALS,
    AclAdmin,
    Mode,
    OutputReader,
    SecuredKafka,
    SecuredTopics,
    ServiceProcess,
    produce,
    run_cli,
    unsecured_jwt,
    wait_acls,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BURST = 24


def mode_settings(
    kafka_broker: SecuredKafka,
    mode: Mode,
    *,
    topics: SecuredTopics,
    sim: SimulatorHandle,
    tmp: Path,
    group: str,
    instance: str,
) -> Settings:
    common = {
        "group_id": group,
        "instance_id": f"{group}-{instance}",
        "session_timeout_ms": 3_000,  # the broker allows it (group.min.session.timeout.ms)
        "commit_interval_ms": 100,
        "connect_backoff_initial_seconds": 0.2,
        "connect_backoff_max_seconds": 1.0,
    }
    kafka: KafkaSettings
    if mode == "oauth":
        token_file = tmp / "kafka-token"
        if not token_file.exists():
            token_file.write_text(unsecured_jwt("rebind-oauth") + "\n")
        kafka = kafka_broker.oauth_settings(token_file, **common)
    else:
        kafka = kafka_broker.kafka_settings(mode, **common)
    return Settings(
        kafka=kafka,
        topics=topics.settings(),
        platform=PlatformSettings(
            base_url=sim.url,
            app_id=sim.app_id,
            secret=sim.secret,
            # A SIGKILLed replica may have spent its whole share: the survivor counts it as
            # spent (docs/budget.md), so the budget must leave the survivor room.
            rate_limit_per_minute=6_000,
            max_concurrency=1,
            retry_backoff_initial_seconds=0.05,
            retry_backoff_max_seconds=0.5,
        ),
        http=HttpSettings(host="127.0.0.1", port=0),
        ledger=LONG_RETENTION,
        log=LogSettings(level="INFO", format="json"),
    )


def secrets_of(settings: Settings) -> list[str]:
    kafka = settings.kafka
    values = [
        s.get_secret_value()
        for s in (kafka.sasl_password, kafka.ssl_key_password, settings.platform.secret)
        if s is not None
    ]
    if kafka.sasl_oauth_token_file is not None:
        values.append(kafka.sasl_oauth_token_file.read_text().strip())
    return values


@pytest.mark.parametrize("mode", MODES)
async def test_the_service_runs_over_each_secured_mode(
    mode: Mode, secured_kafka: SecuredKafka, sim: SimulatorHandle, tmp_path: Path
) -> None:
    topics = SecuredTopics.unique()
    await topics.create(secured_kafka)
    group = f"rebind-{mode}-{secrets.token_hex(4)}"
    settings = mode_settings(
        secured_kafka, mode, topics=topics, sim=sim, tmp=tmp_path, group=group, instance="a"
    )
    other = mode_settings(
        secured_kafka, mode, topics=topics, sim=sim, tmp=tmp_path, group=group, instance="b"
    )
    assert settings.kafka.security_protocol in ("SSL", "SASL_SSL")
    async with AclAdmin(secured_kafka.admin_options()) as admin:
        await admin.grant(
            PRINCIPALS[mode],
            [
                *service_acls(settings.kafka, settings.topics),
                *replay_acls(settings.topics),
                *topics_acls(settings.topics),
            ],
        )
    await wait_acls(lambda: missing_acls(settings.kafka, settings.topics), [])

    devices = [f"dev-{mode}-{i:02d}-{secrets.token_hex(3)}" for i in range(BURST + 1)]
    await sim.control.seed_devices([{"device_id": d, "node_id": f"old-{d}"} for d in devices])
    service = ServiceProcess(settings, tmp_path / "service-a.log")
    replica = ServiceProcess(other, tmp_path / "service-b.log")
    async with OutputReader(secured_kafka, topics.outputs) as outputs:
        try:
            service.start()
            replica.start()
            await service.wait_ready()
            await replica.wait_ready()

            # one swap -> credential-updated
            first = devices[0]
            await produce(
                secured_kafka,
                topics.device_swapped,
                [(first.encode(), swap_event(first, f"new-{first}"))],
            )
            [updated] = await outputs.wait_for(lambda r: len(r) >= 1, "the first outcome")
            assert updated.topic == topics.credential_updated
            assert updated.data["deviceId"] == first

            # a burst; SIGKILL one replica while calls are on the wire; the other takes its
            # partitions over; restart the killed one: nothing lost or doubled
            await sim.control.inject_latency(0.25, operation="refresh_key", times=-1)
            burst = [
                (d.encode(), swap_event(d, f"new-{d}", event_id=f"ev-{d}")) for d in devices[1:]
            ]
            await produce(secured_kafka, topics.device_swapped, burst)
            await outputs.wait_for(lambda r: len(r) >= 5, "some outcomes of the burst")
            await service.kill()
            done_before_kill = len(outputs.records)
            await outputs.wait_for(
                lambda r: {f"ev-{d}" for d in devices[1:]} <= {x.data["swapEventId"] for x in r},
                "every swap of the burst answered",
                timeout=120,
            )
            service.start()
            await service.wait_ready()
            answers = outputs.answers()
            assert all(len(found) == 1 for found in answers.values()), answers
            assert {rec.topic for rec in outputs.records} == {topics.credential_updated}
            for device in devices:
                assert (await sim.control.device(device))["node_id"] == f"new-{device}"
            assert done_before_kill < BURST + 1  # the kill did interrupt the burst

            # replay: a swap fails (unknown device), the device is added, replay sends it again
            ghost = f"ghost-{mode}-{secrets.token_hex(3)}"
            await produce(
                secured_kafka,
                topics.device_swapped,
                [(ghost.encode(), swap_event(ghost, f"new-{ghost}"))],
            )
            found = await outputs.wait_for(
                lambda r: any(x.data["deviceId"] == ghost for x in r), "the ghost's failure"
            )
            [failed] = [x for x in found if x.data["deviceId"] == ghost]
            assert failed.topic == topics.rebind_failed
            assert failed.data["errorCode"] == "100403"
            await sim.control.seed_device(ghost, f"old-{ghost}")
            code, out, err = await run_cli(
                ["replay", "rebind-failed", "--error-code", "100403"], service.env
            )
            assert code == 0, err
            assert "replayed 1 record(s)" in out
            await outputs.wait_for(
                lambda r: any(_updated(x, topics.credential_updated, ghost) for x in r),
                "the replayed swap's credential-updated",
            )

            # topics: the same settings see every topic
            code, out, err = await run_cli(["topics", "check"], service.env)
            assert code == 0, f"{out}\n{err}"
            for name in (topics.device_swapped, topics.ledger, topics.token, topics.budget):
                assert name in out

            assert await service.terminate() == 0
            assert await replica.terminate() == 0
            kafka = settings.kafka
            print(
                f"MODE {mode}: {kafka.security_protocol.value}"
                f"{' ' + kafka.sasl_mechanism if kafka.sasl_mechanism else ''}"
                f"{' client-cert' if kafka.ssl_certfile else ''} as {PRINCIPALS[mode]}: "
                f"1 swap -> credential-updated; burst of {BURST}, replica killed after "
                f"{done_before_kill - 1}, restarted: answered {len(answers) - 1}/{BURST}, "
                f"lost 0, duplicated 0; replay 1 -> credential-updated; topics check ok"
            )
        finally:
            service.cleanup()
            replica.cleanup()

    for run in (service, replica):
        lines = run.lines()  # every line is JSON
        assert not [line for line in lines if "exception" in line or "Traceback" in str(line)]
        text = run.text()
        for value in secrets_of(settings):
            assert value not in text, f"a secret ({value[:4]}...) is in the service's log"


def _updated(record: Received, topic: str, device: str) -> bool:
    return record.topic == topic and record.data["deviceId"] == device
