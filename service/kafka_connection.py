"""Connecting to Kafka once, and saying in one line why the broker refused the client.

:func:`check_connection` opens one connection per bootstrap address with the service's own client
options (:func:`service.kafka.client_options`) and turns a TLS or SASL failure into one
:class:`~service.kafka.KafkaAccessError` that names its cause and the setting to look at (aiokafka
itself only says "Unable to bootstrap"); :func:`explain_connection_error` is that translation.
The start-up access check (:mod:`service.kafka_access`), ``topics``, ``replay`` and the ledger
tool call it before anything else.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from aiokafka import errors as kafka_errors
from aiokafka.conn import create_conn
from aiokafka.protocol.metadata import MetadataRequest

from service.config import ENV_PREFIX, KafkaSettings, SecurityProtocol
from service.kafka import (
    KafkaAccessError,
    KafkaAuthenticationError,
    KafkaTlsError,
    client_options,
)

KAFKA_VAR: Final = f"{ENV_PREFIX}KAFKA__"
"""The prefix of the Kafka settings' environment variables, as the messages name them."""
_VAR: Final = KAFKA_VAR


def _addresses(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for entry in bootstrap.split(","):
        host, _, port = entry.strip().rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return out


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def certificate_summary(path: Path | None) -> str:
    """``CN=rebind, expires 2026-01-01`` of a PEM certificate, or '' when unreadable."""
    if path is None:
        return ""
    try:
        from cryptography import x509  # noqa: PLC0415 - only to explain a refused certificate

        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return ""
    expires = cert.not_valid_after_utc
    state = "expired" if expires < datetime.now(UTC) else "expires"
    return f"{cert.subject.rfc4514_string()}, {state} {expires:%Y-%m-%d}"


def explain_connection_error(  # noqa: PLR0911 - a table of causes
    exc: BaseException, address: str, kafka: KafkaSettings
) -> KafkaAccessError | None:
    """The TLS or SASL cause of a failed connection, as one line; None for anything else (an
    unreachable broker is not an access problem)."""
    for cause in _chain(exc):
        if isinstance(cause, KafkaAccessError):
            return cause
        if isinstance(cause, ssl.SSLCertVerificationError):
            return _broker_certificate_problem(cause, address, kafka)
        if isinstance(cause, ssl.SSLError):
            return _handshake_problem(cause, address, kafka)
        if isinstance(cause, kafka_errors.SaslAuthenticationFailed):
            return _sasl_problem(cause, address, kafka)
        if isinstance(cause, kafka_errors.UnsupportedSaslMechanismError):
            return KafkaAuthenticationError(
                f"kafka: SASL: the listener at {address} does not offer "
                f"{kafka.sasl_mechanism}: {_broker_words(cause)}; check {_VAR}SASL_MECHANISM",
                retry=False,
            )
        if isinstance(cause, kafka_errors.IllegalSaslStateError):
            return KafkaAuthenticationError(
                f"kafka: SASL: the listener at {address} does not expect SASL; check "
                f"{_VAR}SECURITY_PROTOCOL (it is {kafka.security_protocol.value}) and the port",
                retry=False,
            )
    return None


def _broker_certificate_problem(
    cause: ssl.SSLCertVerificationError, address: str, kafka: KafkaSettings
) -> KafkaTlsError:
    words = str(cause.verify_message or cause.reason or cause)
    lowered = words.lower()
    if "expired" in lowered:
        return KafkaTlsError(
            f"kafka: TLS: the broker's certificate at {address} has expired ({words}); the "
            "broker must renew it"
        )
    if "mismatch" in lowered or "hostname" in lowered:
        return KafkaTlsError(
            f"kafka: TLS: the broker's certificate at {address} does not name that host "
            f"({words}); use the names the brokers advertise in {_VAR}BOOTSTRAP_SERVERS, or set "
            f"{_VAR}SSL_CHECK_HOSTNAME=false"
        )
    trusted = (
        f"{_VAR}SSL_CAFILE ({kafka.ssl_cafile}) does not hold the CA that signed it"
        if kafka.ssl_cafile is not None
        else f"{_VAR}SSL_CAFILE is unset, so only the system's CAs are trusted"
    )
    return KafkaTlsError(
        f"kafka: TLS: the broker's certificate at {address} is not trusted ({words}): {trusted}"
    )


def _handshake_problem(cause: ssl.SSLError, address: str, kafka: KafkaSettings) -> KafkaTlsError:
    reason = str(cause.reason or "").upper()
    words = str(cause.strerror or cause).split(" (_ssl.c:")[0]
    if "ALERT" in reason and any(
        w in reason for w in ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED", "HANDSHAKE_FAILURE")
    ):
        if kafka.ssl_certfile is None:
            return KafkaTlsError(
                f"kafka: TLS: the broker at {address} refused the connection ({words}): it asks "
                f"for a client certificate (mutual TLS); set {_VAR}SSL_CERTFILE and "
                f"{_VAR}SSL_KEYFILE"
            )
        summary = certificate_summary(kafka.ssl_certfile)
        return KafkaTlsError(
            f"kafka: TLS: the broker at {address} refused the client certificate "
            f"{_VAR}SSL_CERTFILE ({summary or kafka.ssl_certfile}): {words}; it must be signed "
            "by a CA the broker trusts and be valid"
        )
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason or "LENGTH" in reason:
        return KafkaTlsError(
            f"kafka: TLS: the listener at {address} does not speak TLS ({words}); check "
            f"{_VAR}SECURITY_PROTOCOL (it is {kafka.security_protocol.value}) and the port",
            retry=False,
        )
    return KafkaTlsError(f"kafka: TLS: the handshake with {address} failed: {words}")


def _broker_words(cause: BaseException) -> str:
    text = str(cause.args[0]) if cause.args else type(cause).__name__
    return text or type(cause).__name__


def _sasl_problem(
    cause: BaseException, address: str, kafka: KafkaSettings
) -> KafkaAuthenticationError:
    words = _broker_words(cause)
    if kafka.sasl_mechanism == "OAUTHBEARER":
        return KafkaAuthenticationError(
            f"kafka: SASL OAUTHBEARER: the broker at {address} refused the token of "
            f"{_VAR}SASL_OAUTH_TOKEN_FILE ({kafka.sasl_oauth_token_file}): {words}; the file is "
            "read again at the next attempt"
        )
    return KafkaAuthenticationError(
        f"kafka: SASL {kafka.sasl_mechanism}: the broker at {address} refused user "
        f"{kafka.sasl_username!r}: {words}; check {_VAR}SASL_USERNAME and {_VAR}SASL_PASSWORD "
        "(read once at start: a restart picks up a rotated password)",
        retry=False,
    )


def _closed_at_once(exc: BaseException, kafka: KafkaSettings) -> bool:
    """A plaintext client at a TLS listener: the broker drops the connection at the first
    bytes (it could also be a broker going down: this only adds a hint, and is retried)."""
    plaintext = kafka.security_protocol in (
        SecurityProtocol.PLAINTEXT,
        SecurityProtocol.SASL_PLAINTEXT,
    )
    return (
        plaintext
        and isinstance(exc, kafka_errors.KafkaConnectionError)
        and str(exc).endswith("closed")
    )


async def check_connection(kafka: KafkaSettings, *, timeout_ms: int = 15_000) -> None:
    """Open (and close) one connection to a bootstrap address with the service's options.

    Raises :class:`~service.kafka.KafkaAccessError` (TLS, SASL) naming the cause and the setting
    when no address accepted the client for such a reason; an unreachable cluster raises
    aiokafka's ``KafkaConnectionError`` with each address's error.
    """
    options = client_options(kafka)  # reads the TLS files: may raise KafkaTlsError
    problems: list[KafkaAccessError] = []
    failures: list[str] = []
    for host, port in _addresses(kafka.bootstrap_servers):
        address = f"{host}:{port}"
        try:
            conn = await create_conn(
                host,
                port,
                client_id=options["client_id"],
                request_timeout_ms=timeout_ms,
                ssl_context=options.get("ssl_context"),
                security_protocol=options["security_protocol"],
                sasl_mechanism=options.get("sasl_mechanism"),
                sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password"),
                sasl_oauth_token_provider=options.get("sasl_oauth_token_provider"),
            )
        except Exception as exc:  # noqa: BLE001 - every failure is explained or reported
            problem = explain_connection_error(exc, address, kafka)
            if problem is None and _closed_at_once(exc, kafka):
                problem = KafkaAccessError(
                    f"kafka: the broker at {address} closed the connection at the first request: "
                    f"a TLS listener? {_VAR}SECURITY_PROTOCOL is {kafka.security_protocol.value}"
                )
            if problem is not None:
                problems.append(problem)
            failures.append(f"{address}: {type(exc).__name__}: {exc}")
            continue
        try:
            # A listener that expects SASL accepts ApiVersions from anyone, then closes the
            # connection at the first real request of a client that did not authenticate.
            await conn.send(MetadataRequest([]))
        except Exception as exc:  # noqa: BLE001 - explained below
            problems.append(
                explain_connection_error(exc, address, kafka)
                or KafkaAccessError(
                    f"kafka: the broker at {address} closed the connection at the first request "
                    f"after connecting: check that {_VAR}SECURITY_PROTOCOL (it is "
                    f"{kafka.security_protocol.value}) is the listener's protocol",
                    retry=False,
                )
            )
            continue
        finally:
            conn.close()
        return
    if problems:
        raise problems[0]
    raise kafka_errors.KafkaConnectionError(
        "Unable to connect to any bootstrap address: " + "; ".join(failures)
    )
