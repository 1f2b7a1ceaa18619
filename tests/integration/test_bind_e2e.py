"""Knowing that the new hardware bound (issue 13), end to end: the service, a real broker and the
simulator, which pushes bindDevice notifications and answers activation queries."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trustme
from aiokafka.partitioner import DefaultPartitioner
from pydantic import SecretStr

from service.bind.listener import BindListener
from service.config import BindSettings
from service.metrics import Metrics
from tests.fixtures.kafka import INPUT_PARTITIONS
from tests.fixtures.service import Harness
from tests.support.accounting import OutcomeReader
from tests.support.events import Received, swap_event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

PATH_SECRET = "p-8d1e0c5b-Qm3xT7vKz2Lw9"  # 25 url-safe characters: over 128 bits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def push_settings(**overrides: Any) -> BindSettings:
    port = _free_port()
    return BindSettings(
        **{
            "callback_url": f"http://127.0.0.1:{port}/platform/bind",
            "host": "127.0.0.1",
            "port": port,
            "path_secret": SecretStr(PATH_SECRET),
            "allow_plain_http": True,  # loopback
            "poll": False,
            **overrides,
        }
    )


def poll_settings(**overrides: Any) -> BindSettings:
    return BindSettings(
        **{"poll": True, "poll_initial_seconds": 0.3, "poll_max_seconds": 0.6, **overrides}
    )


async def _bind_outcomes(harness: Harness, count: int, timeout: float = 60) -> list[Received]:
    return await harness.read(
        count,
        topics=[harness.topics.device_rebound, harness.topics.rebind_failed],
        timeout=timeout,
    )


async def _subscribed(harness: Harness) -> None:
    async def done() -> bool:
        return bool(await harness.sim.control.subscriptions())

    await wait_until(done, timeout=30, what="the bindDevice subscription")


async def test_a_bind_is_learned_from_the_platforms_push(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-push", "old-push", connect_after_refresh=0.5)
    service = await harness.start_service(bind=push_settings())
    await _subscribed(harness)
    [sub] = await control.subscriptions()
    assert sub["notify_type"] == "bindDevice"
    assert sub["callback_url"].endswith(f"/platform/bind/{PATH_SECRET}")
    await harness.produce([(b"dev-push", swap_event("dev-push", "new-push", event_id="e-push"))])

    [updated] = await harness.read(1)
    [rebound] = await _bind_outcomes(harness, 1)

    assert updated.topic == harness.topics.credential_updated
    assert rebound.topic == harness.topics.device_rebound
    data = rebound.data
    assert data["deviceId"] == "dev-push"
    assert data["nodeId"] == "new-push"
    assert data["swapEventId"] == "e-push"
    assert data["via"] == "push"
    assert 0 <= data["secondsToBind"] < 30
    assert rebound.json()["type"] == "com.iot.device.rebound.v1"
    assert await control.calls(operation="query_activation") == []  # no polling needed
    metrics = service.metrics.registry
    assert metrics.get_sample_value("rebind_bind_results_total", {"result": "bound_push"}) == 1
    assert metrics.get_sample_value("rebind_bind_notifications_total", {"result": "accepted"}) == 1


async def test_a_bind_is_learned_by_polling_when_no_push_can_arrive(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-poll", "old-poll", connect_after_refresh=1.5)
    await harness.start_service(bind=poll_settings())
    await harness.produce([(b"dev-poll", swap_event("dev-poll", "new-poll", event_id="e-poll"))])

    [rebound] = await _bind_outcomes(harness, 1)

    assert rebound.topic == harness.topics.device_rebound
    assert rebound.data["via"] == "poll"
    assert rebound.data["secondsToBind"] >= 1.0
    polls = await control.calls(operation="query_activation", device_id="dev-poll")
    assert len(polls) >= 2  # not bound at the first poll(s), bound at the last
    assert await control.subscriptions() == []  # no callback URL: no subscription


async def test_a_device_that_does_not_bind_in_time_is_reported_expired(harness: Harness) -> None:
    """With a non-zero timeout the platform deletes the registration: the swap ends with
    BIND_EXPIRED (learned from the platform's 'expired' push), after its credential-updated."""
    control = harness.sim.control
    await control.seed_device("dev-exp", "old-exp")
    await harness.start_service(bind=push_settings())
    await _subscribed(harness)
    await harness.produce(
        [(b"dev-exp", swap_event("dev-exp", "new-exp", event_id="e-exp", timeout=2))]
    )

    [failed] = await _bind_outcomes(harness, 1)

    assert failed.topic == harness.topics.rebind_failed
    assert failed.data["errorCode"] == "BIND_EXPIRED"
    assert failed.data["category"] == "bind_expired"
    assert "regist" in failed.data["recommendedHandling"].lower()
    outcomes = await harness.read(
        2, topics=[harness.topics.credential_updated, harness.topics.rebind_failed]
    )
    # one credential-updated, then (in a later transaction) the bind failure: both committed
    assert sorted(o.topic for o in outcomes) == sorted(
        [harness.topics.credential_updated, harness.topics.rebind_failed]
    )


async def test_expiry_is_found_by_polling_too(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-exp2", "old-exp2")
    await harness.start_service(bind=poll_settings(expiry_grace_seconds=0.5))
    await harness.produce(
        [(b"dev-exp2", swap_event("dev-exp2", "new-exp2", event_id="e-exp2", timeout=2))]
    )

    [failed] = await _bind_outcomes(harness, 1)

    assert failed.data["errorCode"] == "BIND_EXPIRED"


async def test_a_watch_that_sees_no_bind_gives_up_as_not_confirmed(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-quiet", "old-quiet")
    await harness.start_service(bind=poll_settings(watch_deadline_seconds=2))
    await harness.produce([(b"dev-quiet", swap_event("dev-quiet", "new-quiet", timeout=0))])

    [failed] = await _bind_outcomes(harness, 1)

    assert failed.data["errorCode"] == "BIND_NOT_CONFIRMED"
    assert failed.data["category"] == "bind_unconfirmed"


async def test_repeated_and_late_pushes_are_harmless(harness: Harness) -> None:
    control = harness.sim.control
    await control.seed_device("dev-rep", "old-rep", connect_after_refresh=0.3)
    await control.push_behaviour(copies=3)  # every push arrives three times
    service = await harness.start_service(bind=push_settings())
    await _subscribed(harness)
    await harness.produce([(b"dev-rep", swap_event("dev-rep", "new-rep", event_id="e-rep"))])
    [rebound] = await _bind_outcomes(harness, 1)
    assert rebound.data["via"] == "push"
    # a late, out-of-order 'expired' for the same device after the bind changes nothing
    await control.send_notification(
        {
            "notifyType": "bindDevice",
            "deviceId": "dev-rep",
            "resultCode": "expired",
            "deviceInfo": {"nodeId": "new-rep"},
        }
    )
    # and a push that names no nodeId proves nothing: counted apart, settles nothing
    await control.send_notification(
        {"notifyType": "bindDevice", "deviceId": "dev-rep", "resultCode": "expired"}
    )
    metrics = service.metrics.registry

    def count(result: str) -> float:
        value = metrics.get_sample_value("rebind_bind_notifications_total", {"result": result})
        return value or 0.0

    await wait_until(
        lambda: count("duplicate") >= 3 and count("unproven") >= 1,
        timeout=30,
        what="repeats seen as duplicates, the push without a nodeId as unproven",
    )
    outs = await _bind_outcomes(harness, 1)
    assert len(outs) == 1  # still exactly one bind outcome
    assert metrics.get_sample_value("rebind_bind_results_total", {"result": "bound_push"}) == 1
    print(
        "bind pushes that settled nothing: "
        + ", ".join(f"{r}={count(r):g}" for r in ("duplicate", "unproven", "accepted"))
        + "; bind outcomes: 1"
    )


async def test_a_late_push_about_the_old_hardware_does_not_settle_the_newer_swap(
    harness: Harness,
) -> None:
    """Issue 19.1, end to end: swap 1 (n1) is watched; its hardware binds but the push is lost;
    swap 2 (n2) replaces it and waits for the online device; swap 1's push arrives late. Before
    the fix it was kept (without its nodeId) and settled swap 2's watch as soon as n2 was
    refreshed: ``device.rebound via=push`` for hardware that never bound."""
    control = harness.sim.control
    topics = harness.topics
    await control.seed_device("dev-late", "old-late")
    reader = OutcomeReader(harness.bootstrap, [*harness.output_topics, topics.device_rebound])
    await reader.start()
    try:
        service = await harness.start_service(
            bind=push_settings(),
            online_retry_initial_seconds=0.5,
            online_retry_max_seconds=1.0,
        )
        await _subscribed(harness)
        metrics = service.metrics.registry

        def count(result: str) -> float:
            value = metrics.get_sample_value("rebind_bind_notifications_total", {"result": result})
            return value or 0.0

        def outcomes(topic: str) -> list[Received]:
            return [r for r in reader.records if r.topic == topic]

        def bound_2() -> list[Received]:
            return [
                r for r in outcomes(topics.device_rebound) if r.data["swapEventId"] == "e-late-2"
            ]

        await harness.produce(
            [(b"dev-late", swap_event("dev-late", "n1-late", event_id="e-late-1"))]
        )
        await wait_until(
            lambda: len(outcomes(topics.credential_updated)) == 1, 60, "swap 1 refreshed"
        )
        # n1's hardware connects (the device binds, ONLINE); the platform's push is lost.
        await control.drop_pushes(1)
        await control.set_status("dev-late", "ONLINE")
        await harness.produce(
            [
                (
                    b"dev-late",
                    swap_event(
                        "dev-late",
                        "n2-late",
                        event_id="e-late-2",
                        ce_time="2026-11-25T09:40:00Z",
                    ),
                )
            ]
        )

        def waiting() -> bool:
            return (metrics.get_sample_value("rebind_deferred_events") or 0) >= 1

        await wait_until(waiting, 30, "swap 2 waiting for the online device")
        # swap 1's push, late: it names n1
        await control.send_notification(
            {
                "notifyType": "bindDevice",
                "deviceId": "dev-late",
                "resultCode": "succeeded",
                "deviceInfo": {"nodeId": "n1-late"},
            }
        )
        await wait_until(lambda: count("accepted") >= 1, 30, "the late push stored")
        await control.set_status("dev-late", "OFFLINE")  # swap 2 can go: n2 is refreshed
        await wait_until(
            lambda: len(outcomes(topics.credential_updated)) == 2, 60, "swap 2 refreshed"
        )
        await wait_until(
            lambda: count("duplicate") >= 1 or bound_2(),
            30,
            "the late push counted as settling nothing (or a bind outcome)",
        )
        # (swap 1's watch ended BIND_NOT_CONFIRMED when swap 2 replaced it: right)
        settled_by_late_push = [
            r
            for r in outcomes(topics.device_rebound) + outcomes(topics.rebind_failed)
            if r.data.get("swapEventId") == "e-late-2"
        ]
        print(
            f"late push about the old hardware: duplicate={count('duplicate'):g} "
            f"bind outcomes before n2 bound={len(settled_by_late_push)}"
        )
        assert not settled_by_late_push, [r.data for r in settled_by_late_push]

        await control.connect("dev-late")  # n2's hardware connects: the platform pushes
        await wait_until(bound_2, 60, "swap 2 bound")
        [rebound] = outcomes(topics.device_rebound)
        assert rebound.data["swapEventId"] == "e-late-2"
        assert rebound.data["nodeId"] == "n2-late"
        assert rebound.data["via"] == "push"
    finally:
        await reader.stop()


async def test_malformed_pushes_get_a_4xx_and_a_metric(harness: Harness) -> None:
    bind = push_settings()
    service = await harness.start_service(bind=bind)
    url = f"http://127.0.0.1:{bind.port}/platform/bind/{PATH_SECRET}"
    async with httpx.AsyncClient() as client:
        bad_json = await client.post(url, content=b"{not json")
        wrong_type = await client.post(url, json={"notifyType": "deviceAdded", "deviceId": "d"})
        bad_id = await client.post(
            url, json={"notifyType": "bindDevice", "deviceId": "..", "resultCode": "succeeded"}
        )
        wrong_path = await client.post(
            f"http://127.0.0.1:{bind.port}/platform/bind/guess",
            json={"notifyType": "bindDevice", "deviceId": "d", "resultCode": "succeeded"},
        )
    assert [r.status_code for r in (bad_json, wrong_type, bad_id)] == [400, 400, 400]
    assert wrong_path.status_code == 404
    rejected = service.metrics.registry.get_sample_value(
        "rebind_bind_notifications_total", {"result": "rejected"}
    )
    assert rejected == 3
    assert service.readiness()[0]  # nothing crashed


async def test_a_push_received_by_another_replica_reaches_the_owner_of_the_device(
    harness: Harness,
) -> None:
    """Two replicas, each with its own listener: the push is sent to the one that does not own
    the device's partition; it stores it on Kafka and the owner correlates it."""
    control = harness.sim.control
    await control.seed_device("dev-far", "old-far")
    first_bind, second_bind = push_settings(), push_settings()
    first = await harness.start_service(instance="a", bind=first_bind)
    second = await harness.start_service(instance="b", bind=second_bind)
    await wait_until(
        lambda: (
            bool(first.pipeline.assigned())
            and bool(second.pipeline.assigned())
            and len(first.pipeline.assigned()) + len(second.pipeline.assigned()) == 3
        ),
        timeout=60,
        what="both replicas own partitions",
    )
    await harness.produce([(b"dev-far", swap_event("dev-far", "new-far", event_id="e-far"))])
    await harness.read(1)
    partition = _input_partition(b"dev-far")
    owns = {tp.partition for tp in first.pipeline.assigned()}
    other = second_bind if partition in owns else first_bind
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"http://127.0.0.1:{other.port}/platform/bind/{PATH_SECRET}",
            json={
                "notifyType": "bindDevice",
                "deviceId": "dev-far",
                "resultCode": "succeeded",
                "deviceInfo": {"nodeId": "new-far", "status": "ONLINE"},
            },
        )
    assert answer.status_code == 200

    [rebound] = await _bind_outcomes(harness, 1)
    assert rebound.data["deviceId"] == "dev-far"
    assert rebound.data["via"] == "push"


def _input_partition(key: bytes) -> int:
    """The input partition of a key, as the producers' default partitioner chooses it."""
    partitions = list(range(INPUT_PARTITIONS))
    return int(DefaultPartitioner()(key, partitions, partitions))


async def test_a_push_acknowledged_before_its_owner_reads_it_is_not_lost(
    harness: Harness,
) -> None:
    """The listener answers 2xx only once the push is on Kafka: the receiving process stops
    right after the answer, before anything correlated it; the next process does."""
    control = harness.sim.control
    await control.seed_device("dev-crash", "old-crash")
    bind = push_settings()
    service = await harness.start_service(instance="a", bind=bind)
    await harness.produce(
        [(b"dev-crash", swap_event("dev-crash", "new-crash", event_id="e-crash"))]
    )
    await harness.read(1)
    await wait_until(
        lambda: service.metrics.registry.get_sample_value("rebind_bind_watches") == 1,
        timeout=30,
        what="the device watched",
    )
    # The owner stops reading pushes, as if it died the moment the push was acknowledged.
    consumer = service.pipeline._consumer
    assert consumer is not None
    consumer.pause(*(tp for tp in consumer.assignment() if tp.topic == harness.topics.bind_notify))
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"http://127.0.0.1:{bind.port}/platform/bind/{PATH_SECRET}",
            content=orjson.dumps(
                {
                    "notifyType": "bindDevice",
                    "deviceId": "dev-crash",
                    "resultCode": "succeeded",
                    "deviceInfo": {"nodeId": "new-crash"},
                }
            ),
            headers={"content-type": "application/json"},
        )
    assert answer.status_code == 200
    assert await harness.read(0, topics=[harness.topics.device_rebound], timeout=5) == []
    await harness.stop_all()

    await harness.start_service(instance="b", bind=push_settings())
    [rebound] = await _bind_outcomes(harness, 1)
    assert rebound.data["deviceId"] == "dev-crash"
    assert rebound.data["via"] == "push"


async def test_the_listener_bounds_every_peer_the_total_and_the_body(harness: Harness) -> None:
    """Issue 19, item 2: 429 past a peer's rate or the total, 413 past 64 KiB, 404 off the
    secret path; each refusal counted by its own result, none of them written to Kafka."""
    bind = push_settings(max_requests_per_second_per_peer=2, max_requests_per_second=1000)
    service = await harness.start_service(bind=bind)
    base = f"http://127.0.0.1:{bind.port}/platform/bind"
    push = {"notifyType": "bindDevice", "deviceId": "d", "resultCode": "succeeded"}
    async with httpx.AsyncClient() as client:
        flood = [(await client.post(f"{base}/guess-{n}", json=push)).status_code for n in range(12)]
    count = service.metrics.registry.get_sample_value

    def counted(result: str) -> float | None:
        return count("rebind_bind_notifications_total", {"result": result})

    assert flood.count(429) >= 8, flood  # burst of 2 (and what refills meanwhile), then 429
    assert counted("rate_limited") == flood.count(429)
    assert counted("wrong_path") == flood.count(404)
    assert counted("accepted") == 0

    other = push_settings(max_requests_per_second_per_peer=1000, max_requests_per_second=3)
    await harness.stop_all()
    service = await harness.start_service(bind=other)
    url = f"http://127.0.0.1:{other.port}/platform/bind/{PATH_SECRET}"
    async with httpx.AsyncClient() as client:
        too_large = await client.post(url, content=b"{" + b" " * (70 * 1024) + b"}")
        total = [(await client.post(f"{url}x", json=push)).status_code for _ in range(10)]
    count = service.metrics.registry.get_sample_value
    assert too_large.status_code == 413
    assert counted("too_large") == 1
    assert total.count(429) >= 6, total  # the total bucket (3/s) is shared by every peer
    assert counted("rate_limited") == total.count(429)
    print(
        "bind listener refusals: "
        + ", ".join(
            f"{r}={counted(r):g}" for r in ("wrong_path", "rate_limited", "too_large", "accepted")
        )
    )


async def test_with_a_client_ca_the_listener_demands_client_certificates(
    harness: Harness, tmp_path: Path
) -> None:
    """Mutual TLS instead of a path secret: a push without a certificate the CA signed never
    reaches the handler; one with it is stored."""
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    server.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    bind = BindSettings(
        callback_url="https://127.0.0.1:1/platform/bind",
        host="127.0.0.1",
        port=0,
        tls_cert=tmp_path / "tls.crt",
        tls_key=tmp_path / "tls.key",
        client_ca=tmp_path / "ca.pem",
    )
    metrics = Metrics()
    listener = BindListener(
        bind, harness.topics.bind_notify, {"bootstrap_servers": harness.bootstrap}, metrics
    )
    await listener.start()
    url = f"https://127.0.0.1:{listener.port}/platform/bind"
    push = {"notifyType": "bindDevice", "deviceId": "d-mtls", "resultCode": "succeeded"}

    def context(client: trustme.LeafCert | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        if client is not None:
            client.configure_cert(ctx)
        return ctx

    refused = 0
    try:
        for client in (None, other.issue_cert("platform.test")):
            async with httpx.AsyncClient(verify=context(client)) as http:
                try:
                    await http.post(url, json=push)
                except httpx.TransportError:
                    refused += 1
        async with httpx.AsyncClient(verify=context(ca.issue_cert("platform.test"))) as http:
            accepted = await http.post(url, json=push)
    finally:
        await listener.stop()
    assert refused == 2
    assert accepted.status_code == 200
    count = metrics.registry.get_sample_value
    assert count("rebind_bind_notifications_total", {"result": "accepted"}) == 1
