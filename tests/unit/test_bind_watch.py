"""The bind watch's pure parts: when to poll, when to give up, near expiry, the ledger record."""

from __future__ import annotations

from pydantic import SecretStr, ValidationError

from service.bind.listener import listener_path, subscription_url
from service.bind.watch import WatchPolicy, near_expiry
from service.config import BindSettings
from service.pipeline.ledger import Entry, State, decode_entry, encode_entry

POLICY = WatchPolicy.from_settings(
    BindSettings(
        poll=True,
        poll_initial_seconds=10,
        poll_max_seconds=40,
        watch_deadline_seconds=3600,
        expiry_grace_seconds=30,
    )
)
T0 = 1_800_000_000_000


def test_a_non_zero_timeout_expires_with_the_platform_plus_a_grace() -> None:
    watch = POLICY.start(T0, 300)
    assert watch.expires
    assert watch.expires_at_ms == T0 + 300_000
    assert watch.deadline_ms == T0 + 330_000
    assert watch.next_poll_ms == T0 + 10_000


def test_timeout_zero_is_watched_until_the_watch_deadline() -> None:
    watch = POLICY.start(T0, 0)
    assert not watch.expires
    assert watch.expires_at_ms is None
    assert watch.deadline_ms == T0 + 3_600_000


def test_polls_double_up_to_the_maximum_and_never_pass_the_deadline() -> None:
    watch = POLICY.start(T0, 60)
    gaps = []
    now = watch.next_poll_ms
    assert now is not None
    for _ in range(6):
        watch = POLICY.after_poll(watch, now)
        assert watch.next_poll_ms is not None
        gaps.append(watch.next_poll_ms - now)
        now = watch.next_poll_ms
    assert gaps[:2] == [20_000, 40_000]  # doubling from 10 s, capped at 40 s
    assert max(gaps) <= 40_000
    assert now <= watch.deadline_ms
    assert watch.polls == 6


def test_without_polling_only_the_deadline_is_due() -> None:
    policy = WatchPolicy.from_settings(BindSettings(poll=False))
    watch = policy.start(T0, 120)
    assert watch.next_poll_ms is None
    assert watch.due_ms == watch.deadline_ms


def test_near_expiry_is_the_last_fifth_of_a_non_zero_timeout() -> None:
    watch = POLICY.start(T0, 100)
    assert not near_expiry(watch, T0 + 79_000)
    assert near_expiry(watch, T0 + 80_000)
    assert not near_expiry(POLICY.start(T0, 0), T0 + 10**9)  # timeout 0 never expires


def test_a_watching_entry_round_trips_through_its_ledger_record() -> None:
    entry = Entry(
        "evt-1",
        "/inventory/x",
        (T0, 42),
        "node-new",
        State.WATCHING,
        outcome="credential_updated",
        watch=POLICY.start(T0, 300),
        early=("succeeded", T0 + 5, "node-new"),
        value=b'{"swap": 1}',
        headers=[("trace", b"\x00\x01")],
    )
    back = decode_entry(encode_entry(entry))
    assert back == entry
    assert back is not None
    assert entry.watch is not None
    assert back.due_ms == entry.watch.next_poll_ms


SECRET = "s3-Zr4r2m0d3f7pQx9sK1vB8"


def test_the_callback_url_keeps_its_port_even_the_default_one() -> None:
    """The platform requires the port in a callback URL; a URL type would drop ':443'."""
    bind = BindSettings(
        callback_url="https://rebind.example.com:443/platform/bind",
        path_secret=SecretStr(SECRET),
    )
    assert subscription_url(bind) == f"https://rebind.example.com:443/platform/bind/{SECRET}"
    assert listener_path(bind) == f"/platform/bind/{SECRET}"
    for bad in ("https://rebind.example.com/bind", "ftp://h:21/x", "https://h:443/x?y=1"):
        try:
            BindSettings(callback_url=bad)
        except ValidationError:
            continue
        raise AssertionError(f"{bad} was accepted")
