"""Intake: one input record in, a swap to work on or a dead letter out.

A record is dead-lettered (unchanged: same key, value and headers, plus reason headers; a record
just under the size limit whose reason headers take it over has its value cut to fit and its
size in a header) when it
is not a valid device-swapped CloudEvent (:func:`service.events.decode_swap` says why), or when
its Kafka key is not its ``data.deviceId`` (``key_mismatch``): such a record sits in another
device's partition, where per-device order, the ledger and the duplicate memory cannot see it;
or when its CloudEvent ``time`` lies more than ``REBIND_KAFKA__MAX_CLOCK_SKEW_SECONDS`` after the
record's timestamp (``clock_skew``): the latest ``time`` wins, so a swap dated far ahead would
make every later real swap of its device ``SUPERSEDED`` until that date.

Sizes (``max_bytes``, ``REBIND_KAFKA__MAX_INPUT_BYTES``): no record the service writes may be
larger, so

* a record larger than that (key, value once decompressed, headers) is dead-lettered
  ``too_large`` as a record that points at it: its source topic, partition and offset and its
  size in headers, and as much of its value as fits (:func:`too_large`);
* a swap too large to be kept as it is in the ledger while it waits (the ledger stores it base64
  encoded, see :func:`ledger_room`) carries a compact copy of itself instead, with its context
  trimmed (:func:`service.events.encode_swap`) and a header saying so; its outcome says
  ``contextTruncated`` when it comes out of the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import structlog

from service.events import (
    CONTENT_TYPE,
    CONTEXT_TRUNCATED_HEADER,
    DEFAULT_MAX_RECORD_BYTES,
    ORIGINAL_SIZE_HEADER,
    InvalidEvent,
    dead_letter_headers,
    decode_swap,
    encode_swap,
    record_size,
)
from service.partitioner import Partitioner, partition_for
from service.pipeline.records import ConsumedRecord, OutcomeKind, Output
from service.pipeline.work import Work

log = structlog.get_logger(__name__)

FORWARDED_FROM_HEADER: Final = "rebind-forwarded-from"
"""On an input record the service forwarded to its key's partition: ``topic/partition/offset``
of the misrouted original."""
KEY_MISMATCH: Final = "key_mismatch"
CLOCK_SKEW: Final = "clock_skew"
TOO_LARGE: Final = "too_large"
LEDGER_OVERHEAD_BYTES: Final = 32_768
"""What a ledger record holds besides the swap (ids, source, times, field names), at most."""
KEPT_KEY_BYTES: Final = 4096
KEPT_HEADER_BYTES: Final = 16_384
"""A ``too_large`` dead letter keeps the record's key and headers up to these sizes."""
_COMPACT_HEADERS: Final = [
    ("content-type", CONTENT_TYPE.encode()),
    (CONTEXT_TRUNCATED_HEADER, b"true"),
]


COMPACT_HEADERS: Final = _COMPACT_HEADERS
"""The headers of a compact copy of a swap (its context trimmed)."""


def ledger_room(max_bytes: int) -> int:
    """The largest swap (value and headers) the ledger keeps as it is: its record holds it base64
    encoded (4/3 of its size) and must stay within ``max_bytes``."""
    return (max_bytes - LEDGER_OVERHEAD_BYTES) * 3 // 4


def trimmed_for_ledger(work: Work) -> bool:
    """True for a swap rebuilt from the ledger's compact copy of it (its context was trimmed)."""
    return work.offset is None and any(
        name == CONTEXT_TRUNCATED_HEADER for name, _ in work.raw_headers
    )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    output: Output
    reason: str


@dataclass(frozen=True, slots=True)
class Forward:
    """A misrouted swap: it sits on another partition than its key hashes to (by
    ``REBIND_KAFKA__PARTITIONER``). Its copy goes to the right partition of the input topic, in
    the transaction that finishes the original; the owner of that partition works on it."""

    output: Output
    right: int
    producer: str
    """Who produced it, as far as the record says (the CloudEvent ``source``): for the log."""


@dataclass(frozen=True, slots=True)
class Routing:
    """How the input is partitioned: the partitioner and the input's partition count."""

    partitioner: Partitioner
    partitions: int


def order_of(work_time_ms: int | None, record_timestamp_ms: int, offset: int) -> tuple[int, int]:
    return (work_time_ms if work_time_ms is not None else record_timestamp_ms, offset)


def read_record(
    record: ConsumedRecord,
    topic: str,
    partition: int,
    dead_letter_topic: str,
    *,
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_clock_skew_ms: int | None = None,
    routing: Routing | None = None,
) -> Work | DeadLetter | Forward:
    """Decode and check one input record; ``max_bytes``: the record size limit;
    ``max_clock_skew_ms``: how far the event's ``time`` may lie after the record's timestamp
    (None: no bound); ``routing``: check that the record sits on its key's partition (None: no
    check)."""
    headers = list(record.headers or ())
    size = record_size(record.key, record.value, headers)
    if size > max_bytes:
        return too_large(record, headers, topic, partition, dead_letter_topic, size, max_bytes)
    try:
        swap = decode_swap(record.value, headers, max_bytes=max_bytes)
    except InvalidEvent as exc:
        return _dead_letter(
            record,
            headers,
            topic,
            partition,
            dead_letter_topic,
            exc.reason,
            exc.detail,
            max_bytes=max_bytes,
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
            max_bytes=max_bytes,
        )
    time_ms = int(swap.time.timestamp() * 1000) if swap.time is not None else None
    if (
        time_ms is not None
        and max_clock_skew_ms is not None
        and time_ms - record.timestamp > max_clock_skew_ms
    ):
        ahead = (time_ms - record.timestamp) / 1000
        return _dead_letter(
            record,
            headers,
            topic,
            partition,
            dead_letter_topic,
            CLOCK_SKEW,
            f"the event's time lies {ahead:.0f} s after the record's timestamp, more than "
            f"{max_clock_skew_ms / 1000:g} s (REBIND_KAFKA__MAX_CLOCK_SKEW_SECONDS): it would "
            "decide the order of the device's swaps; fix the producer's clock and send the swap "
            "again with a correct time (a replay keeps this time)",
            max_bytes=max_bytes,
        )
    if routing is not None:
        right = partition_for(record.key, routing.partitions, routing.partitioner)
        if right != partition:
            forwarded = [v for k, v in headers if k == FORWARDED_FROM_HEADER]
            if not forwarded:
                origin = f"{topic}/{partition}/{record.offset}".encode()
                return Forward(
                    Output(
                        topic,
                        record.key,
                        record.value,
                        [*headers, (FORWARDED_FROM_HEADER, origin)],
                        partition=right,
                        timestamp_ms=record.timestamp,
                    ),
                    right,
                    swap.source,
                )
            # forwarded once already: the replicas disagree about the partitioner (a rollout),
            # or the partition count changed. Worked on here rather than sent round again.
            log.warning(
                "forwarded_input_misrouted",
                action="worked on here",
                topic=topic,
                partition=partition,
                offset=record.offset,
                expected_partition=right,
                partitioner=routing.partitioner,
            )
    raw_value, raw_headers = record.value, headers
    room = ledger_room(max_bytes)
    if size > room:  # the ledger could not keep it as it is, should it wait: a compact copy
        raw_headers = list(_COMPACT_HEADERS)
        raw_value = encode_swap(swap, max_bytes=room - record_size(None, None, raw_headers))
    return Work(
        swap=swap,
        raw_value=raw_value,
        raw_headers=raw_headers,
        topic=topic,
        partition=partition,
        origin_offset=record.offset,
        order=order_of(time_ms, record.timestamp, record.offset),
        offset=record.offset,
    )


def too_large(  # noqa: PLR0917 - one record's whole context
    record: ConsumedRecord,
    headers: list[tuple[str, bytes]],
    topic: str,
    partition: int,
    dead_letter_topic: str,
    size: int,
    max_bytes: int,
) -> DeadLetter:
    """The dead letter of a record over the size limit: a record that points at it (source topic,
    partition and offset, and its size, in headers) and carries as much of its value as fits,
    with its key and headers when they are small."""
    notes: list[str] = []
    key = record.key
    if key is not None and len(key) > KEPT_KEY_BYTES:
        notes.append(f"its key ({len(key)} bytes) is left out")
        key = None
    kept = headers
    if record_size(None, None, headers) > KEPT_HEADER_BYTES:
        notes.append(f"its {len(headers)} headers are left out")
        kept = []
    value = record.value or b""

    def detail(carried: int) -> str:
        return (
            f"the record is {size} bytes, over the limit of {max_bytes} "
            f"(REBIND_KAFKA__MAX_INPUT_BYTES); this dead letter carries the first {carried} of "
            f"its {len(value)} value bytes"
            + "".join(f"; {note}" for note in notes)
            + f"; the record is at {topic} partition {partition} offset {record.offset} while "
            "the topic keeps it"
        )

    def out_headers(carried: int) -> list[tuple[str, bytes]]:
        return [
            *dead_letter_headers(
                kept,
                reason=TOO_LARGE,
                detail=detail(carried),
                topic=topic,
                partition=partition,
                offset=record.offset,
            ),
            (ORIGINAL_SIZE_HEADER, str(size).encode()),
        ]

    # the headers with the whole value's length are the largest they can be
    value = value[: max(0, max_bytes - record_size(key, None, out_headers(len(value))))]
    log.warning(
        "dead_lettered",
        topic=topic,
        partition=partition,
        offset=record.offset,
        reason=TOO_LARGE,
        detail=detail(len(value)),
    )
    return DeadLetter(
        Output(
            dead_letter_topic,
            key,
            value,
            out_headers(len(value)),
            outcome=OutcomeKind.DEAD_LETTERED,
        ),
        TOO_LARGE,
    )


def _dead_letter(  # noqa: PLR0917 - one record's whole context
    record: ConsumedRecord,
    headers: list[tuple[str, bytes]],
    topic: str,
    partition: int,
    dead_letter_topic: str,
    reason: str,
    detail: str,
    *,
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> DeadLetter:
    """The record as it was, with the reason headers. A record within the limit whose reason
    headers take it over (a few hundred bytes) carries as much of its value as fits, and its
    size in a header, as a ``too_large`` dead letter does: no record written is over the limit."""
    value = record.value

    def reasons(said: str) -> list[tuple[str, bytes]]:
        return dead_letter_headers(
            headers,
            reason=reason,
            detail=said,
            topic=topic,
            partition=partition,
            offset=record.offset,
        )

    out_headers = reasons(detail)
    if record_size(record.key, value, out_headers) > max_bytes:
        size = str(record_size(record.key, value, headers)).encode()
        detail += f"; the value is cut to fit the limit of {max_bytes} with these headers"
        out_headers = [*reasons(detail), (ORIGINAL_SIZE_HEADER, size)]
        value = (value or b"")[: max(0, max_bytes - record_size(record.key, None, out_headers))]
    log.warning(
        "dead_lettered",
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
            value,
            out_headers,
            outcome=OutcomeKind.DEAD_LETTERED,
        ),
        reason,
    )
