"""Poison input mixed into the stream: every bad record is dead-lettered with a reason, byte for
byte, and every good event still gets its outcome."""

from __future__ import annotations

import random
import uuid
from typing import Any

import orjson
import pytest

from service.events import INVALID_REASONS, SWAPPED_TYPE
from tests.faults.conftest import FaultKit
from tests.support.accounting import produce_inputs
from tests.support.events import swap_event

pytestmark = [pytest.mark.slow, pytest.mark.integration]

GOOD = 600


def _event(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(swap_event("dev-poison", "node-poison"))
    body.update(changes)
    return body


def _with_data(**data: Any) -> bytes:
    body = _event()
    body["data"] = {**body["data"], **data}
    return orjson.dumps(body)


def poison_values() -> list[tuple[str, bytes | None, list[tuple[str, bytes]]]]:
    """(what, value, headers) of records the service must not obey."""
    no_device = _event()
    del no_device["data"]["deviceId"]
    no_node = _event()
    del no_node["data"]["nodeId"]
    no_data = _event()
    del no_data["data"]
    text = swap_event("dev-enc", "nöde-é").decode()
    return [
        ("not json", b"{not json", []),
        ("truncated json", swap_event("d", "n")[:40], []),
        ("json array", b"[1, 2, 3]", []),
        ("json string", b'"device.swapped"', []),
        ("wrong event type", orjson.dumps(_event(type="com.example.other.v1")), []),
        ("wrong specversion", orjson.dumps(_event(specversion="0.3")), []),
        (
            "no specversion",
            orjson.dumps({k: v for k, v in _event().items() if k != "specversion"}),
            [],
        ),
        ("data not an object", orjson.dumps(_event(data=[1, 2])), []),
        ("missing deviceId", orjson.dumps(no_device), []),
        ("missing nodeId", orjson.dumps(no_node), []),
        ("missing data", orjson.dumps(no_data), []),
        ("nodeId wrong type", _with_data(nodeId=12345), []),
        ("timeout wrong type", _with_data(timeout="soon"), []),
        ("timeout negative", _with_data(timeout=-1), []),
        ("timeout too large", _with_data(timeout=2_147_483_648), []),
        ("deviceId too long", _with_data(deviceId="d" * 257), []),
        ("nodeId too long", _with_data(nodeId="n" * 5000), []),
        ("verifyCode empty", _with_data(verifyCode=""), []),
        ("latin-1 bytes", text.encode("latin-1"), []),
        ("utf-16", text.encode("utf-16"), []),
        ("invalid utf-8", b'{"specversion": "1.0", "id": "\xff\xfe"}', []),
        ("empty value", b"", []),
        ("tombstone", None, []),
        ("wrong content-type", swap_event("d", "n"), [("content-type", b"text/plain")]),
        (
            "binary mode, data not json",
            b"\x00\x01",
            [("ce_specversion", b"1.0"), ("ce_type", SWAPPED_TYPE.encode())],
        ),
        ("oversized context", _with_data(blob="x" * 900_000, deviceId="d" * 300), []),
    ]


@pytest.mark.timeout(300)
async def test_poison_is_dead_lettered_and_good_events_flow(fault_kit: FaultKit) -> None:
    rng = random.Random()
    devices = await fault_kit.seed(GOOD)
    reader = await fault_kit.start_reader()
    await fault_kit.start_in_process(instance="x0", max_concurrency=32)

    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]], Any]] = []
    for d in devices:
        event_id = str(uuid.uuid4())
        node = f"new-{d}"
        records.append(
            (d.encode(), swap_event(d, node, event_id=event_id), [], (event_id, d, node))
        )
    poison = poison_values() * 2
    for what, value, headers in poison:
        # Poison shares keys (so partitions) with good events, sitting in front of them.
        key = rng.choice(devices).encode() if rng.random() < 0.7 else what.encode()
        records.insert(rng.randrange(len(records) + 1), (key, value, headers, None))
    inputs = await produce_inputs(
        fault_kit.harness.bootstrap, fault_kit.harness.topics.device_swapped, records
    )
    sent = {(r.partition, r.offset): rec for r, rec in zip(inputs.records, records, strict=True)}

    await reader.wait_for(len(inputs), timeout=120)
    accounting = await fault_kit.finish("poison", inputs)
    dead = [o for o in reader.records if o.topic == fault_kit.harness.topics.dead_letter]
    reasons: dict[str, int] = {}
    for rec in dead:
        reason = rec.header("rebind-error-reason")
        assert reason in INVALID_REASONS, f"dead letter without a known reason: {rec.headers}"
        assert rec.header("rebind-error-detail")
        reasons[reason] = reasons.get(reason, 0) + 1
        source = (
            int(rec.header("rebind-source-partition") or -1),
            int(rec.header("rebind-source-offset") or -1),
        )
        sent_key, sent_value, sent_headers, meta = sent[source]
        assert meta is None, f"a good event was dead-lettered: {rec.headers}"
        assert (rec.key, rec.value) == (sent_key, sent_value), "the dead letter is not the original"
        for header in sent_headers:
            assert header in rec.headers
    print(f"poison: {len(dead)} dead letters by reason {dict(sorted(reasons.items()))}")
    assert len(dead) == len(poison)
    assert accounting.details["by_topic"]["iot.credential-updated.v1"] == GOOD
    accounting.assert_clean()
    # Nothing of the poison reached the platform.
    puts = await fault_kit.control.calls(operation="refresh_key")
    assert len({c["device_id"] for c in puts}) == GOOD
