"""Wiring: settings in, a running service out. The only place that knows every component."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import structlog

from service import __version__, logs
from service.bind.listener import BindListener, subscription_url
from service.bind.watch import WatchPolicy
from service.config import Settings
from service.handler import RebindHandler
from service.httpserver import OpsServer
from service.kafka import FatalPipelineError, client_options
from service.metrics import Metrics
from service.ops_port import http_port_message
from service.pipeline.expiry import Retention
from service.pipeline.outcomes import OutcomeBuilder
from service.pipeline.pipeline import Pipeline
from service.platform import PRIORITY_FRESH, PlatformClient, RateBudget, TokenManager
from service.platform.tokens import AuthGate
from service.shared.budget_exchange import BudgetExchange
from service.shared.shared_token import SharedTokenProvider
from service.startup import StartupError, StartupSupervisor

log = structlog.get_logger(__name__)


class Service:
    """The service's parts, started and stopped in order. Tests run it in-process too."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        p = settings.platform
        self.budget = RateBudget(
            p.rate_limit_per_minute, metrics=self.metrics, window_seconds=p.rate_window_seconds
        )
        self.budget.set_poll_share(settings.bind.poll_budget_share)
        self.budget.set_bulk_min_share(p.bulk_min_share)
        self.metrics.urgent_wait_bound.set(p.urgent_wait_alert_seconds)
        self._subscription: asyncio.Task[None] | None = None
        self._build()
        self.ops = OpsServer(
            settings.http.host, settings.http.port, self.metrics, self.readiness, self.alive
        )
        # Kafka not reachable yet, topics not created yet: wait, retry, say why (/readyz).
        self.startup = StartupSupervisor(settings)
        self._assigned_once = False
        self._heartbeat = time.monotonic()

    def _build(self) -> None:
        """The parts that hold Kafka or HTTP clients; built anew after a failed start attempt."""
        settings = self.settings
        p = settings.platform
        # Every replica's recent calls, through Kafka, so rebalances never overrun the budget.
        self.budget_exchange = BudgetExchange.from_settings(settings, self.budget, self.metrics)
        # One token holder per application (docs/tokens.md): the owner of input partition 0.
        self.tokens = SharedTokenProvider(
            p, settings.kafka, settings.topics.token, self.metrics, self.budget
        )
        self.client = PlatformClient(
            p,
            self.metrics,
            self.budget,
            tokens=self.tokens,
            user_agent=f"device-rebind/{__version__} ({settings.kafka.instance_id})",
        )
        outcomes = OutcomeBuilder(settings)
        self.handler = RebindHandler(settings, self.client, self.metrics, outcomes=outcomes)
        self.pipeline = Pipeline(
            settings.kafka,
            settings.topics,
            self.handler,
            self.metrics,
            outcomes=outcomes,
            concurrency=p.max_concurrency,
            # Each buffered record needs at least one call: buffering more than about a minute
            # of the budget only ages records before they start.
            max_buffered=max(
                p.max_concurrency, min(8 * p.max_concurrency, p.rate_limit_per_minute)
            ),
            # A buffer bound by the budget (a minute of calls) holds its records long enough
            # for the order of reading to matter: reads of a partition's share of it, so every
            # partition is worked (docs/core.md). A larger budget turns the buffer over in well
            # under a second: reads stay whole (cheaper per event, make bench section 1).
            share_reads=p.rate_limit_per_minute < 8 * p.max_concurrency,
            on_assignment=self._share_budget,
            on_revocation=self._before_revocation,
            watch=WatchPolicy.from_settings(settings.bind, settings.platform)
            if settings.bind.enabled
            else None,
            bind_notify=settings.bind.callback_url is not None,
            on_drain=self._draining,
            retention=Retention(settings.ledger.retention_ms),
        )
        self.tokens.gate.subscribe(self._auth_changed)
        # The platform's bindDevice pushes: stored on Kafka, correlated by the device's owner.
        self.bind_listener = (
            BindListener(
                settings.bind,
                settings.topics.bind_notify,
                client_options(settings.kafka),
                self.metrics,
                settings.kafka.partitioner,
            )
            if settings.bind.callback_url is not None
            else None
        )

    def _draining(self, handing_over: bool) -> None:
        """Calls not granted yet are not waited for when work is handed over."""
        if handing_over:
            self.budget.interrupt()
        else:
            self.budget.resume()

    def _auth_changed(self, gate: AuthGate) -> None:
        """A login the platform refuses (wrong secret) holds the input until one is accepted."""
        if gate.blocked:
            self.pipeline.hold(gate.reason or "platform: login refused")
        else:
            self.pipeline.release()

    async def _share_budget(self, mine: int, total: int) -> None:
        """Each replica spends the application's budget in proportion to its partitions, minus
        what every replica spent in the last window (docs/budget.md)."""
        self._assigned_once = True
        # A replica without input partitions still needs a sliver (a login, a deferred retry).
        share = max(mine / total, 1e-6) if total else 1.0
        log.info("rate_budget_share", partitions=mine, of=total, share=round(share, 3))
        # The group's assignment decides, whether or not the partition is open yet.
        self.tokens.set_holder(0 in self.pipeline.group_assignment())
        await self.budget_exchange.on_assigned(share)

    async def _before_revocation(self) -> None:
        """The pipeline's revocation is settled: stop calling and publish our calls before the
        member re-joins (every live replica's record is then read at the assignment)."""
        await self.budget_exchange.on_revoked()

    def alive(self) -> bool:
        return time.monotonic() - self._heartbeat < 30

    def readiness(self) -> tuple[bool, str]:  # noqa: PLR0911 - one return per reason
        if not self.pipeline.started.is_set():
            return False, self.startup.reason or "kafka: not connected yet"
        if not self._assigned_once:
            return False, "kafka: waiting for the consumer group to assign partitions"
        if self.tokens.gate.blocked:
            return False, self.tokens.gate.reason or "platform: login refused"
        unopened = self.pipeline.unopened()
        if unopened:
            return (
                False,
                f"kafka: assigned partitions {unopened} could not be opened yet (retrying)",
            )
        if self.budget.lease_expired():
            exchange = self.budget_exchange
            return False, (
                f"budget lease expired: no record acknowledged by the budget topic "
                f"(REBIND_TOPICS__BUDGET={self.settings.topics.budget}) for "
                f"{exchange.lease_seconds:g} s; platform calls wait"
            )
        stuck = self.pipeline.stuck_partitions()
        if stuck:
            return False, (
                f"kafka: partitions {stuck} have a record unfinished for more than "
                f"{self.settings.kafka.stuck_partition_seconds:g} s"
            )
        tokens = self.client.tokens
        if isinstance(tokens, TokenManager | SharedTokenProvider) and not tokens.healthy():
            return False, "platform: no valid token and the last login failed"
        return True, "ready"

    async def _beat(self) -> None:
        while True:
            self._heartbeat = time.monotonic()
            await asyncio.sleep(1)

    async def run(self) -> None:
        """Serve the ops port, wait for Kafka (retrying), then consume until :meth:`stop`.

        Raises :class:`StartupError` when the service cannot start (port in use, topics missing
        after the grace period, not co-partitioned, credentials refused)."""
        beat = asyncio.create_task(self._beat(), name="heartbeat")
        try:
            await self.ops.start()
        except OSError as exc:
            beat.cancel()
            raise StartupError(http_port_message(self.settings.http, exc), exit_code=2) from None
        log.info(
            "ops_port_listening",
            host=self.settings.http.host,
            port=self.ops.port,
            paths="/metrics /healthz /readyz",
        )
        try:
            if await self.startup.run(self._start_parts, self._rebuild):
                await self.pipeline.run()
        finally:
            beat.cancel()
            await self._close_parts()
            await self.budget.aclose()
            await self.ops.stop()

    async def _start_parts(self) -> None:
        await self.tokens.start()
        await self.budget_exchange.start()
        await self.pipeline.start()
        self.budget.set_lane_headroom(self.pipeline.urgent_lane is not None)
        if self.bind_listener is not None:
            await self.bind_listener.start()
            self._subscription = asyncio.create_task(self._subscribe(), name="subscribe")

    async def _subscribe(self) -> None:
        """Subscribe the application to bindDevice pushes (repeating it is harmless), retrying
        with a capped backoff until the platform accepts it; each try spends the budget."""
        url = subscription_url(self.settings.bind)
        delay = 5.0
        while True:
            result = await self.client.subscribe("bindDevice", url, None, priority=PRIORITY_FRESH)
            if result.ok:
                log.info("bind_subscribed")
                return
            log.warning(
                "bind_subscription_refused_retrying",
                error_code=result.error_code,
                http_status=result.http_status,
                retry_in_seconds=delay,
            )
            await asyncio.sleep(delay)
            delay = min(300.0, delay * 2)

    async def _close_parts(self) -> None:
        if self._subscription is not None:
            self._subscription.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._subscription
        if self.bind_listener is not None:
            await self.bind_listener.stop()
        await self.tokens.aclose()
        await self.client.aclose()
        await self.budget_exchange.stop()  # a final record: our calls still count

    async def _rebuild(self) -> None:
        """After a start attempt failed half-way: close what it opened, build fresh parts."""
        # (Pipeline.start closes its own clients when it fails or is cancelled.)
        with contextlib.suppress(Exception):
            await self._close_parts()
        self._build()

    def stop(self) -> None:
        self.startup.stop()
        self.pipeline.stop()


async def run(settings: Settings) -> int:
    logs.configure(settings.log)
    service = Service(settings)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second_signal_exiting", signal=signal.Signals(signum).name)
            os._exit(130)
        log.info("stopping_draining", signal=signal.Signals(signum).name)
        service.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info(
        "starting",
        instance=settings.kafka.instance_id,
        group=settings.kafka.group_id,
        input=settings.topics.device_swapped,
        platform=str(settings.platform.base_url),
        budget_per_minute=settings.platform.rate_limit_per_minute,
        budget_window_seconds=settings.platform.rate_window_seconds,
    )
    try:
        await service.run()
    except StartupError as exc:
        log.error("cannot_start", reason=str(exc))  # noqa: TRY400 - one line, no traceback
        return exc.exit_code
    except FatalPipelineError as exc:
        log.exception("fatal", error=str(exc))
        return 1
    log.info("stopped")
    return 0
