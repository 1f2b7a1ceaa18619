"""Whether the ops port (``REBIND_HTTP__PORT``: /metrics, /healthz, /readyz) can be opened, and
why not, in one line naming the setting.

``check-config`` (:mod:`service.cli`) tries the port before the service would;
:mod:`service.app` words a failed bind at start the same way.
"""

from __future__ import annotations

import contextlib
import errno
import socket

from service.config import HttpSettings


def port_problem(http: HttpSettings) -> str | None:
    """Why the ops port cannot be served here (in use, not permitted), or None."""
    if http.port == 0:
        return None  # any free port
    family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((http.host, http.port))
        except OSError as exc:
            return http_port_message(http, exc)
    return None


def http_port_message(http: HttpSettings, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        why = "is already in use (another process, or another device-rebind, listens on it)"
    elif exc.errno == errno.EACCES:
        why = "may not be opened by this user (ports below 1024 need privileges)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = f"cannot be opened: {http.host} is not an address of this host (REBIND_HTTP__HOST)"
    else:
        why = f"cannot be opened: {exc.strerror or exc}"
    return f"REBIND_HTTP__PORT: port {http.port} on {http.host} {why}"
