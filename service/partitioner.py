"""Which input partition a key belongs to: the partitioner upstream producers use.

Java clients (and aiokafka, and Kafka Streams) hash a key with murmur2; clients built on
librdkafka (kcat, confluent-kafka, most non-JVM producers) default to ``consistent_random``: the
CRC-32 of the key. The two disagree for most keys, so the service is told which one its
producers use (``REBIND_KAFKA__PARTITIONER``) and checks every input record against it: a record
sitting elsewhere is *misrouted* (:mod:`service.pipeline.partition_core` forwards it).

Both functions take a non-empty key (the service's keys are deviceIds); an empty or absent key
is placed at random by both clients and never reaches this check.
"""

from __future__ import annotations

import zlib
from typing import Final, Literal, get_args

from aiokafka.partitioner import murmur2

Partitioner = Literal["murmur2", "crc32"]
PARTITIONERS: Final[tuple[str, ...]] = get_args(Partitioner)


def murmur2_partition(key: bytes, partitions: int) -> int:
    """Java's default partitioner: ``toPositive(murmur2(key)) % partitions``."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def crc32_partition(key: bytes, partitions: int) -> int:
    """librdkafka's ``consistent`` (and ``consistent_random`` for a non-empty key):
    ``crc32(key) % partitions``, the CRC taken as unsigned."""
    return (zlib.crc32(key) & 0xFFFFFFFF) % partitions


def partition_for(key: bytes, partitions: int, partitioner: Partitioner) -> int:
    """The partition ``key`` belongs to among ``partitions`` (>= 1)."""
    if partitions < 1:
        raise ValueError("partitions must be 1 or more")
    if partitioner == "crc32":
        return crc32_partition(key, partitions)
    return murmur2_partition(key, partitions)
