"""The IoT platform client: HTTP, tokens, TLS, the rate budget and the error table.

Knows nothing of Kafka (a forbidden contract in pyproject.toml: no aiokafka, no Kafka plumbing, no
pipeline, no :mod:`service.shared`); the pipeline calls :func:`rebind` with a
:class:`PlatformClient`, and :mod:`service.shared` shares its token and budget between replicas.
"""

from service.platform.budget import (
    PRIORITY_DEFERRED,
    PRIORITY_FRESH,
    PRIORITY_POLL,
    PRIORITY_URGENT,
    PRIORITY_URGENT_LANE,
    RateBudget,
)
from service.platform.client import (
    ActivationQuery,
    CallResult,
    DeviceQuery,
    PlatformClient,
    RefreshRequest,
    build_ssl_context,
)
from service.platform.errors import (
    ATTEMPTS_EXHAUSTED,
    CONNECTION_ERROR,
    DEADLINE_EXCEEDED,
    ERROR_TABLE,
    HTTP_ERROR,
    SUPERSEDED,
    TIMEOUT,
    Action,
    Category,
    ErrorSpec,
    classify,
    lookup,
    parse_error_body,
)
from service.platform.rebind import (
    Deferred,
    Failed,
    RebindClient,
    RebindPolicy,
    RebindResult,
    Succeeded,
    backoff_delay,
    build_request,
    defer_delay,
    rebind,
)
from service.platform.tokens import TokenError, TokenManager, TokenProvider

__all__ = [
    "ATTEMPTS_EXHAUSTED",
    "CONNECTION_ERROR",
    "DEADLINE_EXCEEDED",
    "ERROR_TABLE",
    "HTTP_ERROR",
    "PRIORITY_DEFERRED",
    "PRIORITY_FRESH",
    "PRIORITY_POLL",
    "PRIORITY_URGENT",
    "PRIORITY_URGENT_LANE",
    "SUPERSEDED",
    "TIMEOUT",
    "Action",
    "ActivationQuery",
    "CallResult",
    "Category",
    "Deferred",
    "DeviceQuery",
    "ErrorSpec",
    "Failed",
    "PlatformClient",
    "RateBudget",
    "RebindClient",
    "RebindPolicy",
    "RebindResult",
    "RefreshRequest",
    "Succeeded",
    "TokenError",
    "TokenManager",
    "TokenProvider",
    "backoff_delay",
    "build_request",
    "build_ssl_context",
    "classify",
    "defer_delay",
    "lookup",
    "parse_error_body",
    "rebind",
]
