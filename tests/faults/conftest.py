"""Fixtures of the fault tests: the service as a real process, and in-process instances.

* :class:`ServiceProcess`: ``python -m service run`` with ``REBIND_*`` variables built from
  ``harness.settings()``; waits for ``/readyz``; stops it with SIGTERM (drain) or SIGKILL (crash).
* ``fault_kit``: the harness plus helpers to seed devices, produce inputs, read the committed
  outcomes and print the accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from service.app import Service
from service.config import BindSettings, Settings
from tests.fixtures.service import Harness
from tests.support import clock
from tests.support.accounting import Accounting, Inputs, OutcomeReader, account, produce_inputs
from tests.support.events import swap_event
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``REBIND_*`` variables that make ``load_settings()`` rebuild ``settings``."""
    env: dict[str, str] = {}
    for section in ("kafka", "topics", "platform", "http", "log", "bind", "ledger"):
        model = getattr(settings, section)
        for name in type(model).model_fields:
            text = _env_value(getattr(model, name))
            if text is not None:
                env[f"REBIND_{section.upper()}__{name.upper()}"] = text
    return env


class ServiceProcess:
    """One ``python -m service run`` child process."""

    def __init__(self, settings: Settings, log_path: Path, *, http_port: int | None = None):
        self.port = http_port or free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("REBIND_")},
            **settings_env(settings),
            "REBIND_HTTP__HOST": "127.0.0.1",
            "REBIND_HTTP__PORT": str(self.port),
            "REBIND_LOG__FORMAT": "json",
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def instance_id(self) -> str:
        return self.env["REBIND_KAFKA__INSTANCE_ID"]

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n=== start #{self.starts} at {time.time():.3f} ===\n".encode())
            log_file.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "run"],
                env=self.env,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"service exited with {self.proc.returncode} during start:\n{self.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    async def wait_ready(self, timeout: float = 90) -> None:
        try:
            await wait_until(
                lambda: asyncio.to_thread(self._ready), timeout, f"{self.instance_id} /readyz"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- service log ---\n{self.log_tail()}") from None

    async def start_ready(self, timeout: float = 90) -> None:
        self.start()
        await self.wait_ready(timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        proc = self.proc
        code = await wait_until(
            lambda: proc.poll() is not None, timeout, f"{self.instance_id} to exit"
        )
        assert code
        return int(proc.returncode)

    async def kill(self) -> None:
        """SIGKILL: a crash, nothing is drained or committed."""
        if self.running():
            self.signal(signal.SIGKILL)
            await self.wait_exit(10)

    async def terminate(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM: drain, commit, exit. Returns (exit code, seconds taken)."""
        started = time.monotonic()
        self.signal(signal.SIGTERM)
        code = await self.wait_exit(timeout)
        return code, time.monotonic() - started

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The process's JSON log lines of ``event``, in order (other lines are skipped)."""
        found = []
        for line in self.log_text().splitlines():
            if f'"{event}"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") == event:
                found.append(rec)
        return found

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


@dataclass
class InProcess:
    service: Service
    task: asyncio.Task[None]

    async def stop(self, timeout: float = 60) -> None:
        self.service.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, timeout)


@dataclass
class FaultKit:
    harness: Harness
    tmp_path: Path
    processes: list[ServiceProcess] = field(default_factory=list)
    in_process: list[InProcess] = field(default_factory=list)
    reader: OutcomeReader | None = None

    @property
    def control(self) -> Any:
        return self.harness.sim.control

    def process(
        self, *, instance: str = "p0", bind: BindSettings | None = None, **platform: Any
    ) -> ServiceProcess:
        settings = self.harness.settings(instance=instance, bind=bind, **platform)
        # 6 s is the broker's minimum: a killed member leaves the group quickly.
        kafka = settings.kafka.model_copy(update={"session_timeout_ms": 6_000})
        settings = settings.model_copy(update={"kafka": kafka})
        log_path = self.tmp_path / f"service-{instance}-{len(self.processes)}.log"
        proc = ServiceProcess(settings, log_path)
        self.processes.append(proc)
        return proc

    async def start_in_process(
        self, *, instance: str, kafka_overrides: dict[str, Any] | None = None, **platform: Any
    ) -> InProcess:
        settings = self.harness.settings(instance=instance, **platform)
        kafka = settings.kafka.model_copy(
            update={"session_timeout_ms": 6_000, **(kafka_overrides or {})}
        )
        service = Service(settings.model_copy(update={"kafka": kafka}))
        task = asyncio.create_task(service.run(), name=f"service-{instance}")
        member = InProcess(service, task)
        self.in_process.append(member)
        await wait_until(
            lambda: service.readiness()[0] or task.done(), 60, f"service {instance} ready"
        )
        if task.done():
            task.result()
        return member

    async def seed(self, count: int, prefix: str = "dev") -> list[str]:
        """``count`` offline devices; the simulator's flow control is lifted far above the run."""
        await self.control.configure(rate_limit_per_minute=1_000_000)
        ids = [f"{prefix}-{i:05d}-{uuid.uuid4().hex[:6]}" for i in range(count)]
        for start in range(0, count, 500):
            await self.control.seed_devices(
                [{"device_id": d, "node_id": f"old-{d}"} for d in ids[start : start + 500]]
            )
        return ids

    async def produce_swaps(
        self, devices: list[str], extra: list[tuple[bytes | None, bytes | None]] | None = None
    ) -> Inputs:
        """One swap per device (new nodeId ``new-<device>``), plus poison records if given."""
        records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]], Any]] = []
        for d in devices:
            event_id = str(uuid.uuid4())
            node = f"new-{d}"
            records.append(
                (d.encode(), swap_event(d, node, event_id=event_id), [], (event_id, d, node))
            )
        for key, value in extra or []:
            records.append((key, value, [], None))
        return await produce_inputs(
            self.harness.bootstrap, self.harness.topics.device_swapped, records
        )

    async def start_reader(self) -> OutcomeReader:
        self.reader = OutcomeReader(self.harness.bootstrap, self.harness.output_topics)
        await self.reader.start()
        return self.reader

    async def finish(self, label: str, inputs: Inputs, *, check_devices: bool = True) -> Accounting:
        """Stop every service cleanly, read the outputs to their end, print the accounting."""
        for proc in self.processes:
            if proc.running():
                await proc.terminate(45)
        for member in self.in_process:
            await member.stop()
        self.in_process.clear()
        assert self.reader is not None
        outcomes = await self.reader.read_to_end()
        return await account(
            label,
            inputs,
            outcomes,
            dead_letter_topic=self.harness.topics.dead_letter,
            control=self.control if check_devices else None,
        )


@pytest.fixture(autouse=True)
async def platform_clock(harness: Harness) -> float:
    """Every fault test runs on the suite's platform clock (``tests/support/clock.py``): the
    simulator's flow-control window and the services' ``rate_window_seconds`` are the same
    compressed window in CI, 60 s under ``make soak``."""
    return await clock.apply(harness)


@pytest.fixture
async def fault_kit(harness: Harness, tmp_path: Path) -> AsyncIterator[FaultKit]:
    kit = FaultKit(harness, tmp_path)
    try:
        yield kit
    finally:
        for proc in kit.processes:
            proc.cleanup()
        for member in kit.in_process:
            with contextlib.suppress(Exception):
                await member.stop(30)
        if kit.reader is not None:
            with contextlib.suppress(Exception):
                await kit.reader.stop()
        with contextlib.suppress(Exception):
            await harness.sim.control.clear_faults()


@pytest.fixture
def process_logs(fault_kit: FaultKit) -> Iterator[None]:
    """Print the tails of the service logs when a test fails (pytest shows captured output)."""
    yield
    for proc in fault_kit.processes:
        print(f"--- {proc.instance_id} log tail ---\n{proc.log_tail(30)}")
