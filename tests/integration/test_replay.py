"""`device-rebind replay`: re-drive failed swaps and dead letters after a fix, at most once."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from service.config import KafkaOnlySettings, KafkaSettings, TopicSettings
from service.events import SOURCE_TOPIC_HEADER
from service.kafka import partition_counts
from service.replay import Filters, replay, replay_id
from tests.fixtures.service import Harness
from tests.integration.test_lanes_e2e import with_urgent_lane
from tests.support.events import swap_event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def kafka_only(harness: Harness) -> KafkaOnlySettings:
    s = harness.settings()
    return KafkaOnlySettings(kafka=s.kafka, topics=s.topics)


async def test_a_fixed_failure_is_replayed_once(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-ok", "n-ok-old")
    await harness.start_service()
    await harness.produce(
        [
            (b"dev-missing", swap_event("dev-missing", "n-new", event_id="evt-miss", wo="WO-7")),
            (b"dev-ok", swap_event("dev-ok", "n-ok", event_id="evt-ok")),
        ]
    )
    outs = await harness.read(2)
    [failed] = [o for o in outs if o.topic == harness.topics.rebind_failed]
    assert failed.data["errorCode"] == "100403"

    # Dry run: prints, sends nothing.
    printed = io.StringIO()
    settings = kafka_only(harness)
    n = await replay(
        settings,
        "rebind-failed",
        Filters(error_codes=frozenset({"100403"})),
        dry_run=True,
        out=printed,
    )
    assert n == 1
    assert "would replay 1 record(s)" in printed.getvalue()
    assert "device=dev-missing" in printed.getvalue()

    # The operator fixes the cause, then replays, twice.
    await control.seed_device("dev-missing", "n-old")
    for _ in range(2):
        assert (
            await replay(
                settings,
                "rebind-failed",
                Filters(error_codes=frozenset({"100403"})),
                dry_run=False,
                out=io.StringIO(),
            )
            == 1
        )
    outs = await harness.read(4)

    updated = [
        o
        for o in outs
        if o.topic == harness.topics.credential_updated and o.data["deviceId"] == "dev-missing"
    ]
    assert len(updated) == 2  # the second replay re-publishes the same outcome
    assert {o.json()["id"] for o in updated} == {updated[0].json()["id"]}
    assert updated[0].data["swapEventId"] == replay_id(failed.json()["id"])
    assert updated[0].data["context"] == {"wo": "WO-7"}  # the original event was replayed
    puts = await control.calls(operation="refresh_key", device_id="dev-missing")
    assert [c["status"] for c in puts] == [404, 200]  # one call before the fix, one after


async def test_filters_and_dead_letters(harness: Harness) -> None:
    await harness.start_service()
    await harness.produce(
        [
            (b"k1", b"\xff\xfe not utf-8"),
            (b"k2", b"[1, 2]"),
            (b"ghost", swap_event("ghost", "n", event_id="evt-ghost")),
        ]
    )
    await harness.read(3)
    settings = kafka_only(harness)

    out = io.StringIO()
    assert (
        await replay(
            settings, "dlq", Filters(error_codes=frozenset({"not_utf8"})), dry_run=True, out=out
        )
        == 1
    )
    assert await replay(settings, "dlq", Filters(), dry_run=True, out=io.StringIO()) == 2
    assert (
        await replay(
            settings,
            "rebind-failed",
            Filters(categories=frozenset({"device_online"})),
            dry_run=True,
            out=io.StringIO(),
        )
        == 0
    )
    assert (
        await replay(
            settings,
            "rebind-failed",
            Filters(categories=frozenset({"not_found"})),
            dry_run=True,
            out=io.StringIO(),
        )
        == 1
    )

    # A dead letter replayed as it was is dead-lettered again (still unreadable), not lost.
    assert (
        await replay(
            settings,
            "dlq",
            Filters(error_codes=frozenset({"not_cloudevent"}), limit=1),
            dry_run=False,
            out=io.StringIO(),
        )
        == 1
    )
    outs = await harness.read(4)
    dead = [o for o in outs if o.topic == harness.topics.dead_letter]
    assert len(dead) == 3
    assert dead[-1].value == b"[1, 2]"
    assert [h for h, _ in dead[-1].headers].count("rebind-error-reason") == 1


async def test_a_swap_too_old_is_replayed_on_purpose_with_a_fresh_time(harness: Harness) -> None:
    """A swap dated before the ledger's retention is answered SWAP_TOO_OLD without a call;
    replayed with its own time it would be too old again (the plan says so), replayed with
    ``fresh_time`` it is applied as the device's latest swap."""
    control = harness.sim.control
    await control.seed_device("dev-old", "n-before")
    await harness.start_service()
    old = swap_event("dev-old", "n-after", event_id="evt-old", ce_time="2010-01-01T00:00:00Z")
    await harness.produce([(b"dev-old", old)])
    [failed] = await harness.read(1)
    assert failed.topic == harness.topics.rebind_failed
    assert failed.data["errorCode"] == "SWAP_TOO_OLD"
    assert failed.data["category"] == "swap_too_old"
    assert await control.calls(operation="refresh_key", device_id="dev-old") == []

    settings = kafka_only(harness)
    too_old = Filters(error_codes=frozenset({"SWAP_TOO_OLD"}))
    printed = io.StringIO()
    assert await replay(settings, "rebind-failed", too_old, dry_run=True, out=printed) == 1
    assert "SWAP_TOO_OLD again (--fresh-time" in printed.getvalue()
    now = datetime.now(UTC)
    printed = io.StringIO()
    assert (
        await replay(settings, "rebind-failed", too_old, dry_run=False, out=printed, fresh_time=now)
        == 1
    )
    assert "fresh time " + now.isoformat().replace("+00:00", "Z") in printed.getvalue()
    outs = await harness.read(2)  # every output since the start
    [updated] = [o for o in outs if o.topic == harness.topics.credential_updated]
    assert updated.data["nodeId"] == "n-after"
    puts = await control.calls(operation="refresh_key", device_id="dev-old")
    assert [c["status"] for c in puts] == [200]


async def test_a_failed_urgent_swap_is_replayed_into_the_urgent_lane(harness: Harness) -> None:
    """A swap that came by the urgent lane and failed goes back to that lane when replayed (a
    person waits on it): its original is read from the urgent topic (its context kept), the plan
    says where it goes, and the replayed swap's outcome names the urgent topic as its origin."""
    urgent_topic = await with_urgent_lane(harness)
    control = harness.sim.control
    await harness.start_service()
    swap = swap_event("dev-urgent-missing", "n-new", event_id="evt-urgent", wo="WO-9")
    await harness.produce([(b"dev-urgent-missing", swap)], topic=urgent_topic)
    [failed] = await harness.read(1)
    assert failed.topic == harness.topics.rebind_failed
    assert dict(failed.headers)[SOURCE_TOPIC_HEADER] == urgent_topic.encode()

    await control.seed_device("dev-urgent-missing", "n-old")
    printed = io.StringIO()
    missing = Filters(error_codes=frozenset({"100403"}))
    assert await replay(kafka_only(harness), "rebind-failed", missing, dry_run=False, out=printed)
    assert "original event, to the urgent lane" in printed.getvalue()
    outs = await harness.read(2)
    [updated] = [o for o in outs if o.topic == harness.topics.credential_updated]
    assert dict(updated.headers)[SOURCE_TOPIC_HEADER] == urgent_topic.encode()
    assert updated.data["swapEventId"] == replay_id(failed.json()["id"])
    assert updated.data["context"] == {"wo": "WO-9"}  # read back from the urgent topic


async def test_an_urgent_swap_replayed_after_its_lane_was_removed_goes_to_the_input(
    harness: Harness,
) -> None:
    """The urgent lane's topic deleted after the failure (the lane given up): the replayed swap
    is rebuilt from its outcome and goes to the input topic, and the plan says so; nothing is
    lost for want of the lane."""
    urgent_topic = await with_urgent_lane(harness)
    await harness.start_service()
    swap = swap_event("dev-urgent-gone", "n-new", event_id="evt-urgent-gone")
    await harness.produce([(b"dev-urgent-gone", swap)], topic=urgent_topic)
    [failed] = await harness.read(1)
    assert failed.topic == harness.topics.rebind_failed
    await harness.stop_all()
    admin = AIOKafkaAdminClient(bootstrap_servers=harness.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([urgent_topic])
    finally:
        await admin.close()
    settings = kafka_only(harness)

    async def deleted() -> bool:
        return (await partition_counts(settings.kafka, [urgent_topic]))[urgent_topic] == 0

    await wait_until(deleted, 30, "the urgent topic deleted")

    printed = io.StringIO()
    missing = Filters(error_codes=frozenset({"100403"}))
    assert await replay(settings, "rebind-failed", missing, dry_run=True, out=printed)
    assert "(no urgent lane: to the input topic)" in printed.getvalue()


def test_topic_settings_are_shared_with_the_service() -> None:
    s = KafkaOnlySettings(kafka=KafkaSettings(), topics=TopicSettings())
    assert s.topics.rebind_failed == "iot.rebind-failed.v1"
