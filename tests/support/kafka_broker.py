"""A real single-node Apache Kafka broker for tests and the demo.

:class:`KafkaBroker` drives ``deploy/local/kafka.sh`` (the same script a human uses), so tests and
the demo share one mechanism: jars from Maven Central, KRaft combined broker+controller, free
loopback ports, data and logs in one directory.

    broker = KafkaBroker(tmp_path / "kafka")
    broker.start()                 # fetches the jars on first use, waits until ready
    broker.bootstrap               # "127.0.0.1:PORT"
    broker.restart()               # same ports, same data dir (clean shutdown)
    broker.kill(); broker.start()  # crash + recovery
    broker.stop()

Secured brokers (TLS, mutual TLS, SASL, an authorizer) are the same script with more listeners:
``listeners={"MTLS": "SSL", ...}`` (each on its own free port, ``broker.listener("MTLS")``),
``plaintext=False``, ``inter_broker``, ``controller_protocol``, ``scram`` credentials created at
format time and ``ready_tls`` for the readiness probe; the TLS, SASL and authorizer properties
go in ``properties`` (see :mod:`tests.support.secured_kafka`).

Blocking methods have ``a``-prefixed async twins (``astart``...) that run in a worker thread so
clients on the test's event loop keep running while the broker starts or stops.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO_ROOT / "deploy" / "local" / "kafka.sh"
POM = REPO_ROOT / "deploy" / "local" / "kafka" / "pom.xml"

START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
TOPIC_ALREADY_EXISTS = 36


class KafkaBrokerError(RuntimeError):
    """The broker could not be fetched, started or stopped."""


def default_kafka_version() -> str:
    """``$KAFKA_VERSION`` if set, else the ``kafka.version`` property of the pom."""
    env = os.environ.get("KAFKA_VERSION", "").strip()
    if env:
        return env
    text = POM.read_text(encoding="utf-8")
    start = text.index("<kafka.version>") + len("<kafka.version>")
    return text[start : text.index("</kafka.version>", start)].strip()


def _read_env(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip()
    return values


# Brokers started by this process, stopped at interpreter exit even when a test run dies.
_LIVE: set[KafkaBroker] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        brokers = list(_LIVE)
    for broker in brokers:
        with contextlib.suppress(Exception):
            broker.stop(timeout=10.0)


atexit.register(_stop_all_at_exit)


class KafkaBroker:
    """One broker process whose config, data and logs live in ``workdir``.

    ``port``/``controller_port`` default to free ports chosen at the first start; later starts
    (``restart``, start after ``kill``) reuse them and the data dir, so clients reconnect to the
    same address and find their data. ``version`` defaults to :func:`default_kafka_version`.
    ``properties`` are appended to the generated server.properties.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        version: str | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        start_timeout: float = START_TIMEOUT,
        properties: Mapping[str, str] | None = None,
        echo: bool = False,
        script: Path = KAFKA_SH,
        listeners: Mapping[str, str] | None = None,
        plaintext: bool = True,
        inter_broker: str | None = None,
        controller_protocol: str | None = None,
        scram: Sequence[str] = (),
        ready_tls: Sequence[Path] = (),
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.version = version or default_kafka_version()
        self._port = port
        self._controller_port = controller_port
        self.start_timeout = start_timeout
        # extra server.properties, e.g. {"broker.session.timeout.ms": "3000"}
        self.properties = dict(properties or {})
        self.echo = echo  # pass the script's progress (stderr) through instead of capturing it
        self.script = script
        # name -> security protocol of the listeners besides PLAINTEXT (kafka.sh --listener)
        self.listeners = dict(listeners or {})
        self.plaintext = plaintext
        self.inter_broker = inter_broker
        self.controller_protocol = controller_protocol
        self.scram = list(scram)  # 'SCRAM-SHA-512=[name=u,password=p]', created at format time
        self.ready_tls = [Path(p) for p in ready_tls]  # CA[, CERT, KEY] of the readiness probe

    # ------------------------------------------------------------------ properties
    @property
    def port(self) -> int:
        if self._port is None:
            raise KafkaBrokerError("broker was never started: no port yet")
        return self._port

    @property
    def controller_port(self) -> int:
        if self._controller_port is None:
            raise KafkaBrokerError("broker was never started: no controller port yet")
        return self._controller_port

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT``; stable across restarts."""
        return f"127.0.0.1:{self.port}"

    def listener(self, name: str) -> str:
        """``127.0.0.1:PORT`` of the listener ``name`` (``PLAINTEXT`` or a ``listeners`` key)."""
        for entry in _read_env(self.workdir / "broker.env").get("LISTENERS", "").split(","):
            listener, _, rest = entry.partition(":")
            if listener == name:
                return f"127.0.0.1:{rest.partition(':')[2]}"
        raise KafkaBrokerError(f"no listener {name} (started yet?)")

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def pid(self) -> int | None:
        """Pid of the running broker, or None."""
        try:
            pid = int((self.workdir / "kafka.pid").read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None
        return pid if self._alive(pid) else None

    def is_running(self) -> bool:
        return self.pid is not None

    def _alive(self, pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        state = stat.rsplit(")", 1)[-1].split()[0]
        return state not in {"Z", "X"} and str(self.workdir / "server.properties").encode() in (
            cmdline
        )

    # ------------------------------------------------------------------ script
    def _run(self, *args: str, timeout: float) -> str:
        env = dict(os.environ)
        env.pop("KAFKA_VERSION", None)  # the version is passed explicitly
        try:
            proc = subprocess.run(
                ["bash", str(self.script), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=None if self.echo else subprocess.PIPE,
                text=True,
                env=env,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise KafkaBrokerError(
                f"kafka.sh {args[0]} did not finish within {timeout:.0f} s"
            ) from exc
        if proc.returncode != 0:
            raise KafkaBrokerError(
                f"kafka.sh {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr or ''}"
            )
        return proc.stdout

    @staticmethod
    def fetch(version: str | None = None, *, echo: bool = True) -> Path:
        """Resolve the broker jars into the cache (no-op when present); return the libs dir."""
        proc = subprocess.run(
            ["bash", str(KAFKA_SH), "fetch", version or default_kafka_version()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None if echo else subprocess.PIPE,
            text=True,
            check=False,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise KafkaBrokerError(f"kafka.sh fetch failed:\n{proc.stderr or ''}")
        return Path(proc.stdout.strip())

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Start the broker (fetching jars on first use), wait until ready; return bootstrap."""
        if self.is_running():
            raise KafkaBrokerError(f"broker in {self.workdir} is already running")
        args = ["start", "--dir", str(self.workdir), "--version", self.version]
        args += ["--timeout", str(int(self.start_timeout))]
        if self._port is not None:
            args += ["--port", str(self._port)]
        if self._controller_port is not None:
            args += ["--controller-port", str(self._controller_port)]
        args += ["--watch-pid", str(os.getpid())]
        for key, value in self.properties.items():
            args += ["--prop", f"{key}={value}"]
        for name, protocol in self.listeners.items():
            args += ["--listener", f"{name}:{protocol}"]
        if not self.plaintext:
            args.append("--no-plaintext")
        if self.inter_broker:
            args += ["--inter-broker", self.inter_broker]
        if self.controller_protocol:
            args += ["--controller-protocol", self.controller_protocol]
        for spec in self.scram:
            args += ["--scram", spec]
        if self.ready_tls:
            args += ["--ready-tls", ",".join(str(p) for p in self.ready_tls)]
        with _LIVE_LOCK:
            _LIVE.add(self)  # before the start: a half-started broker is cleaned up too
        out = self._run(*args, timeout=self.start_timeout + 600)  # + a first-run jar download
        env = _read_env(self.workdir / "broker.env")
        self._port = int(env["PORT"])
        self._controller_port = int(env["CONTROLLER_PORT"])
        expected = f"BOOTSTRAP={self.bootstrap}"
        if expected not in out.split():
            raise KafkaBrokerError(f"unexpected kafka.sh start output: {out!r}")
        return self.bootstrap

    def wait_ready(self, deadline: float = START_TIMEOUT) -> None:
        """Block until the broker answers requests; ``deadline`` is in seconds from now."""
        self._run(
            "wait-ready",
            "--dir",
            str(self.workdir),
            "--timeout",
            str(max(1, round(deadline))),
            timeout=deadline + 30,
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Clean shutdown (SIGTERM, then SIGKILL after ``timeout`` s). Idempotent."""
        try:
            if self.workdir.exists():
                self._run(
                    "stop",
                    "--dir",
                    str(self.workdir),
                    "--timeout",
                    str(max(1, round(timeout))),
                    timeout=timeout + 30,
                )
        finally:
            if not self.is_running():
                with _LIVE_LOCK:
                    _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the broker (a crash: no clean shutdown). Idempotent."""
        if self.workdir.exists():
            self._run("kill", "--dir", str(self.workdir), timeout=30)

    def restart(self, *, hard: bool = False) -> str:
        """Stop (or SIGKILL when ``hard``) and start again on the same ports and data dir."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    def send_signal(self, signum: signal.Signals) -> None:
        """Send a signal to the broker process (e.g. SIGSTOP/SIGCONT to freeze it)."""
        pid = self.pid
        if pid is None:
            raise KafkaBrokerError("broker is not running")
        os.kill(pid, signum)

    def log_tail(self, lines: int = 60) -> str:
        path = self.log_dir / "kafka.out"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------ async twins
    async def astart(self) -> str:
        return await asyncio.to_thread(self.start)

    async def astop(self, timeout: float = STOP_TIMEOUT) -> None:
        await asyncio.to_thread(self.stop, timeout)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def arestart(self, *, hard: bool = False) -> str:
        return await asyncio.to_thread(self.restart, hard=hard)

    async def await_ready(self, deadline: float = START_TIMEOUT) -> None:
        await asyncio.to_thread(self.wait_ready, deadline)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        return f"KafkaBroker(version={self.version}, bootstrap=127.0.0.1:{port}, {self.workdir})"


async def create_topics(
    bootstrap: str,
    names: Sequence[str],
    partitions: int | Mapping[str, int] = 1,
    *,
    timeout: float = 30.0,
    configs: Mapping[str, str] | None = None,
    topic_configs: Mapping[str, Mapping[str, str]] | None = None,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Create ``names`` (replication factor 1) and wait until every partition has a leader.

    ``partitions`` is one count for all topics or a per-topic mapping (missing names get 1).
    ``configs`` apply to every topic, ``topic_configs`` (by name) to one each, on top: topics of
    different kinds are created in one request and one wait. Topics that already exist with the
    right partition count are accepted. ``options`` are extra client options (a secured
    broker's TLS and SASL settings).
    """
    counts = {
        name: partitions if isinstance(partitions, int) else partitions.get(name, 1)
        for name in names
    }
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=15000, **dict(options or {})
    )
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(
                    name=name,
                    num_partitions=count,
                    replication_factor=1,
                    topic_configs={**(configs or {}), **(topic_configs or {}).get(name, {})},
                )
                for name, count in counts.items()
            ],
            timeout_ms=int(timeout * 1000),
        )
        for topic, code, *rest in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise KafkaBrokerError(f"creating topic {topic} failed: error {code} {rest}")

        async def all_visible() -> bool:
            described = await admin.describe_topics(list(counts))
            ready = {
                t["topic"]
                for t in described
                if t["error_code"] == 0
                and len(t["partitions"]) == counts[t["topic"]]
                and all(p["error_code"] == 0 and p["leader"] >= 0 for p in t["partitions"])
            }
            return ready == set(counts)

        await wait_until(all_visible, timeout, f"topics {sorted(counts)} to have leaders")
    finally:
        await admin.close()
