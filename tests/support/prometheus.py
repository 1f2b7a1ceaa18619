"""A real Prometheus server for tests: scrape targets every second, query them back.

    with PrometheusServer(tmp_path / "prom", targets=["127.0.0.1:8080"]) as prom:
        wait_until_sync(lambda: prom.query('rebind_ready == 1'), 30, "service ready")

Runs the ``prometheus`` binary found on PATH (``scripts/install-prometheus.sh`` installs it) on a
free loopback port, with a generated configuration, storage in the given directory, and no
remote access. ``rule_files`` optionally loads alerting rules, so tests can watch real alerts via
:meth:`PrometheusServer.alerts`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import httpx

from tests.support.waiting import wait_until_sync

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

Result = dict[str, Any]
"""One element of the API's ``data.result``: ``{"metric": {...}, "value": [ts, "1.5"]}``."""


class PrometheusError(RuntimeError):
    """Prometheus could not start, or answered a query with an error."""


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    """One ``prometheus`` process scraping ``targets`` (``host:port`` strings) every second."""

    def __init__(
        self,
        directory: Path,
        targets: Sequence[str],
        *,
        job: str = "device-rebind",
        metrics_path: str = "/metrics",
        rule_files: Sequence[Path] = (),
        binary: str = "prometheus",
    ) -> None:
        found = shutil.which(binary)
        if found is None:
            raise PrometheusError(
                f"{binary!r} is not on PATH: run scripts/install-prometheus.sh first"
            )
        self.binary = found
        self.directory = directory
        self.targets = list(targets)
        self.job = job
        self.metrics_path = metrics_path
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "prometheus.log"

    def _write_config(self) -> Path:
        # JSON is valid YAML: no YAML writer needed and no quoting surprises.
        config = {
            "global": {
                "scrape_interval": "1s",
                "evaluation_interval": "1s",
                "scrape_timeout": "1s",
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        path = self.directory / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return path

    def start(self) -> None:
        """Start the process and return once ``/-/ready`` answers 200."""
        if self._process is not None:
            raise PrometheusError("already started")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        self.port = free_port()
        args = [
            self.binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=info",
        ]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
            )
        atexit.register(self.stop)  # never leave a server behind, even if a test forgets
        self._client = httpx.Client(base_url=self.url, timeout=5.0)
        try:
            wait_until_sync(
                self._ready,
                START_TIMEOUT,
                f"prometheus ready on {self.url}",
                ignore=(httpx.HTTPError,),
            )
        except Exception as exc:
            log_tail = self._log_tail()
            self.stop()
            raise PrometheusError(f"prometheus did not become ready; log:\n{log_tail}") from exc

    def _ready(self) -> bool:
        process = self._process
        if process is not None and process.poll() is not None:
            raise PrometheusError(f"prometheus exited with {process.returncode}")
        return self.http.get("/-/ready").status_code == 200

    def _log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    @property
    def http(self) -> httpx.Client:
        if self._client is None:
            raise PrometheusError("not started")
        return self._client

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        response = self.http.get(path, params=params)
        try:
            body = response.json()
        except ValueError:
            response.raise_for_status()
            raise
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[Result]:
        """Evaluate an instant query now; the ``data.result`` list of a vector result."""
        data = self._api("/api/v1/query", {"query": expr})
        if data.get("resultType") != "vector":
            raise PrometheusError(f"{expr!r} returned a {data.get('resultType')}, not a vector")
        return cast("list[Result]", data["result"])

    def query_value(self, expr: str) -> float | None:
        """The value of a query that returns at most one series (None when it returns none)."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expr!r} returned {len(result)} series, expected one")
        return float(result[0]["value"][1])

    def targets_health(self) -> dict[str, str]:
        """``scrapeUrl -> health`` ("up", "down", "unknown") of the active targets."""
        data = self._api("/api/v1/targets", {"state": "active"})
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}

    def rule_groups(self) -> list[Result]:
        """The loaded rule groups, each with its rules' ``health`` and ``lastError``."""
        return cast("list[Result]", self._api("/api/v1/rules")["groups"])

    def alerts(self) -> list[Result]:
        """The pending and firing alerts (``labels``, ``annotations``, ``state``, ...)."""
        return cast("list[Result]", self._api("/api/v1/alerts")["alerts"])

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a grace period). Idempotent."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        client, self._client = self._client, None
        if client is not None:
            client.close()

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
