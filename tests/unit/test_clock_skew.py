"""Time is bounded: a swap dated too far after its record's timestamp is dead-lettered
``clock_skew`` (issue 19, item 3), so it can never decide the order of a device's swaps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from service.config import KafkaSettings
from service.events import DLQ_REASON_HEADER, INVALID_REASONS
from service.pipeline.dedupe import DedupeIndex
from service.pipeline.intake import CLOCK_SKEW, DeadLetter, read_record
from service.pipeline.ledger import DeviceLedger
from service.pipeline.partition_core import PartitionCore
from service.pipeline.progress import PartitionProgress
from service.pipeline.records import OutcomeKind
from service.pipeline.work import Work
from tests.support.events import swap_event
from tests.support.records import FakeRecord

T0 = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)
SKEW_MS = 300_000


def _record(offset: int, ahead: timedelta, *, timestamp_ms: int = T0_MS) -> FakeRecord:
    when = T0 + ahead
    value = swap_event("dev-1", f"node-{offset}", ce_time=when.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return FakeRecord(offset, b"dev-1", value, timestamp_ms)


def test_a_swap_dated_past_the_skew_is_dead_lettered_with_its_own_reason() -> None:
    read = read_record(
        _record(0, timedelta(seconds=301)), "in", 0, "dlq", max_clock_skew_ms=SKEW_MS
    )
    assert isinstance(read, DeadLetter)
    assert read.reason == CLOCK_SKEW == "clock_skew"
    assert CLOCK_SKEW in INVALID_REASONS
    headers = dict(read.output.headers)
    assert headers[DLQ_REASON_HEADER] == b"clock_skew"
    assert b"REBIND_KAFKA__MAX_CLOCK_SKEW_SECONDS" in headers["rebind-error-detail"]


@pytest.mark.parametrize("ahead", [timedelta(seconds=300), timedelta(0), timedelta(days=-400)])
def test_a_swap_within_the_skew_or_in_the_past_is_worked_on(ahead: timedelta) -> None:
    read = read_record(_record(0, ahead), "in", 0, "dlq", max_clock_skew_ms=SKEW_MS)
    assert isinstance(read, Work)


def test_the_default_skew_is_300_seconds_and_bounded() -> None:
    assert KafkaSettings().max_clock_skew_seconds == 300
    with pytest.raises(ValueError, match="max_clock_skew_seconds"):
        KafkaSettings(max_clock_skew_seconds=0)


class _Answers:
    def superseded(self, work: Work, newer_event_id: str) -> object:  # pragma: no cover
        raise AssertionError("no swap may be superseded here")

    def rebound(self, *args: object) -> object:  # pragma: no cover
        raise AssertionError

    def bind_failed(self, *args: object) -> object:  # pragma: no cover
        raise AssertionError


def test_a_swap_dated_centuries_ahead_no_longer_blocks_its_device() -> None:
    """The partition core is given the bound: the swap from the year 2400 is dead-lettered, and
    the device's next real swap is worked on (before: SUPERSEDED, forever)."""
    core = PartitionCore(
        topic="in",
        partition=0,
        dead_letter_topic="dlq",
        progress=PartitionProgress(None, None),
        ledger=DeviceLedger("ledger", 0),
        dedupe=DedupeIndex("dedupe", 0, 100),
        answers=_Answers(),  # type: ignore[arg-type]
        max_clock_skew_ms=SKEW_MS,
    )
    future = swap_event("dev-1", "node-x", ce_time="2400-01-01T00:00:00Z")
    assert core.intake(FakeRecord(0, b"dev-1", future, T0_MS)) is None
    commit = core.take_commit()
    assert commit is not None
    assert commit.counts == [OutcomeKind.DEAD_LETTERED]
    assert core.ledger.get("dev-1") is None
    real = core.intake(_record(1, timedelta(seconds=60), timestamp_ms=T0_MS + 60_000))
    assert isinstance(real, Work)
