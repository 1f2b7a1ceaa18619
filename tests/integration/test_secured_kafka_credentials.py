"""Bad credentials against the secured broker: one clear line, not ready, and what happens next.

* An untrusted broker certificate, a client certificate the broker refuses, an OAUTHBEARER token
  it refuses: one line per attempt naming the cause and the setting, ``/readyz`` 503 with it, a
  retry with a growing backoff, and every attempt reads the files again, so replacing the mounted
  files (a rotated Secret) lets the same process start, without a restart.
* A wrong SCRAM password (an environment variable, read once): one line, exit code 1, so the pod
  restarts with the rotated Secret.
* An expired broker certificate, a certificate that does not name the host (and
  ``REBIND_KAFKA__SSL_CHECK_HOSTNAME=false``), SASL PLAIN (Confluent Cloud's mechanism): explained
  or accepted at the connection.
* No password, key, key password or token appears in any log line.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from service.config import (
    HttpSettings,
    KafkaSettings,
    LogSettings,
    PlatformSettings,
    SecurityProtocol,
    Settings,
)
from service.kafka import KafkaAuthenticationError, KafkaTlsError
from service.kafka_access import check_access, service_acls
from service.kafka_connection import check_connection
from tests.fixtures.simulator import SimulatorHandle
from tests.support.secured_kafka import (
    PLAIN_USER,
    AclAdmin,
    SecuredKafka,
    SecuredTopics,
    ServiceProcess,
    run_cli,
    unsecured_jwt,
)
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RETRYING = "not_ready_retrying"
PRINCIPALS = ("User:ANONYMOUS", "User:rebind-mtls", "User:rebind-oauth", f"User:{PLAIN_USER}")


@dataclass
class Setup:
    kafka: SecuredKafka
    topics: SecuredTopics
    group: str
    sim: SimulatorHandle

    def settings(self, kafka: KafkaSettings) -> Settings:
        return Settings(
            kafka=kafka,
            topics=self.topics.settings(),
            platform=PlatformSettings(
                base_url=self.sim.url, app_id=self.sim.app_id, secret=self.sim.secret
            ),
            http=HttpSettings(host="127.0.0.1", port=0),
            log=LogSettings(level="INFO", format="json"),
        )

    def common(self) -> dict[str, object]:
        return {
            "group_id": self.group,
            "instance_id": f"{self.group}-{secrets.token_hex(2)}",
            "session_timeout_ms": 6_000,
            "connect_backoff_initial_seconds": 0.2,
            "connect_backoff_max_seconds": 0.8,
        }


@pytest.fixture(scope="module")
async def setup(secured_kafka: SecuredKafka, simulator: SimulatorHandle) -> Setup:
    topics = SecuredTopics.unique()
    await topics.create(secured_kafka)
    group = f"rebind-creds-{secrets.token_hex(4)}"
    kafka = KafkaSettings(group_id=group)
    async with AclAdmin(secured_kafka.admin_options()) as admin:
        for principal in PRINCIPALS:
            await admin.grant(principal, service_acls(kafka, topics.settings()))
    return Setup(secured_kafka, topics, group, simulator)


def copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    return target


def replace(target: Path, source: Path) -> None:
    """Swap the file's content at once, as the kubelet swaps a mounted Secret's files."""
    staged = target.with_name(f".{target.name}.new")
    staged.write_bytes(source.read_bytes())
    os.replace(staged, target)


def causes(service: ServiceProcess) -> list[tuple[str, float]]:
    return [
        (str(line["cause"]), float(line["retry_in_seconds"]))
        for line in service.lines()
        if line.get("event") == RETRYING
    ]


async def refused_then_recovered(
    service: ServiceProcess, words: str, rotate: list[tuple[Path, Path]], known: list[str]
) -> str:
    """Start ``service``; see it refused (``words`` in each attempt's one line, /readyz 503,
    a growing backoff); rotate the files; see the same process become ready."""
    service.start()
    try:
        await wait_until(lambda: len(causes(service)) >= 3, 60, f"three attempts refused: {words}")
        readyz = service.readyz()
        assert readyz is not None
        assert readyz[0] == 503
        assert words in readyz[1]
        seen = causes(service)
        assert all(words in cause for cause, _ in seen), seen
        delays = [delay for _, delay in seen]
        assert delays[1] > delays[0]  # the backoff grows
        pid = service.proc.pid if service.proc else None
        for target, source in rotate:
            replace(target, source)
        await service.wait_ready(60)
        assert service.proc is not None
        assert service.proc.pid == pid  # no restart
        assert any(line.get("event") == "kafka_ready" for line in service.lines())
        assert await service.terminate() == 0
    finally:
        service.cleanup()
    assert_clean_logs(service, known)
    return seen[0][0]


def assert_clean_logs(service: ServiceProcess, known: list[str]) -> None:
    lines = service.lines()  # every line is JSON
    assert not [line for line in lines if "exception" in line], service.tail()
    text = service.text()
    for value in known:
        assert value not in text, f"a secret ({value[:6]}...) is in the log"


def key_material(path: Path) -> list[str]:
    pem = path.read_text()
    return [pem, *(line for line in pem.splitlines() if line and not line.startswith("-----"))]


async def test_untrusted_broker_certificate_until_the_ca_file_is_rotated(
    setup: Setup, tmp_path: Path
) -> None:
    ca = copy(setup.kafka.pki.untrusted_ca, tmp_path / "ca.crt")
    kafka = setup.kafka.kafka_settings("tls", ssl_cafile=ca, **setup.common())
    service = ServiceProcess(setup.settings(kafka), tmp_path / "service.log")
    line = await refused_then_recovered(
        service, "is not trusted", [(ca, setup.kafka.pki.ca)], known=[]
    )
    assert "REBIND_KAFKA__SSL_CAFILE" in line
    print(f"TLS untrusted broker: {line}")


async def test_refused_client_certificate_until_the_pair_is_rotated(
    setup: Setup, tmp_path: Path
) -> None:
    pki = setup.kafka.pki
    cert = copy(pki.untrusted_client.cert, tmp_path / "user.crt")
    key = copy(pki.untrusted_client.key, tmp_path / "user.key")
    kafka = setup.kafka.kafka_settings(
        "mtls", ssl_certfile=cert, ssl_keyfile=key, ssl_key_password=None, **setup.common()
    )
    service = ServiceProcess(setup.settings(kafka), tmp_path / "service.log")
    line = await refused_then_recovered(
        service,
        "refused the client certificate",
        [(key, pki.service.key), (cert, pki.service.cert)],
        known=[*key_material(pki.untrusted_client.key), *key_material(pki.service.key)],
    )
    assert "REBIND_KAFKA__SSL_CERTFILE" in line
    print(f"mTLS refused client certificate: {line}")


async def test_refused_oauth_token_until_the_token_file_is_renewed(
    setup: Setup, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    expired = unsecured_jwt("rebind-oauth", issued_at=time.time() - 7200)
    token.write_text(expired)
    fresh = tmp_path / "fresh"
    fresh.write_text(unsecured_jwt("rebind-oauth"))
    kafka = setup.kafka.oauth_settings(token, **setup.common())
    service = ServiceProcess(setup.settings(kafka), tmp_path / "service.log")
    line = await refused_then_recovered(
        service,
        "refused the token of REBIND_KAFKA__SASL_OAUTH_TOKEN_FILE",
        [(token, fresh)],
        known=[expired, fresh.read_text()],
    )
    print(f"OAUTHBEARER refused token: {line}")


async def test_wrong_scram_password_exits_with_one_line(setup: Setup, tmp_path: Path) -> None:
    wrong = "WrongScram-" + secrets.token_hex(8)
    kafka = setup.kafka.kafka_settings("scram", sasl_password=SecretStr(wrong), **setup.common())
    service = ServiceProcess(setup.settings(kafka), tmp_path / "service.log")
    service.start()
    try:
        code = await service.terminate_when_exited(60)
    finally:
        service.cleanup()
    assert code == 1
    [cannot] = [line for line in service.lines() if line.get("level") == "error"]
    assert cannot["event"] == "cannot_start"
    assert "refused user 'rebind-scram'" in cannot["reason"]
    assert "REBIND_KAFKA__SASL_PASSWORD" in cannot["reason"]
    assert not [line for line in service.lines() if line.get("event") == RETRYING]
    assert_clean_logs(service, [wrong, setup.kafka.users["rebind-scram"].password])
    print(f"SCRAM wrong password: {cannot['reason']}")
    # the tools say the same in one line
    for args in (["replay", "rebind-failed", "--dry-run"], ["topics", "plan"]):
        code, out, err = await run_cli(args, service.env)
        assert code == 1, (out, err)
        assert len(err.strip().splitlines()) == 1, err
        assert "refused user 'rebind-scram'" in err
        assert wrong not in out + err


async def test_broker_certificates_that_expired_or_name_another_host(setup: Setup) -> None:
    kafka = setup.kafka
    expired = kafka.kafka_settings("tls", bootstrap_servers=kafka.address("EXPIRED"))
    with pytest.raises(KafkaTlsError, match="has expired"):
        await check_connection(expired)
    wronghost = kafka.kafka_settings("tls", bootstrap_servers=kafka.address("WRONGHOST"))
    with pytest.raises(KafkaTlsError, match="REBIND_KAFKA__SSL_CHECK_HOSTNAME=false"):
        await check_connection(wronghost)
    relaxed = wronghost.model_copy(update={"ssl_check_hostname": False, "group_id": setup.group})
    await check_access(relaxed, setup.topics.settings())  # connects, and is authorized


async def test_sasl_plain_over_tls(setup: Setup) -> None:
    """Confluent Cloud's SASL_SSL PLAIN (API key and secret) against the same listener."""
    kafka = setup.kafka
    user = kafka.users[PLAIN_USER]
    plain = KafkaSettings(
        bootstrap_servers=kafka.address("SCRAM"),
        security_protocol=SecurityProtocol.SASL_SSL,
        sasl_mechanism="PLAIN",
        sasl_username=user.name,
        sasl_password=SecretStr(user.password),
        ssl_cafile=kafka.pki.ca,
        group_id=setup.group,
    )
    await check_access(plain, setup.topics.settings())
    wrong = plain.model_copy(update={"sasl_password": SecretStr("not-the-secret")})
    with pytest.raises(KafkaAuthenticationError, match="refused user") as refused:
        await check_connection(wrong)
    assert not refused.value.retry
