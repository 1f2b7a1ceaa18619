"""Device ids that land on a chosen input partition (the service forwards a record found on
another partition than its key hashes to, so tests that place swaps on purpose pick keys)."""

from __future__ import annotations

from service.partitioner import Partitioner, partition_for


def device_on(
    partition: int, partitions: int, prefix: str, partitioner: Partitioner = "murmur2"
) -> str:
    """The first ``<prefix>-<n>`` whose key hashes to ``partition``."""
    n = 0
    while partition_for(f"{prefix}-{n}".encode(), partitions, partitioner) != partition:
        n += 1
    return f"{prefix}-{n}"
