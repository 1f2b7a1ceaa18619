"""Intake: one input record in, a swap to work on or a dead letter out.

A record is dead-lettered (unchanged: same key, value and headers, plus reason headers) when it
is not a valid device-swapped CloudEvent (:func:`service.events.decode_swap` says why), or when
its Kafka key is not its ``data.deviceId`` (``key_mismatch``): such a record sits in another
device's partition, where per-device order, the ledger and the duplicate memory cannot see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import structlog

from service.events import InvalidEvent, dead_letter_headers, decode_swap
from service.pipeline.records import OutcomeKind, Output
from service.pipeline.work import Work

log = structlog.get_logger(__name__)

KEY_MISMATCH: Final = "key_mismatch"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    output: Output
    reason: str


def order_of(work_time_ms: int | None, record_timestamp_ms: int, offset: int) -> tuple[int, int]:
    return (work_time_ms if work_time_ms is not None else record_timestamp_ms, offset)


def read_record(
    record: Any, topic: str, partition: int, dead_letter_topic: str
) -> Work | DeadLetter:
    """Decode and check one input record."""
    headers = list(record.headers or ())
    try:
        swap = decode_swap(record.value, headers)
    except InvalidEvent as exc:
        return _dead_letter(
            record, headers, topic, partition, dead_letter_topic, exc.reason, exc.detail
        )
    if record.key != swap.data.device_id.encode():
        shown = "absent" if record.key is None else f"{len(record.key)} bytes"
        return _dead_letter(
            record,
            headers,
            topic,
            partition,
            dead_letter_topic,
            KEY_MISMATCH,
            f"the record's key ({shown}) is not data.deviceId; produce swaps keyed by deviceId",
        )
    time_ms = int(swap.time.timestamp() * 1000) if swap.time is not None else None
    return Work(
        swap=swap,
        raw_value=record.value,
        raw_headers=headers,
        topic=topic,
        partition=partition,
        origin_offset=record.offset,
        order=order_of(time_ms, record.timestamp, record.offset),
        offset=record.offset,
    )


def _dead_letter(  # noqa: PLR0917 - one record's whole context
    record: Any,
    headers: list[tuple[str, bytes]],
    topic: str,
    partition: int,
    dead_letter_topic: str,
    reason: str,
    detail: str,
) -> DeadLetter:
    out_headers = dead_letter_headers(
        headers,
        reason=reason,
        detail=detail,
        topic=topic,
        partition=partition,
        offset=record.offset,
    )
    log.warning(
        "dead-lettered",
        topic=topic,
        partition=partition,
        offset=record.offset,
        reason=reason,
        detail=detail,
    )
    return DeadLetter(
        Output(
            dead_letter_topic,
            record.key,
            record.value,
            out_headers,
            outcome=OutcomeKind.DEAD_LETTERED,
        ),
        reason,
    )
