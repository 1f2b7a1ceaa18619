"""`make bench`: the real service (``python -m service run``) on this machine, measured.

One Kafka broker (``tests.support.kafka_broker``), the platform simulator as its own process
(``tests.simulator``), the service as one or more subprocesses configured by ``REBIND_*``
variables, exactly as deployed. Every figure is measured in this run, baseline included, because
the machine is shared and noisy. Sections:

1. throughput and CPU per event: a pre-produced backlog, service (bind watch without polls:
   the same job as the baseline; then again with one bind-watch poll per swap) vs the bare
   baseline (``bench/baseline.py``), both as subprocesses, CPU from ``/proc/<pid>/stat``;
2. budget use: the simulator enforcing N calls/min, the service configured with N, 1 and 3
   replicas: busiest 60 s window / N, and the 1010009 answers;
3. backlog memory: peak RSS (``VmHWM``) working a 10k and a 200k backlog;
4. latency: a steady producer at half the configured budget, production to committed outcome;
5. start (process start to ``/readyz`` 200) and stop (SIGTERM to exit, 64 calls in flight);
6. under budget saturation: platform answer to outcome visible ``read_committed`` (p50, p99);
7. under budget saturation: refresh calls redone after one SIGKILL, against those on the wire;
8. under budget saturation: budget use and 1010009 answers through replicas 1 -> 3 -> 1;
9. fresh-input throughput with 10,000 deferred swaps against 0 (sections 6-9:
   ``bench/saturation.py``);
10. the first bind-watch poll behind a saturated refresh backlog (``bench/bind_polls.py``);
11. the ledger's memory per ``done`` device and its load rate, 1,000,000 devices, before and
    after issue 20's packed entries (``bench/ledger_memory.py``; no broker);
12. bind detection delay with 100, 1,000 and 10,000 watched devices, the poll grid against the
    plain backoff, on a compressed clock (``bench/watch_scale.py``);
13. taking over a partition whose ledger holds 1,000,000 devices: assignment to the first
    outcome while the ledger is read, against a swap that waits for the whole read, and the
    member's membership meanwhile (``bench/takeover.py``);
14. a rebalance in which a member keeps its partitions (a second member joins): ledger records
    re-read and the extra wait of a swap, against the latency before (``bench/kept.py``);
15. a rolling restart of 3 replicas holding 3,000,000 ledger devices: the longest gap between
    two outcomes and evicted members (``bench/rolling.py``). About 10 minutes on this machine:
    run only when named (``--only 15``), as it would take the whole run past its 20 minutes.
16. the urgent lane under a saturated budget (N = 600/min on a 10 s window, a 10,000 bulk
    backlog, 50 urgent swaps): urgent publish -> platform call, answer -> visible, budget use,
    1010009 answers, bulk throughput with and without urgent traffic (``bench/lanes.py``).

``python -m bench`` (or ``python bench/run.py``); ``--quick`` shrinks every size for a smoke run;
``--only 1,3`` runs some sections, ``--skip 7,8`` leaves some out; ``--markdown PATH`` also
writes the table as Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from service.config import TopicSettings
from tests.simulator.control import SimulatorControl
from tests.simulator.process import SimulatorProcess
from tests.simulator.state import HOME_APP_ID, HOME_SECRET
from tests.support.events import fresh_swap_event
from tests.support.kafka_broker import KafkaBroker, create_topics, default_kafka_version

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 6
CONCURRENCY = 64
UNLIMITED = 1_000_000  # calls per minute: no flow control in effect
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_EPS = 1000.0
TARGET_RATIO = 1.5
"""Section 1: service throughput / baseline throughput (issue 24: at least 1.5)."""
TARGET_CPU_RATIO = 0.7
"""Section 1: service CPU per event / baseline CPU per event (issue 24: at most 0.7)."""
PRODUCE_RETRY = "Got error produce response"
TARGET_BUDGET_USE = 0.95
TARGET_RSS_MIB = 200.0
TARGET_RSS_GROWTH = 0.10


@dataclass(frozen=True)
class Sizes:
    throughput: int = 20_000
    budget_limit: int = 600
    budget_swaps: int = 700
    budget_timeout: float = 85.0
    memory_small: int = 10_000
    memory_large: int = 200_000
    memory_work: int = 6_000
    """Outcomes both memory runs wait for (the same work; only the backlog behind it differs)."""
    latency_budget: int = 6_000
    latency_seconds: float = 30.0
    stop_latency: float = 0.5
    saturation_limit: int = 600
    """Sections 6-8: calls per minute, enforced by the simulator and configured in the service."""
    saturation_swaps: int = 900
    """Sections 6-7: backlog (1.5 windows)."""
    kill_latency: float = 0.3
    churn_swaps: int = 2_000
    """Section 8: backlog; more than the measured period can use (3 windows if bursty)."""
    churn_step: float = 40.0
    churn_measured: float = 120.0
    deferred_devices: int = 10_000
    fresh_swaps: int = 10_000
    poll_delay_swaps: int = 900
    """Section 10: a watched backlog of 1.5 windows (refreshes end in the third minute)."""
    ledger_devices: int = 1_000_000
    """Section 11: done devices loaded into one partition's ledger."""


QUICK = Sizes(
    throughput=3_000,
    budget_limit=120,
    budget_swaps=140,
    budget_timeout=70.0,
    memory_small=2_000,
    memory_large=10_000,
    memory_work=1_500,
    latency_budget=1_200,
    latency_seconds=10.0,
    saturation_limit=120,
    saturation_swaps=180,
    churn_swaps=400,
    deferred_devices=2_000,
    fresh_swaps=2_000,
    poll_delay_swaps=180,
    ledger_devices=100_000,
)


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its own threads; children are not ours to count)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------- topics and data
@dataclass(frozen=True)
class Topics:
    prefix: str

    @property
    def input(self) -> str:
        return f"{self.prefix}.device-swapped"

    @property
    def ok(self) -> str:
        return f"{self.prefix}.credential-updated"

    @property
    def failed(self) -> str:
        return f"{self.prefix}.rebind-failed"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    @property
    def retry(self) -> str:
        return f"{self.prefix}.retry"

    @property
    def dedupe(self) -> str:
        return f"{self.prefix}.dedupe"

    @property
    def ledger(self) -> str:
        return f"{self.prefix}.ledger"

    @property
    def baseline_out(self) -> str:
        return f"{self.prefix}.baseline-out"

    @property
    def outcomes(self) -> list[str]:
        return [self.ok, self.failed, self.dlq]

    async def create(self, bootstrap: str) -> None:
        names = [self.input, self.ok, self.failed, self.dlq, self.retry, self.baseline_out]
        counts = {self.input: PARTITIONS, self.retry: PARTITIONS, self.baseline_out: 3}
        await create_topics(bootstrap, names, counts)
        # co-partitioned with the input, compacted: as deploy/ creates it
        await create_topics(
            bootstrap, [self.dedupe], PARTITIONS, configs={"cleanup.policy": "compact,delete"}
        )
        # the per-device ledger: co-partitioned with the input, compacted
        await create_topics(
            bootstrap, [self.ledger], PARTITIONS, configs={"cleanup.policy": "compact"}
        )

    def env(self) -> dict[str, str]:
        """``REBIND_TOPICS__*`` for every topic setting this service version has."""
        names = {
            "device_swapped": self.input,
            "credential_updated": self.ok,
            "rebind_failed": self.failed,
            "dead_letter": self.dlq,
            "retry": self.retry,
            "dedupe": self.dedupe,
            "ledger": self.ledger,
            "token": f"{self.prefix}.token",  # created by the service
        }
        known = TopicSettings.model_fields
        return {f"REBIND_TOPICS__{k.upper()}": v for k, v in names.items() if k in known}


def device_id(i: int) -> str:
    return f"bench-{i:07d}"


async def seed(control: SimulatorControl, count: int, chunk: int = 2_000) -> None:
    for start in range(0, count, chunk):
        await control.seed_devices(
            [
                {"device_id": device_id(i), "node_id": f"old-{i:07d}", "status": "OFFLINE"}
                for i in range(start, min(count, start + chunk))
            ]
        )


def fast_producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024, acks=1
    )


async def produce_backlog(bootstrap: str, topic: str, count: int) -> float:
    """Produce ``count`` swaps of distinct devices as fast as the client can; seconds taken."""
    started = time.monotonic()
    producer = fast_producer(bootstrap)
    await producer.start()
    try:
        pending: list[asyncio.Future[Any]] = []
        for i in range(count):
            dev = device_id(i)
            value = fresh_swap_event(dev, f"new-{i:07d}", event_id=f"ev-{i}")
            pending.append(await producer.send(topic, value, key=dev.encode()))
            if len(pending) >= 5_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - started


# ---------------------------------------------------------------------------- reading outcomes
def swap_event_id(value: bytes | None) -> str:
    """The input event an outcome answers (dead letters: their source position)."""
    if value is None:
        return "?"
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(orjson.loads(value)["data"]["swapEventId"])
    return f"raw:{hash(value)}"


@dataclass
class Progress:
    """What the outcome reader saw: counts over time and the CPU of the process under test."""

    target: int
    pid: int | None = None
    count: int = 0
    t_first: float = 0.0
    c_first: int = 0
    cpu_first: float = 0.0
    t_done: float = 0.0
    cpu_done: float = 0.0
    records: list[tuple[bytes | None, int, float]] = field(default_factory=list)
    """(value, record timestamp ms, wall clock seen) when keep_records."""
    distinct: set[str] | None = None
    """With a set: count distinct swapEventIds (``count``), and the ``duplicates`` beside."""
    duplicates: int = 0

    def take(self, records: list[Any], *, keep: bool) -> None:
        """Count a fetched batch of outcome records."""
        n = len(records)
        if self.distinct is not None:
            before = len(self.distinct)
            self.distinct.update(swap_event_id(m.value) for m in records)
            new = len(self.distinct) - before
            self.duplicates += n - new
            n = new
        now = time.monotonic()
        if keep:
            wall = time.time()
            self.records.extend((m.value, m.timestamp, wall) for m in records)
        if self.count == 0:
            self.t_first, self.c_first = now, n
            if self.pid is not None:
                self.cpu_first = cpu_seconds(self.pid)
        self.count += n
        if self.count >= self.target:
            self.t_done = now
            if self.pid is not None:
                self.cpu_done = cpu_seconds(self.pid)

    @property
    def rate(self) -> float:
        span = self.t_done - self.t_first
        return (self.count - self.c_first) / span if span > 0 else 0.0

    @property
    def cpu_per_1000(self) -> float:
        n = self.count - self.c_first
        return (self.cpu_done - self.cpu_first) / n * 1000 if n > 0 else 0.0


async def read_outcomes(
    bootstrap: str,
    topics: list[str],
    progress: Progress,
    timeout: float,
    *,
    keep_records: bool = False,
    alive: Callable[[], bool] | None = None,
) -> Progress:
    """Count committed records on ``topics`` (read_committed, from the start) until the target."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_bytes=8 * 1024 * 1024,
    )
    deadline = time.monotonic() + timeout
    await asyncio.wait_for(consumer.start(), 30)
    try:
        while progress.count < progress.target and time.monotonic() < deadline:
            if alive is not None and not alive():
                await asyncio.sleep(1)  # what it committed before dying is still readable
                alive = None
                deadline = min(deadline, time.monotonic() + 2)
            try:  # guarded, so that a stuck fetch cannot stall the whole run
                batch = await asyncio.wait_for(
                    consumer.getmany(timeout_ms=100, max_records=5_000), 10
                )
            except TimeoutError:
                continue
            records = [m for msgs in batch.values() for m in msgs]
            if records:
                progress.take(records, keep=keep_records)
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consumer.stop(), 10)
    return progress


async def await_outcomes_metric(
    svc: ServiceProc, progress: Progress, timeout: float, interval: float = 0.25
) -> Progress:
    """Like :func:`read_outcomes`, from the service's ``rebind_outcomes_total`` (committed)."""
    deadline = time.monotonic() + timeout
    while progress.count < progress.target and time.monotonic() < deadline and svc.alive():
        with contextlib.suppress(OSError, ValueError):
            total = int(await asyncio.to_thread(svc.metric, "rebind_outcomes_total"))
            now = time.monotonic()
            if total and progress.count == 0:
                progress.t_first, progress.c_first = now, total
                if progress.pid is not None:
                    progress.cpu_first = cpu_seconds(progress.pid)
            if total >= progress.target and progress.count < progress.target:
                progress.t_done = now
                if progress.pid is not None:
                    progress.cpu_done = cpu_seconds(progress.pid)
            progress.count = total
        await asyncio.sleep(interval)
    return progress


# ---------------------------------------------------------------------------- processes
@dataclass
class ServiceProc:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Seconds from process start to /readyz 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"service exited during start:\n{tail}")
            time.sleep(0.05)
        raise RuntimeError(f"service not ready within {timeout}s; log {self.log_path}")

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout: float = 40.0) -> float:
        """SIGTERM; seconds until the process exited (killed after ``timeout``)."""
        if self.proc.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return time.monotonic() - started


def stop_all(procs: list[ServiceProc]) -> None:
    """SIGTERM to every replica at once, then wait for each."""
    for p in procs:
        if p.alive():
            p.proc.send_signal(signal.SIGTERM)
    for p in procs:
        p.stop()


class Bench:
    def __init__(self, sizes: Sizes, work: Path) -> None:
        self.sizes = sizes
        self.work = work
        self.bootstrap = ""
        self._runs = 0
        self._procs: list[subprocess.Popen[bytes]] = []
        self.py_spy: str | None = None
        self._spies: list[subprocess.Popen[bytes]] = []

    def spy(self, pid: int, name: str) -> None:
        """Sample ``pid`` with py-spy (``--py-spy PATH``) until :meth:`unspy`: raw stacks."""
        if self.py_spy is None:
            return
        out = self.work / f"{name}.pyspy.txt"
        self._spies.append(
            subprocess.Popen(  # noqa: S603 - the profiler the user named
                [self.py_spy, "record", "--pid", str(pid), "-r", "50", "-f", "raw", "-o", str(out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        say(f"  py-spy sampling pid {pid} into {out}")

    def unspy(self) -> None:
        for spy in self._spies:
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
        self._spies.clear()

    def topics(self, name: str) -> Topics:
        self._runs += 1
        return Topics(f"bench{self._runs}-{name}")

    def start_service(
        self,
        topics: Topics,
        sim_url: str,
        *,
        rate: int,
        instance: str = "bench-0",
        group: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> ServiceProc:
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "REBIND_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "REBIND_KAFKA__GROUP_ID": group or f"{topics.prefix}-group",
            "REBIND_KAFKA__INSTANCE_ID": instance,
            "REBIND_KAFKA__TRANSACTIONAL_ID_PREFIX": f"{topics.prefix}-tx",
            **topics.env(),
            "REBIND_PLATFORM__BASE_URL": sim_url,
            "REBIND_PLATFORM__APP_ID": HOME_APP_ID,
            "REBIND_PLATFORM__SECRET": HOME_SECRET,
            "REBIND_PLATFORM__RATE_LIMIT_PER_MINUTE": str(rate),
            "REBIND_PLATFORM__MAX_CONCURRENCY": str(CONCURRENCY),
            "REBIND_HTTP__HOST": "127.0.0.1",
            "REBIND_HTTP__PORT": str(port),
            **(extra_env or {}),
        }
        log_path = self.work / f"{topics.prefix}-{instance}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service", "run"],
                env=env,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self._procs.append(proc)
        return ServiceProc(proc, port, log_path, time.monotonic())

    def start_baseline(self, topics: Topics, sim_url: str, count: int) -> subprocess.Popen[bytes]:
        log_path = self.work / f"{topics.prefix}-baseline.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [
                    sys.executable,
                    "-m",
                    "bench.baseline",
                    "--bootstrap",
                    self.bootstrap,
                    "--input",
                    topics.input,
                    "--output",
                    topics.baseline_out,
                    "--group",
                    f"{topics.prefix}-baseline",
                    "--url",
                    sim_url,
                    "--app-id",
                    HOME_APP_ID,
                    "--secret",
                    HOME_SECRET,
                    "--concurrency",
                    str(CONCURRENCY),
                    "--count",
                    str(count),
                ],
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self._procs.append(proc)
        return proc

    def kill_leftovers(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)


@contextlib.contextmanager
def simulator(rate_limit: int) -> Iterator[tuple[str, SimulatorControl, int]]:
    sim = SimulatorProcess(rate_limit_per_minute=rate_limit)
    url = sim.start()
    try:
        assert sim.pid is not None
        yield url, SimulatorControl(url), sim.pid
    finally:
        sim.stop()


# ---------------------------------------------------------------------------- 1. throughput
@dataclass
class ThroughputResult:
    events: int
    service_eps: float
    service_cpu: float
    baseline_eps: float
    baseline_cpu: float
    sim_cpu_service: float
    sim_cpu_baseline: float
    produce_retries: int = 0
    """aiokafka's retried produce requests in the service's log (issue 24: target 0)."""
    transactions: float = 0.0
    """The service's committed transactions (``rebind_kafka_transactions_total``)."""
    polled_eps: float = 0.0
    """The service with its bind watch polling once per swap."""
    polled_cpu: float = 0.0


def produce_retries(log_path: Path) -> int:
    """Produce requests aiokafka retried, from a service log: each "Got error produce response"
    line counts once, or ``repeated`` times when it is a rate-limited summary line."""
    total = 0
    for line in log_path.read_bytes().splitlines():
        if PRODUCE_RETRY.encode() not in line:
            continue
        try:
            total += int(orjson.loads(line).get("repeated", 1))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            total += 1
    return total


async def seed_binding(control: SimulatorControl, count: int, chunk: int = 2_000) -> None:
    """Like :func:`seed`, each device's new hardware connecting as soon as its key is refreshed
    (one bind-watch poll ends its watch)."""
    for start in range(0, count, chunk):
        await control.seed_devices(
            [
                {"device_id": device_id(i), "node_id": f"old-{i:07d}", "connect_after_refresh": 0}
                for i in range(start, min(count, start + chunk))
            ]
        )


@dataclass
class ServiceRun:
    progress: Progress
    sim_cpu: float
    retries: int
    transactions: float


async def run_service_backlog(
    b: Bench, topics: Topics, n: int, *, polls: bool, spy: bool
) -> ServiceRun:
    """The service working off ``n`` pre-produced swaps, unlimited budget. ``polls``: the bind
    watch polls (first poll 1 s after the refresh, the hardware binds at once, so one poll per
    swap, inside the run); without, the watch waits for a push as the baseline waits for
    nothing."""
    with simulator(UNLIMITED) as (url, control, sim_pid):
        await (seed_binding(control, n) if polls else seed(control, n))
        sim_cpu0 = cpu_seconds(sim_pid)
        env = (
            {"REBIND_BIND__POLL": "true", "REBIND_BIND__POLL_INITIAL_SECONDS": "1"}
            if polls
            else {"REBIND_BIND__POLL": "false"}
        )
        svc = b.start_service(topics, url, rate=UNLIMITED, extra_env=env)
        if spy:
            b.spy(svc.pid, "service")
        progress = Progress(n, pid=svc.pid)
        await read_outcomes(b.bootstrap, topics.outcomes, progress, timeout=300, alive=svc.alive)
        sim_cpu = cpu_seconds(sim_pid) - sim_cpu0
        if spy:
            b.unspy()
        transactions = 0.0
        with contextlib.suppress(OSError):
            transactions = svc.metric("rebind_kafka_transactions_total")
        svc.stop()
    retries = produce_retries(svc.log_path)
    if progress.count < n:
        raise RuntimeError(f"service: only {progress.count}/{n} outcomes; log {svc.log_path}")
    return ServiceRun(progress, sim_cpu, retries, transactions)


async def bench_throughput(b: Bench) -> ThroughputResult:
    n = b.sizes.throughput
    topics = b.topics("throughput")
    await topics.create(b.bootstrap)
    took = await produce_backlog(b.bootstrap, topics.input, n)
    say(f"throughput: {n} swaps pre-produced to {PARTITIONS} partitions in {took:.1f}s")

    # the service: the same job as the baseline (no bind-watch polls)
    run = await run_service_backlog(b, topics, n, polls=False, spy=True)
    progress, retries, transactions = run.progress, run.retries, run.transactions
    say(
        f"  service : {retries} retried produce requests "
        f"({retries / max(1, progress.count) * 1000:.1f} per 1000 outcomes), "
        f"{transactions:.0f} transactions for {progress.count} outcomes"
    )
    say(f"  service : {progress.rate:7.0f} events/s, {progress.cpu_per_1000:.2f} CPU s/1000 events")

    # the service with its bind watch polling: one activation query per swap on top
    polled_topics = b.topics("throughput-polls")
    await polled_topics.create(b.bootstrap)
    await produce_backlog(b.bootstrap, polled_topics.input, n)
    polled = await run_service_backlog(b, polled_topics, n, polls=True, spy=False)
    say(
        f"  service with polls: {polled.progress.rate:7.0f} events/s, "
        f"{polled.progress.cpu_per_1000:.2f} CPU s/1000 events"
    )

    # the baseline, on the same backlog (its own consumer group and output topic)
    with simulator(UNLIMITED) as (url, control, sim_pid):
        await seed(control, n)
        sim_cpu0 = cpu_seconds(sim_pid)
        proc = b.start_baseline(topics, url, n)
        b.spy(proc.pid, "baseline")
        base = Progress(n, pid=proc.pid)
        await read_outcomes(b.bootstrap, [topics.baseline_out], base, timeout=300)
        sim_cpu_baseline = cpu_seconds(sim_pid) - sim_cpu0
        b.unspy()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if base.count < n:
        raise RuntimeError(f"baseline: only {base.count}/{n} results")
    say(f"  baseline: {base.rate:7.0f} events/s, {base.cpu_per_1000:.2f} CPU s/1000 events")
    return ThroughputResult(
        n,
        progress.rate,
        progress.cpu_per_1000,
        base.rate,
        base.cpu_per_1000,
        run.sim_cpu,
        sim_cpu_baseline,
        retries,
        transactions,
        polled.progress.rate,
        polled.progress.cpu_per_1000,
    )


# ---------------------------------------------------------------------------- 2. budget
@dataclass
class BudgetResult:
    replicas: int
    limit: int
    swaps: int
    outcomes: int
    busiest_window: int
    throttled: int
    seconds: float
    duplicates: int = 0

    @property
    def use(self) -> float:
        return self.busiest_window / self.limit


async def bench_budget(b: Bench, replicas: int) -> BudgetResult:
    limit, swaps = b.sizes.budget_limit, b.sizes.budget_swaps
    topics = b.topics(f"budget{replicas}")
    await topics.create(b.bootstrap)
    with simulator(limit) as (url, control, _):
        await seed(control, swaps)
        procs = [
            b.start_service(topics, url, rate=limit, instance=f"bench-{i}") for i in range(replicas)
        ]
        for p in procs:
            await asyncio.to_thread(p.wait_ready)
        await asyncio.sleep(3 if replicas > 1 else 0)  # let the group settle on 3 members
        started = time.monotonic()
        await produce_backlog(b.bootstrap, topics.input, swaps)
        progress = Progress(swaps, distinct=set())
        await read_outcomes(
            b.bootstrap,
            topics.outcomes,
            progress,
            timeout=b.sizes.budget_timeout,
            alive=lambda: all(p.alive() for p in procs),
        )
        seconds = time.monotonic() - started
        stats = await control.stats()
        await asyncio.to_thread(stop_all, procs)
    app = stats["apps"][HOME_APP_ID]
    result = BudgetResult(
        replicas,
        limit,
        swaps,
        progress.count,
        int(app["max_calls_in_any_window"]),
        int(app["throttled_calls"]),
        seconds,
        progress.duplicates,
    )
    say(
        f"budget, {replicas} replica(s): {result.busiest_window}/{limit} calls in the busiest "
        f"60 s window ({result.use:.1%}), {result.throttled} x 1010009, "
        f"{progress.count}/{swaps} outcomes in {seconds:.0f}s"
    )
    return result


# ---------------------------------------------------------------------------- 3. memory
@dataclass
class MemoryResult:
    backlog: int
    hwm_mib: float
    rss_mib: float
    seconds: float
    eps: float
    worked: int


async def bench_memory(b: Bench, backlog: int) -> MemoryResult:
    """Peak RSS while working ``memory_work`` events off a backlog of ``backlog``.

    Devices are not seeded: the platform answers 100403 (a full round trip, rebind-failed). Both
    runs do the same work (the small backlog's size), so they differ only in what waits behind.
    """
    work = min(backlog, b.sizes.memory_work)
    topics = b.topics(f"memory{backlog}")
    await topics.create(b.bootstrap)
    took = await produce_backlog(b.bootstrap, topics.input, backlog)
    say(f"memory: {backlog} swaps pre-produced in {took:.1f}s")
    with simulator(UNLIMITED) as (url, _control, _pid):
        svc = b.start_service(topics, url, rate=UNLIMITED)
        started = time.monotonic()
        progress = Progress(work, pid=svc.pid)
        await asyncio.to_thread(svc.wait_ready)
        await await_outcomes_metric(svc, progress, timeout=300)
        seconds = time.monotonic() - started
        hwm = status_kib(svc.pid, "VmHWM") / 1024
        rss = status_kib(svc.pid, "VmRSS") / 1024
        svc.stop()
    if progress.count < work:
        raise RuntimeError(f"memory: only {progress.count}/{work} outcomes")
    result = MemoryResult(backlog, hwm, rss, seconds, progress.rate, work)
    say(
        f"  peak RSS {hwm:.1f} MiB (RSS at the end {rss:.1f} MiB), "
        f"{work} of {backlog} worked off in {seconds:.0f}s"
    )
    return result


# ---------------------------------------------------------------------------- 4. latency
@dataclass
class LatencyResult:
    budget: int
    rate: float
    events: int
    received: int
    p50: float
    p99: float
    max: float
    seen_p50: float
    seen_p99: float
    seen_max: float
    duplicates: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench_latency(b: Bench) -> LatencyResult:
    budget = b.sizes.latency_budget
    rate = budget / 60 / 2
    events = int(rate * b.sizes.latency_seconds)
    topics = b.topics("latency")
    await topics.create(b.bootstrap)
    with simulator(budget) as (url, control, _):
        await seed(control, events)
        svc = b.start_service(topics, url, rate=budget)
        await asyncio.to_thread(svc.wait_ready)
        progress = Progress(events, distinct=set())
        reader = asyncio.create_task(
            read_outcomes(
                b.bootstrap,
                topics.outcomes,
                progress,
                timeout=b.sizes.latency_seconds + 60,
                keep_records=True,
                alive=svc.alive,
            )
        )
        produced: dict[str, int] = {}
        producer = AIOKafkaProducer(bootstrap_servers=b.bootstrap, linger_ms=0)
        await producer.start()
        try:
            t0 = time.monotonic()
            sent: list[tuple[str, asyncio.Future[Any]]] = []
            for i in range(events):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                dev = device_id(i)
                fut = await producer.send(
                    topics.input,
                    fresh_swap_event(dev, f"new-{i:07d}", event_id=f"lat-{i}"),
                    key=dev.encode(),
                )
                sent.append((f"lat-{i}", fut))
            for event_id, fut in sent:
                produced[event_id] = (await fut).timestamp
        finally:
            await producer.stop()
        await reader
        svc.stop()
    by_record: list[float] = []
    by_sight: list[float] = []
    for value, ts, wall in progress.records:
        if value is None:
            continue
        swap_id = orjson.loads(value).get("data", {}).get("swapEventId")
        if swap_id in produced:
            by_record.append((ts - produced[swap_id]) / 1000)
            by_sight.append(wall - produced[swap_id] / 1000)
    result = LatencyResult(
        budget,
        rate,
        events,
        len(by_record),
        percentile(by_record, 0.5),
        percentile(by_record, 0.99),
        max(by_record, default=float("nan")),
        percentile(by_sight, 0.5),
        percentile(by_sight, 0.99),
        max(by_sight, default=float("nan")),
        progress.duplicates,
    )
    say(
        f"latency at {rate:.0f}/s ({events} events): p50 {result.p50 * 1000:.0f} ms, "
        f"p99 {result.p99 * 1000:.0f} ms, max {result.max * 1000:.0f} ms"
    )
    return result


# ---------------------------------------------------------------------------- 5. start / stop
@dataclass
class StartStopResult:
    ready_seconds: float
    inflight_at_sigterm: float
    stop_seconds: float
    exit_code: int | None
    calls_started: int
    outcomes_committed: int
    duplicates: int
    swaps: int


async def bench_start_stop(b: Bench) -> StartStopResult:
    swaps = CONCURRENCY * 4
    topics = b.topics("startstop")
    await topics.create(b.bootstrap)
    with simulator(UNLIMITED) as (url, control, _):
        await seed(control, swaps)
        svc = b.start_service(topics, url, rate=UNLIMITED)
        ready = await asyncio.to_thread(svc.wait_ready)
        await control.inject_latency(b.sizes.stop_latency, operation="refresh_key", times=-1)
        await produce_backlog(b.bootstrap, topics.input, swaps)
        # The simulator logs a call when it arrives and answers it 0.5 s later: once 64 calls
        # have arrived, 64 are in flight.
        deadline = time.monotonic() + 30
        calls_before = 0
        while time.monotonic() < deadline and calls_before < CONCURRENCY:
            calls_before = len(await control.calls(operation="refresh_key"))
            await asyncio.sleep(0.02)
        inflight = float(calls_before)
        stop_seconds = await asyncio.to_thread(svc.stop)
        calls = len(await control.calls(operation="refresh_key"))
    progress = Progress(swaps, distinct=set())
    await read_outcomes(b.bootstrap, topics.outcomes, progress, timeout=8)
    result = StartStopResult(
        ready,
        inflight,
        stop_seconds,
        svc.proc.returncode,
        max(calls, calls_before),
        progress.count,
        progress.duplicates,
        swaps,
    )
    say(
        f"start to /readyz {ready:.2f}s; SIGTERM with {inflight:.0f} in flight to exit "
        f"{stop_seconds:.2f}s (rc {svc.proc.returncode}); {calls} calls made, "
        f"{progress.count} outcomes committed, {progress.duplicates} duplicates"
    )
    return result


# ---------------------------------------------------------------------------- report
def machine() -> list[tuple[str, str]]:
    mem_kib = 0
    cpu_model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    java = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["java", "-version"],  # noqa: S607 - the broker's java, from PATH
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        java = (out.stderr or out.stdout).splitlines()[0]
    return [
        ("cores", f"{os.cpu_count()} ({cpu_model})"),
        ("memory", f"{mem_kib / 1024 / 1024:.1f} GiB"),
        ("os", f"{platform.system()} {platform.release()}"),
        ("python", platform.python_version()),
        ("kafka broker", f"Apache Kafka {default_kafka_version()} (KRaft, 1 node), {java}"),
        ("aiokafka", importlib.metadata.version("aiokafka")),
        ("httpx", importlib.metadata.version("httpx")),
    ]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


@dataclass
class Report:
    sizes: Sizes
    machine: list[tuple[str, str]] = field(default_factory=list)
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, measure: str, value: str, target: str = "", result: str = "") -> None:
        self.rows.append((measure, value, target, result))

    def text(self) -> str:
        out = ["", "machine:"]
        out += [f"  {k:<13} {v}" for k, v in self.machine]
        head = ("measure", "value", "target", "")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]
        out.append("")
        for r in [head, tuple("-" * w for w in widths), *self.rows]:
            out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        out += ["", *self.notes, f"total bench run time: {self.seconds:.0f} s"]
        return "\n".join(out)

    def markdown(self) -> str:
        out = ["| | |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in self.machine]
        out += ["", "| measure | value | target | |", "|---|---|---|---|"]
        out += [f"| {m} | {v} | {t} | {r} |" for m, v, t, r in self.rows]
        out += [
            "",
            *[f"- {n}" for n in self.notes],
            f"- total bench run time: {self.seconds:.0f} s",
        ]
        return "\n".join(out) + "\n"


def add_throughput(rep: Report, t: ThroughputResult) -> None:
    ratio = t.service_eps / t.baseline_eps if t.baseline_eps else 0.0
    rep.add(
        f"1. throughput, service ({t.events} backlog, no bind polls)",
        f"{t.service_eps:.0f} events/s",
        f">= {TARGET_EPS:.0f}/s",
        verdict(t.service_eps >= TARGET_EPS),
    )
    rep.add("1. throughput, baseline", f"{t.baseline_eps:.0f} events/s")
    rep.add(
        "1. service / baseline",
        f"{ratio:.2f}",
        f">= {TARGET_RATIO}",
        verdict(ratio >= TARGET_RATIO),
    )
    rep.add("1. CPU s / 1000 events, service", f"{t.service_cpu:.2f}")
    rep.add("1. CPU s / 1000 events, baseline", f"{t.baseline_cpu:.2f}")
    cost = t.service_cpu / t.baseline_cpu if t.baseline_cpu else 0.0
    rep.add(
        "1. CPU per event, service / baseline",
        f"{cost:.2f}x",
        f"<= {TARGET_CPU_RATIO}x",
        verdict(0 < cost <= TARGET_CPU_RATIO),
    )
    rep.add(
        "1. with bind polls (1 per swap): events/s; CPU s / 1000",
        f"{t.polled_eps:.0f}; {t.polled_cpu:.2f}",
    )
    per_1000 = t.produce_retries / t.events * 1000 if t.events else 0.0
    rep.add(
        "1. retried produce requests per 1000 outcomes (service)",
        f"{per_1000:.1f} ({t.produce_retries} in all)",
        "0",
        verdict(t.produce_retries == 0),
    )
    rep.add(
        "1. transactions per 1000 outcomes (service)",
        f"{t.transactions / t.events * 1000:.0f}" if t.events else "-",
    )
    rep.add(
        "1. simulator CPU s / 1000 events (svc, base)",
        f"{t.sim_cpu_service / t.events * 1000:.2f}, {t.sim_cpu_baseline / t.events * 1000:.2f}",
    )


def add_budget(rep: Report, r: BudgetResult) -> None:
    rep.add(
        f"2. budget use, {r.replicas} replica(s) (N={r.limit}, {r.swaps} swaps)",
        f"{r.busiest_window}/{r.limit} = {r.use:.1%}",
        f">= {TARGET_BUDGET_USE:.0%}",
        verdict(r.use >= TARGET_BUDGET_USE),
    )
    rep.add(
        f"2. 1010009 answers, {r.replicas} replica(s)",
        f"{r.throttled} ({r.outcomes}/{r.swaps} outcomes in {r.seconds:.0f}s, "
        f"{r.duplicates} duplicate outcomes)",
        "0",
        verdict(r.throttled == 0),
    )


def add_memory(rep: Report, small: MemoryResult, large: MemoryResult) -> None:
    growth = large.hwm_mib / small.hwm_mib - 1 if small.hwm_mib else 0.0
    for m in (small, large):
        rep.add(
            f"3. peak RSS, backlog {m.backlog} ({m.worked} worked off)",
            f"{m.hwm_mib:.1f} MiB ({m.eps:.0f} events/s)",
            f"< {TARGET_RSS_MIB:.0f} MiB",
            verdict(m.hwm_mib < TARGET_RSS_MIB),
        )
    rep.add(
        f"3. peak RSS {large.backlog} / {small.backlog}",
        f"{1 + growth:.3f} ({growth:+.1%})",
        f"within {TARGET_RSS_GROWTH:.0%}",
        verdict(abs(growth) <= TARGET_RSS_GROWTH),
    )


def add_latency(rep: Report, r: LatencyResult) -> None:
    rep.add(
        f"4. latency p50 / p99 / max ({r.rate:.0f}/s = half of {r.budget}/min, {r.events} ev)",
        f"{r.p50 * 1000:.0f} / {r.p99 * 1000:.0f} / {r.max * 1000:.0f} ms",
    )
    rep.add(
        "4.   same, until seen by a read_committed consumer",
        f"{r.seen_p50 * 1000:.0f} / {r.seen_p99 * 1000:.0f} / {r.seen_max * 1000:.0f} ms",
    )
    if r.received < r.events or r.duplicates:
        rep.notes.append(
            f"latency: {r.received} outcomes matched for {r.events} events, "
            f"{r.duplicates} duplicate outcomes"
        )


def add_start_stop(rep: Report, r: StartStopResult) -> None:
    rep.add("5. start: process start to /readyz 200", f"{r.ready_seconds:.2f} s")
    rep.add(
        f"5. stop: SIGTERM to exit ({r.inflight_at_sigterm:.0f} in flight)",
        f"{r.stop_seconds:.2f} s (rc {r.exit_code})",
    )
    rep.add(
        f"5.   calls made / inputs answered / duplicate outcomes ({r.swaps} swaps)",
        f"{r.calls_started} / {r.outcomes_committed} / {r.duplicates}",
        "dup 0",
        verdict(r.duplicates == 0),
    )


async def run_all(b: Bench, rep: Report, only: set[str], skip: set[str] | None = None) -> None:
    from bench import saturation  # noqa: PLC0415 - sections 6-9; it imports this module

    skip = skip or set()

    async def s1() -> None:
        add_throughput(rep, await bench_throughput(b))

    async def s2() -> None:
        for replicas in (1, 3):
            add_budget(rep, await bench_budget(b, replicas))

    async def s3() -> None:
        small = await bench_memory(b, b.sizes.memory_small)
        large = await bench_memory(b, b.sizes.memory_large)
        add_memory(rep, small, large)

    async def s4() -> None:
        add_latency(rep, await bench_latency(b))

    async def s5() -> None:
        add_start_stop(rep, await bench_start_stop(b))

    async def s6() -> None:
        saturation.add_answer_delay(rep, await saturation.bench_answer_delay(b))

    async def s7() -> None:
        saturation.add_sigkill_redo(rep, await saturation.bench_sigkill_redo(b))

    async def s8() -> None:
        saturation.add_budget_churn(rep, await saturation.bench_budget_churn(b))

    async def s9() -> None:
        saturation.add_deferred_load(rep, *await saturation.bench_deferred_load(b))

    async def s10() -> None:
        from bench import bind_polls  # noqa: PLC0415 - section 10

        for schedule in ("backoff", "grid"):
            bind_polls.add_poll_delay(rep, await bind_polls.bench_poll_delay(b, schedule))

    async def s11() -> None:
        from bench import ledger_memory  # noqa: PLC0415 - section 11

        ledger_memory.add_ledger_memory(rep, await ledger_memory.bench_ledger_memory(b))

    async def s12() -> None:
        from bench import watch_scale  # noqa: PLC0415 - section 12

        watch_scale.add_watch_scale(rep, await watch_scale.bench_watch_scale(b))

    async def s13() -> None:
        from bench import takeover  # noqa: PLC0415 - section 13

        takeover.add_takeover(rep, await takeover.bench_takeover(b))

    async def s14() -> None:
        from bench import kept  # noqa: PLC0415 - section 14

        kept.add_kept(rep, await kept.bench_kept(b))

    async def s15() -> None:
        from bench import rolling  # noqa: PLC0415 - section 15

        rolling.add_rolling(rep, await rolling.bench_rolling(b))

    # (section, run, longest it may take: a guard so one stuck section cannot eat the run)
    steps = [
        ("1", s1, 480.0),
        ("5", s5, 90.0),
        ("4", s4, 120.0),
        ("3", s3, 360.0),
        ("2", s2, 260.0),
        ("6", s6, 240.0),
        ("7", s7, 300.0),
        ("8", s8, 300.0),
        ("9", s9, 600.0),
        ("10", s10, 900.0),
        ("11", s11, 300.0),
        ("12", s12, 900.0),
        ("13", s13, 420.0),
        ("14", s14, 300.0),
        ("15", s15, 900.0),
        ("16", lambda: section_16(b, rep), 720.0),
    ]
    for name, step, limit in steps:
        if (only and name not in only) or name in skip or (name in ON_REQUEST and not only):
            continue
        try:
            await asyncio.wait_for(step(), limit)
        except Exception as exc:  # noqa: BLE001 - report the section as failed, run the rest
            say(f"section {name} failed: {exc!r}")
            b.kill_leftovers()
            rep.add(f"{name}. (section failed)", f"{type(exc).__name__}: {exc}"[:120])


async def section_16(b: Bench, rep: Report) -> None:
    from bench import lanes  # noqa: PLC0415 - section 16; it imports this module

    lanes.add_lanes(rep, await lanes.bench_lanes(b))


ON_REQUEST = frozenset({"15"})
"""Sections run only when named in ``--only``: too long for the default run's 20 minutes."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--only", default="", help="comma-separated sections to run, e.g. 1,3")
    p.add_argument(
        "--skip",
        default="",
        help="comma-separated sections to leave out, e.g. 7,8 (6: answer -> visible, 7: SIGKILL "
        "redo, 8: 1 -> 3 -> 1 budget, 9: deferred load, 11: ledger memory, 12: watching at "
        "scale, 13: take-over, 14: kept rebalance, 15: rolling restart, 16: urgent lane; each is "
        "one figure of the table)",
    )
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    p.add_argument("--py-spy", default=None, help="py-spy binary: profile section 1's processes")
    args = p.parse_args(argv)
    started = time.monotonic()
    sizes = QUICK if args.quick else Sizes()
    rep = Report(sizes, machine())
    rep.notes += [
        "throughput: events/s = outcomes committed between the first and the last committed "
        "outcome seen by a read_committed consumer of the output topics; CPU = utime+stime of "
        "the process under test (/proc/<pid>/stat) over the same span",
        "memory: devices not seeded, so each swap is a full platform round trip answered 100403 "
        f"(rebind-failed); peak RSS = VmHWM once {sizes.memory_work} outcomes are committed: "
        "the same work in both runs, only the backlog behind it differs",
    ]
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # leader elections of new topics
    KafkaBroker.fetch(echo=True)
    work = Path(tempfile.mkdtemp(prefix="device-rebind-bench-"))
    broker = KafkaBroker(work / "kafka")
    b = Bench(sizes, work)
    b.py_spy = args.py_spy
    say(f"starting the Kafka broker (work dir {work})")
    b.bootstrap = broker.start()
    try:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        asyncio.run(run_all(b, rep, only, skip))
    finally:
        b.kill_leftovers()
        broker.stop()
    rep.seconds = time.monotonic() - started
    print(rep.text(), flush=True)
    if args.markdown is not None:
        args.markdown.write_text(rep.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
