"""Poll-with-deadline helpers: the only way tests wait for something to become true.

Tests never sleep to synchronise; they state the condition they wait for and a deadline, and on
timeout get an error that names what was awaited (and the last value or error seen).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")

DEFAULT_INTERVAL = 0.05
MAX_INTERVAL = 0.5


class WaitTimeoutError(AssertionError):
    """The awaited condition did not become true before the deadline."""


def _describe(what: str, timeout: float, last: object, last_error: BaseException | None) -> str:
    message = f"timed out after {timeout:.1f} s waiting for {what}"
    if last_error is not None:
        message += f" (last error: {last_error!r})"
    elif last is not None:
        message += f" (last value: {last!r})"
    return message


def wait_until_sync(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = DEFAULT_INTERVAL,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``condition`` until it returns a truthy value; return that value.

    Exceptions listed in ``ignore`` count as "not yet". Raises :class:`WaitTimeoutError`
    after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    last: object = None
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
        except ignore as exc:
            last_error = exc
        else:
            if value:
                return value
            last, last_error = value, None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeoutError(_describe(what, timeout, last, last_error))
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, MAX_INTERVAL)


@overload
async def wait_until(
    condition: Callable[[], Awaitable[T]],
    timeout: float,
    what: str,
    *,
    interval: float = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


@overload
async def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


async def wait_until(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float,
    what: str,
    *,
    interval: float = DEFAULT_INTERVAL,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Async variant of :func:`wait_until_sync`; ``condition`` may be sync or async.

    Polls without blocking the event loop, so clients running on the same loop keep working.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    last: object = None
    last_error: BaseException | None = None
    while True:
        try:
            result = condition()
            value: T = await result if inspect.isawaitable(result) else result
        except ignore as exc:
            last_error = exc
        else:
            if value:
                return value
            last, last_error = value, None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeoutError(_describe(what, timeout, last, last_error))
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, MAX_INTERVAL)
