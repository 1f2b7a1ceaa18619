"""Run the simulator as a separate process (``python -m tests.simulator``) — for benchmarks."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[2]
URL_PREFIX = "SIMULATOR_URL="


class SimulatorProcess:
    """``with SimulatorProcess(rate_limit_per_minute=100000) as p: p.url``.

    ``start()`` spawns the process and waits for its ``SIMULATOR_URL=...`` line; ``stop()`` sends
    SIGTERM (then SIGKILL after a grace period).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit_per_minute: int | None = None,
        flow_window_seconds: float | None = None,
        token_ttl: int | None = None,
        tls_dir: str | Path | None = None,
        require_client_cert: bool = False,
        seed_demo: bool = False,
        extra_args: list[str] | None = None,
        python: str = sys.executable,
    ) -> None:
        args = [python, "-m", "tests.simulator", "--host", host, "--port", str(port)]
        if rate_limit_per_minute is not None:
            args += ["--rate-limit-per-minute", str(rate_limit_per_minute)]
        if flow_window_seconds is not None:
            args += ["--flow-window-seconds", str(flow_window_seconds)]
        if token_ttl is not None:
            args += ["--token-ttl", str(token_ttl)]
        if tls_dir is not None:
            args += ["--tls-dir", str(tls_dir)]
        if require_client_cert:
            args.append("--require-client-cert")
        if seed_demo:
            args.append("--seed-demo")
        args += extra_args or []
        self.args = args
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump_thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> str:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self.proc = subprocess.Popen(
            self.args,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._pump_thread = threading.Thread(
            target=self._pump, daemon=True, name="simulator-stdout"
        )
        self._pump_thread.start()
        try:
            while True:
                line = self._lines.get(timeout=timeout)
                if line is None:
                    raise RuntimeError(f"simulator exited early (rc={self.proc.poll()})")
                if line.startswith(URL_PREFIX):
                    self.url = line[len(URL_PREFIX) :].strip()
                    return self.url
        except queue.Empty:
            self.stop()
            raise RuntimeError("simulator did not print its URL in time") from None

    def _pump(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stop(self, timeout: float = 10.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._pump_thread is not None:
            self._pump_thread.join(timeout)
            self._pump_thread = None
        if proc.stdout is not None:
            proc.stdout.close()
        self.proc = None
        return proc.returncode

    def __enter__(self) -> SimulatorProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
