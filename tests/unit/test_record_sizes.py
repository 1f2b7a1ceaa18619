"""No record the service writes exceeds the size limit (issue 11, item 4), without Kafka: the
intake's ``too_large`` dead letter, trimmed outcome contexts, the compact copy of a large waiting
swap in the ledger, the duplicate memory's copy of an outcome."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from service.config import KafkaSettings
from service.events import (
    CONTEXT_TRUNCATED_HEADER,
    DEFAULT_MAX_RECORD_BYTES,
    DLQ_REASON_HEADER,
    ORIGINAL_SIZE_HEADER,
    SwapData,
    credential_updated,
    decode_swap,
    encode_swap,
    parse_outcome,
    rebind_failed,
    record_size,
    trim_context,
)
from service.pipeline.committer import MAX_REQUEST_BYTES, fits
from service.pipeline.dedupe import DedupeIndex
from service.pipeline.intake import DeadLetter, ledger_room, read_record, trimmed_for_ledger
from service.pipeline.ledger import DeviceLedger
from service.pipeline.records import Output
from service.pipeline.work import WaitState, Work
from tests.support.events import swap_event

LIMIT = DEFAULT_MAX_RECORD_BYTES
NOW = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)


@dataclass(frozen=True)
class Rec:
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    offset: int = 7
    timestamp: int = 1_764_000_000_000


def _swap(size: int, device: str = "dev-1", **fields: Any) -> bytes:
    base = len(device) + len(swap_event(device, "n-1", event_id="e-1", blob="", **fields))
    return swap_event(device, "n-1", event_id="e-1", blob="x" * (size - base), **fields)


def test_the_limit_is_the_default_and_below_the_request_size() -> None:
    assert KafkaSettings().max_input_bytes == LIMIT
    assert LIMIT <= MAX_REQUEST_BYTES - 64 * 1024
    with pytest.raises(ValueError, match="less than or equal"):
        KafkaSettings(max_input_bytes=LIMIT + 1)


@pytest.mark.parametrize("size", [LIMIT + 1, 1024 * 1024, 2 * 1024 * 1024])
def test_an_input_over_the_limit_is_a_pointer_that_fits(size: int) -> None:
    value = _swap(size)
    record = Rec(b"dev-1", value, (("trace", b"t-1"),))
    dead = read_record(record, "in", 3, "dlq")
    assert isinstance(dead, DeadLetter)
    assert dead.reason == "too_large"
    out = dead.output
    headers = dict(out.headers)
    assert headers[DLQ_REASON_HEADER] == b"too_large"
    assert (
        headers[ORIGINAL_SIZE_HEADER]
        == str(record_size(b"dev-1", value, [("trace", b"t-1")])).encode()
    )
    assert headers["rebind-source-partition"] == b"3"
    assert headers["rebind-source-offset"] == b"7"
    assert headers["trace"] == b"t-1"
    assert out.key == b"dev-1"
    assert out.value is not None
    assert value.startswith(out.value)
    assert record_size(out.key, out.value, out.headers) <= LIMIT
    assert record_size(out.key, out.value, out.headers) > LIMIT - 2048  # as much as fits
    assert str(len(out.value)).encode() in headers["rebind-error-detail"]
    assert fits(out)


def test_a_huge_key_and_huge_headers_are_left_out_of_the_pointer() -> None:
    record = Rec(b"k" * 10_000, b"v" * 10, tuple((f"h{i}", b"x" * 1000) for i in range(2000)))
    dead = read_record(record, "in", 0, "dlq")
    assert isinstance(dead, DeadLetter)
    out = dead.output
    assert out.key is None
    assert out.value == b"v" * 10
    assert not any(name.startswith("h") for name, _ in out.headers)
    detail = dict(out.headers)["rebind-error-detail"]
    assert b"key (10000 bytes) is left out" in detail
    assert b"2000 headers are left out" in detail
    assert record_size(out.key, out.value, out.headers) <= LIMIT


def test_an_outcome_whose_context_does_not_fit_is_trimmed_and_says_so() -> None:
    swap = decode_swap(_swap(LIMIT - 100, small="kept", order=[1, 2]), [])
    event = credential_updated(
        swap, verify_code="n-1", timeout=0, attempts=1, source="/rebind", time=NOW
    )
    assert len(event.value) <= LIMIT - 16_384
    parsed = parse_outcome(event.value)
    assert parsed.data.context_truncated is True
    assert parsed.data.context == {"small": "kept", "order": [1, 2]}  # the big field is left out
    failed = rebind_failed(
        swap,
        error_code="100403",
        error_desc="d" * 5000,
        http_status=404,
        category="not_found",
        recommended_handling="r" * 5000,
        attempts=1,
        first_attempt_at=NOW,
        last_attempt_at=NOW,
        source="/rebind",
        time=NOW,
        max_bytes=200_000,
    )
    assert len(failed.value) <= 200_000 - 16_384
    assert parse_outcome(failed.value).data.context_truncated is True


def test_an_outcome_that_fits_is_unchanged() -> None:
    swap = decode_swap(swap_event("dev-1", "n-1", event_id="e-1", workOrderId="WO-1"), [])
    event = credential_updated(
        swap, verify_code="n-1", timeout=0, attempts=1, source="/rebind", time=NOW
    )
    data = orjson.loads(event.value)["data"]
    assert data["context"] == {"workOrderId": "WO-1"}
    assert "contextTruncated" not in data


def test_trim_context_keeps_the_smallest_fields_in_order() -> None:
    context = {"a": "x" * 100, "b": 1, "c": "y" * 10, "d": None}
    assert trim_context(context, 10_000) == (context, False)
    kept, trimmed = trim_context(context, 40)
    assert trimmed
    assert list(kept) == ["b", "c", "d"]
    assert len(orjson.dumps(kept)) <= 40
    assert trim_context(context, 0) == ({}, True)


def test_a_swap_too_large_for_the_ledger_keeps_a_compact_copy_of_itself() -> None:
    value = _swap(LIMIT - 100, appId="rebind-partner-app", timeout=30, previousNodeId="n-0")
    work = read_record(Rec(b"dev-1", value), "in", 0, "dlq")
    assert isinstance(work, Work)
    assert work.swap.context["blob"]  # worked on with the whole context
    assert work.raw_value != value
    assert work.raw_value is not None
    assert record_size(None, work.raw_value, work.raw_headers) <= ledger_room(LIMIT)
    assert (CONTEXT_TRUNCATED_HEADER, b"true") in work.raw_headers
    assert not trimmed_for_ledger(work)  # a fresh swap: its outcome has the whole context
    copy = decode_swap(work.raw_value, work.raw_headers)
    assert copy.model_dump(exclude={"data"}) == work.swap.model_dump(exclude={"data"})
    known = set(SwapData.model_fields)
    assert copy.data.model_dump(include=known) == work.swap.data.model_dump(include=known)
    assert "blob" not in copy.data.context
    assert copy.context["previousNodeId"] == "n-0"

    ledger = DeviceLedger("ledger", 0)
    ledger.admit(work)
    assert ledger.wait(work, WaitState(1, 2, 1, 1, None, "100611", "device_online"))
    record = ledger.record("dev-1")
    assert record_size(record.key, record.value, record.headers) <= LIMIT
    assert fits(record)


def test_a_swap_that_fits_the_ledger_is_kept_as_it_is() -> None:
    value = _swap(ledger_room(LIMIT) - 100)
    work = read_record(Rec(b"dev-1", value), "in", 0, "dlq")
    assert isinstance(work, Work)
    assert work.raw_value == value
    ledger = DeviceLedger("ledger", 0)
    ledger.admit(work)
    assert ledger.wait(work, WaitState(1, 2, 1, 1, None, "100611", "device_online"))
    record = ledger.record("dev-1")
    assert record_size(record.key, record.value, record.headers) <= LIMIT


def test_the_duplicate_memory_copy_of_the_largest_outcome_fits() -> None:
    long_source = "/" + "s" * 2047
    swap = decode_swap(_swap(LIMIT - 100, device="d" * 256, source=long_source), [])
    event = credential_updated(
        swap, verify_code="n-1", timeout=0, attempts=1, source="/rebind", time=NOW
    )
    outcome = Output(
        "iot.credential-updated.v1",
        event.key,
        event.value,
        [*event.headers, ("rebind-source-topic", b"t" * 249), ("rebind-source-offset", b"9" * 19)],
    )
    assert record_size(outcome.key, outcome.value, outcome.headers) <= LIMIT
    stored = DedupeIndex("device-rebind.dedupe.v1", 0, 10).record(swap.source, swap.id, outcome, 12)
    assert record_size(stored.key, stored.value, stored.headers) <= LIMIT


def test_encode_swap_reads_back_and_respects_its_bound() -> None:
    swap = decode_swap(
        swap_event("dev-1", "n-1", event_id="e-1", ce_time="2026-11-25T09:30:00.123456+05:30"), []
    )
    again = decode_swap(encode_swap(swap, max_bytes=10_000), [])
    assert again == swap
    assert len(encode_swap(swap, max_bytes=10)) > 10  # the attributes are never cut
