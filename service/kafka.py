"""Everything the service's Kafka clients share: connection options, the "read a partition to its
end" helper, committed offsets with their metadata, and the error that stops the instance.

The consumer, the per-partition transactional producers, the ledger and dedupe readers, the token
and budget topics, ``replay`` and ``topics`` all take their options from :func:`client_options`,
so a security setting applies to every client the service opens.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from service.config import KafkaSettings, SecurityProtocol

#: Largest metadata string the service writes with a committed offset. Brokers refuse more than
#: ``offset.metadata.max.bytes`` (4096 by default); what does not fit is simply redone.
MAX_OFFSET_METADATA_CHARS = 3000


class FatalPipelineError(Exception):
    """The instance must stop (e.g. topics missing, or commits that keep failing)."""


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by every Kafka client of the service."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol.value,
    }
    if settings.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL):
        from aiokafka.helpers import create_ssl_context  # noqa: PLC0415 - only with TLS

        options["ssl_context"] = create_ssl_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
        )
    if settings.sasl_mechanism is not None:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password else None
        )
    return options


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


def reader(settings: KafkaSettings) -> AIOKafkaConsumer:
    """A consumer without a group, reading committed data only (assign and seek it yourself)."""
    return AIOKafkaConsumer(
        **client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )


async def read_to_end(
    consumer: AIOKafkaConsumer,
    partitions: Sequence[TopicPartition],
    on_record: Callable[[TopicPartition, Any], None],
    *,
    start: dict[TopicPartition, int] | None = None,
    batch: int = 5000,
) -> int:
    """Read ``partitions`` from ``start`` (default: their beginning) up to the end they had when
    the call began; hand every record to ``on_record``. Returns the number of records read."""
    if not partitions:
        return 0
    tps = list(partitions)
    consumer.assign(tps)
    beginnings = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
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

    Permanent errors make the service exit at once (retrying cannot help: a wrong password, a
    defect); the others are retried with a capped backoff while ``/readyz`` answers 503 with
    the message. Extend the table here when a client option brings new errors (e.g. TLS or
    SASL settings).
    """
    from aiokafka import errors  # noqa: PLC0415 - keeps the module's import light

    detail = str(exc) or type(exc).__name__
    where = f"{_BOOTSTRAP}={bootstrap}" if bootstrap else _BOOTSTRAP
    if isinstance(exc, FatalPipelineError):
        return True, detail
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
        return True, (
            f"Kafka refused access ({type(exc).__name__}): grant the ACLs listed in "
            f"docs/deploying.md to the principal of {_CREDENTIALS}"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True, (
            f"the brokers' TLS certificate is not trusted (REBIND_KAFKA__SSL_CAFILE): {detail}"
        )
    if isinstance(exc, errors.KafkaConnectionError | ConnectionError | OSError | TimeoutError):
        return False, f"Kafka is not reachable ({where}): {detail}"
    if isinstance(exc, errors.KafkaError):
        # Timeouts, no leader yet, coordinator loading, not controller: a broker starting up.
        return False, f"Kafka is not ready ({where}): {type(exc).__name__}: {detail}"
    return True, f"unexpected error while connecting to Kafka: {type(exc).__name__}: {detail}"
