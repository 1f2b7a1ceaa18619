"""Prometheus metrics. Labels stay bounded: never a deviceId, nodeId or event id.

One ``Metrics`` object per process (tests may build their own on a private registry).
"""

from __future__ import annotations

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from service import __version__

log = structlog.get_logger(__name__)

# The *_created series only double the scrape size.
disable_created_metrics()  # type: ignore[no-untyped-call]

THROTTLE_CODE = "1010009"  # the platform's flow control
DEVICE_ONLINE_CODE = "100611"  # "device is online"

OUTCOMES = ("credential_updated", "rebind_failed", "dead_lettered", "deferred", "duplicate")
BIND_RESULTS = ("bound_push", "bound_poll", "expired", "unconfirmed")
OPERATIONS = (
    "refresh_device_key",
    "login",
    "refresh_token",
    "query_device",
    "query_activation",
    "subscribe",
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


BODY_READ_RESULTS = ("found", "lost", "failed")

_RAW_CODE_MAX = 64
"""Characters of an unlisted error code kept in its log line."""


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _status_label(http_status: int | None) -> str:
    if http_status is None:
        return "none"
    return str(http_status) if 100 <= http_status <= 599 else "other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_consumed = Counter(
            "rebind_events_consumed", "Records read from Kafka.", ["topic"], registry=r
        )
        self.outcomes = Counter(
            "rebind_outcomes", "Outcomes committed, by kind.", ["outcome"], registry=r
        )
        self.platform_requests = Counter(
            "rebind_platform_requests",
            "Calls made to the platform, by operation, HTTP status and platform error code.",
            ["operation", "http_status", "error_code"],
            registry=r,
        )
        self.platform_request_duration = Histogram(
            "rebind_platform_request_duration_seconds",
            "Duration of platform calls.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.throttle_rejections = Counter(
            "rebind_platform_throttle_rejections",
            "Flow-control rejections (1010009) answered by the platform.",
            ["operation"],
            registry=r,
        )
        self.device_online_rejections = Counter(
            "rebind_platform_device_online_rejections",
            "'Device is online' rejections (100611) answered by the platform.",
            registry=r,
        )
        self.rate_limiter_wait = Histogram(
            "rebind_rate_limiter_wait_seconds",
            "Time a call waited for the shared rate budget.",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.rate_limit_per_minute = Gauge(
            "rebind_rate_limit_per_minute",
            "This replica's share of the application's calls per minute.",
            registry=r,
        )
        self.budget_lease_expired = Gauge(
            "rebind_budget_lease_expired",
            "1 while this replica's budget lease has run out: no record of its calls was "
            "acknowledged by the budget topic for the lease (3 publication intervals, 6 s), so "
            "it makes no platform call until one is.",
            registry=r,
        )
        self.deferred_events = Gauge(
            "rebind_deferred_events",
            "Swaps waiting for their device to go offline.",
            registry=r,
        )
        self.inflight_events = Gauge(
            "rebind_inflight_events", "Events being worked on now.", registry=r
        )
        self.consumer_lag = Gauge(
            "rebind_consumer_lag", "Records behind the partition's end.", ["partition"], registry=r
        )
        self.oldest_unfinished = Gauge(
            "rebind_partition_oldest_unfinished_seconds",
            "Age of the oldest input record of the partition read and not finished yet.",
            ["partition"],
            registry=r,
        )
        self.redeliveries_skipped = Counter(
            "rebind_redeliveries_skipped",
            "Records read again after a crash or rebalance whose outcome was already published: "
            "finished without any work.",
            registry=r,
        )
        self.misrouted_records = Counter(
            "rebind_misrouted_records",
            "Input records found on another partition than their key hashes to (by "
            "REBIND_KAFKA__PARTITIONER): forwarded to their key's partition.",
            registry=r,
        )
        self.ledger_entries_expired = Counter(
            "rebind_ledger_entries_expired",
            "Done ledger entries removed (a tombstone in the partition's transaction) because "
            "their swap is older than REBIND_LEDGER__RETENTION_DAYS.",
            registry=r,
        )
        self.ledger_body_reads = Counter(
            "rebind_ledger_body_reads",
            "Swap bodies read back from the ledger topic (a waiting swap due, a watch polled or "
            "ended, a newer swap or a push of its device), by result: found; lost (the record "
            "was gone: a waiting swap is answered rebind-failed INTERNAL_ERROR, a watch goes on "
            "with a compact copy); failed (the read failed: asked again after a pause).",
            ["result"],
            registry=r,
        )
        self.ledger_body_read_seconds = Histogram(
            "rebind_ledger_body_read_seconds",
            "Time of one read of the bodies a partition asked for together, from the ledger "
            "topic (seek, fetch until every asked offset is passed).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.swaps_too_old = Counter(
            "rebind_swaps_too_old",
            "Swaps answered rebind-failed SWAP_TOO_OLD without a call: their time is older than "
            "the ledger's retention horizon.",
            registry=r,
        )
        self.bind_watches = Gauge(
            "rebind_bind_watches",
            "Refreshed devices watched until their new hardware binds.",
            registry=r,
        )
        self.bind_near_expiry = Gauge(
            "rebind_bind_watches_near_expiry",
            "Watched devices refreshed with a non-zero timeout that have 20 % or less of it "
            "left and have not bound (the platform deletes their registration at 0).",
            registry=r,
        )
        self.bind_poll_overdue = Gauge(
            "rebind_bind_poll_overdue_seconds",
            "How long the most overdue bind-watch poll has waited past its schedule (0: none is "
            "overdue). Polls wait for their share of the platform budget.",
            registry=r,
        )
        self.bind_results = Counter(
            "rebind_bind_results",
            "Ends of bind watches, by result.",
            ["result"],
            registry=r,
        )
        self.bind_seconds = Histogram(
            "rebind_bind_seconds",
            "Time from a key refresh to the new hardware binding.",
            buckets=(1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 14_400.0, 86_400.0),
            registry=r,
        )
        self.bind_notifications = Counter(
            "rebind_bind_notifications",
            "bindDevice pushes, by result (accepted: stored on Kafka; duplicate: matched no "
            "open watch, or named another nodeId than the watched swap's; unproven: no nodeId, "
            "settles nothing; rejected: malformed or unknown; wrong_path: not the secret path; "
            "too_large: body over 64 KiB; rate_limited: over a peer's or the total rate).",
            ["result"],
            registry=r,
        )
        self.lane_answered = Counter(
            "rebind_lane_records_answered",
            "Input records answered (outcome, dead letter, duplicate, deferral) and committed, "
            "by lane (bulk: the input topic; urgent: the urgent lane).",
            ["lane"],
            registry=r,
        )
        self.record_to_call = Histogram(
            "rebind_record_to_call_seconds",
            "Time from an input record's Kafka timestamp to its swap's first platform call "
            "leaving, by lane: the wait behind the buffer, the scheduler and the budget.",
            ["lane"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.lane_backlog = Gauge(
            "rebind_lane_backlog",
            "Records of the lane not answered yet: behind the partitions' ends, plus read and "
            "not finished (every 5 s).",
            ["lane"],
            registry=r,
        )
        self.urgent_oldest_waiting = Gauge(
            "rebind_urgent_oldest_waiting_seconds",
            "Age of the oldest urgent-lane record read and not answered yet (0: none).",
            registry=r,
        )
        self.urgent_wait_bound = Gauge(
            "rebind_urgent_wait_bound_seconds",
            "REBIND_PLATFORM__URGENT_WAIT_ALERT_SECONDS: the alert RebindUrgentSwapWaiting fires "
            "while an urgent swap waits longer.",
            registry=r,
        )
        self.event_latency = Histogram(
            "rebind_event_latency_seconds",
            "Time from an input event's Kafka timestamp to its outcome being committed.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.transactions = Counter(
            "rebind_kafka_transactions",
            "Kafka transactions, by result (committed, aborted).",
            ["result"],
            registry=r,
        )
        self.token_valid = Gauge(
            "rebind_platform_token_valid",
            "1 while this replica holds an access token that has not expired.",
            registry=r,
        )
        self.token_holder = Gauge(
            "rebind_platform_token_holder",
            "1 while this replica is the token holder (the only one that logs in or refreshes "
            "the application's access token).",
            registry=r,
        )
        self.token_rotations = Counter(
            "rebind_platform_token_rotations",
            "Token rotations by the holder, by result (renewed; failed: the platform refused or "
            "did not answer, the old token kept; fenced: another replica became the holder).",
            ["result"],
            registry=r,
        )
        self.auth_blocked = Gauge(
            "rebind_platform_auth_blocked",
            "1 while the platform refuses the service's login (wrong or rotated secret, unknown "
            "or frozen application): the input is paused and the login retried.",
            registry=r,
        )
        self.ready = Gauge("rebind_ready", "1 while /readyz answers 200.", registry=r)
        self.build_info = Gauge("rebind_build_info", "Build information.", ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)
        for outcome in OUTCOMES:
            self.outcomes.labels(outcome=outcome)
        for operation in OPERATIONS:
            self.throttle_rejections.labels(operation=operation)
        for result in BIND_RESULTS:
            self.bind_results.labels(result=result)
        for result in (  # the listener's closed set (service.bind.listener.RESULTS_COUNTED)
            "accepted",
            "duplicate",
            "unproven",
            "rejected",
            "wrong_path",
            "too_large",
            "rate_limited",
        ):
            self.bind_notifications.labels(result=result)
        for result in ("renewed", "failed", "fenced"):
            self.token_rotations.labels(result=result)
        for result in BODY_READ_RESULTS:
            self.ledger_body_reads.labels(result=result)

    def platform_call(
        self, operation: str, http_status: int | None, error_code: str | None, seconds: float
    ) -> None:
        """Count one platform call and its answer; 1010009 and 100611 have counters of their own.

        The ``error_code`` label is bounded: a code that is neither in the error table nor one of
        the service's own counts as ``other`` (its raw value is logged at WARNING instead).
        """
        # service.platform imports this module: the table is looked up when first needed.
        from service.platform.errors import OTHER_CODE, metric_code  # noqa: PLC0415

        code_label = metric_code(error_code or None)
        if code_label == OTHER_CODE:
            log.warning(
                "platform_error_code_unlisted",
                operation=operation,
                http_status=http_status,
                error_code=_clip(str(error_code), _RAW_CODE_MAX),
                label=OTHER_CODE,
            )
        self.platform_requests.labels(
            operation=operation,
            http_status=_status_label(http_status),
            error_code=code_label,
        ).inc()
        self.platform_request_duration.labels(operation=operation).observe(max(0.0, seconds))
        if error_code == THROTTLE_CODE:
            self.throttle_rejections.labels(operation=operation).inc()
        elif error_code == DEVICE_ONLINE_CODE:
            self.device_online_rejections.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
