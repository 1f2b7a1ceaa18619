"""The partitioner setting: murmur2 as Java clients, crc32 as librdkafka's consistent(_random)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import pytest
from aiokafka.partitioner import DefaultPartitioner

from service.config import KafkaSettings
from service.partitioner import crc32_partition, murmur2_partition, partition_for
from service.pipeline.dedupe import DedupeIndex
from service.pipeline.intake import FORWARDED_FROM_HEADER, Routing
from service.pipeline.ledger import DeviceLedger
from service.pipeline.partition_core import PartitionCore
from service.pipeline.progress import PartitionProgress
from service.pipeline.work import Work
from tests.support.events import swap_event

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


# ---- the intake's check: a misrouted record is forwarded, once -----------------------------


@dataclass(frozen=True)
class _Record:
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 1_764_000_000_000
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def _core(partition: int) -> PartitionCore:
    return PartitionCore(
        topic="in",
        partition=partition,
        dead_letter_topic="dlq",
        progress=PartitionProgress(None, None),
        ledger=DeviceLedger("ledger", partition),
        dedupe=DedupeIndex("dedupe", partition, 100),
        answers=None,  # type: ignore[arg-type]
        routing=Routing("crc32", 6),
    )


def test_a_misrouted_swap_is_forwarded_with_its_offset_in_one_commit() -> None:
    right = crc32_partition(b"dev-1", 6)
    wrong = (right + 1) % 6
    core = _core(wrong)
    value = swap_event("dev-1", "n-1", event_id="evt-1")
    assert core.intake(_Record(7, b"dev-1", value, headers=[("h", b"v")])) is None
    assert core.misrouted == 1
    commit = core.take_commit()
    assert commit is not None
    [out] = commit.outputs
    assert (out.topic, out.partition, out.key, out.value) == ("in", right, b"dev-1", value)
    assert out.headers == [("h", b"v"), (FORWARDED_FROM_HEADER, f"in/{wrong}/7".encode())]
    assert out.timestamp_ms == 1_764_000_000_000  # its order keeps the original's timestamp
    assert commit.offset == 8  # finished together with the forward
    assert commit.counts == []  # its outcome is the copy's


def test_a_forwarded_copy_on_its_partition_is_worked_on_and_never_sent_round_again() -> None:
    right = crc32_partition(b"dev-1", 6)
    forwarded = [(FORWARDED_FROM_HEADER, b"in/0/7")]
    value = swap_event("dev-1", "n-1", event_id="evt-1")
    assert isinstance(_core(right).intake(_Record(0, b"dev-1", value, headers=forwarded)), Work)
    # still elsewhere (replicas disagree during a rollout): worked on here, no ping-pong
    elsewhere = _core((right + 1) % 6)
    assert isinstance(elsewhere.intake(_Record(0, b"dev-1", value, headers=forwarded)), Work)
    assert elsewhere.misrouted == 0
