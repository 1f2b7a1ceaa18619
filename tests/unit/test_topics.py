"""The topic table and the plan: what ``topics create`` would do, given what exists."""

from __future__ import annotations

import io

from service.config import TopicSettings
from service.topics import SPECS, Existing, Partitions, Plan, plan_for, print_plan

T = TopicSettings()
COMPACT = {"cleanup.policy": "compact"}


def everything(n: int = 6) -> dict[str, Existing]:
    """Every topic as the spec wants it, the input with ``n`` partitions."""
    out = {}
    for spec in SPECS:
        count = 1 if spec.partitions is Partitions.ONE else n
        out[getattr(T, spec.setting)] = Existing(count, dict(spec.configs))
    return out


def test_every_topic_setting_but_the_retired_one_has_a_spec() -> None:
    specs = {spec.setting for spec in SPECS}
    assert specs <= set(TopicSettings.model_fields)
    assert "retry" not in specs  # no longer used
    for required in ("device_swapped", "ledger", "dedupe", "token", "budget"):
        assert required in specs
    ledger = next(s for s in SPECS if s.setting == "ledger")
    assert ledger.partitions is Partitions.CO_PARTITIONED
    assert ledger.configs == COMPACT


def test_an_empty_cluster_gets_everything_co_partitioned_and_compacted() -> None:
    plan = plan_for(T, {}, brokers=5, partitions=12)
    assert {i.name: i.action for i in plan.items} == {i.name: "create" for i in plan.items}
    by_name = {i.name: i for i in plan.items}
    assert by_name["device-rebind.ledger.v1"].partitions == 12
    assert by_name["device-rebind.dedupe.v1"].partitions == 12
    assert by_name["device-rebind.token.v1"].partitions == 1
    assert by_name["device-rebind.dedupe.v1"].spec.configs["retention.ms"] == "604800000"
    assert plan.replication_factor == 3  # at most 3, even with 5 brokers
    assert plan.problems == []


def test_the_input_count_decides_once_the_input_exists() -> None:
    plan = plan_for(T, {"asset.device-swapped.v1": Existing(4, {})}, brokers=1, partitions=12)
    by_name = {i.name: i for i in plan.items}
    assert by_name["device-rebind.ledger.v1"].partitions == 4
    assert by_name["asset.device-swapped.v1"].action == "ok"
    assert any("asked for 12" in n for n in by_name["asset.device-swapped.v1"].notes)
    assert plan.replication_factor == 1


def test_a_complete_cluster_has_nothing_to_do() -> None:
    plan = plan_for(T, everything(), brokers=3)
    assert plan.missing == []
    assert plan.problems == []
    assert {i.action for i in plan.items} == {"ok"}


def test_differences_are_reported_never_fixed() -> None:
    existing = everything(6)
    existing["device-rebind.ledger.v1"] = Existing(3, {"cleanup.policy": "delete"})
    existing["device-rebind.dedupe.v1"] = Existing(
        6, {"cleanup.policy": "delete,compact", "retention.ms": "1209600000"}
    )
    existing["device-rebind.token.v1"] = Existing(2, COMPACT)
    plan = plan_for(T, existing, brokers=3)
    assert plan.missing == []
    problems = plan.problems
    assert any("ledger" in p and "3 partitions, the input topic has 6" in p for p in problems)
    assert any("ledger" in p and "cleanup.policy=delete, expected compact" in p for p in problems)
    assert any("token" in p and "2 partitions, must be 1" in p for p in problems)
    dedupe = next(i for i in plan.items if i.name == "device-rebind.dedupe.v1")
    assert dedupe.problems == []  # "delete,compact" is "compact,delete"
    assert dedupe.notes == ["retention.ms=1209600000, expected 604800000"]  # taste, not a fault


def test_topic_names_follow_the_settings() -> None:
    topics = TopicSettings(ledger="team.ledger", device_swapped="team.in")
    plan = plan_for(topics, {"team.in": Existing(2, {})}, brokers=1)
    names = {i.spec.setting: i.name for i in plan.items}
    assert names["ledger"] == "team.ledger"
    assert {i.name: i.partitions for i in plan.items}["team.ledger"] == 2


def test_the_printed_plan_names_topics_settings_and_actions() -> None:
    existing = everything(3)
    del existing["device-rebind.ledger.v1"]
    out = io.StringIO()
    print_plan(plan_for(T, existing, brokers=1), out)
    text = out.getvalue()
    header, *rows = text.splitlines()
    assert header.split() == ["topic", "setting", "partitions", "configs", "action"]
    ledger = next(r for r in rows if r.startswith("device-rebind.ledger.v1 "))
    assert "REBIND_TOPICS__LEDGER" in ledger
    assert "3 (= input)" in ledger
    assert "cleanup.policy=compact" in ledger
    assert ledger.endswith("create")
    assert rows[-1] == f"1 to create (replication factor 1), {len(SPECS) - 1} exist, 0 problem(s)"


def test_plan_type_reports_missing() -> None:
    plan: Plan = plan_for(T, {}, brokers=1)
    assert len(plan.missing) == len(SPECS)


def test_the_urgent_lane_is_co_partitioned_and_left_out_when_turned_off() -> None:
    plan = plan_for(T, {"asset.device-swapped.v1": Existing(4, {})}, brokers=1)
    urgent = {i.name: i for i in plan.items}["asset.device-swapped.urgent.v1"]
    assert urgent.spec.partitions is Partitions.CO_PARTITIONED
    assert urgent.partitions == 4
    existing = {"asset.device-swapped.v1": Existing(4, {}), urgent.name: Existing(3, {})}
    differs = {i.name: i for i in plan_for(T, existing, brokers=1).items}[urgent.name]
    assert differs.action == "differs"  # topics check exits 1: not co-partitioned
    # missing, it is to create, but `topics check` does not fail on it: the lane is optional
    assert urgent in plan.missing
    assert urgent not in plan.required_missing
    off = TopicSettings(device_swapped_urgent="")
    assert urgent.name not in {i.name for i in plan_for(off, {}, brokers=1).items}
