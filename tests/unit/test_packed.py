"""Packed done entries: the ledger answers and writes exactly what it did with an object each."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.pipeline import packed
from service.pipeline.ledger import DeviceLedger, Entry, State, decode_entry, encode_entry
from service.pipeline.packed import DoneFields, PackedEntries, pack_text, unpack_text
from service.pipeline.work import WaitState

LEDGER_TOPIC = "device-rebind.ledger.v1"
UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def done_record(
    event_id: str = UUID,
    *,
    source: str = "/inventory/erp",
    node_id: str = "356938035643809",
    outcome: str | None = "credential_updated",
    order: tuple[int, int] = (1_790_000_000_000, 7),
) -> bytes:
    return encode_entry(Entry(event_id, source, order, node_id, State.DONE, outcome=outcome))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "dev-1",
        UUID,
        UUID.upper(),  # not canonical: kept as text
        "0f8fad5b-d9cb-469f-a165-70867728950",  # 35 characters
        "0f8fad5b-d9cb-469f-a165-70867728950g",
        "0f8fad5b d9cb-469f-a165-70867728950e",
        "é" * 127,
        "日本語のデバイス",
    ],
)
def test_texts_come_back_as_they_were(text: str) -> None:
    stored = pack_text(text)
    assert stored is not None
    assert unpack_text(stored) == text


def test_a_uuid_takes_17_bytes_and_a_long_or_broken_text_does_not_pack() -> None:
    assert len(pack_text(UUID) or b"") == 17
    assert pack_text("x" * 255) is None
    assert pack_text("\ud800") is None


@pytest.mark.parametrize(
    "record",
    [
        done_record(),
        done_record("ev-1", source="/inventory/test", node_id="node-a", outcome="bound"),
        done_record(outcome=None),
        done_record(order=(-5, 0)),
        done_record("e" * 300),  # does not pack: kept as an object
        done_record(node_id="\u00e9" * 200),
        done_record(source="s" * 3_000),
        done_record(order=(2**63 + 5, 1)),  # past a signed 64-bit int
    ],
)
@pytest.mark.parametrize("device", ["dev-1", UUID, "d" * 300])
def test_a_loaded_done_entry_reads_and_writes_as_the_record_it_came_from(
    record: bytes, device: str
) -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    ledger.load(device.encode(), record)
    assert len(ledger) == 1
    assert ledger.get(device) == decode_entry(record)
    assert ledger.record(device).value == record
    assert ledger.get("another") is None


def test_records_that_are_not_plain_done_entries_load_as_before() -> None:
    """A done record with fields a done entry never writes, or of other types, keeps them."""
    odd = [
        b'{"v":1,"eventId":"a","source":"s","timeMs":1,"offset":2,"nodeId":"n","state":"done",'
        b'"outcome":5}',
        b'{"v":1,"eventId":"a","source":"s","timeMs":1.5,"offset":2,"nodeId":"n","state":"done"}',
        b'{"v":1,"eventId":3,"source":"s","timeMs":1,"offset":2,"nodeId":"n","state":"done"}',
        b'{"v":1,"eventId":"a","source":"s","timeMs":1,"offset":2,"nodeId":"n","state":"done",'
        b'"early":{"result":"succeeded","atMs":1,"nodeId":"n"}}',
        b"not json",
    ]
    for value in odd:
        ledger = DeviceLedger(LEDGER_TOPIC, 0)
        ledger.load(b"dev-1", value)
        assert ledger.get("dev-1") == decode_entry(value)
        assert len(ledger) == (decode_entry(value) is not None)


def test_a_tombstone_or_an_unreadable_record_removes_a_packed_entry() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    for last in (None, b"", b"not json"):
        ledger.load(b"dev-1", done_record())
        ledger.load(b"dev-1", last)
        assert ledger.get("dev-1") is None
        assert len(ledger) == 0


def test_a_waiting_record_after_a_done_one_replaces_it_and_back() -> None:
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    ledger.load(b"dev-1", done_record())
    waiting = Entry(
        "b",
        "/inventory/erp",
        (1_790_000_001_000, 9),
        "n2",
        State.WAITING,
        wait=WaitState(5, 10, 1, 1, None, "100611", "device_online"),
        value=b"{}",
    )
    ledger.load(b"dev-1", encode_entry(waiting))
    assert ledger.waiting == 1
    assert ledger.get("dev-1") == decode_entry(encode_entry(waiting))
    assert len(ledger) == 1
    ledger.load(b"dev-1", done_record())
    assert ledger.waiting == 0
    assert ledger.pop_due(10**15, 10) == []
    assert ledger.get("dev-1") == decode_entry(done_record())
    assert len(ledger) == 1


def test_sources_past_the_bound_keep_their_entries_as_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(packed, "MAX_STRINGS", 3)
    ledger = DeviceLedger(LEDGER_TOPIC, 0)
    records = {f"dev-{i}": done_record(source=f"/src/{i}") for i in range(10)}
    for device, record in records.items():
        ledger.load(device.encode(), record)
    for device, record in records.items():
        assert ledger.get(device) == decode_entry(record)
        assert ledger.record(device).value == record
    assert len(ledger) == 10


texts = st.one_of(
    st.sampled_from(["a", "b", UUID, UUID.upper(), str(uuid.UUID(int=1))]),
    st.text(max_size=140),
)
fields = st.tuples(
    texts,
    st.sampled_from(["/a", "/b", "s" * 300]),
    st.tuples(st.integers(-(2**64), 2**64), st.integers(0, 2**40)),
    texts,
    st.sampled_from([None, "bound", "credential_updated"]),
)
operations = st.lists(
    st.tuples(st.integers(0, 40), st.none() | fields),  # None: remove the device
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.booleans())
def test_packed_entries_hold_what_a_dict_would(
    ops: list[tuple[int, DoneFields | None]], tiny: bool
) -> None:
    """Puts, replacements and removals in any order, with the table rebuilt and the blob
    rewritten as often as possible (``tiny``): every device reads back its last put."""
    original = packed._MIN_GARBAGE
    packed._MIN_GARBAGE = 0 if tiny else original  # type: ignore[misc]
    try:
        table = PackedEntries()
        model: dict[str, DoneFields] = {}
        for index, done in ops:
            device = f"dev-{index}" if index % 3 else str(uuid.UUID(int=index))
            if done is None:
                table.discard(device)
                model.pop(device, None)
            elif table.put(device, done):
                model[device] = done
            else:
                model.pop(device, None)
            assert len(table) == len(model)
        for index in range(41):
            device = f"dev-{index}" if index % 3 else str(uuid.UUID(int=index))
            assert table.get(device) == model.get(device)
    finally:
        packed._MIN_GARBAGE = original  # type: ignore[misc]
