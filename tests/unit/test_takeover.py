"""A ledger read from its end back (service.pipeline.takeover) ends as a ledger read forwards,
and knows a device exactly when its newest record has been read."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from service.pipeline.ledger import DeviceLedger, Entry, State, encode_entry
from service.pipeline.takeover import LedgerLoad, LedgerRecord
from service.pipeline.work import WaitState
from tests.unit.test_ledger import swap

DEVICES = ("a", "b", "c", "d")


def _record(device: str, n: int, kind: str) -> LedgerRecord:
    if kind == "tombstone":
        return device.encode(), None, n
    if kind == "unreadable":
        return device.encode(), b"{not json", n
    entry = Entry(f"evt-{n}", "/src", (1000 + n, n), f"node-{n}", State.DONE, outcome="ok")
    if kind == "waiting":
        entry.state = State.WAITING
        entry.wait = WaitState(
            due_ms=5000 + n,
            deadline_ms=90_000,
            deferrals=1,
            attempts=1,
            first_attempt_ms=None,
            last_code="100611",
            reason="online",
        )
        entry.value = b"{}"
    return device.encode(), encode_entry(entry), n


logs = st.lists(
    st.tuples(
        st.sampled_from(DEVICES),
        st.sampled_from(("done", "done", "waiting", "tombstone", "unreadable")),
    ),
    max_size=30,
).map(lambda picks: [_record(d, n, kind) for n, (d, kind) in enumerate(picks)])


@settings(max_examples=300, deadline=None)
@given(log=logs, chunks=st.lists(st.integers(1, 7), min_size=1, max_size=10))
def test_reading_backwards_ends_as_reading_forwards(
    log: list[LedgerRecord], chunks: list[int]
) -> None:
    # bodies_out: a waiting swap's body stays in the topic, at its record's offset, both ways
    forwards = DeviceLedger("ledger", 0, bodies_out=True)
    for key, value, offset in log:
        forwards.load(key, value, offset)
    backwards = DeviceLedger("ledger", 0, bodies_out=True)
    load = LedgerLoad(backwards, 0, len(log))
    backwards.loading = load
    step = 0
    while not load.done:
        start = max(0, load.read_from - chunks[step % len(chunks)])
        step += 1
        load.apply(log[start : load.read_from])
        load.passed(start)
        for device in DEVICES:
            newest = max(
                (i for i, (key, _, _) in enumerate(log) if key == device.encode()), default=None
            )
            # known exactly when its newest record is read (or it has none and all is read)
            expected = (newest is not None and newest >= start) or load.done
            assert load.known(device) is expected, (device, newest, start)
            if load.known(device):
                assert backwards.get(device) == forwards.get(device), device
    for device in DEVICES:
        assert backwards.get(device) == forwards.get(device), device
    assert backwards.waiting == forwards.waiting
    assert backwards.next_due_ms() == forwards.next_due_ms()


def test_held_swaps_are_released_in_order_once_their_device_is_read() -> None:
    log = [_record("a", 0, "done"), _record("b", 1, "done")]
    ledger = DeviceLedger("ledger", 0)
    load = LedgerLoad(ledger, 0, len(log))
    ledger.loading = load
    first = swap(10, event_id="e1", device="a")
    second = swap(11, event_id="e2", device="a")
    other = swap(12, event_id="e3", device="c")
    assert ledger.hold(first)
    assert ledger.hold(second)
    assert ledger.hold(other)
    load.apply(log[1:])
    load.passed(1)
    assert load.release() == []  # "b" read; "a" and "c" not yet
    assert load.known("b")
    load.apply(log[:1])
    load.passed(0)
    assert load.release() == [first, second, other]  # all read: "c" has no entry at all
    assert load.held == 0
    assert not ledger.hold(swap(13, event_id="e4", device="c"))


def test_a_device_with_a_held_swap_is_not_known_until_it_is_released() -> None:
    log = [_record("a", 0, "done")]
    ledger = DeviceLedger("ledger", 0)
    load = LedgerLoad(ledger, 0, 1)
    ledger.loading = load
    held = swap(10, event_id="e1", device="a")
    assert ledger.hold(held)
    load.apply(log)
    load.passed(0)
    assert not load.known("a")  # read, but an earlier swap of it still waits to be admitted
    assert load.release() == [held]
    assert load.known("a")
