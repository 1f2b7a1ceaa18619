"""The partitioner setting: murmur2 as Java clients, crc32 as librdkafka's consistent(_random)."""

from __future__ import annotations

import zlib

import pytest
from aiokafka.partitioner import DefaultPartitioner

from service.config import KafkaSettings
from service.partitioner import crc32_partition, murmur2_partition, partition_for

# Kafka's own test vectors of Utils.murmur2 (clients/src/test/.../UtilsTest.java)
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "signed"), sorted(JAVA_MURMUR2.items()))
def test_murmur2_places_keys_as_the_java_client(key: bytes, signed: int) -> None:
    for partitions in (1, 3, 6, 7, 12, 100):
        assert murmur2_partition(key, partitions) == (signed & 0x7FFFFFFF) % partitions
        assert murmur2_partition(key, partitions) == DefaultPartitioner()(
            key, list(range(partitions)), list(range(partitions))
        )


def test_crc32_places_keys_as_librdkafka_consistent() -> None:
    # the CRC-32 check value (IEEE 802.3, as rd_crc32): 0xCBF43926, taken as unsigned
    assert crc32_partition(b"123456789", 1000) == 0xCBF43926 % 1000
    for key in (b"dev-1", b"\xff" * 40, "gerät-ü".encode()):
        assert crc32_partition(key, 6) == zlib.crc32(key) % 6


def test_the_two_disagree_for_most_device_ids() -> None:
    keys = [f"dev-{i}".encode() for i in range(600)]
    differ = sum(partition_for(k, 6, "murmur2") != partition_for(k, 6, "crc32") for k in keys)
    assert differ > 400  # about 5 in 6


def test_the_setting_defaults_to_murmur2_and_takes_crc32_in_any_case() -> None:
    assert KafkaSettings().partitioner == "murmur2"
    assert KafkaSettings(partitioner="CRC32").partitioner == "crc32"
    with pytest.raises(ValueError, match="partitioner"):
        KafkaSettings(partitioner="random")
