"""What the service may do on Kafka, and finding out at start whether it can.

* :func:`service_acls` is the exact set of ACLs the service's principal needs, nothing more:
  ``docs/deploying.md`` and the chart's README list it as ``kafka-acls`` commands and as a
  Strimzi ``KafkaUser`` block (a test checks they match), and the secured-broker tests grant
  exactly it, then take each entry away in turn. :func:`replay_acls` is the set of ``replay``.
* :func:`check_access` checks the connection first (:mod:`service.kafka_connection`: a TLS or
  SASL refusal in one line naming its cause and setting), then asks the broker which of the
  needed operations the principal is allowed (topic and group "authorized operations", and
  initialising a transactional id under the service's prefix), and raises
  :class:`~service.kafka.KafkaAuthorizationError` naming every missing ACL in one line.

Describe is never listed: Kafka implies it from Read and Write (and Describe is all the
co-partitioning check, the offset fetches and the transactional-id lookups need), so a separate
Describe ACL would change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.protocol.admin import DescribeGroupsRequest
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Int16, Int32, Schema, String

from service.config import (
    BindSettings,
    KafkaSettings,
    SecurityProtocol,
    TopicSettings,
)
from service.kafka import (
    KafkaAuthorizationError,
    client_options,
)
from service.kafka_connection import KAFKA_VAR, certificate_summary, check_connection
from service.topics import specs_for

log = structlog.get_logger(__name__)

_VAR: Final = KAFKA_VAR
ACL_DOCS: Final = "docs/deploying.md#acls"

Resource = Literal["Topic", "Group", "TransactionalId", "Cluster"]
Operation = Literal["Read", "Write", "Create", "Describe", "DescribeConfigs", "IdempotentWrite"]
Pattern = Literal["LITERAL", "PREFIXED"]

# AclOperation codes: the bit each sets in an "authorized operations" field.
_OPERATION_CODES: Final[dict[str, int]] = {
    "Read": 3,
    "Write": 4,
    "Create": 5,
    "Describe": 8,
    "DescribeConfigs": 10,
    "IdempotentWrite": 12,
}
_NOT_PROVIDED: Final = -(2**31)  # "authorized operations" the broker did not compute
_UNKNOWN_TOPIC: Final = 3
_TOPIC_AUTHORIZATION_FAILED: Final = 29
_GROUP_AUTHORIZATION_FAILED: Final = 30
ACCESS_CHECK_SUFFIX: Final = "access-check"


@dataclass(frozen=True)
class AclRequirement:
    """One ACL binding (allow, any host) the principal needs."""

    resource: Resource
    name: str
    operation: Operation
    pattern: Pattern = "LITERAL"
    why: str = ""

    def describe(self) -> str:
        """``Read on topic 'x'``, ``Write on transactional ids prefixed 'p-g-'``."""
        noun = {
            "Topic": "topic",
            "Group": "group",
            "TransactionalId": "transactional id",
            "Cluster": "the cluster",
        }[self.resource]
        if self.resource == "Cluster":
            return f"{self.operation} on the cluster"
        if self.pattern == "PREFIXED":
            return f"{self.operation} on {noun}s prefixed {self.name!r}"
        return f"{self.operation} on {noun} {self.name!r}"


def transactional_id_prefix(kafka: KafkaSettings) -> str:
    """Every transactional id of the service starts with this: ``<prefix>-<group>-``."""
    return f"{kafka.transactional_id_prefix}-{kafka.group_id}-"


def service_acls(
    kafka: KafkaSettings, topics: TopicSettings, bind: BindSettings | None = None
) -> list[AclRequirement]:
    """The exact ACLs ``device-rebind run`` needs (topics created beforehand). ``bind``: the
    bind-watch settings (default: polling on, no callback URL)."""
    bind = bind if bind is not None else BindSettings()
    out = [
        AclRequirement("Topic", topics.device_swapped, "Read", why="consume the swaps"),
        AclRequirement(
            "Topic",
            topics.device_swapped,
            "Write",
            why="forward a misrouted swap to its key's partition (REBIND_KAFKA__PARTITIONER)",
        ),
    ]
    if topics.device_swapped_urgent:
        out += [
            AclRequirement(
                "Topic", topics.device_swapped_urgent, "Read", why="consume the urgent swaps"
            ),
            AclRequirement(
                "Topic",
                topics.device_swapped_urgent,
                "Write",
                why="forward a misrouted urgent swap to its key's partition",
            ),
        ]
    outputs = [
        (topics.credential_updated, "publish credential-updated"),
        (topics.rebind_failed, "publish rebind-failed"),
        (topics.dead_letter, "dead-letter unreadable input"),
    ]
    if bind.enabled:
        outputs.append((topics.device_rebound, "publish device-rebound"))
    out += [AclRequirement("Topic", name, "Write", why=why) for name, why in outputs]
    own = [
        (topics.ledger, "the per-device ledger"),
        (topics.dedupe, "the duplicate memory"),
        (topics.token, "the shared access token"),
        (topics.budget, "the budget exchange"),
    ]
    if bind.callback_url is not None:
        own.append((topics.bind_notify, "the platform's bindDevice pushes"))
    for name, why in own:
        out += [
            AclRequirement("Topic", name, "Read", why=f"read {why}"),
            AclRequirement("Topic", name, "Write", why=f"write {why}"),
        ]
    out.append(
        AclRequirement(
            "Group", kafka.group_id, "Read", why="join the group, commit offsets in transactions"
        )
    )
    out.append(
        AclRequirement(
            "TransactionalId",
            transactional_id_prefix(kafka),
            "Write",
            "PREFIXED",
            why="one transactional producer per input partition, and the token holder's",
        )
    )
    return out


def replay_acls(topics: TopicSettings) -> list[AclRequirement]:
    """The ACLs of ``device-rebind replay`` (which may run with another principal)."""
    return [
        AclRequirement("Topic", topics.rebind_failed, "Read", why="replay rebind-failed"),
        AclRequirement("Topic", topics.dead_letter, "Read", why="replay dlq"),
        AclRequirement(
            "Topic", topics.device_swapped, "Read", why="find a failed swap's original event"
        ),
        AclRequirement("Topic", topics.device_swapped, "Write", why="produce the replayed swaps"),
    ]


def topics_acls(topics: TopicSettings, *, create: bool = False) -> list[AclRequirement]:
    """What ``device-rebind topics plan|check`` needs on every topic of the table (Describe,
    DescribeConfigs to compare configs), and ``topics create`` (Create as well)."""
    operations: tuple[Operation, ...] = ("Describe", "DescribeConfigs")
    if create:
        operations += ("Create",)
    return [
        AclRequirement("Topic", name, operation, why=f"topics {'create' if create else 'check'}")
        for _, name in specs_for(topics)
        for operation in operations
    ]


# ---------------------------------------------------------------------------- rendering


def kafka_acls_commands(
    requirements: Sequence[AclRequirement],
    principal: str = "User:device-rebind",
    bootstrap: str = "kafka:9093",
    command_config: str = "admin.properties",
) -> list[str]:
    """One ``kafka-acls.sh --add`` command per resource, its operations together."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for r in requirements:
        grouped.setdefault((r.resource, r.name, r.pattern), []).append(r.operation)
    flag = {"Topic": "--topic", "Group": "--group", "TransactionalId": "--transactional-id"}
    lines = []
    for (resource, name, pattern), operations in grouped.items():
        target = "--cluster" if resource == "Cluster" else f"{flag[resource]} '{name}'"
        if pattern == "PREFIXED":
            target += " --resource-pattern-type prefixed"
        ops = " ".join(f"--operation {op}" for op in operations)
        lines.append(
            f"kafka-acls.sh --bootstrap-server {bootstrap} --command-config {command_config} "
            f"--add --allow-principal '{principal}' {ops} {target}"
        )
    return lines


def strimzi_acls(requirements: Sequence[AclRequirement]) -> list[dict[str, Any]]:
    """The ``spec.authorization.acls`` entries of a Strimzi ``KafkaUser`` (type: simple)."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for r in requirements:
        grouped.setdefault((r.resource, r.name, r.pattern), []).append(r.operation)
    kinds = {"Topic": "topic", "Group": "group", "TransactionalId": "transactionalId"}
    out: list[dict[str, Any]] = []
    for (resource, name, pattern), operations in grouped.items():
        if resource == "Cluster":
            entry: dict[str, Any] = {"resource": {"type": "cluster"}}
        else:
            entry = {
                "resource": {
                    "type": kinds[resource],
                    "name": name,
                    "patternType": pattern.lower(),
                }
            }
        entry["operations"] = list(operations)
        entry["host"] = "*"
        out.append(entry)
    return out


def strimzi_yaml(requirements: Sequence[AclRequirement]) -> str:
    """The ``acls:`` list of a ``KafkaUser``'s ``spec.authorization``, as YAML text."""
    lines = ["acls:"]
    for entry in strimzi_acls(requirements):
        resource = entry["resource"]
        fields = ", ".join(
            f"{key}: {json.dumps(value) if key == 'name' else value}"
            for key, value in resource.items()
        )
        lines.append(f"  - resource: {{{fields}}}")
        lines.append(f"    operations: [{', '.join(entry['operations'])}]")
        lines.append('    host: "*"')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- authorization


class _MetadataResponse_v8(Response):  # type: ignore[misc]  # noqa: N801 - aiokafka's naming
    API_KEY = 3
    API_VERSION = 8
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            Array(
                ("node_id", Int32),
                ("host", String("utf-8")),
                ("port", Int32),
                ("rack", String("utf-8")),
            ),
        ),
        ("cluster_id", String("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            Array(
                ("error_code", Int16),
                ("topic", String("utf-8")),
                ("is_internal", Boolean),
                (
                    "partitions",
                    Array(
                        ("error_code", Int16),
                        ("partition", Int32),
                        ("leader", Int32),
                        ("leader_epoch", Int32),
                        ("replicas", Array(Int32)),
                        ("isr", Array(Int32)),
                        ("offline_replicas", Array(Int32)),
                    ),
                ),
                ("topic_authorized_operations", Int32),
            ),
        ),
        ("cluster_authorized_operations", Int32),
    )


class _MetadataRequest_v8(RequestStruct):  # type: ignore[misc]  # noqa: N801 - aiokafka's naming
    API_KEY = 3
    API_VERSION = 8
    RESPONSE_TYPE = _MetadataResponse_v8
    SCHEMA = Schema(
        ("topics", Array(String("utf-8"))),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
    )


class AuthorizedOperationsRequest(Request[_MetadataRequest_v8]):  # type: ignore[misc]
    """Metadata of some topics with the operations the principal may perform on each (never
    creates a topic)."""

    API_KEY = 3

    def __init__(self, topics: list[str]) -> None:
        self._topics = topics

    def build(self, request_struct_class: type[_MetadataRequest_v8]) -> _MetadataRequest_v8:
        return request_struct_class(self._topics, False, False, True)


def _allowed(operations: int, operation: str) -> bool:
    return bool(operations & (1 << _OPERATION_CODES[operation]))


async def _missing_topic_acls(
    client: AIOKafkaClient, required: Sequence[AclRequirement]
) -> list[AclRequirement]:
    names = sorted({r.name for r in required})
    node = client.get_random_node()
    try:
        response = await client.send(node, AuthorizedOperationsRequest(names))
    except (NotImplementedError, kafka_errors.IncompatibleBrokerVersion):
        log.info("kafka_access_topic_check_skipped", reason="broker without Metadata v8")
        return []
    found = {t["topic"]: t for t in response.to_object()["topics"]}
    missing = []
    for r in required:
        topic = found.get(r.name)
        if topic is None or topic["error_code"] == _UNKNOWN_TOPIC:
            continue  # a missing topic is reported by the topic checks, not as an ACL
        if topic["error_code"] == _TOPIC_AUTHORIZATION_FAILED:
            missing.append(r)
            continue
        operations = topic["topic_authorized_operations"]
        if operations != _NOT_PROVIDED and not _allowed(operations, r.operation):
            missing.append(r)
    return missing


_COORDINATOR_RETRIES: Final = 20
_COORDINATOR_BACKOFF_SECONDS: Final = 0.25


async def _coordinator(client: AIOKafkaClient, group: str) -> int:
    """The group's coordinator; a cluster creating its offsets topic first answers "not
    available" for a moment."""
    for _ in range(_COORDINATOR_RETRIES - 1):
        try:
            node: int = await client.coordinator_lookup(CoordinationType.GROUP, group)
        except (
            kafka_errors.CoordinatorNotAvailableError,
            kafka_errors.NotCoordinatorError,
            kafka_errors.CoordinatorLoadInProgressError,
        ):
            await asyncio.sleep(_COORDINATOR_BACKOFF_SECONDS)
        else:
            return node
    last: int = await client.coordinator_lookup(CoordinationType.GROUP, group)
    return last


async def _missing_group_acls(
    client: AIOKafkaClient, required: Sequence[AclRequirement]
) -> list[AclRequirement]:
    missing = []
    for r in required:
        try:
            node = await _coordinator(client, r.name)
            response = await client.send(
                node, DescribeGroupsRequest([r.name], include_authorized_operations=True)
            )
        except kafka_errors.GroupAuthorizationFailedError:
            missing.append(r)
            continue
        except (NotImplementedError, kafka_errors.IncompatibleBrokerVersion):
            log.info("kafka_access_group_check_skipped", reason="broker without DescribeGroups v3")
            continue
        [group] = response.to_object()["groups"]
        if group["error_code"] == _GROUP_AUTHORIZATION_FAILED:
            missing.append(r)
            continue
        operations = group.get("authorized_operations", _NOT_PROVIDED)
        if operations != _NOT_PROVIDED and not _allowed(operations, r.operation):
            missing.append(r)
    return missing


async def _missing_transactional_acls(
    kafka: KafkaSettings, topics: TopicSettings, required: Sequence[AclRequirement]
) -> list[AclRequirement]:
    """Initialise a transactional id of the service's own prefix that no partition uses
    (``<prefix>-<group>-<input topic>-access-check``): Kafka checks Write on it exactly as on
    the partitions' ids, and nothing is fenced."""
    missing = []
    for r in required:
        probe = f"{r.name}{topics.device_swapped}-{ACCESS_CHECK_SUFFIX}"
        producer = AIOKafkaProducer(
            **client_options(kafka), transactional_id=probe, request_timeout_ms=15_000
        )
        try:
            await producer.start()
        except kafka_errors.TransactionalIdAuthorizationFailed:
            missing.append(r)
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()
    return missing


def principal_hint(kafka: KafkaSettings) -> str:
    """Who the broker sees, as far as the client can tell."""
    if kafka.sasl_mechanism == "OAUTHBEARER":
        return f"the subject of the token in {_VAR}SASL_OAUTH_TOKEN_FILE"
    if kafka.sasl_mechanism is not None:
        return f"User:{kafka.sasl_username}"
    if kafka.security_protocol == SecurityProtocol.SSL and kafka.ssl_certfile is not None:
        subject = certificate_summary(kafka.ssl_certfile).split(", ")[0]
        return f"the client certificate's principal ({subject or kafka.ssl_certfile})"
    return "User:ANONYMOUS"


async def missing_acls(
    kafka: KafkaSettings, topics: TopicSettings, bind: BindSettings | None = None
) -> list[AclRequirement]:
    """The entries of :func:`service_acls` the broker does not grant this principal."""
    required = service_acls(kafka, topics, bind)
    client = AIOKafkaClient(**client_options(kafka), request_timeout_ms=15_000)
    try:
        await client.bootstrap()
        missing = await _missing_topic_acls(client, [r for r in required if r.resource == "Topic"])
        missing += await _missing_group_acls(client, [r for r in required if r.resource == "Group"])
    finally:
        await client.close()
    missing += await _missing_transactional_acls(
        kafka, topics, [r for r in required if r.resource == "TransactionalId"]
    )
    return missing


async def check_access(
    kafka: KafkaSettings, topics: TopicSettings, bind: BindSettings | None = None
) -> None:
    """Connect as the service does and check its ACLs; raise one clear error otherwise.

    Raises :class:`~service.kafka.KafkaTlsError` / :class:`~service.kafka.KafkaAuthenticationError`
    (connection refused for a TLS or SASL reason) or :class:`~service.kafka.KafkaAuthorizationError`
    (missing ACLs, every one named).
    """
    await check_connection(kafka)
    missing = await missing_acls(kafka, topics, bind)
    if missing:
        raise KafkaAuthorizationError(
            f"kafka: not authorized: {principal_hint(kafka)} lacks "
            + "; ".join(r.describe() for r in missing)
            + f" (the ACLs the service needs: {ACL_DOCS})"
        )


# ---------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.kafka_access``: the ACLs for the ``REBIND_*`` settings in the
    environment, as ``kafka-acls.sh`` commands or a Strimzi ``KafkaUser`` acls block."""
    import argparse  # noqa: PLC0415 - the command line only
    import sys  # noqa: PLC0415

    from service.config import ConfigError, load_kafka_settings  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python -m service.kafka_access",
        description="Print the ACLs device-rebind needs for the REBIND_* settings of the "
        "environment (topic names, group, transactional id prefix).",
    )
    parser.add_argument("--format", choices=("kafka-acls", "strimzi"), default="kafka-acls")
    parser.add_argument("--principal", default="User:device-rebind", help="kafka-acls only")
    parser.add_argument("--bootstrap", help="kafka-acls --bootstrap-server (default: the setting)")
    parser.add_argument(
        "--for",
        dest="what",
        choices=("run", "replay", "topics-create"),
        default="run",
        help="the service (default), device-rebind replay, or device-rebind topics create",
    )
    parser.add_argument(
        "--callback-url", action="store_true", help="REBIND_BIND__CALLBACK_URL is set"
    )
    parser.add_argument(
        "--no-bind-watch",
        action="store_true",
        help="REBIND_BIND__POLL=false and no callback URL (no device-rebound outcomes)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_kafka_settings()
    except ConfigError as exc:
        print(f"device-rebind: {exc}", file=sys.stderr)
        return 2
    # Only which topics are used matters here: no listener runs, so none of its rules apply
    # (a callback URL without its port, or without a path secret, would be refused).
    bind = BindSettings.model_construct(
        poll=not args.no_bind_watch,
        callback_url="https://callback.invalid:443/" if args.callback_url else None,
    )
    if args.what == "replay":
        acls = replay_acls(settings.topics)
    elif args.what == "topics-create":
        acls = topics_acls(settings.topics, create=True)
    else:
        acls = service_acls(settings.kafka, settings.topics, bind)
    if args.format == "strimzi":
        print(strimzi_yaml(acls), end="")
    else:
        bootstrap = args.bootstrap or settings.kafka.bootstrap_servers
        for line in kafka_acls_commands(acls, args.principal, bootstrap):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
