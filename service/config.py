"""Settings: one pydantic-settings model, read once at start, passed down as plain objects.

Every variable is ``REBIND_<SECTION>__<NAME>``. No other module reads the environment.
"""

from __future__ import annotations

import socket
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "REBIND_"
ENV_NESTED_DELIMITER = "__"


class SecurityProtocol(StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = Field(
        default="localhost:9092", min_length=1, description="Comma-separated host:port list."
    )
    group_id: str = Field(default="device-rebind", min_length=1)
    client_id: str = Field(default="device-rebind", min_length=1)
    security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
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

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL):
            missing = [
                name
                for name, value in (
                    ("SASL_MECHANISM", self.sasl_mechanism),
                    ("SASL_USERNAME", self.sasl_username),
                    ("SASL_PASSWORD", self.sasl_password),
                )
                if not value
            ]
            if missing:
                raise ValueError(
                    f"security_protocol {self.security_protocol.value} needs "
                    + ", ".join(f"{ENV_PREFIX}KAFKA__{m}" for m in missing)
                )
        return self


class TopicSettings(_Section):
    device_swapped: str = Field(default="asset.device-swapped.v1", min_length=1, max_length=249)
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


class PlatformSettings(_Section):
    base_url: AnyHttpUrl = Field(description="e.g. https://iot.example.com:8743")
    app_id: str = Field(min_length=1, max_length=256)
    secret: SecretStr
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_bundle: Path | None = None
    verify_tls: bool = Field(
        default=True, description="Turning this off is logged as a warning at every start."
    )
    rate_limit_per_minute: int = Field(
        default=100, ge=1, le=1_000_000, description="The application's budget across all replicas."
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
        description="A follower without a usable shared token for this long (plus up to 50% "
        "jitter) logs in itself and renews until a holder publishes again.",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> PlatformSettings:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError(
                f"{ENV_PREFIX}PLATFORM__CLIENT_CERT and {ENV_PREFIX}PLATFORM__CLIENT_KEY "
                "must be set together"
            )
        return self


class HttpSettings(_Section):
    host: str = "0.0.0.0"  # noqa: S104 - the metrics/health port must be reachable in a pod
    port: int = Field(default=8080, ge=0, le=65_535)


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


def load_kafka_settings(**overrides: Any) -> KafkaOnlySettings:
    try:
        return KafkaOnlySettings(**overrides)
    except ValidationError as exc:
        raise _config_error(exc) from None


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; raise ConfigError naming every bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise _config_error(exc) from None


def _config_error(exc: ValidationError) -> ConfigError:
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
        lines.append(f"{_variable_name(loc)}: {err['msg']}")
    return ConfigError("invalid configuration: " + "; ".join(lines))


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
            elif isinstance(value, SecretStr):
                out[key] = SECRET_MASK if value.get_secret_value() else ""
            elif value is None:
                out[key] = None
            elif isinstance(value, StrEnum):
                out[key] = value.value
            elif isinstance(value, bool | int | float):
                out[key] = value
            else:
                out[key] = str(value)

    walk(ENV_PREFIX, settings)
    return out
