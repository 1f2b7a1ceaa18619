"""`make demo`: the service doing its job, on this machine, in a few minutes.

Starts a real Apache Kafka broker (jars from Maven Central, cached), the platform simulator and
the service as a separate process (`python -m service run`), plays a short story of swaps,
prints the outcome events as a table and the key metrics. Then the service starts again with the
urgent lane and a budget the platform matches, and a campaign of swaps saturates it while one
urgent swap overtakes it. Then it stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.simulator.control import SimulatorControl
from tests.simulator.process import SimulatorProcess
from tests.simulator.state import HOME_APP_ID, HOME_SECRET
from tests.support.calllog import THROTTLED, max_in_window
from tests.support.events import Received, fresh_swap_event
from tests.support.kafka_broker import KafkaBroker, create_topics

ROOT = Path(__file__).resolve().parents[2]
TOPICS = {
    "in": "asset.device-swapped.v1",
    "ok": "iot.credential-updated.v1",
    "failed": "iot.rebind-failed.v1",
    "dlq": "asset.device-swapped.v1.dlq",
    "rebound": "iot.device-rebound.v1",
}
BIND_NOTIFY_TOPIC = "device-rebind.bind-notify.v1"  # co-partitioned with the input
BIND_PATH_SECRET = "demo-8f3a-Lq7Zr2xV9mK4wT"  # noqa: S105 - the demo's own listener path
LEDGER_TOPIC = "device-rebind.ledger.v1"  # compacted, co-partitioned with the input
DEDUPE_TOPIC = "device-rebind.dedupe.v1"  # compacted, co-partitioned with the input
PLATFORM_LIMIT = 15  # calls per minute the simulated platform allows this application
BURST = 16
BOLD, DIM, GREEN, RED, YELLOW, RESET = (
    ("\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[33m", "\033[0m")
    if sys.stdout.isatty()
    else ("",) * 6
)


def say(text: str) -> None:
    print(f"{BOLD}==>{RESET} {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Story:
    def __init__(self, bootstrap: str, control: SimulatorControl) -> None:
        self.bootstrap = bootstrap
        self.control = control
        self.labels: dict[str, str] = {}  # event id -> what the story step is
        self.outcomes: list[Received] = []

    async def produce(self, records: list[tuple[str, bytes | None, bytes, str]]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        await producer.start()
        try:
            for event_id, key, value, label in records:
                self.labels[event_id] = label
                await producer.send_and_wait(TOPICS["in"], value, key=key)
        finally:
            await producer.stop()

    async def collect(self, consumer: AIOKafkaConsumer, total: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_report = 0.0
        while len(self.outcomes) < total and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, msgs in batch.items():
                for m in msgs:
                    rec = Received(
                        tp.topic, tp.partition, m.offset, m.key, m.value, tuple(m.headers or ())
                    )
                    self.outcomes.append(rec)
                    print(f"    {DIM}outcome {len(self.outcomes)}/{total}: {tp.topic}{RESET}")
            if time.monotonic() - last_report > 10 and len(self.outcomes) < total:
                last_report = time.monotonic()
                left = int(deadline - time.monotonic())
                print(
                    f"    {DIM}{len(self.outcomes)}/{total} outcomes so far; waiting "
                    f"(flow control and an online device take their time; up to {left}s){RESET}",
                    flush=True,
                )


def row(rec: Received, labels: dict[str, str]) -> tuple[str, ...]:
    if rec.topic == TOPICS["dlq"]:
        return (
            "3. malformed",
            (rec.key or b"").decode(errors="replace"),
            f"{YELLOW}dead letter{RESET}",
            f"reason={rec.header('rebind-error-reason')}",
            "-",
        )
    data = rec.data
    label = labels.get(str(data.get("swapEventId")), "?")
    if rec.topic == TOPICS["rebound"]:
        return (
            label,
            data["deviceId"],
            f"{GREEN}device-rebound{RESET}",
            f"via={data['via']} secondsToBind={data['secondsToBind']:.1f}",
            "-",
        )
    if rec.topic == TOPICS["ok"]:
        return (
            label,
            data["deviceId"],
            f"{GREEN}credential-updated{RESET}",
            f"nodeId={data['nodeId']} verifyCode={data['verifyCode']}",
            str(data["attempts"]),
        )
    return (
        label,
        data["deviceId"],
        f"{RED}rebind-failed{RESET}",
        f"errorCode={data['errorCode']} http={data['httpStatus']} category={data['category']}",
        str(data["attempts"]),
    )


def print_table(rows: list[tuple[str, ...]]) -> None:
    headers = ("story step", "deviceId", "outcome", "details", "attempts")

    def visible(text: str) -> int:
        for code in (BOLD, DIM, GREEN, RED, YELLOW, RESET):
            if code:
                text = text.replace(code, "")
        return len(text)

    widths = [max(visible(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for r in [headers, *rows]:
        print(
            "  " + "  ".join(cell + " " * (widths[i] - visible(cell)) for i, cell in enumerate(r))
        )


KEY_METRICS = (
    "rebind_outcomes_total",
    "rebind_platform_throttle_rejections_total",
    "rebind_platform_device_online_rejections_total",
    "rebind_platform_requests_total",
    "rebind_deferred_events",
    "rebind_rate_limit_per_minute",
    "rebind_kafka_transactions_total",
    "rebind_bind_results_total",
    "rebind_bind_notifications_total",
)


def start_service(
    bootstrap: str,
    sim_url: str,
    http_port: int,
    bind_port: int,
    log_path: Path,
    *,
    extra_env: dict[str, str] | None = None,
) -> Any:
    env = {
        **os.environ,
        "REBIND_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "REBIND_KAFKA__INSTANCE_ID": "demo-0",
        "REBIND_PLATFORM__BASE_URL": sim_url,
        "REBIND_PLATFORM__APP_ID": HOME_APP_ID,
        "REBIND_PLATFORM__SECRET": HOME_SECRET,
        "REBIND_PLATFORM__ONLINE_RETRY_INITIAL_SECONDS": "4",
        "REBIND_HTTP__PORT": str(http_port),
        # bindDevice pushes to a listener of its own, and polling as the safety net
        "REBIND_BIND__CALLBACK_URL": f"http://127.0.0.1:{bind_port}/platform/bind",
        "REBIND_BIND__HOST": "127.0.0.1",
        "REBIND_BIND__PORT": str(bind_port),
        "REBIND_BIND__PATH_SECRET": BIND_PATH_SECRET,
        "REBIND_BIND__ALLOW_PLAIN_HTTP": "true",  # loopback
        "REBIND_BIND__POLL_INITIAL_SECONDS": "2",
        "REBIND_BIND__POLL_MAX_SECONDS": "4",
        "REBIND_BIND__EXPIRY_GRACE_SECONDS": "2",
        "REBIND_BIND__WATCH_DEADLINE_SECONDS": "600",
        "REBIND_LOG__FORMAT": "console",
        **(extra_env or {}),
    }
    say(f"starting the service (python -m service run); its log: {log_path}")
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "service", "run"],
            env=env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def wait_ready(service: Any, http_port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2):
                return
        except OSError:
            if service.poll() is not None:
                print(log_path.read_text(), file=sys.stderr)
                raise SystemExit("the service exited during start") from None
            time.sleep(0.3)
    raise SystemExit("the service did not become ready within 60 s")


def stop_service(service: Any) -> None:
    say("stopping the service (SIGTERM: drain, commit, exit)")
    started = time.monotonic()
    service.send_signal(signal.SIGTERM)
    try:
        code = service.wait(30)
        print(f"  exited with {code} after {time.monotonic() - started:.1f}s")
    except subprocess.TimeoutExpired:
        service.kill()
        print("  did not stop within 30 s: killed")


def print_metrics(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(KEY_METRICS) and not line.endswith(" 0.0"):
            print(f"  {line}")


async def play(bootstrap: str, sim_url: str, work: Path) -> int:
    control = SimulatorControl(sim_url)
    await control.configure(rate_limit_per_minute=PLATFORM_LIMIT)
    await control.seed_device("meter-0001", "864475040000099")
    await control.seed_device("meter-0002", "864475040000100", status="ONLINE")
    for i in range(BURST):
        await control.seed_device(f"burst-{i:02d}", f"86447504001{i:04d}")
    await create_topics(bootstrap, list(TOPICS.values()), {TOPICS["in"]: 3})
    await create_topics(bootstrap, [LEDGER_TOPIC], 3, configs={"cleanup.policy": "compact"})
    await create_topics(bootstrap, [BIND_NOTIFY_TOPIC], 3)
    await create_topics(bootstrap, [DEDUPE_TOPIC], 3, configs={"cleanup.policy": "compact,delete"})

    for device, node in BIND_DEVICES:
        await control.seed_device(device, node)
    http_port = free_port()
    log_path = work / "service.log"
    service = start_service(bootstrap, sim_url, http_port, free_port(), log_path)
    try:
        await asyncio.to_thread(wait_ready, service, http_port, log_path)
        say("service ready")

        story = Story(bootstrap, control)
        consumer = AIOKafkaConsumer(
            TOPICS["ok"],
            TOPICS["failed"],
            TOPICS["dlq"],
            TOPICS["rebound"],
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            say("1. meter-0001 was swapped: a device that exists and is offline")
            say("2. ghost-9999 was swapped: a device the platform does not know")
            say("3. a malformed event (not JSON) arrives on the input topic")
            say("4. meter-0002 was swapped, but the old meter is still online (100611);")
            print("       it goes offline 8 s later", flush=True)
            await control.go_offline_after("meter-0002", 8)
            await story.produce(
                [
                    (
                        "evt-1",
                        b"meter-0001",
                        fresh_swap_event(
                            "meter-0001", "864475040000123", event_id="evt-1", workOrderId="WO-1"
                        ),
                        "1. swap",
                    ),
                    (
                        "evt-2",
                        b"ghost-9999",
                        fresh_swap_event("ghost-9999", "864475040000124", event_id="evt-2"),
                        "2. unknown device",
                    ),
                    ("evt-3", b"meter-0003", b"{this is not json", "3. malformed"),
                    (
                        "evt-4",
                        b"meter-0002",
                        fresh_swap_event("meter-0002", "864475040000125", event_id="evt-4"),
                        "4. online device",
                    ),
                ]
            )
            say(
                f"5. a burst of {BURST} swaps; the platform allows this application only "
                f"{PLATFORM_LIMIT} calls/minute (the service is configured for 100): flow control"
            )
            await story.produce(
                [
                    (
                        f"evt-b{i}",
                        f"burst-{i:02d}".encode(),
                        fresh_swap_event(
                            f"burst-{i:02d}", f"86447504002{i:04d}", event_id=f"evt-b{i}"
                        ),
                        "5. burst",
                    )
                    for i in range(BURST)
                ]
            )
            total = 4 + BURST
            await story.collect(consumer, total, timeout=150)
            total += await bind_story(story, consumer)
        finally:
            await consumer.stop()

        say("outcome events (read_committed)")
        print_table(sorted((row(r, story.labels) for r in story.outcomes), key=lambda r: r[0]))
        say(f"key metrics (http://127.0.0.1:{http_port}/metrics)")
        await asyncio.to_thread(print_metrics, http_port)
        stats = await control.stats()
        print(f"  platform saw: {stats.get('logins', '?')} login(s)")
        ok = len(story.outcomes) == total
        if not ok:
            say(f"only {len(story.outcomes)} of {total} outcomes arrived; see {log_path}")
        return 0 if ok else 1
    finally:
        await asyncio.to_thread(stop_service, service)


BIND_DEVICES = (
    ("gas-0101", "354000000000101"),
    ("gas-0102", "354000000000102"),
    ("gas-0103", "354000000000103"),
)


async def bind_story(story: Story, consumer: AIOKafkaConsumer) -> int:
    """6. Did the new hardware bind? One device binds and the platform pushes it, one binds while
    pushes cannot get through (polling finds it), one never connects before its timeout."""
    control = story.control
    say("6. three more swaps; the service watches each device until its new hardware binds:")
    print("       gas-0101 connects 3 s after the refresh (the platform pushes bindDevice)")
    print("       gas-0102 connects while pushes cannot reach the service (polling finds it)")
    print("       gas-0103 never connects; its timeout is 8 s: the platform deletes it")
    await control.update_device("gas-0101", connect_after_refresh=3)
    before = len(story.outcomes)
    await story.produce(
        [
            (
                "evt-g1",
                b"gas-0101",
                fresh_swap_event("gas-0101", "354000000000201", event_id="evt-g1"),
                "6. binds (push)",
            ),
            (
                "evt-g2",
                b"gas-0102",
                fresh_swap_event("gas-0102", "354000000000202", event_id="evt-g2"),
                "6. binds (poll)",
            ),
            (
                "evt-g3",
                b"gas-0103",
                fresh_swap_event("gas-0103", "354000000000203", event_id="evt-g3", timeout=8),
                "6. never binds",
            ),
        ]
    )
    # once gas-0102's key is refreshed, pushes are lost and its new hardware connects
    deadline = time.monotonic() + 120

    def refreshed() -> bool:
        return any(
            r.topic == TOPICS["ok"] and r.data["deviceId"] == "gas-0102"
            for r in story.outcomes[before:]
        )

    while not refreshed() and time.monotonic() < deadline:
        await story.collect(consumer, len(story.outcomes) + 1, timeout=5)
    await control.push_behaviour(drop_next=1)
    await control.connect("gas-0102")
    # polls are the budget's lowest class: behind the burst's flow control they may wait a minute
    await story.collect(consumer, before + 6, timeout=240)
    return 6


URGENT_TOPIC = "asset.device-swapped.urgent.v1"  # the urgent lane, co-partitioned with the input
LANE_LIMIT = 20
"""Step 7: calls per window, for the platform and the service alike."""
LANE_WINDOW = 5
"""Step 7: the flow-control window, shortened from 60 s so that the campaign lasts half a minute
(20 calls per 5 s is 240 a minute)."""
CAMPAIGN = 120
URGENT_DEVICE = ("meter-7001", "864475040007001")


def node_of(i: int) -> str:
    return f"86447504003{i:04d}"


async def refresh_calls(control: SimulatorControl, count: int, timeout: float) -> None:
    """Until the platform has had ``count`` refresh calls in all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(await control.calls(operation="refresh_key")) >= count:
            return
        await asyncio.sleep(0.1)
    raise SystemExit("the campaign did not start: see the service's log")


class Campaign:
    """Step 7's outcomes as a ``read_committed`` consumer sees them: swap event id -> when."""

    def __init__(self, bootstrap: str, control: SimulatorControl) -> None:
        self.bootstrap = bootstrap
        self.control = control
        self.consumer = AIOKafkaConsumer(
            TOPICS["ok"],
            TOPICS["failed"],
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            auto_offset_reset="earliest",  # the story's outcomes before: other event ids
        )
        self.seen: dict[str, float] = {}
        self.started = 0.0
        self.reading: asyncio.Task[None] | None = None
        self.arrived = asyncio.Event()

    async def start(self) -> None:
        """Read outcomes in the background from now on, noting when each was visible."""
        await self.consumer.start()

        async def read() -> None:
            while True:
                await self.take(100)

        self.reading = asyncio.create_task(read())

    async def stop(self) -> None:
        if self.reading is not None:
            self.reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reading
        await self.consumer.stop()

    async def until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Until ``done()`` (looked at whenever outcomes arrive) or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)
        return True

    @property
    def bulk(self) -> int:
        return sum(1 for k in self.seen if k.startswith("evt-c"))

    async def take(self, timeout_ms: int) -> None:
        for msgs in (await self.consumer.getmany(timeout_ms=timeout_ms)).values():
            for m in msgs:
                swap = Received(m.topic, m.partition, m.offset, m.key, m.value, ()).data
                self.seen.setdefault(str(swap.get("swapEventId")), time.time())
            self.arrived.set()

    async def publish(self, calls_before: int) -> float:
        """The campaign, then (once it saturates the budget) the urgent swap: its timestamp."""
        self.started = time.time()
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=10)
        await producer.start()
        try:
            for i in range(CAMPAIGN):
                await producer.send(
                    TOPICS["in"],
                    fresh_swap_event(f"campaign-{i:03d}", node_of(i), event_id=f"evt-c{i}"),
                    key=f"campaign-{i:03d}".encode(),
                )
            await producer.flush()
            # a second window's budget spent: bulk calls wait for calls to age out
            await refresh_calls(self.control, calls_before + 2 * (LANE_LIMIT - 1), timeout=60)
            device, node = URGENT_DEVICE
            meta = await producer.send_and_wait(
                URGENT_TOPIC, fresh_swap_event(device, node, event_id="evt-u1"), key=device.encode()
            )
        finally:
            await producer.stop()
        return float(meta.timestamp) / 1000

    async def overtaken(self, published: float) -> bool:
        """Until the urgent swap's outcome is visible; print its times."""
        bulk_then = self.bulk
        await self.until(lambda: "evt-u1" in self.seen, timeout=30)
        device = URGENT_DEVICE[0]
        urgent_calls = await self.control.calls(operation="refresh_key", device_id=device)
        if "evt-u1" not in self.seen or not urgent_calls:
            return False
        called = float(urgent_calls[0]["time"]) - published
        calls = await self.control.calls(operation="refresh_key")
        waiting = CAMPAIGN - sum(1 for c in calls if str(c["device_id"]).startswith("campaign-"))
        print(
            f"  {GREEN}urgent swap of {device}: platform call {called:.2f} s after it was "
            f"published, outcome visible (read_committed) {self.seen['evt-u1'] - published:.2f} "
            f"s after{RESET}",
            flush=True,
        )
        print(
            f"  when it was published the campaign had {bulk_then} outcomes; {waiting} of its "
            f"{CAMPAIGN} swaps were still waiting for the budget",
            flush=True,
        )
        return True

    async def goes_on(self) -> int:
        """Until every campaign swap is answered, a line per window: bulk outcomes so far."""
        say("the campaign goes on (bulk outcomes, every window):")
        deadline = time.monotonic() + CAMPAIGN / (LANE_LIMIT - 1) * LANE_WINDOW + 60
        while self.bulk < CAMPAIGN and time.monotonic() < deadline:
            await self.until(lambda: self.bulk == CAMPAIGN, timeout=LANE_WINDOW)
            print(
                f"    {time.time() - self.started:4.0f} s after the campaign was published: "
                f"{self.bulk:3d}/{CAMPAIGN} bulk outcomes",
                flush=True,
            )
        return self.bulk


async def lanes_story(bootstrap: str, sim_url: str, work: Path) -> int:
    """7. The urgent lane: a campaign saturates the budget; an urgent swap published in the
    middle of it is refreshed within a second, and the campaign goes on."""
    control = SimulatorControl(sim_url)
    say(
        f"7. priority lanes: a campaign of {CAMPAIGN} swaps on the input topic; the platform "
        f"allows {LANE_LIMIT} calls per {LANE_WINDOW} s window (shortened from 60 s for the "
        "demo) and the service is configured with the same budget: the campaign saturates it"
    )
    print(
        f"       in the middle of it a technician's swap of {URGENT_DEVICE[0]} goes to the "
        f"urgent lane ({URGENT_TOPIC})",
        flush=True,
    )
    await create_topics(bootstrap, [URGENT_TOPIC], {URGENT_TOPIC: 3})
    await control.configure(rate_limit_per_minute=LANE_LIMIT, flow_window_seconds=LANE_WINDOW)
    await control.seed_devices(
        [{"device_id": f"campaign-{i:03d}", "node_id": f"old-{i:03d}"} for i in range(CAMPAIGN)]
        + [{"device_id": URGENT_DEVICE[0], "node_id": "864475040006001"}]
    )
    calls_before = len(await control.calls(operation="refresh_key"))
    http_port = free_port()
    log_path = work / "service-lanes.log"
    service = start_service(
        bootstrap,
        sim_url,
        http_port,
        free_port(),
        log_path,
        extra_env={
            "REBIND_PLATFORM__RATE_LIMIT_PER_MINUTE": str(LANE_LIMIT),
            "REBIND_PLATFORM__RATE_WINDOW_SECONDS": str(LANE_WINDOW),
        },
    )
    campaign = Campaign(bootstrap, control)
    try:
        await asyncio.to_thread(wait_ready, service, http_port, log_path)
        say("service started again, now with the urgent lane")
        await campaign.start()
        published = await campaign.publish(calls_before)
        if not await campaign.overtaken(published):
            say(f"the urgent swap was not answered within 30 s; see {log_path}")
            return 1
        done = await campaign.goes_on()
        calls = [c for c in await control.calls() if c["time"] >= campaign.started]
        accepted = [float(c["time"]) for c in calls if c["error_code"] != THROTTLED]
        print(
            f"  campaign done in {time.time() - campaign.started:.0f} s; {len(accepted)} platform "
            f"calls, the busiest {LANE_WINDOW} s window had "
            f"{max_in_window(accepted, LANE_WINDOW)}/{LANE_LIMIT}, "
            f"{len(calls) - len(accepted)} x 1010009 (throttled)",
            flush=True,
        )
        print(
            f"  {DIM}by hand: device-rebind swap {URGENT_DEVICE[0]} {URGENT_DEVICE[1]} --urgent "
            f"--wait{RESET}",
            flush=True,
        )
        return 0 if done == CAMPAIGN else 1
    finally:
        await campaign.stop()
        await asyncio.to_thread(stop_service, service)


async def whole_demo(bootstrap: str, sim_url: str, work: Path) -> int:
    code = await play(bootstrap, sim_url, work)
    return await lanes_story(bootstrap, sim_url, work) or code


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="device-rebind-demo-"))
    say("Apache Kafka broker jars (downloaded once from Maven Central, then cached)")
    KafkaBroker.fetch(echo=True)
    broker = KafkaBroker(work / "kafka")
    say("starting a single-node Kafka broker (KRaft)")
    bootstrap = broker.start()
    print(f"  bootstrap {bootstrap}")
    sim = SimulatorProcess(rate_limit_per_minute=PLATFORM_LIMIT)
    try:
        sim_url = sim.start()
        say(f"platform simulator at {sim_url}")
        return asyncio.run(whole_demo(bootstrap, sim_url, work))
    finally:
        say("stopping the simulator and the broker")
        sim.stop()
        broker.stop()


if __name__ == "__main__":
    raise SystemExit(main())
