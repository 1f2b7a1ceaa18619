"""Large ledgers, fast: ``done`` ledger records written straight into a ledger partition with
the service's own encoder, in record batches built by hand (no future per record), so a
million-device partition takes seconds to build rather than a service run."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer

from service.pipeline.ledger import Entry, State, encode_entry

SOURCE = "/inventory/fleet"


def done_record(
    device: str, *, event_id: str | None = None, time_ms: int | None = None, offset: int = 0
) -> tuple[bytes, bytes]:
    """The (key, value) of a ``done`` ledger record of ``device`` (a swap answered
    credential-updated, dated ``time_ms``: now by default)."""
    entry = Entry(
        event_id or str(uuid.uuid4()),
        SOURCE,
        (time_ms if time_ms is not None else int(time.time() * 1000), offset),
        f"{uuid.uuid4().int % 10**15:015d}",
        State.DONE,
        outcome="credential_updated",
    )
    return device.encode(), encode_entry(entry)


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def filler(
    count: int, *, time_ms: int | None = None, seed: int = 20
) -> Iterable[tuple[bytes, bytes]]:
    """``count`` done records of distinct devices with UUID-shaped deviceIds and event ids and
    a 15-digit nodeId (no swap of them is ever sent: which input partition their keys hash to
    does not matter)."""
    at = time_ms if time_ms is not None else int(time.time() * 1000)
    rng = random.Random(seed)
    for n in range(count):
        entry = Entry(
            _uuid(rng),
            SOURCE,
            (at, n),
            f"{rng.getrandbits(50) % 10**15:015d}",
            State.DONE,
            outcome="credential_updated",
        )
        yield _uuid(rng).encode(), encode_entry(entry)


async def write_ledger(
    bootstrap: str, topic: str, partition: int, records: Iterable[tuple[bytes, bytes]]
) -> int:
    """Append ``records`` to ``topic``'s ``partition`` (non-transactional: committed at once
    for ``read_committed`` readers); returns how many were written."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, max_batch_size=1024 * 1024, max_request_size=2 * 1024 * 1024
    )
    await producer.start()
    written = 0
    try:
        pending = []
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:
                pending.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
            written += 1
            if len(pending) >= 32:
                for future in pending:
                    await future
                pending.clear()
        if batch.record_count():
            pending.append(await producer.send_batch(batch, topic, partition=partition))
        for future in pending:
            await future
    finally:
        await producer.stop()
    return written
