"""The group's assignor (service/assignor.py): co-partitioned, balanced, sticky."""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from service.assignor import (
    NAME,
    Claim,
    CoPartitionedAssignor,
    assign_numbers,
    decode_claim,
    encode_claim,
)
from service.config import KafkaSettings
from service.pipeline.pipeline import input_consumer

INPUT, NOTIFY = "asset.device-swapped.v1", "device-rebind.bind-notify.v1"


class _Cluster:
    def __init__(self, counts: Mapping[str, int]) -> None:
        self._counts = counts

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self._counts.get(topic)
        return None if n is None else set(range(n))


def _claims(**held: list[int]) -> dict[str, Claim]:
    return {member: Claim(frozenset(ps), 1) for member, ps in held.items()}


def _moved(before: Mapping[str, Claim], after: Mapping[str, list[int]]) -> int:
    return sum(len(claim.partitions - set(after.get(m, []))) for m, claim in before.items())


def test_a_first_assignment_is_balanced_and_covers_every_number() -> None:
    result = assign_numbers(6, {"a": Claim(), "b": Claim(), "c": Claim(), "d": Claim()})
    assert sorted(p for ps in result.values() for p in ps) == list(range(6))
    assert sorted(len(ps) for ps in result.values()) == [1, 1, 2, 2]


def test_a_member_joining_takes_only_what_balance_needs() -> None:
    before = _claims(a=[0, 1, 2], b=[3, 4, 5])
    after = assign_numbers(6, {**before, "c": Claim()})
    assert [len(ps) for ps in after.values()] == [2, 2, 2]
    assert set(after["a"]) <= {0, 1, 2}
    assert set(after["b"]) <= {3, 4, 5}
    assert _moved(before, after) == 2  # one from each, the least balance allows


def test_a_member_leaving_hands_over_only_its_own() -> None:
    before = _claims(a=[0, 1], b=[2, 3], c=[4, 5])
    after = assign_numbers(6, {m: before[m] for m in ("a", "c")})
    assert set(after["a"]) >= {0, 1}
    assert set(after["c"]) >= {4, 5}
    assert sorted(after["a"] + after["c"]) == list(range(6))


def test_nothing_changes_when_nothing_changed() -> None:
    before = _claims(a=[0, 3], b=[1, 4], c=[2, 5])
    assert assign_numbers(6, before) == {"a": [0, 3], "b": [1, 4], "c": [2, 5]}


def test_the_later_generation_wins_a_disputed_number() -> None:
    # b missed a generation (evicted) and still claims 2, which a got since.
    claims = {"a": Claim(frozenset({0, 2}), 7), "b": Claim(frozenset({1, 2}), 5)}
    after = assign_numbers(4, claims)
    assert 2 in after["a"]
    assert 1 in after["b"]
    assert sorted(after["a"] + after["b"]) == [0, 1, 2, 3]


def test_claims_past_the_count_are_ignored() -> None:
    after = assign_numbers(2, _claims(a=[0, 5], b=[1, 7]))
    assert after == {"a": [0], "b": [1]}


def test_claims_round_trip_and_unreadable_ones_claim_nothing() -> None:
    claim = Claim(frozenset({3, 1}), 12)
    assert decode_claim(encode_claim(claim)) == claim
    for junk in (b"", None, b"\xff", b"[]", b'{"g":"x","p":[1]}', b'{"p":[1]}'):
        assert decode_claim(junk) == Claim()


def test_the_assignor_gives_every_topic_partition_p_to_one_member() -> None:
    assignor = CoPartitionedAssignor()
    members = {
        m: ConsumerProtocolMemberMetadata(0, [INPUT, NOTIFY], encode_claim(c))
        for m, c in _claims(a=[0, 1, 2, 3], b=[4, 5]).items()
    }
    result = assignor.assign(_Cluster({INPUT: 6, NOTIFY: 6}), members)
    for member, assignment in result.items():
        by_topic = dict(assignment.assignment)
        assert set(by_topic) == {INPUT, NOTIFY}
        assert by_topic[INPUT] == by_topic[NOTIFY], member
    assert dict(result["a"].assignment)[INPUT] == [0, 1, 2]
    assert dict(result["b"].assignment)[INPUT] == [3, 4, 5]


def test_the_assignor_claims_what_it_was_given_at_its_next_join() -> None:
    assignor = CoPartitionedAssignor()
    generation = 4
    assignor.read_generation(lambda: generation)
    assert decode_claim(assignor.metadata([INPUT]).user_data) == Claim()
    assignor.on_assignment(
        ConsumerProtocolMemberAssignment(0, [(INPUT, [2, 5]), (NOTIFY, [2, 5])], b"")
    )
    metadata = assignor.metadata([INPUT, NOTIFY])
    assert metadata.subscription == [INPUT, NOTIFY]
    assert decode_claim(metadata.user_data) == Claim(frozenset({2, 5}), 4)


async def test_the_consumer_offers_one_strategy_under_the_range_protocol_name() -> None:
    consumer = input_consumer(KafkaSettings(), heartbeat_seconds=3.0)
    strategies = consumer._partition_assignment_strategy
    assert [s.name for s in strategies] == [NAME] == [RangePartitionAssignor.name]
    assert consumer._group_instance_id is None  # static membership is opt-in


async def test_static_membership_uses_the_instance_id() -> None:
    kafka = KafkaSettings(instance_id="device-rebind-2", static_membership=True)
    assert input_consumer(kafka, heartbeat_seconds=3.0)._group_instance_id == "device-rebind-2"


# ---- properties ------------------------------------------------------------------------------


@st.composite
def _groups(draw: st.DrawFn) -> tuple[int, dict[str, Claim]]:
    """A group after a change: a previous assignment of ``before`` numbers over some members,
    then members leaving and joining, the count changed, and stale claims of older generations."""
    before = draw(st.integers(0, 24))
    old = [f"m{i}" for i in range(draw(st.integers(1, 6)))]
    owners = draw(st.lists(st.sampled_from(old), min_size=before, max_size=before))
    claims = {m: set[int]() for m in old}
    for p, m in enumerate(owners):
        claims[m].add(p)
    generation = 10
    result = {m: Claim(frozenset(ps), generation) for m, ps in claims.items()}
    staying = draw(st.lists(st.sampled_from(old), unique=True)) if old else []
    group = {m: result[m] for m in staying}
    for i in range(draw(st.integers(0, 4))):
        stale = draw(st.sets(st.integers(0, 30), max_size=6))
        group[f"n{i}"] = Claim(frozenset(stale), draw(st.integers(-1, generation - 1)))
    if not group:
        group["n-only"] = Claim()
    count = draw(st.one_of(st.just(before), st.integers(0, 30)))
    return count, group


@settings(max_examples=400, deadline=None)
@given(_groups())
def test_properties_co_partitioned_balanced_minimal_movement(
    group: tuple[int, dict[str, Claim]],
) -> None:
    count, claims = group
    result = assign_numbers(count, claims)
    # Every number exactly once (co-partitioning is per number: see the assignor test above).
    assigned = sorted(p for ps in result.values() for p in ps)
    assert assigned == list(range(count))
    assert set(result) == set(claims)
    # Balanced.
    sizes = [len(ps) for ps in result.values()]
    assert max(sizes) - min(sizes) <= 1
    # Minimal movement: each number is held by the winner of its claims (the later generation);
    # no balanced assignment keeps more of them than this one does.
    winner: dict[int, str] = {}
    for m in sorted(claims):
        for p in claims[m].partitions:
            if p < count and (
                p not in winner or claims[m].generation > claims[winner[p]].generation
            ):
                winner[p] = m
    holding = {m: sum(1 for w in winner.values() if w == m) for m in claims}
    base, extra = divmod(count, len(claims))
    best = sum(min(h, base) for h in holding.values()) + min(
        extra, sum(1 for h in holding.values() if h > base)
    )
    kept = sum(1 for p, m in winner.items() if p in result[m])
    assert kept == best
    # Deterministic: the same claims give the same answer, whoever leads.
    assert assign_numbers(count, dict(reversed(list(claims.items())))) == result


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 24), st.integers(1, 6))
def test_property_a_stable_group_keeps_its_assignment(count: int, members: int) -> None:
    first = assign_numbers(count, {f"m{i}": Claim() for i in range(members)})
    again = assign_numbers(count, {m: Claim(frozenset(ps), 3) for m, ps in first.items()})
    assert again == first


def test_a_partition_is_kept_only_across_two_consecutive_generations() -> None:
    assignor = CoPartitionedAssignor()
    generation = 5
    assignor.read_generation(lambda: generation)

    def assign(*partitions: int) -> None:
        assignment = ConsumerProtocolMemberAssignment(0, [(INPUT, list(partitions))], b"")
        assignor.on_assignment(assignment)

    assign(0, 1)
    assert not assignor.kept(0)  # nothing known before
    generation = 6
    assign(0, 2)
    assert assignor.kept(0)  # held in 5 and 6: nobody else had it
    assert not assignor.kept(1)  # gone
    assert not assignor.kept(2)  # new
    generation = 8
    assign(0, 2)
    assert not assignor.kept(0)  # a generation missed: another member may have had it
    generation = 9  # a later join whose assignment this assignor did not see (range)
    assert not assignor.kept(0)
