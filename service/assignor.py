"""The group's assignment: co-partitioned, balanced, sticky.

Partition *numbers* are assigned, not topic partitions: the member given number p gets partition p
of every topic it subscribes to (the input and, with bind pushes, the bind-notify topic), and reads
partition p of the ledger and the duplicate memory itself. That is the core's co-partitioning
(docs/core.md): a device's swaps, pushes, ledger entry and answered events all meet in one member.

Balanced: the members' counts differ by at most one. Sticky: each member tells, in the user data of
its subscription, the numbers it was assigned last and the group generation it got them in; a
number stays with the member that held it, and only what balance needs moves (Kafka's sticky
assignor does the same per topic partition; this one keeps the topics together). When two members
claim one number (a member that missed a generation still claims what it held before it), the
claim of the later generation wins.

:func:`assign_numbers` is the whole decision, a pure function; :class:`CoPartitionedAssignor` is
its aiokafka face (``partition_assignment_strategy``), the consumer's only strategy, offered under
the protocol name ``range``. Why that name: a group must agree on one protocol name, and the release
before this one offered aiokafka's range assignor. Offering both (sticky first, range second) would
be the textbook rolling upgrade, but aiokafka 0.14 sends one JoinGroup per offered strategy in
``perform_group_join`` (its KIP-394 retry loop sits inside the loop over the strategies), the
first with the first strategy alone: every join then changes the member's protocols twice and
triggers another rebalance (seen as groups of in-process members that never settled in 60 s), and
a member offering the sticky strategy alone is refused with InconsistentGroupProtocol by a group of
range-only members. Under one name both releases agree: whichever member leads assigns, an old
leader by range (co-partitioned too: it assigns each topic by the same numbers when the counts are
equal, which the service checks at start), a new one stickily (an old member's subscription carries
no claim: it is read as holding nothing). Members accept any assignment; ``kafka-consumer-groups``
shows the protocol as ``range``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

__all__ = ["Claim", "CoPartitionedAssignor", "assign_numbers", "decode_claim", "encode_claim"]

NAME = "range"
"""The protocol name: the one the release before used (see the module docstring)."""
_VERSION = 0
_NO_GENERATION = -1


@dataclass(frozen=True)
class Claim:
    """What a member held before this rebalance: its partition numbers, and the group generation
    that assigned them (-1 when it does not know)."""

    partitions: frozenset[int] = frozenset()
    generation: int = _NO_GENERATION


def encode_claim(claim: Claim) -> bytes:
    return json.dumps(
        {"g": claim.generation, "p": sorted(claim.partitions)}, separators=(",", ":")
    ).encode()


def decode_claim(data: bytes | None) -> Claim:
    """A member's claim from its subscription's user data; no claim when it says nothing
    readable (an older member, a member that just started)."""
    if not data:
        return Claim()
    try:
        raw = json.loads(data)
        generation = int(raw["g"])
        partitions = frozenset(int(p) for p in raw["p"])
    except (ValueError, TypeError, KeyError):
        return Claim()
    return Claim(frozenset(p for p in partitions if p >= 0), generation)


def assign_numbers(count: int, claims: Mapping[str, Claim]) -> dict[str, list[int]]:
    """Partition numbers ``0 .. count-1`` over the members of ``claims``, each list sorted.

    Every number goes to exactly one member; counts differ by at most one; a member keeps the
    numbers it claims (the later generation winning a disputed one) up to its share, and the
    members holding the most keep the larger shares: nothing moves that balance does not need.
    Deterministic: the same input gives the same assignment on whichever member leads.
    """
    members = sorted(claims)
    if not members:
        return {}
    # A disputed number goes to the claim of the later generation (then the smaller member id).
    holder: dict[int, str] = {}
    for member in members:
        claim = claims[member]
        for p in claim.partitions:
            if p >= count:
                continue
            current = holder.get(p)
            if current is None or claim.generation > claims[current].generation:
                holder[p] = member
    held: dict[str, list[int]] = {member: [] for member in members}
    for p in sorted(holder):
        held[holder[p]].append(p)
    base, extra = divmod(count, len(members))
    # The larger shares go to the members that hold the most: they keep the most.
    by_holding = sorted(members, key=lambda m: (-len(held[m]), m))
    share = {member: base + (1 if rank < extra else 0) for rank, member in enumerate(by_holding)}
    result: dict[str, list[int]] = {}
    free: list[int] = [p for p in range(count) if p not in holder]
    for member in members:
        kept = held[member][: share[member]]
        free.extend(held[member][share[member] :])
        result[member] = kept
    free.sort()
    for member in members:
        need = share[member] - len(result[member])
        if need > 0:
            result[member] = sorted(result[member] + free[:need])
            del free[:need]
    return result


class CoPartitionedAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """aiokafka's face of :func:`assign_numbers`. One instance per consumer: it remembers what its
    member was assigned, to claim it at the next join, with the group generation of that join
    (:meth:`read_generation`; aiokafka sets it before it hands over the assignment)."""

    name = NAME
    version = _VERSION

    def __init__(self) -> None:
        self._generation: Callable[[], int] | None = None
        self._claim = Claim()
        self._previous = Claim()

    def read_generation(self, source: Callable[[], int]) -> None:
        """Where the member's generation is read (:func:`consumer_generation`)."""
        self._generation = source

    @property
    def claim(self) -> Claim:
        """What this member will claim at its next join."""
        return self._claim

    def assign(
        self,
        cluster: ClusterMetadata,
        members: Mapping[str, ConsumerProtocolMemberMetadata],
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        counts: dict[str, int] = {}
        for metadata in members.values():
            for topic in metadata.subscription:
                if topic not in counts:
                    counts[topic] = len(cluster.partitions_for_topic(topic) or ())
        # The topics are co-partitioned (the pipeline refuses to start otherwise); if they ever
        # are not, numbers past a topic's count give no partition of that topic.
        numbers = assign_numbers(
            max(counts.values(), default=0),
            {member: decode_claim(metadata.user_data) for member, metadata in members.items()},
        )
        result: dict[str, ConsumerProtocolMemberAssignment] = {}
        for member, metadata in members.items():
            mine = numbers.get(member, [])
            topics = sorted(
                (topic, [p for p in mine if p < counts[topic]])
                for topic in set(metadata.subscription)
            )
            result[member] = ConsumerProtocolMemberAssignment(self.version, topics, b"")
        return result

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, list(topics), encode_claim(self._claim))

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        generation = self._generation() if self._generation is not None else _NO_GENERATION
        numbers = frozenset(p for _topic, partitions in assignment.assignment for p in partitions)
        self._previous, self._claim = self._claim, Claim(numbers, generation)

    def kept(self, partition: int) -> bool:
        """True when this member holds ``partition`` in the group's current generation and held
        it in the one just before: no other member was assigned it in between, so no other
        member initialised its transactional id. False whenever that is not known (the range
        protocol assigned, a generation missed, the generation unreadable)."""
        if self._generation is None:
            return False
        current, previous = self._claim, self._previous
        return (
            previous.generation >= 0
            and current.generation == self._generation()
            and current.generation == previous.generation + 1
            and partition in current.partitions
            and partition in previous.partitions
        )


def consumer_generation(consumer: object) -> Callable[[], int]:
    """The generation of ``consumer``'s last join (aiokafka keeps it on its private coordinator,
    set before the assignment is handed over); -1 when it cannot be read."""

    def read() -> int:
        coordinator = getattr(consumer, "_coordinator", None)
        generation = getattr(coordinator, "generation", _NO_GENERATION)
        return generation if isinstance(generation, int) else _NO_GENERATION

    return read
