"""Everything the service's Kafka clients share: connection options, the "read a partition to its
end" helper, committed offsets with their metadata, whether a transactional producer is fenced for
good, and the error that stops the instance.

The consumer, the per-partition transactional producers, the ledger and dedupe readers, the token
and budget topics, ``replay`` and ``topics`` all take their options from :func:`client_options`,
so a security setting applies to every client the service opens.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import conn as aiokafka_conn
from aiokafka.abc import AbstractTokenProvider
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import OffsetAndMetadata

from service import logs
from service.config import ENV_PREFIX, KafkaSettings, SecurityProtocol

#: Largest metadata string the service writes with a committed offset. Brokers refuse more than
#: ``offset.metadata.max.bytes`` (4096 by default); what does not fit is simply redone.
MAX_OFFSET_METADATA_CHARS = 3000


class FatalPipelineError(Exception):
    """The instance must stop (e.g. topics missing, or commits that keep failing)."""


_VAR: Final = f"{ENV_PREFIX}KAFKA__"


class KafkaAccessError(Exception):
    """Kafka refused this client, or its TLS or SASL material is unusable: one line that names
    the cause and what to change (a setting, a file, an ACL).

    ``retry`` tells whether trying again later can succeed without a restart: files
    (certificates, keys, the OAUTHBEARER token) are read again by every new set of clients and
    ACLs can be granted meanwhile; a SASL password is an environment variable, read once.
    """

    kind: ClassVar[str] = "access"
    retry: bool = True

    def __init__(self, message: str, *, retry: bool | None = None) -> None:
        super().__init__(message)
        if retry is not None:
            self.retry = retry

    @property
    def reason(self) -> str:
        """The one line for the log and ``/readyz``."""
        return str(self.args[0]) if self.args else type(self).__name__


class KafkaTlsError(KafkaAccessError):
    """The TLS handshake failed (an untrusted, expired or misnamed broker certificate, a client
    certificate the broker refused) or the configured TLS files are unusable."""

    kind = "tls"


class KafkaAuthenticationError(KafkaAccessError):
    """SASL authentication was refused (wrong user or password, a refused or missing token)."""

    kind = "authentication"


class KafkaAuthorizationError(KafkaAccessError):
    """The principal lacks ACLs the service needs (:mod:`service.kafka_access`)."""

    kind = "authorization"


class KafkaTokenFileError(KafkaAuthenticationError, KafkaConnectionError):  # type: ignore[misc]
    """The OAUTHBEARER token file cannot be read or is empty. A connection error to aiokafka
    (it tries again later, when the file may be there), a clear line to the operator."""


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by every Kafka client of the service.

    Every call reads the TLS files and builds a new SSL context, so clients created after a
    mounted Secret was rotated use the new certificate, key or CA. The OAUTHBEARER token file
    is read at every new connection.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol.value,
    }
    if settings.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL):
        options["ssl_context"] = ssl_context(settings)
    if settings.sasl_mechanism == "OAUTHBEARER":
        assert settings.sasl_oauth_token_file is not None  # the settings' validation
        options["sasl_mechanism"] = "OAUTHBEARER"
        options["sasl_oauth_token_provider"] = FileTokenProvider(settings.sasl_oauth_token_file)
    elif settings.sasl_mechanism is not None:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password else None
        )
    return options


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """A client TLS context from the settings' files, read now: the CA to trust (else the
    system's), the client certificate and key for mutual TLS, host name checking.

    Raises :class:`KafkaTlsError` naming the variable whose file is unusable.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if settings.ssl_cafile is not None:
        try:
            _read_file(context.load_verify_locations, "SSL_CAFILE", settings.ssl_cafile)
        except ssl.SSLError as exc:
            raise KafkaTlsError(
                f"{_VAR}SSL_CAFILE: {settings.ssl_cafile} holds no usable CA certificate: "
                f"{_ssl_words(exc)}"
            ) from None
    context.check_hostname = settings.ssl_check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if settings.ssl_certfile is not None and settings.ssl_keyfile is not None:
        certfile, keyfile = settings.ssl_certfile, settings.ssl_keyfile
        secret = settings.ssl_key_password
        password = secret.get_secret_value().encode() if secret else b""

        def load_pair(_: str) -> None:
            # A password callable: an encrypted key without a password fails, never prompts.
            context.load_cert_chain(str(certfile), str(keyfile), password=lambda: password)

        _read_file(lambda _: None, "SSL_KEYFILE", keyfile)
        try:
            _read_file(load_pair, "SSL_CERTFILE", certfile)
        except ssl.SSLError as exc:
            raise KafkaTlsError(
                _key_pair_words(exc, encrypted=_encrypted(keyfile), has_password=bool(secret))
            ) from None
    return context


def _encrypted(keyfile: Path) -> bool:
    """A PEM key that needs a password (PKCS#8 ``ENCRYPTED PRIVATE KEY`` or legacy
    ``Proc-Type: 4,ENCRYPTED``)."""
    try:
        return b"ENCRYPTED" in keyfile.read_bytes()
    except OSError:
        return False


def _read_file(load: Callable[[str], object], name: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
        load(str(path))
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise
        raise KafkaTlsError(
            f"{_VAR}{name}: cannot read {path}: {exc.strerror or type(exc).__name__}"
        ) from None


def _key_pair_words(exc: ssl.SSLError, *, encrypted: bool, has_password: bool) -> str:
    reason = f"{exc.reason or ''} {exc}".upper()
    pair = f"{_VAR}SSL_CERTFILE / {_VAR}SSL_KEYFILE"
    if "KEY_VALUES_MISMATCH" in reason:
        return f"{pair}: the private key does not belong to the certificate"
    if encrypted and not has_password:
        return f"{_VAR}SSL_KEYFILE is encrypted: set {_VAR}SSL_KEY_PASSWORD"
    if encrypted or "DECRYPT" in reason:
        return f"{_VAR}SSL_KEY_PASSWORD does not decrypt {_VAR}SSL_KEYFILE"
    return f"{pair}: not a PEM certificate and its private key: {_ssl_words(exc)}"


def _ssl_words(exc: ssl.SSLError) -> str:
    """The OpenSSL reason without the C source location (``... (_ssl.c:1006)``)."""
    text = getattr(exc, "verify_message", None) or exc.strerror or str(exc)
    return str(text).split(" (_ssl.c:")[0]


class FileTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """OAUTHBEARER: the access token is the content of a file, read again for every new
    connection. A sidecar, an operator or a mounted Secret keeps the file current; a token the
    broker refuses is replaced by writing a new one, without restarting the service.

    Every token read is registered with the log redaction, so it never appears in a log line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    async def token(self) -> str:
        return self.read()

    def read(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            words = getattr(exc, "strerror", None) or type(exc).__name__
            raise KafkaTokenFileError(
                f"{_VAR}SASL_OAUTH_TOKEN_FILE: cannot read the token from {self.path}: {words}"
            ) from None
        token = text.strip()
        if not token:
            raise KafkaTokenFileError(
                f"{_VAR}SASL_OAUTH_TOKEN_FILE: {self.path} is empty (no token written yet?)"
            )
        logs.register_secret(token)
        return token


class _OAuthBearerAuthenticator(aiokafka_conn.OAuthAuthenticator):  # type: ignore[misc]
    """aiokafka's OAUTHBEARER exchange, plus the end of a refused one (RFC 7628 section 3.2.3).

    A broker that refuses the token answers the client's first message with an error challenge
    (e.g. ``{"status":"invalid_token"}``) and no error code yet; the client must answer it with
    ``%x01`` to receive the error. aiokafka 0.14 takes the challenge for success, so the
    connection is then closed at its first request with no word of why (sarama had the same
    defect, IBM/sarama#1428). Answering the challenge makes aiokafka raise
    ``SaslAuthenticationFailed`` with the broker's reason instead.
    """

    def __init__(self, *, sasl_oauth_token_provider: AbstractTokenProvider) -> None:
        super().__init__(sasl_oauth_token_provider=sasl_oauth_token_provider)
        self._challenge_answered = False

    async def step(self, payload: bytes | None) -> tuple[bytes, bool] | None:
        if self._token_sent and payload and not self._challenge_answered:
            self._challenge_answered = True
            return b"\x01", True
        result: tuple[bytes, bool] | None = await super().step(payload)
        return result


def _authenticator_oauth(self: aiokafka_conn.AIOKafkaConnection) -> _OAuthBearerAuthenticator:
    return _OAuthBearerAuthenticator(sasl_oauth_token_provider=self._sasl_oauth_token_provider)


aiokafka_conn.AIOKafkaConnection.authenticator_oauth = _authenticator_oauth


# The name the rest of the code base used before this module existed.
kafka_client_options = client_options


async def partition_counts(settings: KafkaSettings, names: Sequence[str]) -> dict[str, int]:
    """Partitions of each topic (0 when it does not exist)."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        # Describe only listed topics: naming a missing one in a metadata request makes a broker
        # with auto.create.topics.enable create it with its defaults (a ledger that deletes).
        listed = set(await admin.list_topics())
        present = [name for name in names if name in listed]
        described = await admin.describe_topics(present) if present else []
    finally:
        await admin.close()
    counts = dict.fromkeys(names, 0)
    counts.update({t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0})
    return counts


def reader(settings: KafkaSettings, *, bulk: bool = False) -> AIOKafkaConsumer:
    """A consumer without a group, reading committed data only (assign and seek it yourself).
    ``bulk``: fetches of up to 16 MiB from one partition (a whole ledger read back at the fetch
    rate, not 1 MiB per round trip)."""
    fetch = {"max_partition_fetch_bytes": BULK_FETCH_BYTES} if bulk else {}
    return AIOKafkaConsumer(
        **client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        **fetch,
    )


BULK_FETCH_BYTES = 16 * 1024 * 1024


def on_heartbeat(consumer: AIOKafkaConsumer, succeeded: Callable[[float], None]) -> bool:
    """Call ``succeeded(sent_at)`` after every heartbeat the group coordinator accepted, with the
    ``time.monotonic()`` at which that heartbeat was sent.

    The acceptance proves membership as of the sending, not as of the reading of the answer: a
    heartbeat sent just before the process froze is answered while it is stopped and read when
    it wakes, possibly long after the group dropped it. Dated at its reading it would make a
    woken zombie look freshly proven (a call let through, seen once in the zombie fault test).

    aiokafka keeps the time of its last accepted heartbeat to itself; the service needs it as
    the proof that it is still a member of the group (:mod:`service.ownership`). So this wraps
    the coordinator's private ``_do_heartbeat`` (aiokafka 0.14: returns True when accepted), in
    this one place. Returns False (and the caller falls back to assignments alone) when the
    installed aiokafka has no such method. Call it after ``consumer.start()``.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    original = getattr(coordinator, "_do_heartbeat", None)
    if coordinator is None or original is None:
        return False

    async def tracked() -> bool:
        sent_at = time.monotonic()
        accepted = bool(await original())
        if accepted:
            succeeded(sent_at)
        return accepted

    coordinator._do_heartbeat = tracked
    return True


def producer_fatal(producer: AIOKafkaProducer) -> bool:
    """True when the producer's transaction manager is in its fatal state (after a fence)."""
    manager = getattr(producer, "_txn_manager", None)
    return str(getattr(manager, "state", "")).endswith("FATAL_ERROR")


async def read_to_end(
    consumer: AIOKafkaConsumer,
    partitions: Sequence[TopicPartition],
    on_record: Callable[[TopicPartition, Any], object],
    *,
    start: dict[TopicPartition, int] | None = None,
    batch: int = 5000,
    reached: dict[TopicPartition, int] | None = None,
) -> int:
    """Read ``partitions`` from ``start`` (default: their beginning) up to the end they had when
    the call began; hand every record to ``on_record``. Returns the number of records read;
    ``reached``, when given, receives the end offset read up to, per partition."""
    if not partitions:
        return 0
    tps = list(partitions)
    consumer.assign(tps)
    beginnings = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    if reached is not None:
        reached.update(ends)
    for tp in tps:
        consumer.seek(tp, max(beginnings[tp], (start or {}).get(tp, beginnings[tp])))
    read = 0
    remaining = {tp for tp in tps if ends[tp] > max(beginnings[tp], (start or {}).get(tp, 0))}
    while remaining:
        fetched = await consumer.getmany(*remaining, timeout_ms=500, max_records=batch)
        for tp, records in fetched.items():
            for record in records:
                on_record(tp, record)
                read += 1
        remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
    return read


async def committed_with_metadata(
    consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]
) -> dict[TopicPartition, OffsetAndMetadata]:
    """The group's committed offsets of ``partitions`` with their metadata strings.

    aiokafka's public ``committed()`` returns the offset only; the metadata (where the service
    records the work finished beyond that offset) comes from its coordinator.
    """
    if not partitions:
        return {}
    coordinator = consumer._coordinator
    found: dict[TopicPartition, OffsetAndMetadata] = await coordinator.fetch_committed_offsets(
        list(partitions)
    )
    return found


# ---------------------------------------------------------------------------------- start-up

_BOOTSTRAP = "REBIND_KAFKA__BOOTSTRAP_SERVERS"
_CREDENTIALS = "REBIND_KAFKA__SASL_USERNAME / REBIND_KAFKA__SASL_PASSWORD"


def classify_startup_error(  # noqa: PLR0911 - a table
    exc: BaseException, *, bootstrap: str | None = None
) -> tuple[bool, str]:
    """Whether an error met while connecting at start is permanent, and one line naming its
    cause and the variable to look at.

    Permanent errors make the service exit at once (retrying cannot help: a wrong SASL
    password, a defect); the others (missing ACLs and TLS problems included: they can be fixed
    while the service waits) are retried with a capped backoff while ``/readyz`` answers 503
    with the message. Extend the table here when a client option brings new
    errors (e.g. TLS or SASL settings).
    """
    from aiokafka import errors  # noqa: PLC0415 - keeps the module's import light

    detail = str(exc) or type(exc).__name__
    where = f"{_BOOTSTRAP}={bootstrap}" if bootstrap else _BOOTSTRAP
    if isinstance(exc, FatalPipelineError):
        return True, detail
    if isinstance(exc, KafkaAccessError):
        # TLS, SASL and ACL problems found by service.kafka_access.check_access. Certificates,
        # keys and the OAUTHBEARER token are files read again by every attempt, and ACLs can be
        # granted meanwhile: retried. A SASL password is read once: permanent.
        return not exc.retry, exc.reason
    if isinstance(exc, errors.SaslAuthenticationFailed | errors.AuthenticationFailedError):
        return True, f"Kafka refused the credentials ({_CREDENTIALS}): {detail}"
    if isinstance(exc, errors.UnsupportedSaslMechanismError | errors.IllegalSaslStateError):
        return True, f"Kafka does not accept REBIND_KAFKA__SASL_MECHANISM: {detail}"
    if isinstance(
        exc,
        errors.TopicAuthorizationFailedError
        | errors.GroupAuthorizationFailedError
        | errors.ClusterAuthorizationFailedError
        | errors.TransactionalIdAuthorizationFailed,
    ):
        # Retried like the ACLs check_access reports: they can be granted while we wait.
        return False, (
            f"Kafka refused access ({type(exc).__name__}): grant the ACLs listed in "
            f"docs/deploying.md#acls to the service's principal"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Retried: the CA file is read again by the next attempt (a rotated Secret).
        return False, (
            f"the brokers' TLS certificate is not trusted (REBIND_KAFKA__SSL_CAFILE): {detail}"
        )
    if isinstance(exc, errors.KafkaConnectionError | ConnectionError | OSError | TimeoutError):
        return False, f"Kafka is not reachable ({where}): {detail}"
    if isinstance(exc, errors.KafkaError):
        # Timeouts, no leader yet, coordinator loading, not controller: a broker starting up.
        return False, f"Kafka is not ready ({where}): {type(exc).__name__}: {detail}"
    return True, f"unexpected error while connecting to Kafka: {type(exc).__name__}: {detail}"


COMPACTED_TOPIC_REPLICATION_MAX: Final = 3
TOPIC_ALREADY_EXISTS: Final = 36


async def ensure_compacted_topic(
    options: dict[str, Any], topic: str, *, setting: str, configs: dict[str, str] | None = None
) -> bool:
    """Create ``topic`` (compacted, one partition, replication min(3, brokers)) when it is
    missing; True when this call created it. A refusal (ACLs) stops the start naming the
    ``setting`` (e.g. ``REBIND_TOPICS__TOKEN``): production creates these topics beforehand."""
    admin = AIOKafkaAdminClient(**options, request_timeout_ms=15_000)
    await admin.start()
    try:
        if topic in await admin.list_topics():
            return False
        brokers = len((await admin.describe_cluster()).get("brokers", ())) or 1
        response = await admin.create_topics(
            [
                NewTopic(
                    name=topic,
                    num_partitions=1,
                    replication_factor=min(COMPACTED_TOPIC_REPLICATION_MAX, brokers),
                    topic_configs={"cleanup.policy": "compact", **(configs or {})},
                )
            ],
            timeout_ms=15_000,
        )
        for _topic, code, *_rest in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):  # another replica may have been faster
                raise FatalPipelineError(
                    f"{setting}: topic {topic!r} is missing and could not be created "
                    f"(error {code}); create it compacted with one partition"
                )
        return True
    finally:
        await admin.close()
