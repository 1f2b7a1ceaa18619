"""The platform reference's error rows (docs/platform-api.md), written out once as an oracle.

Kept apart from ``service.platform.errors`` on purpose: the tests check the service's table and
the simulator against the reference, not against themselves.
"""

from __future__ import annotations

from typing import Final

# (HTTP status, error code) of every row of the refresh-device-key call: all sixteen.
REFRESH_ROWS: Final[list[tuple[int, str]]] = [
    (200, "100217"),
    (400, "100003"),
    (400, "100007"),
    (400, "100426"),
    (400, "100610"),
    (400, "100611"),
    (400, "50400"),
    (401, "100025"),
    (403, "100203"),
    (403, "100217"),
    (403, "1010009"),
    (403, "1010005"),
    (404, "100403"),
    (404, "100418"),
    (500, "100203"),
    (500, "50252"),
]
