"""Fuzzing the intake (issue 11, item 10): every record gets exactly one disposition.

Property, for any record of :func:`tests.support.intake_corpus.records` (arbitrary bytes,
arbitrary JSON, CloudEvents with random field types, sizes, unicode, nesting and headers, in
binary and structured mode, with random keys):

* :func:`service.pipeline.intake.read_record` returns a :class:`Work` or a :class:`DeadLetter`
  and raises nothing;
* a dead letter carries a reason from the closed set (``INVALID_REASONS``, which includes
  ``key_mismatch``), the record's key, value and headers unchanged, and the reason headers; or,
  for a record over the size limit (``too_large``), a prefix of its value and its size;
* a swap is keyed by its deviceId, and it can always be answered: both outcome events build,
  parse back as the contract's models, and its ledger and duplicate-memory records encode;
* every record the intake leads to (dead letter, outcomes, the ledger's copy of a waiting swap,
  the duplicate memory's copy of an outcome) stays within the record size limit, so the
  producer always takes it (the corpus has values up to 2 MiB).
* :func:`service.events.decode_swap` raises nothing but :class:`InvalidEvent`, whatever its size
  bound.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.events import (
    DEFAULT_MAX_RECORD_BYTES,
    DLQ_REASON_HEADER,
    INVALID_REASONS,
    ORIGINAL_SIZE_HEADER,
    SOURCE_OFFSET_HEADER,
    InvalidEvent,
    credential_updated,
    decode_swap,
    parse_outcome,
    rebind_failed,
    record_size,
)
from service.pipeline.committer import fits
from service.pipeline.dedupe import DedupeIndex
from service.pipeline.intake import KEY_MISMATCH, TOO_LARGE, DeadLetter, read_record
from service.pipeline.ledger import DeviceLedger, decode_entry
from service.pipeline.records import Output
from service.pipeline.work import WaitState, Work
from tests.support.intake_corpus import FuzzRecord, records

# The corpus holds values up to 2 MiB: their repr in a failing example is long, and that is fine.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

DLQ = "in.dlq"
LIMIT = DEFAULT_MAX_RECORD_BYTES
NOW = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)

EXAMPLES = int(os.environ.get("INTAKE_FUZZ_EXAMPLES", "600"))
"""Examples per property (``INTAKE_FUZZ_EXAMPLES=50000`` for a long run)."""
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_the_closed_set_of_reasons_includes_key_mismatch() -> None:
    assert KEY_MISMATCH in INVALID_REASONS


@FUZZ
@given(records())
def test_every_record_gets_exactly_one_disposition(record: FuzzRecord) -> None:
    result = read_record(record, "in", 0, DLQ)

    assert isinstance(result, Work | DeadLetter)
    if isinstance(result, DeadLetter):
        _check_dead_letter(record, result)
    else:
        _check_swap(record, result)


def _fits(output: Output) -> None:
    assert record_size(output.key, output.value, output.headers) <= LIMIT
    assert fits(output)


def _check_dead_letter(record: FuzzRecord, dead: DeadLetter) -> None:
    assert dead.reason in INVALID_REASONS
    out = dead.output
    _fits(out)
    headers = dict(out.headers)
    assert headers[DLQ_REASON_HEADER] == dead.reason.encode()
    assert headers[SOURCE_OFFSET_HEADER] == str(record.offset).encode()
    if dead.reason == TOO_LARGE:
        size = record_size(record.key, record.value, record.headers)
        assert size > LIMIT
        assert headers[ORIGINAL_SIZE_HEADER] == str(size).encode()
        assert (record.value or b"").startswith(out.value or b"")
        return
    kept = [h for h in record.headers if not h[0].lower().startswith("rebind-")]
    assert (out.topic, out.key) == (DLQ, record.key)
    if out.value != record.value:  # within the limit, but not with the reason headers
        assert out.headers[-1] == (ORIGINAL_SIZE_HEADER, str(record_size(*_kvh(record))).encode())
        assert (record.value or b"").startswith(out.value or b"")
        assert [h for h in out.headers[:-6] if not h[0].lower().startswith("rebind-")] == kept
        return
    assert out.value == record.value
    assert [h for h in out.headers[:-5] if not h[0].lower().startswith("rebind-")] == kept


def _kvh(record: FuzzRecord) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    return record.key, record.value, list(record.headers)


def _check_swap(record: FuzzRecord, work: Work) -> None:
    swap = work.swap
    assert record.key == swap.data.device_id.encode()
    assert work.raw_value == record.value or work.raw_headers != list(record.headers)
    updated = credential_updated(
        swap, verify_code=swap.data.node_id, timeout=0, attempts=1, source="/rebind", time=NOW
    )
    failed = rebind_failed(
        swap,
        error_code="100403",
        error_desc="The device is not existed.",
        http_status=404,
        category="not_found",
        recommended_handling="check the deviceId",
        attempts=1,
        first_attempt_at=NOW,
        last_attempt_at=NOW,
        source="/rebind",
        time=NOW,
    )
    for event in (updated, failed):
        parsed = parse_outcome(event.value)
        assert parsed.data.device_id == swap.data.device_id
        if parsed.data.context_truncated:
            assert parsed.data.context.items() <= swap.context.items()
        else:
            assert parsed.data.context == swap.context
        _fits(Output("out", event.key, event.value, event.headers))
    # the ledger (a waiting swap keeps the input itself) and the duplicate memory encode it
    ledger = DeviceLedger("ledger", 0)
    ledger.admit(work)
    wait = WaitState(1, 2, 1, 1, None, "100611", "device_online")
    assert ledger.wait(work, wait)
    stored_entry = ledger.record(work.device)
    _fits(stored_entry)
    assert stored_entry.value is not None
    entry = decode_entry(stored_entry.value)
    assert entry is not None
    assert (entry.value, entry.headers) == (work.raw_value, work.raw_headers)
    if work.raw_value != record.value:  # a compact copy: the same swap, maybe less context
        copy = decode_swap(work.raw_value, work.raw_headers)
        assert (copy.id, copy.source, copy.data.node_id) == (
            swap.id,
            swap.source,
            swap.data.node_id,
        )
        assert copy.data.context.items() <= swap.data.context.items()
    index = DedupeIndex("dedupe", 0, 10)
    outcome = Output("iot.credential-updated.v1", updated.key, updated.value, updated.headers)
    stored = index.record(swap.source, swap.id, outcome, work.origin_offset)
    assert index.seen(swap.source, swap.id) is not None
    _fits(stored)


@FUZZ
@given(records(), st.integers(min_value=0, max_value=2_000_000))
def test_decode_swap_raises_nothing_but_invalid_event(record: FuzzRecord, limit: int) -> None:
    reason = None
    try:
        decode_swap(record.value, list(record.headers), max_bytes=limit)
    except InvalidEvent as exc:
        reason = exc.reason
    assert reason is None or reason in INVALID_REASONS


def test_an_invalid_record_at_the_limit_is_cut_to_fit_with_its_reason_headers() -> None:
    """Found by the fuzz property: a record within the limit that is not a CloudEvent, whose
    five reason headers take its dead letter 1 byte over the limit. It keeps its reason and
    key; its value is cut to fit, and its size is in a header (as for ``too_large``)."""
    value = b"{" + b"x" * (LIMIT - 3) + b"}"  # key (1 byte) + value = the limit, not JSON
    record = FuzzRecord(key=b"0", value=value, headers=())
    assert record_size(*_kvh(record)) == LIMIT
    dead = read_record(record, "in", 0, DLQ)
    assert isinstance(dead, DeadLetter)
    assert dead.reason != TOO_LARGE
    _check_dead_letter(record, dead)
    assert dead.output.value is not None
    assert len(dead.output.value) < len(value)
