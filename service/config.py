"""Settings: one pydantic-settings model, read once at start, passed down as plain objects.

Every variable is ``REBIND_<SECTION>__<NAME>``. No other module reads the environment.
"""

from __future__ import annotations

import difflib
import os
import socket
import types
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.events import DEFAULT_MAX_RECORD_BYTES

ENV_PREFIX = "REBIND_"
ENV_NESTED_DELIMITER = "__"


class SecurityProtocol(StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


def _secret(value: Any) -> Any:
    """Secrets lose surrounding whitespace (a file written by ``echo`` and mounted with
    ``kubectl create secret --from-file`` ends with a newline) and may not be empty."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise PydanticCustomError("empty_secret", "is empty")
    return value


Secret = Annotated[SecretStr, BeforeValidator(_secret)]
"""A secret setting: stripped of surrounding whitespace, never empty, masked everywhere."""


def _readable_file(path: Path) -> Path:
    if not path.exists():
        raise PydanticCustomError("file_missing", "no such file: {path}", {"path": str(path)})
    if not path.is_file():
        raise PydanticCustomError("not_a_file", "not a file: {path}", {"path": str(path)})
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise PydanticCustomError(
            "file_unreadable",
            "cannot read {path}: {reason}",
            {"path": str(path), "reason": exc.strerror or type(exc).__name__},
        ) from None
    return path


ReadableFile = Annotated[Path, AfterValidator(_readable_file)]
"""A path setting (certificates, keys, CA bundles): must name an existing, readable file."""


def _bootstrap_servers(value: Any) -> Any:
    """``host:port[,host:port...]``, whitespace around entries ignored, normalised."""
    if not isinstance(value, str):
        return value
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if not entries:
        raise PydanticCustomError(
            "bootstrap_empty", "names no broker: expected host:port[,host:port...]"
        )
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65_536:
            raise PydanticCustomError(
                "bootstrap_entry", f"{entry!r} is not host:port (e.g. kafka-0.kafka:9092)"
            )
    return ",".join(entries)


def _choices(annotation: Any) -> tuple[str, ...]:
    """The allowed words of an enum-like field (a StrEnum or a Literal of strings)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _choices(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return tuple(c for arg in get_args(annotation) for c in _choices(arg))
    if origin is Literal:
        return tuple(a for a in get_args(annotation) if isinstance(a, str))
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        return tuple(m.value for m in annotation)
    return ()


def _not_above(model: BaseModel, section: str, low: str, high: str) -> None:
    """Cross-field rule: setting ``low`` may not exceed setting ``high``."""
    low_value, high_value = getattr(model, low), getattr(model, high)
    if low_value > high_value:
        name = f"{ENV_PREFIX}{section}{ENV_NESTED_DELIMITER}"
        raise PydanticCustomError(
            "order",
            f"{name}{low.upper()}={low_value:g} is more than {name}{high.upper()}={high_value:g}; "
            "lower the first or raise the second",
        )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _choices_ignore_case(cls, data: Any) -> Any:
        """Every enum-like setting (protocols, mechanisms, levels, formats) ignores case."""
        if not isinstance(data, Mapping):
            return data
        out = dict(data)
        for name, info in cls.model_fields.items():
            value = out.get(name)
            if not isinstance(value, str):
                continue
            for choice in _choices(info.annotation):
                if choice.lower() == value.strip().lower():
                    out[name] = choice
                    break
        return out


def _sasl_needs(kafka: KafkaSettings) -> list[tuple[str, object]]:
    """The settings a SASL protocol needs with the chosen mechanism: a user name and password,
    or (OAUTHBEARER) a token file."""
    if kafka.sasl_mechanism == "OAUTHBEARER":
        return [("SASL_OAUTH_TOKEN_FILE", kafka.sasl_oauth_token_file)]
    return [
        ("SASL_MECHANISM", kafka.sasl_mechanism),
        ("SASL_USERNAME", kafka.sasl_username),
        ("SASL_PASSWORD", kafka.sasl_password),
    ]


class KafkaSettings(_Section):
    bootstrap_servers: Annotated[str, BeforeValidator(_bootstrap_servers)] = Field(
        default="localhost:9092", min_length=1, description="Comma-separated host:port list."
    )
    group_id: str = Field(default="device-rebind", min_length=1)
    client_id: str = Field(default="device-rebind", min_length=1)
    security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    sasl_oauth_token_file: Path | None = Field(
        default=None,
        description="OAUTHBEARER: a file holding the access token (a JWT), read again for every "
        "new connection, so a sidecar or a mounted Secret renews it without a restart.",
    )
    ssl_cafile: ReadableFile | None = None
    ssl_certfile: ReadableFile | None = Field(
        default=None,
        description="Mutual TLS: the client certificate (PEM, with its chain), read again for "
        "every new set of clients.",
    )
    ssl_keyfile: ReadableFile | None = Field(
        default=None, description="Mutual TLS: the client certificate's private key (PEM)."
    )
    ssl_key_password: Secret | None = Field(
        default=None, description="Password of an encrypted REBIND_KAFKA__SSL_KEYFILE."
    )
    ssl_check_hostname: bool = Field(
        default=True,
        description="Check that the broker's certificate names the host connected to. Turn it "
        "off only for brokers whose certificates do not name their advertised addresses.",
    )
    transactional_id_prefix: str = Field(
        default="device-rebind",
        min_length=1,
        description="Prefix of the transactional ids: <prefix>-<group>-<input topic>-<partition>, "
        "one per input partition.",
    )
    instance_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        description="Stable identity of this replica (pod name in Kubernetes). "
        "Names the replica in logs and in the budget exchange.",
    )
    static_membership: bool = Field(
        default=False,
        description="Join the consumer group as a static member (KIP-345) named by "
        "REBIND_KAFKA__INSTANCE_ID: a replica that comes back within the session timeout gets "
        "its partitions back without a rebalance, and one that stops hands them over only once "
        "the session timeout ran out. Two processes with one instance id fence each other: "
        "only with unique, stable instance ids (a StatefulSet's pod names).",
    )
    max_poll_records: int = Field(default=500, ge=1, le=100_000)
    session_timeout_ms: int = Field(default=30_000, ge=1_000)
    commit_interval_ms: int = Field(
        default=200, ge=1, le=60_000, description="Longest time between two transactions."
    )
    dedupe_entries_per_partition: int = Field(
        default=50_000,
        ge=0,
        le=10_000_000,
        description="Event ids remembered per input partition to recognise redelivered input.",
    )
    commit_batch_size: int = Field(
        default=500, ge=1, le=100_000, description="Outcomes per transaction at most."
    )
    stuck_partition_seconds: float = Field(
        default=900.0,
        gt=0,
        description="A partition whose oldest unfinished record is older than this makes "
        "/readyz answer 503.",
    )
    max_input_bytes: int = Field(
        default=DEFAULT_MAX_RECORD_BYTES,
        ge=131_072,
        le=DEFAULT_MAX_RECORD_BYTES,
        description="Largest input record (key, value once decompressed, headers) worked on; "
        "a larger one is dead-lettered too_large. No record the service writes is larger. At "
        "most 960 KiB: the service's producers send at most 1 MiB per record.",
    )
    partitioner: Literal["murmur2", "crc32"] = Field(
        default="murmur2",
        description="How upstream producers place a deviceId: murmur2 (Java clients, aiokafka, "
        "Kafka Streams) or crc32 (librdkafka's consistent/consistent_random: kcat, "
        "confluent-kafka). Input found on another partition than its key's is forwarded there; "
        "replay and the bind listener write by it.",
    )
    max_clock_skew_seconds: float = Field(
        default=300.0,
        gt=0,
        le=604_800,
        description="A swap whose CloudEvent time lies more than this after its record's "
        "timestamp is dead-lettered clock_skew: the latest time wins, so a swap dated ahead "
        "would make the device's later real swaps SUPERSEDED until that date.",
    )
    connect_backoff_initial_seconds: float = Field(
        default=1.0,
        gt=0,
        le=600,
        description="At start, the first wait before trying to reach Kafka again (doubles).",
    )
    connect_backoff_max_seconds: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="At start, the longest wait between two attempts to reach Kafka.",
    )
    topics_grace_seconds: float = Field(
        default=300.0,
        ge=0,
        description="At start, how long missing topics are waited for (they may be being "
        "created) before the service exits naming them.",
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> KafkaSettings:
        _not_above(self, "KAFKA", "connect_backoff_initial_seconds", "connect_backoff_max_seconds")
        return self

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL):
            missing = [name for name, value in _sasl_needs(self) if not value]
            if missing:
                raise ValueError(
                    f"{ENV_PREFIX}KAFKA__SECURITY_PROTOCOL={self.security_protocol.value} needs "
                    + ", ".join(f"{ENV_PREFIX}KAFKA__{m}" for m in missing)
                )
        return self

    @model_validator(mode="after")
    def _security_consistent(self) -> KafkaSettings:
        """TLS and OAUTHBEARER settings are complete and used by the chosen protocol."""
        var = f"{ENV_PREFIX}KAFKA__"
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError(f"{var}SSL_CERTFILE and {var}SSL_KEYFILE must be set together")
        if self.ssl_key_password is not None and self.ssl_keyfile is None:
            raise ValueError(f"{var}SSL_KEY_PASSWORD is set without {var}SSL_KEYFILE")
        tls = self.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL)
        if not tls:
            unused = [
                name
                for name, value in (
                    ("SSL_CAFILE", self.ssl_cafile),
                    ("SSL_CERTFILE", self.ssl_certfile),
                    ("SSL_KEYFILE", self.ssl_keyfile),
                )
                if value is not None
            ]
            if unused:
                raise ValueError(
                    ", ".join(var + name for name in unused)
                    + f" need {var}SECURITY_PROTOCOL=SSL or SASL_SSL "
                    f"(it is {self.security_protocol.value})"
                )
        if self.sasl_oauth_token_file is not None and self.sasl_mechanism != "OAUTHBEARER":
            raise ValueError(
                f"{var}SASL_OAUTH_TOKEN_FILE is used only with {var}SASL_MECHANISM=OAUTHBEARER"
            )
        return self


class TopicSettings(_Section):
    device_swapped: str = Field(default="asset.device-swapped.v1", min_length=1, max_length=249)
    device_swapped_urgent: str = Field(
        default="asset.device-swapped.urgent.v1",
        max_length=249,
        description="The urgent lane: swaps a person waits for, same contract as the input, "
        "co-partitioned with it; read beside the input and served first by the budget. Empty, "
        "or a topic that does not exist at start: no urgent lane.",
    )
    credential_updated: str = Field(
        default="iot.credential-updated.v1", min_length=1, max_length=249
    )
    rebind_failed: str = Field(default="iot.rebind-failed.v1", min_length=1, max_length=249)
    dead_letter: str = Field(default="asset.device-swapped.v1.dlq", min_length=1, max_length=249)
    retry: str = Field(
        default="device-rebind.retry.v1",
        min_length=1,
        max_length=249,
        description="No longer used: waiting swaps live in the ledger topic. Accepted so that "
        "existing configurations keep starting.",
    )
    ledger: str = Field(
        default="device-rebind.ledger.v1",
        min_length=1,
        max_length=249,
        description="Compacted, co-partitioned with the input: the latest swap of every device "
        "and where it stands (service-owned).",
    )
    token: str = Field(
        default="device-rebind.token.v1",
        min_length=1,
        max_length=249,
        description="Compacted, one partition: the shared access token, encrypted (service-owned).",
    )
    budget: str = Field(
        default="device-rebind.budget.v1",
        min_length=1,
        max_length=249,
        description="Compacted, one partition: every replica's recent platform calls, read at "
        "each rebalance so the replicas together never overrun the budget (service-owned).",
    )
    dedupe: str = Field(default="device-rebind.dedupe.v1", min_length=1, max_length=249)
    bind_notify: str = Field(
        default="device-rebind.bind-notify.v1",
        min_length=1,
        max_length=249,
        description="Co-partitioned with the input: bindDevice pushes received, keyed by "
        "deviceId (service-owned; only with REBIND_BIND__CALLBACK_URL).",
    )
    device_rebound: str = Field(
        default="iot.device-rebound.v1",
        min_length=1,
        max_length=249,
        description="Outcome: the new hardware bound.",
    )


class PlatformSettings(_Section):
    base_url: AnyHttpUrl = Field(description="e.g. https://iot.example.com:8743")
    app_id: str = Field(min_length=1, max_length=256)
    secret: Secret
    secret_file: ReadableFile | None = Field(
        default=None,
        description="A file holding the secret (a mounted Kubernetes Secret), stripped of "
        "surrounding whitespace; when set it wins over REBIND_PLATFORM__SECRET and is read "
        "again at every login, so a rotated secret is used without a restart.",
    )
    client_cert: ReadableFile | None = None
    client_key: ReadableFile | None = None
    ca_bundle: ReadableFile | None = None
    verify_tls: bool = Field(
        default=True, description="Turning this off is logged as a warning at every start."
    )
    rate_limit_per_minute: int = Field(
        default=100, ge=1, le=1_000_000, description="The application's budget across all replicas."
    )
    rate_window_seconds: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        description="The length of the platform's sliding flow-control window, in seconds: "
        "the application may make rate_limit_per_minute calls in any window this long. The "
        "platform configures flow control per application; 60 unless yours says otherwise.",
    )
    bulk_min_share: float = Field(
        default=0.1,
        ge=0,
        le=0.9,
        description="While urgent swaps (the urgent lane) saturate the budget, the bulk lane "
        "still gets this share of the window's calls (0: urgent swaps always go first).",
    )
    urgent_wait_alert_seconds: float = Field(
        default=10.0,
        gt=0,
        description="The alert RebindUrgentSwapWaiting fires while an urgent swap has been read "
        "and not answered for longer than this (rebind_urgent_oldest_waiting_seconds against "
        "rebind_urgent_wait_bound_seconds).",
    )
    default_timeout: int = Field(default=0, ge=0, le=2_147_483_647)
    request_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    max_concurrency: int = Field(
        default=64, ge=1, le=10_000, description="Devices worked on at once by one replica."
    )
    max_attempts: int = Field(default=6, ge=1, le=100, description="Attempts on transient errors.")
    retry_backoff_initial_seconds: float = Field(default=0.5, gt=0, le=3600)
    retry_backoff_max_seconds: float = Field(default=30.0, gt=0, le=86_400)
    attempt_deadline_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long one try of a swap may take, retries and budget waits included.",
    )
    online_retry_initial_seconds: float = Field(
        default=30.0,
        gt=0,
        description="First wait of a swap deferred because the device is online.",
    )
    online_retry_max_seconds: float = Field(
        default=900.0, gt=0, description="Longest wait between two tries of a deferred swap."
    )
    inline_backoff_max_seconds: float = Field(
        default=2.0,
        ge=0,
        description="A transient retry that must wait longer than this waits in the ledger "
        "instead, so it holds no concurrency slot and no partition.",
    )
    online_retry_deadline_seconds: float = Field(
        default=86_400.0, gt=0, description="How long a swap waits for an online device."
    )
    token_refresh_margin_seconds: float = Field(
        default=300.0, ge=0, description="Refresh the access token this long before it expires."
    )
    token_takeover_seconds: float = Field(
        default=60.0,
        ge=1,
        description="A follower without a usable shared token, that has seen no record of a "
        "holder for this long (plus up to 50% jitter), becomes the token holder itself (fencing "
        "any other).",
    )
    token_rotation_window_seconds: float = Field(
        default=1.0,
        ge=0.1,
        le=30.0,
        description="At each token rotation every replica holds new calls at least this long "
        "(and until its calls in flight on the old token are answered) before the holder "
        "renews: calls on the wire never meet a replaced token.",
    )

    @model_validator(mode="before")
    @classmethod
    def _secret_from_file(cls, data: Any) -> Any:
        """With REBIND_PLATFORM__SECRET_FILE, the secret at start is the file's content."""
        if not isinstance(data, Mapping) or data.get("secret_file") in (None, ""):
            return data
        path = Path(str(data["secret_file"]))
        name = f"{ENV_PREFIX}PLATFORM{ENV_NESTED_DELIMITER}SECRET_FILE"
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise PydanticCustomError(
                "secret_file",
                "{name}: cannot read {path}: {reason}",
                {"name": name, "path": str(path), "reason": reason},
            ) from None
        if not text:
            raise PydanticCustomError(
                "secret_file", "{name}: {path} is empty", {"name": name, "path": str(path)}
            )
        return {**data, "secret": text}

    @model_validator(mode="after")
    def _orders(self) -> PlatformSettings:
        for low, high in (
            ("retry_backoff_initial_seconds", "retry_backoff_max_seconds"),
            ("online_retry_initial_seconds", "online_retry_max_seconds"),
            ("online_retry_initial_seconds", "online_retry_deadline_seconds"),
            ("request_timeout_seconds", "attempt_deadline_seconds"),
        ):
            _not_above(self, "PLATFORM", low, high)
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> PlatformSettings:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError(
                f"{ENV_PREFIX}PLATFORM__CLIENT_CERT and {ENV_PREFIX}PLATFORM__CLIENT_KEY "
                "must be set together"
            )
        return self


MIN_PATH_SECRET_CHARS = 22
"""22 url-safe characters (6 bits each) hold 132 bits: at least 128."""
_URL_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def strong_path_secret(secret: SecretStr | None) -> bool:
    """At least 128 bits: 22 or more url-safe characters (``secrets.token_urlsafe(16)`` and up)."""
    if secret is None:
        return False
    value = secret.get_secret_value()
    return len(value) >= MIN_PATH_SECRET_CHARS and set(value) <= _URL_SAFE


class BindSettings(_Section):
    """Knowing that the new hardware bound: pushes from the platform, else polling."""

    callback_url: str | None = Field(
        default=None,
        description="Public URL the platform pushes bindDevice notifications to, with its port "
        "written out (the platform requires it, even 443); unset = no subscription and no "
        "listener.",
    )
    host: str = "0.0.0.0"  # noqa: S104 - the platform's pushes must reach the pod
    port: int = Field(default=8443, ge=0, le=65_535, description="Port of the push listener.")
    path_secret: SecretStr | None = Field(
        default=None,
        description="A secret path segment appended to the callback URL's path; pushes to any "
        "other path answer 404. With a callback URL it must hold at least 128 bits: 22 or more "
        "url-safe characters (A-Z a-z 0-9 - _), e.g. python -c 'import secrets; "
        "print(secrets.token_urlsafe(32))'; or set REBIND_BIND__CLIENT_CA.",
    )
    tls_cert: Path | None = Field(default=None, description="Certificate of the push listener.")
    tls_key: Path | None = Field(default=None, description="Key of the push listener.")
    client_ca: ReadableFile | None = Field(
        default=None,
        description="Mutual TLS: CA bundle (PEM) the push listener checks client certificates "
        "against; a push without a certificate it signed is refused in the TLS handshake. "
        "Needs REBIND_BIND__TLS_CERT and REBIND_BIND__TLS_KEY.",
    )
    allow_plain_http: bool = Field(
        default=False,
        description="Accept an http:// callback URL (pushes travel unencrypted, the path secret "
        "with them); only behind a TLS-terminating ingress on a trusted network.",
    )
    max_requests_per_second_per_peer: float = Field(
        default=20.0,
        gt=0,
        le=10_000,
        description="Pushes one peer address may send per second (token bucket, burst of the "
        "same size); more answer 429.",
    )
    max_requests_per_second: float = Field(
        default=200.0,
        gt=0,
        le=100_000,
        description="Pushes the listener takes per second from all peers together; more answer "
        "429. Bounds the writes to the bind-notify topic.",
    )
    poll: bool = Field(default=True, description="Poll the activation status of refreshed devices.")
    poll_budget_share: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="Largest share of the platform budget that polls may use.",
    )
    poll_schedule: Literal["grid", "backoff"] = Field(
        default="grid",
        description="grid: polls on slots that fit the poll share whatever the number of watched "
        "devices (docs/bind.md, 'Watching at scale'); backoff: each device on its own doubling "
        "interval (the schedule before issue 20: with many watches, polls fall behind).",
    )
    poll_initial_seconds: float = Field(default=15.0, gt=0, description="First poll interval.")
    poll_max_seconds: float = Field(default=300.0, gt=0, description="Longest poll interval.")
    watch_deadline_seconds: float = Field(
        default=86_400.0,
        gt=0,
        description="How long a device refreshed with timeout 0 is watched before the swap "
        "ends BIND_NOT_CONFIRMED.",
    )
    expiry_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        description="After a non-zero timeout passes, how long to wait for the platform's "
        "'expired' push before ending the swap BIND_EXPIRED.",
    )

    @field_validator("callback_url")
    @classmethod
    def _callback_url_with_port(cls, value: str | None) -> str | None:
        # Kept as written: a URL type would drop a default port (443), which the platform needs.
        if value is None:
            return None
        parts = urlsplit(value.strip())
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise ValueError(
                "must be an http(s) URL with its port written out, "
                "e.g. https://rebind.example.com:443/platform/bind"
            )
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or a fragment")
        return value.strip()

    @property
    def enabled(self) -> bool:
        """True when refreshed devices are watched until they bind."""
        return self.callback_url is not None or self.poll

    @model_validator(mode="after")
    def _tls_pair(self) -> BindSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                f"{ENV_PREFIX}BIND__TLS_CERT and {ENV_PREFIX}BIND__TLS_KEY must be set together"
            )
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError(
                f"{ENV_PREFIX}BIND__CLIENT_CA needs the listener to serve TLS: set "
                f"{ENV_PREFIX}BIND__TLS_CERT and {ENV_PREFIX}BIND__TLS_KEY"
            )
        return self

    @model_validator(mode="after")
    def _closed_by_default(self) -> BindSettings:
        """A listener that anyone who can reach it may post to turns every POST into a Kafka
        write: with a callback URL, pushes must prove something (a long path secret, or a
        client certificate), and travel encrypted unless plain HTTP is allowed explicitly."""
        if self.callback_url is None:
            return self
        var = f"{ENV_PREFIX}BIND__"
        if self.client_ca is None and not strong_path_secret(self.path_secret):
            why = "is not set" if self.path_secret is None else "is too weak"
            raise ValueError(
                f"{var}PATH_SECRET {why}: with {var}CALLBACK_URL the push listener needs a path "
                f"secret of at least {MIN_PATH_SECRET_CHARS} url-safe characters (A-Z a-z 0-9 - "
                "_, 128 bits or more; e.g. python -c 'import secrets; "
                f"print(secrets.token_urlsafe(32))'), or client certificates ({var}CLIENT_CA)"
            )
        if urlsplit(self.callback_url).scheme == "http" and not self.allow_plain_http:
            raise ValueError(
                f"{var}CALLBACK_URL is http://: pushes and the path secret would travel "
                f"unencrypted; use https://, or set {var}ALLOW_PLAIN_HTTP=true (a TLS-terminating "
                "ingress in front, on a trusted network)"
            )
        return self


class HttpSettings(_Section):
    host: str = "0.0.0.0"  # noqa: S104 - the metrics/health port must be reachable in a pod
    port: int = Field(default=8080, ge=0, le=65_535)


class LedgerSettings(_Section):
    retention_days: float = Field(
        default=14.0,
        ge=1,
        le=3_650,
        description="How long a device's done ledger entry is kept after its swap's CloudEvent "
        "time; then it is removed (a tombstone). A swap whose time is older than this is "
        "answered rebind-failed SWAP_TOO_OLD without a call: it can no longer be proven the "
        "latest. The default covers the duplicate memory (the dedupe topic keeps 7 days) twice "
        "over, and a week of delay before a swap is replayed.",
    )

    @property
    def retention_ms(self) -> int:
        return int(self.retention_days * 86_400_000)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = "json"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class _FromEnvironment(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="ignore",
        frozen=True,
    )


class Settings(_FromEnvironment):
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    platform: PlatformSettings
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    bind: BindSettings = BindSettings()
    ledger: LedgerSettings = LedgerSettings()


class ConfigError(Exception):
    """A bad configuration, with a message that names the environment variables at fault."""


def _variable_name(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(p.upper() for p in parts)


class KafkaOnlySettings(_FromEnvironment):
    """What the tools that only touch Kafka (``replay``) need: no platform credentials."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    log: LogSettings = LogSettings()
    ledger: LedgerSettings = LedgerSettings()


def load_kafka_settings(**overrides: Any) -> KafkaOnlySettings:
    """The Kafka side of the environment (``replay``, ``topics``); raise ConfigError naming
    every bad variable, unknown ``REBIND_`` names included."""
    unknown = unknown_variables(os.environ)
    try:
        settings = KafkaOnlySettings(**overrides)
    except ValidationError as exc:
        raise _config_error(exc, unknown) from None
    if unknown:
        raise ConfigError("invalid configuration: " + "; ".join(unknown))
    return settings


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; raise ConfigError naming every bad variable, unknown ``REBIND_``
    names included."""
    unknown = unknown_variables(os.environ)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise _config_error(exc, unknown) from None
    if unknown:
        raise ConfigError("invalid configuration: " + "; ".join(unknown))
    return settings


def variables() -> dict[str, tuple[type[BaseModel], str]]:
    """Every environment variable the service reads: name -> (section model, field name)."""
    out: dict[str, tuple[type[BaseModel], str]] = {}
    for section, info in Settings.model_fields.items():
        model = info.annotation
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        for name in model.model_fields:
            variable = f"{ENV_PREFIX}{section.upper()}{ENV_NESTED_DELIMITER}{name.upper()}"
            out[variable] = (model, name)
    return out


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message per ``REBIND_`` variable that names no setting, with the nearest valid name.

    A misspelt variable would otherwise be ignored silently and its default used.
    """
    known = set(variables())
    sections = {f"{ENV_PREFIX}{s.upper()}" for s in Settings.model_fields}  # a whole section
    messages = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in sections:
            continue
        nearest = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        hint = (
            f"did you mean {nearest[0]}?"
            if nearest
            else "no setting has this name (device-rebind check-config --defaults lists them)"
        )
        messages.append(f"{name}: unknown variable; {hint}")
    return messages


def _plain(err: Any) -> str:
    """pydantic's message in plain words, for an operator who reads the variable's name."""
    ctx = err.get("ctx") or {}
    kind = err["type"]
    words = {
        "url_parsing": "is not a URL; expected e.g. https://iot.example.com:8743",
        "url_scheme": "must start with http:// or https://",
        "url_type": "is not a URL; expected e.g. https://iot.example.com:8743",
        "int_parsing": "must be a whole number",
        "int_from_float": "must be a whole number",
        "int_type": "must be a whole number",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "string_type": "must be text",
        "missing": "required, not set",
        "greater_than_equal": "must be {ge} or more",
        "greater_than": "must be more than {gt}",
        "less_than_equal": "must be {le} or less",
        "less_than": "must be less than {lt}",
        "string_too_long": "must be at most {max_length} characters",
        "literal_error": "must be one of {expected} (any case)",
        "enum": "must be one of {expected} (any case)",
        "extra_forbidden": "unknown setting",
    }
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "is empty"
    template = words.get(kind)
    if template is not None:
        try:
            return template.format(**ctx)
        except (KeyError, IndexError):
            pass
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _config_error(exc: ValidationError, unknown: list[str] | None = None) -> ConfigError:
    lines: list[str] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(err["loc"])
        if err["type"] == "missing" and loc == ("platform",):
            lines.extend(
                f"{_variable_name(('platform', field))}: required, not set"
                for field, info in PlatformSettings.model_fields.items()
                if info.is_required()
            )
            continue
        if err["type"] == "extra_forbidden" and any(
            u.startswith(f"{_variable_name(loc)}:") for u in unknown or ()
        ):
            continue  # reported below, with the nearest valid name
        message = _plain(err)
        if len(loc) < 2 and message.startswith(ENV_PREFIX):
            lines.append(message)  # a rule across settings: its message names them all
        else:
            lines.append(f"{_variable_name(loc)}: {message}")
    return ConfigError("invalid configuration: " + "; ".join([*lines, *(unknown or ())]))


def defaults() -> dict[str, Any]:
    """Every setting with its default (``None``: unset), required ones as :data:`REQUIRED`,
    without reading the environment."""
    out: dict[str, Any] = {}
    for variable, (model, name) in variables().items():
        info = model.model_fields[name]
        if info.is_required():
            out[variable] = REQUIRED
        elif info.default_factory is not None:
            out[variable] = DYNAMIC_DEFAULTS.get(variable, "<computed at start>")
        else:
            out[variable] = _shown(info.default)
    return out


REQUIRED = "<required>"
DYNAMIC_DEFAULTS = {f"{ENV_PREFIX}KAFKA{ENV_NESTED_DELIMITER}INSTANCE_ID": "<host name>"}


def _shown(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return SECRET_MASK if value.get_secret_value() else ""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, StrEnum):
        return value.value
    return str(value)


SECRET_MASK = "**********"  # noqa: S105 - the mask, not a secret


def masked(settings: Settings) -> dict[str, Any]:
    """The effective configuration as environment variables, secrets masked."""
    out: dict[str, Any] = {}

    def walk(prefix: str, model: BaseModel) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            key = f"{prefix}{name.upper()}"
            if isinstance(value, BaseModel):
                walk(key + ENV_NESTED_DELIMITER, value)
            else:
                out[key] = _shown(value)

    walk(ENV_PREFIX, settings)
    return out
