"""Least privilege, proven both ways, against the secured broker (StandardAuthorizer,
``allow.everyone.if.no.acl.found=false``), as a SCRAM user that has nothing but what it is given.

* Granted exactly :func:`service.kafka_access.service_acls` (what docs/deploying.md lists), the
  service starts and a swap becomes ``credential-updated``.
* Each of those ACLs taken away in turn, the service does not start: one log line per attempt
  names the missing permission (topic, group or transactional id), ``/readyz`` answers 503 with
  it, no traceback, the process keeps retrying (no crash loop). Granting the ACL back while it
  waits lets it start, without a restart.
* ``device-rebind topics create`` needs Create, and only it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path

import pytest
from pydantic import SecretStr

from service.app import Service
from service.config import HttpSettings, LogSettings, PlatformSettings, Settings
from service.kafka_access import AclRequirement, missing_acls, service_acls, topics_acls
from tests.fixtures.simulator import SimulatorHandle
from tests.support.events import LONG_RETENTION, swap_event
from tests.support.exposition import get
from tests.support.logcapture import CapturedLogs, captured_logs
from tests.support.secured_kafka import (
    AclAdmin,
    OutputReader,
    SecuredKafka,
    SecuredTopics,
    produce,
    run_cli,
    settings_env,
    wait_acls,
)
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER = "rebind-least"
PRINCIPAL = f"User:{USER}"
RETRYING = "not_ready_retrying"


def least_settings(kafka: SecuredKafka, topics: SecuredTopics, sim: SimulatorHandle) -> Settings:
    user = kafka.users[USER]
    group = f"rebind-least-{secrets.token_hex(4)}"
    return Settings(
        kafka=kafka.kafka_settings(
            "scram",
            sasl_username=user.name,
            sasl_password=SecretStr(user.password),
            group_id=group,
            instance_id=f"{group}-i0",
            session_timeout_ms=6_000,
            commit_interval_ms=100,
            connect_backoff_initial_seconds=0.2,
            connect_backoff_max_seconds=0.5,
        ),
        topics=topics.settings(),
        platform=PlatformSettings(
            base_url=sim.url,
            app_id=sim.app_id,
            secret=sim.secret,
            rate_limit_per_minute=6_000,
        ),
        http=HttpSettings(host="127.0.0.1", port=0),
        ledger=LONG_RETENTION,
        log=LogSettings(level="INFO", format="json"),
    )


async def start(settings: Settings) -> tuple[Service, asyncio.Task[None]]:
    service = Service(settings)
    return service, asyncio.create_task(service.run(), name="service")


async def stop(service: Service, task: asyncio.Task[None]) -> None:
    service.stop()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)


def refusals(cap: CapturedLogs) -> list[str]:
    """The cause of each failed start attempt so far."""
    return [str(line["cause"]) for line in cap.lines() if line["event"] == RETRYING]


async def test_exactly_the_documented_acls_and_each_one_taken_away(
    secured_kafka: SecuredKafka, sim: SimulatorHandle
) -> None:
    topics = SecuredTopics.unique()
    await topics.create(secured_kafka)
    settings = least_settings(secured_kafka, topics, sim)
    acls = service_acls(settings.kafka, settings.topics, settings.bind)
    assert {a.resource for a in acls} == {"Topic", "Group", "TransactionalId"}

    async def broker_view() -> list[AclRequirement]:
        return await missing_acls(settings.kafka, settings.topics, settings.bind)

    async with AclAdmin(secured_kafka.admin_options()) as admin:
        await admin.grant(PRINCIPAL, acls)
        await wait_acls(broker_view, [])

        # exactly the set: the service works
        await sim.control.seed_device("dev-least", "old-least")
        service, task = await start(settings)
        try:
            await wait_until(lambda: service.readiness()[0] or task.done(), 60, "the service ready")
            assert not task.done(), task
            async with OutputReader(secured_kafka, topics.outputs) as outputs:
                await produce(
                    secured_kafka,
                    topics.device_swapped,
                    [(b"dev-least", swap_event("dev-least", "new-least"))],
                )
                [out] = await outputs.wait_for(lambda r: len(r) >= 1, "the outcome")
            assert out.topic == topics.credential_updated
        finally:
            await stop(service, task)

        # each ACL taken away in turn: one clear line per attempt, not ready, no traceback
        printed: dict[str, str] = {}
        for index, acl in enumerate(acls):
            await admin.revoke(PRINCIPAL, [acl])
            await wait_acls(broker_view, [acl])
            with captured_logs(level="INFO", fmt="json") as cap:
                service, task = await start(settings)
                try:
                    await wait_until(
                        lambda: len(refusals(cap)) >= 2 or task.done(),  # noqa: B023
                        30,
                        f"two refused attempts without {acl.describe()}",
                    )
                    assert not task.done(), "the service must keep retrying, not exit"
                    ready, reason = service.readiness()
                    readyz = await get(service.ops.port, "/readyz")
                    if index == 0:
                        # granted back while it waits: it starts, without a restart
                        await admin.grant(PRINCIPAL, [acl])
                        await wait_until(
                            lambda: service.readiness()[0] or task.done(),  # noqa: B023
                            60,
                            "the service ready once the ACL is granted",
                        )
                        assert not task.done()
                finally:
                    await stop(service, task)
            causes = refusals(cap)
            assert not ready
            assert acl.describe() in reason
            assert readyz.status_code == 503
            assert acl.describe() in readyz.text
            assert all(acl.describe() in cause for cause in causes), causes
            assert all(len(c.splitlines()) == 1 for c in causes)
            assert not [line for line in cap.lines() if "exception" in line], cap.text
            assert secured_kafka.users[USER].password not in cap.text
            printed[acl.describe()] = causes[0]
            if index > 0:
                await admin.grant(PRINCIPAL, [acl])
            await wait_acls(broker_view, [])

    assert len(printed) == len(acls)
    for line in printed.values():
        print(f"ACL {line}")


async def test_only_topics_create_needs_create(
    secured_kafka: SecuredKafka, sim: SimulatorHandle, tmp_path: Path
) -> None:
    topics = SecuredTopics.unique()  # not created
    settings = least_settings(secured_kafka, topics, sim)
    env = settings_env(settings)
    async with AclAdmin(secured_kafka.admin_options()) as admin:
        await admin.grant(
            PRINCIPAL,
            [
                *service_acls(settings.kafka, settings.topics, settings.bind),
                *topics_acls(settings.topics),
            ],
        )
        code, out, err = await run_cli(["topics", "plan"], env)
        assert code == 0, err
        assert all(f"{name} " in out for name in vars(topics).values()), out
        code, out, err = await run_cli(["topics", "create"], env)
        assert code == 1
        assert "TOPIC_AUTHORIZATION_FAILED" in err or "error 29" in err, err
        assert len(err.strip().splitlines()) == 1, err

        await admin.grant(PRINCIPAL, topics_acls(settings.topics, create=True))
        await wait_until(
            lambda: _created(env), 60, "topics create to succeed once Create is granted"
        )
    code, out, err = await run_cli(["topics", "check"], env)
    assert code == 0, f"{out}\n{err}"


async def _created(env: dict[str, str]) -> bool:
    code, _, _ = await run_cli(["topics", "create"], env)
    return code == 0
