"""SharedTokenProvider without Kafka: the record codec, followers that never log in, the holder."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from service.config import KafkaSettings, PlatformSettings
from service.metrics import Metrics
from service.platform.budget import RateBudget
from service.platform.tokens import TokenError
from service.shared.shared_token import SharedTokenProvider
from service.shared.token_channel import HolderFencedError
from service.shared.token_records import (
    InvalidRecordError,
    SharedToken,
    TokenCodec,
    fingerprint,
)
from tests.support.waiting import wait_until

APP = "app-1"
SECRET = "s3cret-value"
KEY = b"group-1/app-1"


def _token(
    access: str = "tok-A",
    *,
    ttl: float = 3600,
    renew_in: float | None = None,
    sequence: int | None = None,
    issued_ago: float = 0.0,
) -> SharedToken:
    now = time.time() - issued_ago
    return SharedToken(
        access=access,
        refresh="refresh-A",
        issued_at=now,
        expires_at=now + ttl,
        renew_at=now + (renew_in if renew_in is not None else ttl - 300),
        holder="i9",
        sequence=sequence,
    )


# ---------------------------------------------------------------------- codec
def test_codec_roundtrip_and_a_fresh_nonce_per_record() -> None:
    codec = TokenCodec(APP, SECRET)
    tok = _token()
    one, two = codec.encode_token(tok, KEY), codec.encode_token(tok, KEY)
    assert one != two  # random nonce
    assert tok.access.encode() not in one
    assert SECRET.encode() not in one
    assert codec.decode_token(one, KEY) == tok
    assert "tok-A" not in repr(tok)


@pytest.mark.parametrize(
    "reader",
    [
        TokenCodec(APP, "another-secret"),  # wrong secret: wrong key
        TokenCodec("app-2", SECRET),  # another application
    ],
)
def test_a_record_under_another_key_fails_closed(reader: TokenCodec) -> None:
    value = TokenCodec(APP, SECRET).encode_token(_token(), KEY)
    with pytest.raises(InvalidRecordError):
        reader.decode_token(value, KEY)


def test_a_record_moved_to_another_record_key_or_tampered_fails_closed() -> None:
    codec = TokenCodec(APP, SECRET)
    value = codec.encode_token(_token(), KEY)
    with pytest.raises(InvalidRecordError):
        codec.decode_token(value, b"group-2/app-1")
    tampered = value[:-1] + bytes([value[-1] ^ 1])
    with pytest.raises(InvalidRecordError):
        codec.decode_token(tampered, KEY)
    for bad in (None, b"", b"\x02" + value[1:], b"\x01short"):
        with pytest.raises(InvalidRecordError):
            codec.decode_token(bad, KEY)


# ---------------------------------------------------------------------- provider
@dataclass
class FakePlatform:
    """Counts login/refreshToken calls; answers with numbered tokens."""

    ttl: int = 3600
    calls: list[str] = field(default_factory=list)
    refuse_refresh: bool = False
    """Answer refreshToken 100208 (its refresh token spent)."""

    def handler(self, request: httpx.Request) -> httpx.Response:
        op = "login" if request.url.path.endswith("/login") else "refresh_token"
        self.calls.append(op)
        if op == "refresh_token" and self.refuse_refresh:
            return httpx.Response(401, json={"error_code": "100208", "error_desc": "wrong"})
        n = len(self.calls)
        return httpx.Response(
            200,
            json={
                "accessToken": f"access-{n}",
                "refreshToken": f"refresh-{n}",
                "expiresIn": self.ttl,
                "tokenType": "bearer",
            },
        )


@dataclass
class Rig:
    platform: FakePlatform
    published: list[tuple[bytes, bytes]]
    metrics: Metrics
    make: Callable[..., SharedTokenProvider]
    codec: TokenCodec
    fence_at: list[str] = field(default_factory=list)
    """Rotation phases at which the (fake) holder producer is found fenced."""


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    platform = FakePlatform()
    published: list[tuple[bytes, bytes]] = []
    metrics = Metrics()
    budget = RateBudget(100_000, metrics=metrics)
    providers: list[SharedTokenProvider] = []
    clients: list[httpx.AsyncClient] = []

    fence_at: list[str] = []

    async def publish(key: bytes, value: bytes) -> None:
        if key == KEY + b"/rotating" and fence_at:
            phase = TokenCodec(APP, SECRET).decrypt(value, key).get("phase")
            if phase in fence_at:
                raise HolderFencedError("another replica started the holder's producer")
        published.append((key, value))

    def make(
        instance: str = "i0", *, wait: float = 0.3, takeover: float = 600, **extra: Any
    ) -> SharedTokenProvider:
        settings = PlatformSettings(
            base_url="https://iot.invalid:8743",
            app_id=APP,
            secret=SecretStr(SECRET),
            token_takeover_seconds=takeover,
            token_rotation_window_seconds=extra.pop("window", 0.1),
            **extra,
        )
        http = httpx.AsyncClient(
            base_url="https://iot.invalid:8743", transport=httpx.MockTransport(platform.handler)
        )
        clients.append(http)
        provider = SharedTokenProvider(
            settings,
            KafkaSettings(group_id="group-1", instance_id=instance),
            "token-topic",
            metrics,
            budget,
            http=http,
            wait_seconds=wait,
            publish=publish,
        )
        providers.append(provider)
        return provider

    yield Rig(platform, published, metrics, make, TokenCodec(APP, SECRET), fence_at)
    for provider in providers:
        await provider.aclose()
    for http in clients:
        await http.aclose()
    await budget.aclose()


def _gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("rebind_platform_token_valid")


def _tokens(rig: Rig) -> list[SharedToken]:
    """The token records published so far (not the notices), decoded."""
    return [rig.codec.decode_token(v, KEY) for k, v in rig.published if k == KEY]


def _notices(rig: Rig, suffix: bytes) -> list[dict[str, Any]]:
    return [rig.codec.decrypt(v, k) for k, v in rig.published if k == KEY + suffix]


async def _until(condition: Callable[[], bool], what: str = "the token to be published") -> None:
    await wait_until(condition, timeout=3, what=what)


async def test_a_follower_uses_the_shared_token_and_never_logs_in(rig: Rig) -> None:
    follower = rig.make()
    with pytest.raises(TokenError):  # nothing shared yet: it waits, then gives up (no login)
        await follower.get()
    assert _gauge(rig.metrics) == 0.0
    follower.receive(KEY, rig.codec.encode_token(_token("tok-A", sequence=1), KEY))
    assert await follower.get() == "tok-A"
    assert _gauge(rig.metrics) == 1.0

    # refused: it tells the holder (a fingerprint, not the token) and waits for another token
    waiter = asyncio.create_task(follower.invalidated("tok-A"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    follower.receive(KEY, rig.codec.encode_token(_token("tok-B", sequence=2), KEY))
    assert await waiter == "tok-B"
    assert {k for k, _ in rig.published} == {KEY + b"/need", KEY + b"/refused"}
    [(key, value)] = [(k, v) for k, v in rig.published if k.endswith(b"/refused")]
    assert b"tok-A" not in value
    assert rig.codec.decrypt(value, key)["fingerprint"] == fingerprint("tok-A")

    with pytest.raises(TokenError):  # refused and nothing newer: still no login
        await follower.invalidated("tok-B")
    assert rig.platform.calls == []


async def test_a_follower_refused_an_old_token_retries_with_the_newest_without_a_notice(
    rig: Rig,
) -> None:
    follower = rig.make()
    follower.receive(KEY, rig.codec.encode_token(_token("tok-A", sequence=1), KEY))
    token = await follower.get()
    follower.receive(KEY, rig.codec.encode_token(_token("tok-B", sequence=2), KEY))
    assert await follower.invalidated(token) == "tok-B"  # its call carried the replaced one
    assert rig.published == []  # nobody is told: the holder did nothing wrong
    assert rig.platform.calls == []


async def test_a_record_under_another_secret_is_ignored_and_logged_without_contents(
    rig: Rig,
) -> None:
    follower = rig.make()
    follower.receive(KEY, rig.codec.encode_token(_token("tok-A"), KEY))
    forged = TokenCodec(APP, "not-the-secret").encode_token(_token("tok-EVIL"), KEY)
    with capture_logs() as logs:
        follower.receive(KEY, forged, offset=7)
        follower.receive(b"group-2/app-1", forged, offset=8)  # another group's: skipped quietly
    assert await follower.get() == "tok-A"
    [entry] = logs
    assert entry["event"] == "token_record_ignored"
    assert entry["offset"] == 7
    assert "tok" not in json.dumps(entry, default=str).replace("token_record", "")


async def test_a_rotation_holds_new_calls_and_waits_for_calls_in_flight(rig: Rig) -> None:
    follower = rig.make("i1", wait=3)
    follower.receive(KEY, rig.codec.encode_token(_token("tok-A", sequence=1), KEY))
    on_the_wire = await follower.get()
    rotating = rig.codec.encrypt({"seq": 2, "by": "i0"}, KEY + b"/rotating")
    follower.receive(KEY + b"/rotating", rotating)
    # a call on the wire with the old token: it says so, the holder waits for it
    await _until(lambda: len(_notices(rig, b"/draining")) == 1, "a draining notice")
    assert _notices(rig, b"/draining")[0] == {"rotation": 2, "by": "i1", "done": False}
    waiter = asyncio.create_task(follower.get())  # a new call waits for the new token
    await asyncio.sleep(0.2)  # a while in which nothing may happen (not a synchronisation)
    assert not waiter.done()
    follower.release(on_the_wire)  # answered: the holder may rotate now
    await _until(lambda: len(_notices(rig, b"/draining")) == 2, "a done notice")
    assert _notices(rig, b"/draining")[1]["done"] is True
    follower.receive(KEY, rig.codec.encode_token(_token("tok-B", sequence=3), KEY))
    assert await waiter == "tok-B"
    # a rotation nobody finishes (the holder died): after a bound, the old token is used
    follower.receive(
        KEY + b"/rotating", rig.codec.encrypt({"seq": 4, "by": "i0"}, KEY + b"/rotating")
    )
    follower._rotation_hold = 0.3
    assert await asyncio.wait_for(follower.get(), 3) == "tok-B"
    assert rig.platform.calls == []


async def test_after_an_unfinished_rotation_one_call_tries_the_old_token_first(
    rig: Rig,
) -> None:
    """The holder announced a rotation and went quiet: its refresh may have replaced the token.
    Once the hold ends, one call tries the old token; the others wait for its answer."""
    follower = rig.make("i1", wait=3)
    follower._rotation_hold = 0.2
    follower.receive(KEY, rig.codec.encode_token(_token("tok-A", sequence=1), KEY))
    rotating = rig.codec.encrypt({"seq": 2, "by": "i0"}, KEY + b"/rotating")
    follower.receive(KEY + b"/rotating", rotating)
    probe = await asyncio.wait_for(follower.get(), 2)
    assert probe == "tok-A"
    others = [asyncio.create_task(follower.get()) for _ in range(5)]
    await asyncio.sleep(0.2)  # a while in which nothing may happen (not a synchronisation)
    assert not any(t.done() for t in others)  # waiting for the probe's answer
    follower.release(probe)  # answered, not 1010005: the token still works
    assert set(await asyncio.gather(*others)) == {"tok-A"}

    # the same with a probe answered 1010005: nobody else tries the dead token
    follower.receive(
        KEY + b"/rotating", rig.codec.encrypt({"seq": 3, "by": "i0"}, KEY + b"/rotating")
    )
    for _ in others:
        follower.release("tok-A")
    follower._confirmed = None
    follower.receive(KEY, rig.codec.encode_token(_token("tok-B", sequence=4), KEY))
    follower.receive(
        KEY + b"/rotating", rig.codec.encrypt({"seq": 5, "by": "i0"}, KEY + b"/rotating")
    )
    probe = await asyncio.wait_for(follower.get(), 2)
    assert probe == "tok-B"
    waiter = asyncio.create_task(follower.get())
    follower.release(probe, refused=True)
    retry = asyncio.create_task(follower.invalidated(probe))
    await asyncio.sleep(0.2)  # a while in which nothing may happen (not a synchronisation)
    assert not waiter.done()
    assert not retry.done()
    follower.receive(KEY, rig.codec.encode_token(_token("tok-C", sequence=6), KEY))
    assert await waiter == await retry == "tok-C"
    assert rig.platform.calls == []


async def test_the_holder_logs_in_once_and_publishes_the_token_encrypted(rig: Rig) -> None:
    holder = rig.make()
    holder.set_holder(True)
    tokens = await asyncio.gather(*(holder.get() for _ in range(20)))
    assert set(tokens) == {"access-1"}
    assert rig.platform.calls == ["login"]
    assert _gauge(rig.metrics) == 1.0
    assert rig.metrics.registry.get_sample_value("rebind_platform_token_holder") == 1.0
    await _until(lambda: len(_tokens(rig)) == 1)
    # the login was announced (and fenced) by a rotating record first
    assert [k for k, _ in rig.published] == [KEY + b"/rotating", KEY + b"/rotating", KEY]
    value = rig.published[-1][1]
    assert b"access-1" not in value
    shared = rig.codec.decode_token(value, KEY)
    assert (shared.access, shared.refresh, shared.holder) == ("access-1", "refresh-1", "i0")
    assert shared.renew_at == pytest.approx(shared.expires_at - 300, abs=1)
    for token in tokens:
        holder.release(token)

    # a follower was refused the holder's current token: it is renewed (by its refresh token)
    holder.receive(
        KEY + b"/refused",
        rig.codec.encrypt({"fingerprint": fingerprint("access-1")}, KEY + b"/refused"),
    )
    await _until(lambda: len(_tokens(rig)) == 2)
    assert rig.platform.calls == ["login", "refresh_token"]
    assert _tokens(rig)[1].access == "access-2"
    assert (_tokens(rig)[1].sequence or 0) > (_tokens(rig)[0].sequence or 0)


async def test_the_holder_renews_only_once_its_calls_in_flight_are_answered(rig: Rig) -> None:
    holder = rig.make(window=0.1, wait=3)
    holder.set_holder(True)
    token = await holder.get()
    await _until(lambda: len(_tokens(rig)) == 1)
    follower_busy = rig.codec.encrypt(
        {"rotation": 99, "by": "i1", "done": False}, KEY + b"/draining"
    )
    holder.receive(
        KEY + b"/refused", rig.codec.encrypt({"fingerprint": fingerprint(token)}, KEY + b"/refused")
    )
    await _until(lambda: holder.holder.rotating, "the rotation to start")
    seq = _notices(rig, b"/rotating")[-1]["seq"]
    holder.receive(KEY + b"/draining", follower_busy)  # another rotation's: ignored
    busy = rig.codec.encrypt({"rotation": seq, "by": "i1", "done": False}, KEY + b"/draining")
    holder.receive(KEY + b"/draining", busy)
    await asyncio.sleep(0.3)  # a while in which nothing may happen (not a synchronisation)
    assert rig.platform.calls == ["login"]  # its own call and i1's are still on the wire
    holder.release(token)
    await asyncio.sleep(0.2)  # a while in which nothing may happen (not a synchronisation)
    assert rig.platform.calls == ["login"]  # i1's still is
    done = rig.codec.encrypt({"rotation": seq, "by": "i1", "done": True}, KEY + b"/draining")
    holder.receive(KEY + b"/draining", done)
    await _until(lambda: len(_tokens(rig)) == 2)
    assert rig.platform.calls == ["login", "refresh_token"]


async def test_a_spent_refresh_token_leads_to_one_fenced_login(rig: Rig) -> None:
    rig.platform.refuse_refresh = True
    holder = rig.make()
    holder.receive(KEY, rig.codec.encode_token(_token("tok-A", renew_in=0, sequence=3), KEY))
    holder.set_holder(True)
    await _until(lambda: "access-2" in [t.access for t in _tokens(rig)])
    assert rig.platform.calls == ["refresh_token", "login"]
    # each platform call came right after a rotating record (the fence), never two in a row
    keys = [k.removeprefix(KEY) for k, _ in rig.published]
    assert keys.count(b"/rotating") >= 4


async def test_a_new_holder_adopts_a_valid_token_and_claims_it_without_logging_in(
    rig: Rig,
) -> None:
    provider = rig.make()
    provider.receive(KEY, rig.codec.encode_token(_token("tok-A", sequence=4), KEY))
    provider.set_holder(True)
    assert await provider.get() == "tok-A"
    await _until(lambda: len(_tokens(rig)) == 1)
    claim = _tokens(rig)[0]
    assert (claim.access, claim.holder, claim.sequence) == ("tok-A", "i0", 5)
    assert rig.platform.calls == []


async def test_a_new_holder_renews_an_expired_token_with_its_refresh_token(rig: Rig) -> None:
    provider = rig.make()
    provider.receive(KEY, rig.codec.encode_token(_token("tok-A", ttl=-5, renew_in=-10), KEY))
    provider.set_holder(True)
    assert await provider.get() == "access-1"
    assert rig.platform.calls == ["refresh_token"]


async def test_after_an_unfinished_rotation_the_new_holder_logs_in(rig: Rig) -> None:
    """The previous holder announced a rotation and died: its refresh may have replaced the
    token and spent the refresh token, so the new holder must not use that refresh token."""
    provider = rig.make()
    provider.receive(KEY, rig.codec.encode_token(_token("tok-A", sequence=4), KEY))
    rotating = rig.codec.encrypt({"seq": 5, "by": "i9"}, KEY + b"/rotating")
    provider.receive(KEY + b"/rotating", rotating)
    provider.set_holder(True)
    assert await provider.get() == "access-1"
    assert rig.platform.calls == ["login"]
    assert (_tokens(rig)[-1].sequence or 0) > 5


async def test_an_announced_rotation_without_a_call_costs_the_next_holder_no_login(
    rig: Rig,
) -> None:
    """The previous holder announced a rotation but stopped before its call: the token and its
    refresh token are intact, the new holder adopts them."""
    provider = rig.make()
    provider.receive(KEY, rig.codec.encode_token(_token("tok-A", sequence=4), KEY))
    announce = {"seq": 5, "by": "i9", "phase": "announce"}
    provider.receive(KEY + b"/rotating", rig.codec.encrypt(announce, KEY + b"/rotating"))
    provider.set_holder(True)
    assert await provider.get() == "tok-A"
    await _until(lambda: len(_tokens(rig)) == 1)
    assert _tokens(rig)[0].access == "tok-A"  # its claim ends the followers' hold
    assert rig.platform.calls == []


async def test_a_holder_fenced_right_before_its_call_makes_none(rig: Rig) -> None:
    rig.fence_at.append("call")
    holder = rig.make(wait=2)
    holder.receive(KEY, rig.codec.encode_token(_token("tok-A", renew_in=0, sequence=3), KEY))
    holder.set_holder(True)
    await _until(lambda: holder.fenced == 1, "the holder to find itself fenced")
    assert rig.platform.calls == []  # the budget granted the call; the fence stopped it
    assert not holder.is_holder
    assert _tokens(rig) == []  # it published nothing
    assert await holder.get() == "tok-A"  # it follows: the token is still the shared one
    assert (
        rig.metrics.registry.get_sample_value(
            "rebind_platform_token_rotations_total", {"result": "fenced"}
        )
        == 1
    )


async def test_a_starving_follower_takes_over_only_when_no_holder_is_heard(rig: Rig) -> None:
    heard = rig.make("i1", wait=1.5, takeover=1)
    heard.receive(KEY + b"/rotating", rig.codec.encrypt({"seq": 1, "by": "i0"}, KEY + b"/rotating"))
    with pytest.raises(TokenError):  # a holder is alive (it just announced): no takeover yet
        await heard.get()
    assert heard.takeovers == 0

    follower = rig.make("i2", wait=5, takeover=1)
    results = await asyncio.gather(*(follower.get() for _ in range(10)))
    assert set(results) == {"access-1"}
    assert rig.platform.calls == ["login"]
    assert follower.takeovers == 1
    assert follower.is_holder


async def test_a_cancelled_waiter_is_not_left_running(rig: Rig) -> None:
    follower = rig.make(wait=30)
    waiter = asyncio.create_task(follower.get())
    await asyncio.sleep(0.05)
    # the token arrives in the same loop turn as the cancellation: the cancellation still wins
    follower.receive(KEY, rig.codec.encode_token(_token("tok-A"), KEY))
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 2)


async def test_a_holder_without_a_token_logs_in_only_when_someone_needs_one(rig: Rig) -> None:
    holder = rig.make()
    holder.set_holder(True)
    await _until(lambda: holder.is_holder, "the holder to be ready")
    await asyncio.sleep(0.1)
    assert rig.platform.calls == []  # nobody asked: a wrong secret shows at the first swap
    holder.receive(KEY + b"/need", rig.codec.encrypt({"by": "i1"}, KEY + b"/need"))
    await _until(lambda: len(_tokens(rig)) == 1)
    assert rig.platform.calls == ["login"]
    assert _tokens(rig)[0].access == "access-1"


# ---------------------------------------------------------------------- replays (issue 11, item 2)
async def test_a_follower_ignores_a_record_older_than_the_token_it_holds(rig: Rig) -> None:
    follower = rig.make(wait=0.3)
    captured = rig.codec.encode_token(_token("tok-OLD", sequence=4, issued_ago=600), KEY)
    follower.receive(KEY, captured, offset=1)
    follower.receive(KEY, rig.codec.encode_token(_token("tok-NEW", sequence=5), KEY), offset=2)
    with capture_logs() as logs:
        follower.receive(KEY, captured, offset=3)  # the captured record, written again
    assert await follower.get() == "tok-NEW"
    assert follower.stale_records == 1
    [entry] = [e for e in logs if e["event"] == "token_record_stale"]
    assert (entry["offset"], entry["record_sequence"], entry["held_sequence"]) == (3, 4, 5)
    assert "tok" not in json.dumps(entry, default=str).replace("token_record", "")
    # a record of the same sequence but issued later (a second publisher that had seen the
    # same records) is newer; without sequences (an earlier version) the issue time decides
    later = rig.codec.encode_token(_token("tok-LATER", sequence=5, issued_ago=-1), KEY)
    follower.receive(KEY, later, offset=4)
    assert await follower.get() == "tok-LATER"
    follower.receive(KEY, rig.codec.encode_token(_token("tok-V0", issued_ago=60), KEY), offset=5)
    assert await follower.get() == "tok-LATER"
    assert rig.platform.calls == []


async def test_the_holder_answers_a_replay_with_its_current_token(rig: Rig) -> None:
    holder = rig.make()
    holder.set_holder(True)
    assert await holder.get() == "access-1"
    await _until(lambda: len(_tokens(rig)) == 1)
    own = next(v for k, v in rig.published if k == KEY)
    holder.receive(KEY, own, offset=0)  # its own record, read back
    first = rig.codec.decode_token(own, KEY).sequence
    replay = rig.codec.encode_token(_token("tok-OLD", sequence=0, issued_ago=600), KEY)
    holder.receive(KEY, replay, offset=1)
    await _until(lambda: len(_tokens(rig)) == 2)
    again = _tokens(rig)[1]
    assert again.access == "access-1"  # the same token, a newer record
    assert first is not None
    assert again.sequence is not None
    assert again.sequence > first
    assert rig.platform.calls == ["login"]  # republished, not renewed


async def test_the_holder_republishes_when_a_follower_is_refused_an_older_token(
    rig: Rig,
) -> None:
    holder = rig.make("i0")
    holder.set_holder(True)
    assert await holder.get() == "access-1"
    await _until(lambda: len(_tokens(rig)) == 1)
    # A follower that started late: the topic's last record was an old token (a replay that
    # compaction kept), so that is what it holds.
    follower = rig.make("i1", wait=3)
    follower.receive(KEY, rig.codec.encode_token(_token("tok-OLD", sequence=0), KEY))
    waiter = asyncio.create_task(follower.invalidated("tok-OLD"))  # the platform said 1010005
    [(key, notice)] = await _published_with(rig, b"/refused")
    holder.receive(key, notice)
    await _until(lambda: len(_tokens(rig)) == 2)
    follower.receive(KEY, [v for k, v in rig.published if k == KEY][-1])
    assert await waiter == "access-1"
    assert rig.platform.calls == ["login"]  # the holder's token was fine: no new login


async def _published_with(rig: Rig, suffix: bytes) -> list[tuple[bytes, bytes]]:
    await _until(lambda: any(k.endswith(suffix) for k, _ in rig.published))
    return [(k, v) for k, v in rig.published if k.endswith(suffix)]


# ---------------------------------------------------------------------- republish (issue 19.7)
async def _holder_with_token(rig: Rig) -> SharedTokenProvider:
    holder = rig.make("i0")
    holder.set_holder(True)
    assert await holder.get() == "access-1"
    await _until(lambda: len(_tokens(rig)) == 1)
    holder.release("access-1")
    return holder


async def test_the_holder_answers_a_need_notice_by_republishing_its_token(rig: Rig) -> None:
    """A restarting follower found no usable token record (lost, compacted to a bad one): its
    /need is answered with the current token at once, not after the takeover grace."""
    holder = await _holder_with_token(rig)
    holder.receive(KEY + b"/need", rig.codec.encrypt({"by": "i1"}, KEY + b"/need"))
    await _until(lambda: len(_tokens(rig)) == 2, "the token republished for the need")
    first, again = _tokens(rig)
    assert again.access == "access-1"  # the same token, a newer record
    assert (again.sequence or 0) > (first.sequence or 0)
    assert again.holder == "i0"
    assert rig.platform.calls == ["login"]  # republished, not renewed


@pytest.mark.parametrize(
    "value",
    [
        None,  # a tombstone: the token record is gone
        TokenCodec(APP, "not-the-secret").encode_token(_token("tok-EVIL"), KEY),
        b"\x01garbage",
    ],
    ids=["tombstone", "another-secret", "garbage"],
)
async def test_the_holder_republishes_over_an_unreadable_token_record(
    rig: Rig, value: bytes | None
) -> None:
    """The topic's last token record does not decrypt: compaction would keep it and every
    replica starting later would read nothing usable. The holder writes its token again."""
    holder = await _holder_with_token(rig)
    with capture_logs() as logs:
        holder.receive(KEY, value, offset=9)
        await _until(lambda: len(_tokens(rig)) == 2, "the token republished")
    assert _tokens(rig)[1].access == "access-1"
    assert rig.platform.calls == ["login"]
    [ignored] = [e for e in logs if e["event"] == "token_record_ignored"]
    assert ignored["action"] == "republish"
    assert "tok" not in json.dumps(logs, default=str).replace("token_", "")


async def test_a_flood_of_needs_and_unreadable_records_cannot_make_the_holder_write_in_a_loop(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.shared.token_holder.REPUBLISH_MIN_SECONDS", 0.5)
    holder = await _holder_with_token(rig)
    need = rig.codec.encrypt({"by": "i1"}, KEY + b"/need")
    holder.receive(KEY + b"/need", need)
    await _until(lambda: len(_tokens(rig)) == 2, "the first answer")
    for n in range(200):  # a flood: notices and unreadable records, right after the answer
        holder.receive(KEY + b"/need", need)
        holder.receive(KEY, b"\x01garbage", offset=100 + n)
    await _until(lambda: len(_tokens(rig)) == 3, "one more answer, after the interval")
    await asyncio.sleep(0.8)  # a while in which nothing may happen (not a synchronisation)
    assert len(_tokens(rig)) == 3  # the flood cost one record, not 400
    assert rig.platform.calls == ["login"]


async def test_a_follower_does_not_republish_an_unreadable_record(rig: Rig) -> None:
    follower = rig.make("i1")
    follower.receive(KEY, rig.codec.encode_token(_token("tok-A", sequence=1), KEY))
    follower.receive(KEY, None, offset=3)
    follower.receive(KEY + b"/need", rig.codec.encrypt({"by": "i2"}, KEY + b"/need"))
    await asyncio.sleep(0.2)  # a while in which nothing may happen (not a synchronisation)
    assert rig.published == []  # only the holder writes token records
