"""The topics the service needs, in one table, and ``device-rebind topics plan | create | check``.

:data:`SPECS` is the single description of every topic: which setting names it, how many
partitions it needs (co-partitioned with the input, exactly one, or any) and which configs
matter. Adding a topic is one line there; the CLI, the start-up check, the chart's hook Job
(which runs ``topics create``) and the docs' tables follow it.

The admin client uses the service's own Kafka settings (:func:`service.kafka.client_options`), so
TLS and SASL apply. ``create`` only ever creates missing topics; an existing topic is never
changed: differences are reported, and the ones that break the service (a co-partitioned topic
with another partition count, a ledger that deletes) make ``create`` and ``check`` exit 1.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from service.config import ENV_NESTED_DELIMITER, ENV_PREFIX, TopicSettings
from service.kafka import client_options
from service.kafka_connection import check_connection

TOPIC_ALREADY_EXISTS: Final = 36
REPLICATION_MAX: Final = 3
DEFAULT_INPUT_PARTITIONS: Final = 6
REQUEST_TIMEOUT_MS: Final = 15_000


class Partitions(enum.Enum):
    INPUT = "N"
    """The input topic itself: N partitions, chosen by whoever creates it."""
    CO_PARTITIONED = "N, = input"
    """Exactly the input topic's count: partition p belongs to the owner of input partition p."""
    ONE = "1"
    """Exactly one partition (a single, totally ordered log read by every replica)."""
    ANY = "any"
    """Any count (created with N)."""


@dataclass(frozen=True)
class TopicSpec:
    setting: str
    """Field of :class:`~service.config.TopicSettings` that names the topic."""
    partitions: Partitions
    configs: Mapping[str, str] = field(default_factory=dict)
    """Configs the topic is created with and checked for."""
    purpose: str = ""
    required_at_start: bool = False
    """The service waits at start until it exists (and exits after the grace period)."""
    created_by_service: bool = False
    """The service creates it at start when missing."""
    optional: bool = False
    """The service works without it (``check`` does not fail on it missing): the urgent lane."""

    @property
    def variable(self) -> str:
        return f"{ENV_PREFIX}TOPICS{ENV_NESTED_DELIMITER}{self.setting.upper()}"


_COMPACT: Final = {"cleanup.policy": "compact"}

#: Every topic the service reads or writes. One line per topic.
SPECS: Final[tuple[TopicSpec, ...]] = (
    TopicSpec("device_swapped", Partitions.INPUT, {}, "input: device.swapped events", True),
    TopicSpec(
        "device_swapped_urgent",
        Partitions.CO_PARTITIONED,
        {},
        "urgent lane: swaps a person waits for, served first (same contract as the input)",
        optional=True,
    ),
    TopicSpec("ledger", Partitions.CO_PARTITIONED, _COMPACT, "per-device ledger", True),
    TopicSpec(
        "dedupe",
        Partitions.CO_PARTITIONED,
        {"cleanup.policy": "compact,delete", "retention.ms": "604800000"},
        "duplicate memory (7 days)",
        True,
    ),
    TopicSpec("token", Partitions.ONE, _COMPACT, "shared access token, encrypted", True, True),
    TopicSpec(
        "budget",
        Partitions.ONE,
        {"cleanup.policy": "compact", "segment.ms": "600000"},
        "replicas' calls of the last minute",
        True,
        True,
    ),
    TopicSpec("credential_updated", Partitions.ANY, {}, "outcome: key refreshed"),
    TopicSpec("rebind_failed", Partitions.ANY, {}, "outcome: swap failed"),
    TopicSpec("dead_letter", Partitions.ANY, {}, "unreadable input, byte for byte"),
    TopicSpec("device_rebound", Partitions.ANY, {}, "outcome: the new hardware bound"),
    TopicSpec(
        "bind_notify",
        Partitions.CO_PARTITIONED,
        {},
        "bindDevice pushes received (read when REBIND_BIND__CALLBACK_URL is set)",
    ),
)

# Configs whose difference breaks a promise (not a matter of taste, like a longer retention).
_ESSENTIAL_CONFIGS: Final = frozenset({"cleanup.policy"})


@dataclass(frozen=True)
class Existing:
    partitions: int
    configs: Mapping[str, str]


@dataclass
class Planned:
    spec: TopicSpec
    name: str
    partitions: int
    """Wanted count (for an existing ANY/INPUT topic: what it has)."""
    existing: Existing | None
    problems: list[str] = field(default_factory=list)
    """Differences that break the service: ``create`` and ``check`` fail on them."""
    notes: list[str] = field(default_factory=list)
    """Differences worth knowing about, that the service works with."""

    @property
    def action(self) -> str:
        if self.existing is None:
            return "create"
        if self.problems:
            return "differs"
        return "ok"


@dataclass
class Plan:
    items: list[Planned]
    input_partitions: int
    replication_factor: int

    @property
    def missing(self) -> list[Planned]:
        return [i for i in self.items if i.existing is None]

    @property
    def problems(self) -> list[str]:
        return [f"{i.name}: {p}" for i in self.items for p in i.problems]

    @property
    def required_missing(self) -> list[Planned]:
        """Missing topics the service cannot work without (``check`` exits 1 on them)."""
        return [i for i in self.missing if not i.spec.optional]


def specs_for(topics: TopicSettings) -> list[tuple[TopicSpec, str]]:
    """Each spec with the topic name the settings give it (specs of unknown settings skipped)."""
    return [
        (spec, getattr(topics, spec.setting))
        for spec in SPECS
        if spec.setting in type(topics).model_fields and getattr(topics, spec.setting)
    ]  # an empty name: a topic turned off (the urgent lane)


def plan_for(
    topics: TopicSettings,
    existing: Mapping[str, Existing],
    *,
    brokers: int,
    partitions: int | None = None,
    replication_factor: int | None = None,
) -> Plan:
    """What ``create`` would do, given what exists. ``partitions``: the input's count when the
    input topic must be created (default: the existing input's, else 6)."""
    pairs = specs_for(topics)
    input_name = next(name for spec, name in pairs if spec.partitions is Partitions.INPUT)
    found_input = existing.get(input_name)
    n = found_input.partitions if found_input else (partitions or DEFAULT_INPUT_PARTITIONS)
    items: list[Planned] = []
    for spec, name in pairs:
        have = existing.get(name)
        want = 1 if spec.partitions is Partitions.ONE else n
        item = Planned(spec, name, have.partitions if have and _free(spec) else want, have)
        if have is not None:
            _compare(item, have, n, partitions)
        items.append(item)
    rf = replication_factor or min(REPLICATION_MAX, max(brokers, 1))
    return Plan(items, n, rf)


def _free(spec: TopicSpec) -> bool:
    return spec.partitions in (Partitions.ANY, Partitions.INPUT)


def _compare(item: Planned, have: Existing, n: int, asked: int | None) -> None:
    spec = item.spec
    if spec.partitions is Partitions.CO_PARTITIONED and have.partitions != n:
        item.problems.append(
            f"{have.partitions} partitions, the input topic has {n}: they must be equal "
            "(co-partitioned); this is a migration, not something to change in place"
        )
    elif spec.partitions is Partitions.ONE and have.partitions != 1:
        item.problems.append(f"{have.partitions} partitions, must be 1")
    elif spec.partitions is Partitions.INPUT and asked is not None and asked != have.partitions:
        item.notes.append(f"exists with {have.partitions} partitions (asked for {asked}): kept")
    for key, wanted in spec.configs.items():
        actual = have.configs.get(key)
        if actual is None or _normalised(actual) == _normalised(wanted):
            continue
        text = f"{key}={actual}, expected {wanted}"
        (item.problems if key in _ESSENTIAL_CONFIGS else item.notes).append(text)


def _normalised(value: str) -> str:
    return ",".join(sorted(part.strip() for part in value.split(",")))


# ---------------------------------------------------------------------------------- Kafka side


async def describe(admin: AIOKafkaAdminClient, names: Sequence[str]) -> dict[str, Existing]:
    """The topics of ``names`` that exist, with their partition counts and configs."""
    # Only topics listed as existing are described: a metadata request naming a missing topic
    # makes a broker with auto.create.topics.enable create it, with the broker's defaults.
    listed = set(await admin.list_topics())
    present = [name for name in names if name in listed]
    if not present:
        return {}
    described = await admin.describe_topics(present)
    counts = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
    configs: dict[str, dict[str, str]] = {name: {} for name in counts}
    if counts:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in counts]
        )
        for response in responses:
            for resource in response.to_object()["resources"]:
                if resource["error_code"] == 0 and resource["resource_name"] in configs:
                    configs[resource["resource_name"]] = {
                        entry["config_names"]: entry["config_value"]
                        for entry in resource["config_entries"]
                        if entry["config_value"] is not None
                    }
    return {name: Existing(count, configs[name]) for name, count in counts.items()}


def admin_client(kafka: Any) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=REQUEST_TIMEOUT_MS)


async def current_plan(
    admin: AIOKafkaAdminClient,
    topics: TopicSettings,
    *,
    partitions: int | None = None,
    replication_factor: int | None = None,
) -> Plan:
    names = [name for _, name in specs_for(topics)]
    existing = await describe(admin, names)
    brokers = len((await admin.describe_cluster()).get("brokers", ()))
    return plan_for(
        topics,
        existing,
        brokers=brokers,
        partitions=partitions,
        replication_factor=replication_factor,
    )


class TopicCreationError(Exception):
    """The broker refused to create a topic (ACLs, policy, too few brokers)."""

    def __init__(self, message: str, codes: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.codes = tuple(codes)
        """Kafka error codes, e.g. 29 TOPIC_AUTHORIZATION_FAILED, 38 INVALID_REPLICATION_FACTOR."""


async def create_missing(
    admin: AIOKafkaAdminClient, plan: Plan, only: Sequence[Planned] | None = None
) -> list[str]:
    """Create the plan's missing topics (or ``only`` these); never touches existing ones.

    Returns the names created (a topic another process created meanwhile counts as created).
    """
    wanted = [i for i in (only if only is not None else plan.missing) if i.existing is None]
    if not wanted:
        return []
    response = await admin.create_topics(
        [
            NewTopic(
                name=i.name,
                num_partitions=i.partitions,
                replication_factor=plan.replication_factor,
                topic_configs=dict(i.spec.configs),
            )
            for i in wanted
        ],
        timeout_ms=REQUEST_TIMEOUT_MS,
    )
    errors = [
        (topic, code, rest[0] if rest and rest[0] else "")
        for topic, code, *rest in response.topic_errors
        if code not in (0, TOPIC_ALREADY_EXISTS)
    ]
    if errors:
        raise TopicCreationError(
            "could not create "
            + ", ".join(f"{t} (error {c}{': ' + m if m else ''})" for t, c, m in errors),
            [c for _, c, _ in errors],
        )
    return [i.name for i in wanted]


# ---------------------------------------------------------------------------------- CLI side


def print_plan(plan: Plan, out: TextIO) -> None:
    """A table, then one line per difference, then a summary line."""
    rows = [("topic", "setting", "partitions", "configs", "action")]
    for i in plan.items:
        count = str(i.existing.partitions if i.existing else i.partitions)
        if i.spec.partitions is Partitions.CO_PARTITIONED:
            count += " (= input)"
        elif i.spec.partitions is Partitions.ONE and count != "1":
            count += " (want 1)"
        configs = " ".join(f"{k}={v}" for k, v in i.spec.configs.items()) or "-"
        rows.append((i.name, i.spec.variable, count, configs, i.action))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
    for i in plan.items:
        for problem in i.problems:
            print(f"problem: {i.name} ({i.spec.variable}): {problem}", file=out)
        for note in i.notes:
            print(f"note: {i.name} ({i.spec.variable}): {note}", file=out)
    missing = len(plan.missing)
    print(
        f"{missing} to create (replication factor {plan.replication_factor}), "
        f"{len(plan.items) - missing} exist, {len(plan.problems)} problem(s)",
        file=out,
    )


async def run_command(
    kafka: Any,
    topics: TopicSettings,
    command: str,
    out: TextIO,
    *,
    partitions: int | None = None,
    replication_factor: int | None = None,
) -> int:
    """``plan`` (exit 0), ``create`` and ``check`` (exit 1 on problems or, for ``check``, on a
    missing topic)."""
    await check_connection(kafka)  # a TLS or SASL refusal in one line, naming it
    admin = admin_client(kafka)
    try:
        await admin.start()
        plan = await current_plan(
            admin, topics, partitions=partitions, replication_factor=replication_factor
        )
        if command == "create" and plan.missing:
            created = await create_missing(admin, plan)
            for name in created:
                print(f"created {name}", file=out)
            await _wait_visible(admin, created)
            plan = await current_plan(
                admin, topics, partitions=partitions, replication_factor=replication_factor
            )
        print_plan(plan, out)
    finally:
        await admin.close()
    if command == "plan":
        return 0
    return 1 if plan.problems or plan.required_missing else 0


async def _wait_visible(admin: AIOKafkaAdminClient, names: Sequence[str]) -> None:
    """Until the created topics show in the metadata with a leader for every partition."""
    for _ in range(100):
        described = await admin.describe_topics(list(names))
        if all(
            t["error_code"] == 0
            and t["partitions"]
            and all(p["leader"] >= 0 for p in t["partitions"])
            for t in described
        ):
            return
        await asyncio.sleep(0.1)
