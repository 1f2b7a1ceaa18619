"""The outcome events of a swap, built in one place: ``credential-updated``, ``rebind-failed``
(after a call, or decided without one: superseded, a bind watch that ended, a swap too old) and
``device.rebound``, each with the headers saying where its swap was read.

The handler uses it for the outcomes of its calls; each partition's core is given it for the
answers it decides without calling the platform. Neither calls back into what fed it.

Invariants: every outcome record fits ``max_input_bytes`` (a context too large is trimmed and
flagged), carries the source headers of its swap, and is logged once, at INFO, by its kind
(``credential_updated``, ``rebind_failed``, ``device_rebound``).
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from service.config import Settings
from service.events import (
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
    OutcomeEvent,
    credential_updated,
    device_rebound,
    rebind_failed,
)
from service.pipeline.intake import trimmed_for_ledger
from service.pipeline.records import OutcomeKind, Output
from service.pipeline.work import Outcome, Work
from service.platform import SUPERSEDED, Failed, RefreshRequest, Succeeded, classify

log = structlog.get_logger(__name__)


def source_headers(work: Work) -> list[tuple[str, bytes]]:
    """Where the swap was read, so an outcome can be traced back and ``device-rebind replay``
    can find the original event."""
    return [
        (SOURCE_TOPIC_HEADER, work.topic.encode()),
        (SOURCE_PARTITION_HEADER, str(work.partition).encode()),
        (SOURCE_OFFSET_HEADER, str(work.origin_offset).encode()),
    ]


def _output(topic: str, event: OutcomeEvent, work: Work, kind: OutcomeKind) -> Output:
    """The record of an outcome event, with the headers saying where its swap was read."""
    return Output(topic, event.key, event.value, event.headers + source_headers(work), kind)


def _dt(epoch_seconds: float | None) -> datetime | None:
    return None if epoch_seconds is None else datetime.fromtimestamp(epoch_seconds, UTC)


class OutcomeBuilder:
    """Builds the outcome records of swaps for one service (its topics, its event ``source``)."""

    def __init__(self, settings: Settings) -> None:
        self._topics = settings.topics
        self._source = f"/device-rebind/{settings.kafka.group_id}"
        self._max_bytes = settings.kafka.max_input_bytes  # no outcome record is larger

    def succeeded(
        self, work: Work, req: RefreshRequest, result: Succeeded, prior_attempts: int
    ) -> Outcome:
        attempts = prior_attempts + result.attempts
        log.info("credential_updated", attempts=attempts, reconciled=result.reconciled)
        # The platform echoes what we sent; should it answer something out of contract, the
        # outcome carries what was sent rather than break the output schema.
        verify_code = result.verify_code if 1 <= len(result.verify_code) <= 256 else req.verify_code
        timeout = result.timeout if 0 <= result.timeout <= 2_147_483_647 else req.timeout
        event = credential_updated(
            work.swap,
            verify_code=verify_code,
            timeout=timeout,
            attempts=max(1, attempts),
            source=self._source,
            time=datetime.now(UTC),
            max_bytes=self._max_bytes,
            context_truncated=trimmed_for_ledger(work),
        )
        return Outcome(
            OutcomeKind.CREDENTIAL_UPDATED,
            _output(self._topics.credential_updated, event, work, OutcomeKind.CREDENTIAL_UPDATED),
            timeout=timeout,
        )

    def failed(self, work: Work, failed: Failed, last_code: str | None = None) -> Outcome:
        swap = work.swap
        log.info(
            "rebind_failed",
            error_code=failed.error_code,
            http_status=failed.http_status,
            category=failed.category,
            attempts=failed.attempts,
        )
        desc = failed.error_desc or failed.error_code
        if last_code and last_code not in desc:
            desc = f"{desc} (last platform code {last_code})"
        event = rebind_failed(
            swap,
            error_code=failed.error_code,
            error_desc=desc,
            http_status=failed.http_status,
            category=failed.category,
            recommended_handling=failed.recommended_handling,
            attempts=failed.attempts,
            first_attempt_at=_dt(failed.first_attempt_at),
            last_attempt_at=_dt(failed.last_attempt_at),
            source=self._source,
            time=datetime.now(UTC),
            max_bytes=self._max_bytes,
            context_truncated=trimmed_for_ledger(work),
        )
        return Outcome(
            OutcomeKind.REBIND_FAILED,
            _output(self._topics.rebind_failed, event, work, OutcomeKind.REBIND_FAILED),
        )

    def superseded(self, work: Work, newer_event_id: str) -> Outcome:
        """The answer to a swap that a newer swap of the same device replaced."""
        wait = work.wait
        log.info("superseded", newer_event_id=newer_event_id)
        return self.service_failed(
            work,
            SUPERSEDED,
            f"a newer swap of the device ({newer_event_id}) replaced this one",
            attempts=wait.attempts if wait else 0,
            first_attempt_at=(wait.first_attempt_ms or 0) / 1000 if wait else None,
            last_code=wait.last_code if wait else None,
        )

    def service_failed(
        self,
        work: Work,
        code: str,
        desc: str,
        *,
        attempts: int = 0,
        first_attempt_at: float | None = None,
        last_attempt_at: float | None = None,
        last_code: str | None = None,
    ) -> Outcome:
        """``rebind-failed`` with a code of the service's own (no HTTP status), its category and
        recommended handling from the error table."""
        spec = classify("refresh_device_key", None, code)
        return self.failed(
            work,
            Failed(
                error_code=code,
                error_desc=desc,
                http_status=None,
                category=spec.category,
                recommended_handling=spec.recommended_handling,
                attempts=attempts,
                first_attempt_at=first_attempt_at,
                last_attempt_at=last_attempt_at,
            ),
            last_code=last_code,
        )

    # ---- bind watches ----------------------------------------------------------------------

    def bind_failed(self, work: Work, code: str, desc: str) -> Outcome:
        """``rebind-failed`` with a service code decided without a call: BIND_EXPIRED or
        BIND_NOT_CONFIRMED after a refresh, SWAP_TOO_OLD for a swap older than the ledger's
        retention."""
        return self.service_failed(work, code, desc)

    def rebound(self, work: Work, via: str, bound_at_ms: int, refreshed_ms: int) -> Output:
        """The ``device.rebound`` event: the new hardware bound."""
        seconds = max(0.0, (bound_at_ms - refreshed_ms) / 1000)
        log.info("device_rebound", via=via, seconds_to_bind=round(seconds, 3))
        event = device_rebound(
            work.swap,
            bound_at=datetime.fromtimestamp(bound_at_ms / 1000, UTC),
            via="push" if via == "push" else "poll",
            seconds_to_bind=seconds,
            source=self._source,
            time=datetime.now(UTC),
            max_bytes=self._max_bytes,
            context_truncated=trimmed_for_ledger(work),
        )
        return Output(
            self._topics.device_rebound,
            event.key,
            event.value,
            event.headers + source_headers(work),
        )
