"""A secured Apache Kafka broker for tests: TLS, mutual TLS, SASL/SCRAM, OAUTHBEARER, ACLs.

:class:`SecuredKafka` starts the project's broker (``deploy/local/kafka.sh`` through
:class:`~tests.support.kafka_broker.KafkaBroker`) with no PLAINTEXT listener at all:

======== ========= ==================================================================
listener protocol  who connects
======== ========= ==================================================================
TLS      SSL       server-authenticated TLS; the principal is ``User:ANONYMOUS``
MTLS     SSL       ``ssl.client.auth=required``; the principal is the certificate's CN
                   (``ssl.principal.mapping.rules``); the broker itself (CN=broker) and
                   the harness (CN=admin) connect here
SCRAM    SASL_SSL  SCRAM-SHA-512 users created at format time (``--add-scram``)
OAUTH    SASL_SSL  OAUTHBEARER, unsecured JWTs (Kafka's development validator); the
                   principal is the token's ``sub``
WRONGHOST SSL      a certificate that names ``broker.invalid`` only (host name checks)
EXPIRED  SSL       a certificate that expired yesterday
CONTROLLER SSL     ``ssl.client.auth=required`` (KRaft controller, the broker's own)
======== ========= ==================================================================

KRaft's ``StandardAuthorizer`` runs with ``allow.everyone.if.no.acl.found=false`` and super users
``User:broker`` and ``User:admin``: every other principal can do exactly what its ACLs allow.
Certificates are generated with trustme (as the platform simulator's) and written as PEM files:
the broker reads them as PEM key and trust stores (``ssl.keystore.type=PEM``).

:class:`AclAdmin` creates and deletes ACLs with the admin client's protocol (CreateAcls and
DeleteAcls v1), as the super user, and :func:`wait_acls` waits until the broker applies them.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import trustme
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Int8, Int16, Int32, Schema, String
from cryptography.hazmat.primitives import serialization
from pydantic import SecretStr

from service.config import KafkaSettings, SecurityProtocol, Settings, TopicSettings
from service.kafka_access import AclRequirement
from service.topics import Partitions, specs_for
from tests.support.events import Received
from tests.support.kafka_broker import REPO_ROOT, KafkaBroker, create_topics
from tests.support.waiting import wait_until

Mode = Literal["tls", "mtls", "scram", "oauth"]
MODES: Final[tuple[Mode, ...]] = ("tls", "mtls", "scram", "oauth")

SUPER_USERS: Final = ("broker", "admin")
SCRAM_MECHANISM: Final = "SCRAM-SHA-512"
PLAIN_USER: Final = "rebind-plain"
"""A SASL PLAIN user of the SCRAM listener (Confluent Cloud's mechanism: API key and secret)."""
KEY_PASSWORD_LENGTH: Final = 12


@dataclass(frozen=True)
class Pair:
    """A PEM certificate chain and its PKCS#8 private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Every PEM file the secured broker and its clients use."""

    directory: Path
    ca: Path
    broker_keystore: Path  # key + chain in one PEM file (Kafka's PEM key store)
    wronghost_keystore: Path
    expired_keystore: Path
    admin: Pair  # CN=admin, a super user
    service: Pair  # CN=rebind-mtls, the service's mutual-TLS identity
    service_encrypted_key: Path  # the same key, encrypted with ``key_password``
    key_password: str
    untrusted_ca: Path  # a CA the broker does not know
    untrusted_client: Pair  # a client certificate it signed


def _pkcs8(key_pem: bytes, password: bytes | None = None) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _pair(cert: trustme.LeafCert, directory: Path, name: str) -> Pair:
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    return Pair(
        _write(directory / f"{name}.pem", chain, 0o644),
        _write(directory / f"{name}.key", _pkcs8(cert.private_key_pem.bytes())),
    )


def _keystore(cert: trustme.LeafCert, path: Path) -> Path:
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    return _write(path, _pkcs8(cert.private_key_pem.bytes()) + chain)


def generate_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="device-rebind test Kafka CA")
    other = trustme.CA(organization_name="device-rebind untrusted CA")
    broker = ca.issue_cert("127.0.0.1", "localhost", common_name="broker")
    now = datetime.now(UTC)
    expired = ca.issue_cert(
        "127.0.0.1",
        "localhost",
        common_name="broker",
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    wronghost = ca.issue_cert("broker.invalid", common_name="broker")
    service = ca.issue_cert("rebind-mtls.client.test", common_name="rebind-mtls")
    service_pair = _pair(service, directory, "service")
    key_password = secrets.token_urlsafe(KEY_PASSWORD_LENGTH)
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other.cert_pem.write_to_path(str(directory / "untrusted-ca.pem"))
    return Pki(
        directory=directory,
        ca=directory / "ca.pem",
        broker_keystore=_keystore(broker, directory / "broker-keystore.pem"),
        wronghost_keystore=_keystore(wronghost, directory / "wronghost-keystore.pem"),
        expired_keystore=_keystore(expired, directory / "expired-keystore.pem"),
        admin=_pair(ca.issue_cert("admin.client.test", common_name="admin"), directory, "admin"),
        service=service_pair,
        service_encrypted_key=_write(
            directory / "service-encrypted.key",
            _pkcs8(service.private_key_pem.bytes(), key_password.encode()),
        ),
        key_password=key_password,
        untrusted_ca=directory / "untrusted-ca.pem",
        untrusted_client=_pair(
            other.issue_cert("rebind-mtls.client.test", common_name="rebind-mtls"),
            directory,
            "untrusted-client",
        ),
    )


def unsecured_jwt(
    subject: str, *, lifetime_seconds: int = 3600, issued_at: float | None = None
) -> str:
    """An unsigned JWT (``alg: none``), what Kafka's development OAUTHBEARER validator accepts."""
    now = int(time.time() if issued_at is None else issued_at)

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    claims = {
        "sub": subject,
        "iat": now,
        "exp": now + lifetime_seconds,
        "jti": secrets.token_hex(8),
    }
    return f"{part({'alg': 'none'})}.{part(claims)}."


def broker_properties(pki: Pki, plain: ScramUser) -> dict[str, str]:
    """server.properties of the secured broker (the listeners come from kafka.sh)."""
    jaas_oauth = (
        "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required "
        'unsecuredLoginStringClaim_sub="broker";'
    )
    return {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(pki.broker_keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(pki.ca),
        "ssl.principal.mapping.rules": "RULE:^CN=([^,]+)(,.*)?$/$1/,DEFAULT",
        "listener.name.controller.ssl.client.auth": "required",
        "listener.name.mtls.ssl.client.auth": "required",
        "listener.name.scram.sasl.enabled.mechanisms": f"{SCRAM_MECHANISM},PLAIN",
        "listener.name.scram.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        "listener.name.scram.plain.sasl.jaas.config": (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{plain.name}="{plain.password}";'
        ),
        "listener.name.oauth.sasl.enabled.mechanisms": "OAUTHBEARER",
        "listener.name.oauth.oauthbearer.sasl.jaas.config": jaas_oauth,
        "listener.name.wronghost.ssl.keystore.type": "PEM",
        "listener.name.wronghost.ssl.keystore.location": str(pki.wronghost_keystore),
        "listener.name.expired.ssl.keystore.type": "PEM",
        "listener.name.expired.ssl.keystore.location": str(pki.expired_keystore),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": ";".join(f"User:{name}" for name in SUPER_USERS),
        "allow.everyone.if.no.acl.found": "false",
        "transaction.max.timeout.ms": "900000",
        # a killed member leaves its group within a test's patience
        "group.min.session.timeout.ms": "1000",
    }


LISTENERS: Final = {
    "TLS": "SSL",
    "MTLS": "SSL",
    "SCRAM": "SASL_SSL",
    "OAUTH": "SASL_SSL",
    "WRONGHOST": "SSL",
    "EXPIRED": "SSL",
}


@dataclass
class ScramUser:
    name: str
    password: str

    def spec(self) -> str:
        return f"{SCRAM_MECHANISM}=[name={self.name},password={self.password}]"


class SecuredKafka:
    """The secured broker, its PKI, its users and an admin connection (CN=admin)."""

    def __init__(self, workdir: Path, users: Iterable[str] = ("rebind-scram", "rebind-least")):
        self.workdir = workdir
        self.pki = generate_pki(workdir / "pki")
        self.users = {name: ScramUser(name, f"{name}-{secrets.token_hex(8)}") for name in users}
        plain = ScramUser(PLAIN_USER, f"{PLAIN_USER}-{secrets.token_hex(8)}")
        self.broker = KafkaBroker(
            workdir / "broker",
            properties=broker_properties(self.pki, plain),
            listeners=LISTENERS,
            plaintext=False,
            inter_broker="MTLS",
            controller_protocol="SSL",
            scram=[u.spec() for u in self.users.values()],
            ready_tls=[self.pki.ca],
        )
        self.users[PLAIN_USER] = plain

    def start(self) -> None:
        self.broker.start()

    def stop(self) -> None:
        self.broker.stop()

    def address(self, listener: str) -> str:
        return self.broker.listener(listener)

    # ------------------------------------------------------------------ clients
    def admin_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.pki.admin.cert), str(self.pki.admin.key))
        return context

    def admin_options(self) -> dict[str, Any]:
        """aiokafka options of the harness: mutual TLS as the super user ``admin``."""
        return {
            "bootstrap_servers": self.address("MTLS"),
            "security_protocol": "SSL",
            "ssl_context": self.admin_context(),
        }

    def kafka_settings(self, mode: Mode, **overrides: Any) -> KafkaSettings:
        """The service's Kafka settings for ``mode`` (overrides replace any field)."""
        fields: dict[str, Any] = {"ssl_cafile": self.pki.ca}
        if mode == "tls":
            fields |= {
                "bootstrap_servers": self.address("TLS"),
                "security_protocol": SecurityProtocol.SSL,
            }
        elif mode == "mtls":
            fields |= {
                "bootstrap_servers": self.address("MTLS"),
                "security_protocol": SecurityProtocol.SSL,
                "ssl_certfile": self.pki.service.cert,
                "ssl_keyfile": self.pki.service_encrypted_key,
                "ssl_key_password": SecretStr(self.pki.key_password),
            }
        elif mode == "scram":
            user = self.users["rebind-scram"]
            fields |= {
                "bootstrap_servers": self.address("SCRAM"),
                "security_protocol": SecurityProtocol.SASL_SSL,
                "sasl_mechanism": SCRAM_MECHANISM,
                "sasl_username": user.name,
                "sasl_password": SecretStr(user.password),
            }
        else:
            raise ValueError("oauth needs a token file: use oauth_settings()")
        return KafkaSettings(**(fields | overrides))

    def oauth_settings(self, token_file: Path, **overrides: Any) -> KafkaSettings:
        fields: dict[str, Any] = {
            "bootstrap_servers": self.address("OAUTH"),
            "security_protocol": SecurityProtocol.SASL_SSL,
            "sasl_mechanism": "OAUTHBEARER",
            "sasl_oauth_token_file": token_file,
            "ssl_cafile": self.pki.ca,
        }
        return KafkaSettings(**(fields | overrides))


PRINCIPALS: Final[dict[Mode, str]] = {
    "tls": "User:ANONYMOUS",
    "mtls": "User:rebind-mtls",
    "scram": "User:rebind-scram",
    "oauth": "User:rebind-oauth",
}


# ---------------------------------------------------------------------------- ACLs

_RESOURCE_TYPES: Final = {"Topic": 2, "Group": 3, "Cluster": 4, "TransactionalId": 5}
_PATTERNS: Final = {"LITERAL": 3, "PREFIXED": 4}
_OPERATIONS: Final = {
    "Read": 3,
    "Write": 4,
    "Create": 5,
    "Describe": 8,
    "DescribeConfigs": 10,
    "IdempotentWrite": 12,
}
_ALLOW: Final = 3


class _CreateAclsResponse_v1(Response):  # type: ignore[misc]  # noqa: N801
    API_KEY = 30
    API_VERSION = 1
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("results", Array(("error_code", Int16), ("error_message", String("utf-8")))),
    )


class _CreateAclsRequest_v1(RequestStruct):  # type: ignore[misc]  # noqa: N801
    API_KEY = 30
    API_VERSION = 1
    RESPONSE_TYPE = _CreateAclsResponse_v1
    SCHEMA = Schema(
        (
            "creations",
            Array(
                ("resource_type", Int8),
                ("resource_name", String("utf-8")),
                ("resource_pattern_type", Int8),
                ("principal", String("utf-8")),
                ("host", String("utf-8")),
                ("operation", Int8),
                ("permission_type", Int8),
            ),
        ),
    )


class _DeleteAclsResponse_v1(Response):  # type: ignore[misc]  # noqa: N801
    API_KEY = 31
    API_VERSION = 1
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "filter_results",
            Array(
                ("error_code", Int16),
                ("error_message", String("utf-8")),
                (
                    "matching_acls",
                    Array(
                        ("error_code", Int16),
                        ("error_message", String("utf-8")),
                        ("resource_type", Int8),
                        ("resource_name", String("utf-8")),
                        ("pattern_type", Int8),
                        ("principal", String("utf-8")),
                        ("host", String("utf-8")),
                        ("operation", Int8),
                        ("permission_type", Int8),
                    ),
                ),
            ),
        ),
    )


class _DeleteAclsRequest_v1(RequestStruct):  # type: ignore[misc]  # noqa: N801
    API_KEY = 31
    API_VERSION = 1
    RESPONSE_TYPE = _DeleteAclsResponse_v1
    SCHEMA = Schema(
        (
            "filters",
            Array(
                ("resource_type_filter", Int8),
                ("resource_name_filter", String("utf-8")),
                ("pattern_type_filter", Int8),
                ("principal_filter", String("utf-8")),
                ("host_filter", String("utf-8")),
                ("operation", Int8),
                ("permission_type", Int8),
            ),
        ),
    )


class _CreateAcls(Request[_CreateAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 30

    def __init__(self, creations: list[tuple[Any, ...]]) -> None:
        self._creations = creations

    def build(self, cls: type[_CreateAclsRequest_v1]) -> _CreateAclsRequest_v1:
        return cls(self._creations)


class _DeleteAcls(Request[_DeleteAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 31

    def __init__(self, filters: list[tuple[Any, ...]]) -> None:
        self._filters = filters

    def build(self, cls: type[_DeleteAclsRequest_v1]) -> _DeleteAclsRequest_v1:
        return cls(self._filters)


def _binding(principal: str, acl: AclRequirement) -> tuple[Any, ...]:
    return (
        _RESOURCE_TYPES[acl.resource],
        "kafka-cluster" if acl.resource == "Cluster" else acl.name,
        _PATTERNS[acl.pattern],
        principal,
        "*",
        _OPERATIONS[acl.operation],
        _ALLOW,
    )


class AclAdmin:
    """Grant and revoke ACLs as the super user (the same requests kafka-acls.sh sends)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._client = AIOKafkaClient(**options, request_timeout_ms=15_000)

    async def __aenter__(self) -> AclAdmin:
        await self._client.bootstrap()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    async def _send(self, request: Request) -> Any:
        node = self._client.get_random_node()
        return await self._client.send(node, request)

    async def grant(self, principal: str, acls: Sequence[AclRequirement]) -> None:
        if not acls:
            return
        response = await self._send(_CreateAcls([_binding(principal, a) for a in acls]))
        errors = [r for r in response.to_object()["results"] if r["error_code"]]
        assert not errors, f"CreateAcls failed: {errors}"

    async def revoke(self, principal: str, acls: Sequence[AclRequirement]) -> None:
        if not acls:
            return
        response = await self._send(_DeleteAcls([_binding(principal, a) for a in acls]))
        errors = [r for r in response.to_object()["filter_results"] if r["error_code"]]
        assert not errors, f"DeleteAcls failed: {errors}"


async def wait_acls(
    check: Callable[[], Awaitable[list[AclRequirement]]],
    expected_missing: Sequence[AclRequirement],
    timeout: float = 30.0,
) -> None:
    """Wait until ``check()`` (the broker's view, e.g. service.kafka_access.missing_acls)
    reports exactly ``expected_missing``: ACL changes reach the authorizer asynchronously."""
    want = sorted(expected_missing, key=repr)
    last: list[AclRequirement] = []

    async def applied() -> bool:
        nonlocal last
        last = sorted(await check(), key=repr)
        return last == want

    await wait_until(applied, timeout, f"the broker to apply the ACLs (missing now: {last})")


# ---------------------------------------------------------------------------- the service


@dataclass(frozen=True)
class SecuredTopics:
    """Every topic of one test (a unique suffix), all created beforehand by the super user."""

    device_swapped: str
    device_swapped_urgent: str
    credential_updated: str
    rebind_failed: str
    dead_letter: str
    ledger: str
    dedupe: str
    token: str
    budget: str
    device_rebound: str
    bind_notify: str

    @classmethod
    def unique(cls) -> SecuredTopics:
        suffix = f"s-{secrets.token_hex(5)}"
        return cls(
            device_swapped=f"asset.device-swapped.v1.{suffix}",
            device_swapped_urgent=f"asset.device-swapped.urgent.v1.{suffix}",
            credential_updated=f"iot.credential-updated.v1.{suffix}",
            rebind_failed=f"iot.rebind-failed.v1.{suffix}",
            dead_letter=f"asset.device-swapped.v1.dlq.{suffix}",
            ledger=f"device-rebind.ledger.v1.{suffix}",
            dedupe=f"device-rebind.dedupe.v1.{suffix}",
            token=f"device-rebind.token.v1.{suffix}",
            budget=f"device-rebind.budget.v1.{suffix}",
            device_rebound=f"iot.device-rebound.v1.{suffix}",
            bind_notify=f"device-rebind.bind-notify.v1.{suffix}",
        )

    def settings(self) -> TopicSettings:
        known = TopicSettings.model_fields
        return TopicSettings(**{k: v for k, v in vars(self).items() if k in known})

    @property
    def outputs(self) -> list[str]:
        """The outcomes of a swap (device-rebound, which follows credential-updated, is not)."""
        return [self.credential_updated, self.rebind_failed, self.dead_letter]

    async def create(self, kafka: SecuredKafka, partitions: int = 3) -> None:
        """Create every topic as ``device-rebind topics create`` would (the service's table of
        topics: partition counts and configs), as the super user."""
        options = kafka.admin_options()
        bootstrap = options.pop("bootstrap_servers")
        for spec, name in specs_for(self.settings()):
            count = 1 if spec.partitions is Partitions.ONE else partitions
            await create_topics(
                bootstrap, [name], count, configs=dict(spec.configs), options=options
            )


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``REBIND_*`` variables that make ``load_settings()`` rebuild ``settings``."""
    env: dict[str, str] = {}
    for section in type(settings).model_fields:
        model = getattr(settings, section)
        for name in type(model).model_fields:
            value = getattr(model, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                text = value.get_secret_value()
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, enum.Enum):
                text = str(value.value)
            else:
                text = str(value)
            env[f"REBIND_{section.upper()}__{name.upper()}"] = text
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """``python -m service run`` with the ``REBIND_*`` environment of ``settings``."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("REBIND_")},
            **settings_env(settings),
            "REBIND_HTTP__HOST": "127.0.0.1",
            "REBIND_HTTP__PORT": str(self.port),
            "REBIND_LOG__FORMAT": "json",
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "run"],
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    def readyz(self) -> tuple[int, str] | None:
        """``/readyz`` status and text, None while the port does not answer."""
        assert self.proc is not None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except (urllib.error.URLError, OSError):
            return None

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the service exited with {self.proc.returncode}:\n{self.tail()}")
        answer = self.readyz()
        return answer is not None and answer[0] == 200

    async def wait_ready(self, timeout: float = 90) -> None:
        try:
            await wait_until(lambda: asyncio.to_thread(self._ready), timeout, "/readyz 200")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- service log ---\n{self.tail()}") from None

    async def kill(self) -> None:
        """SIGKILL: a crash, nothing drained or committed."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            await wait_until(lambda: proc.poll() is not None, 10, "the killed service to end")

    async def terminate_when_exited(self, timeout: float = 60) -> int:
        """Wait for the process to end by itself; its exit code."""
        proc = self.proc
        assert proc is not None
        await wait_until(lambda: proc.poll() is not None, timeout, "the service to exit")
        return int(proc.returncode)

    async def terminate(self, timeout: float = 60) -> int:
        proc = self.proc
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: proc.poll() is not None, timeout, "the service to stop")
        return int(proc.returncode)

    def lines(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (a line that is not JSON fails the test)."""
        text = self.log_path.read_text(encoding="utf-8") if self.log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def run_cli(
    args: Sequence[str], env: dict[str, str], timeout: float = 60
) -> tuple[int, str, str]:
    """``python -m service <args>`` with ``env``: (exit code, stdout, stderr)."""

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", *args],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    done = await asyncio.to_thread(run)
    return done.returncode, done.stdout, done.stderr


async def produce(kafka: SecuredKafka, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None:
    """Produce ``(key, value)`` records as the super user."""
    producer = AIOKafkaProducer(**kafka.admin_options(), acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class OutputReader:
    """Reads committed records of some topics (read_committed) as the super user."""

    def __init__(self, kafka: SecuredKafka, topics: Sequence[str]) -> None:
        self._consumer = AIOKafkaConsumer(
            *topics,
            **kafka.admin_options(),
            group_id=None,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        self.records: list[Received] = []

    async def __aenter__(self) -> OutputReader:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def _poll(self) -> None:
        batch = await self._consumer.getmany(timeout_ms=200)
        for tp, msgs in batch.items():
            self.records.extend(
                Received(tp.topic, tp.partition, m.offset, m.key, m.value, tuple(m.headers or ()))
                for m in msgs
            )

    async def wait_for(
        self, predicate: Callable[[list[Received]], bool], what: str, timeout: float = 60
    ) -> list[Received]:
        async def done() -> bool:
            await self._poll()
            return predicate(self.records)

        await wait_until(done, timeout, what)
        return self.records

    def answers(self) -> dict[str, list[Received]]:
        """Outcomes by the swap event they answer (``data.swapEventId``)."""
        found: dict[str, list[Received]] = {}
        for record in self.records:
            found.setdefault(record.data["swapEventId"], []).append(record)
        return found
