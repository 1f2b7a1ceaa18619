"""PartitionProgress: the committed offset, and the metadata listing what is finished beyond it."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.kafka import MAX_OFFSET_METADATA_CHARS
from service.pipeline.progress import PartitionProgress, decode_finished, encode_finished


def _offsets(base: int, gaps: list[int]) -> list[int]:
    """Sorted offsets above ``base``, each ``gap`` + 1 after the previous one."""
    out: list[int] = []
    cursor = base
    for gap in gaps:
        cursor += gap + 1
        out.append(cursor)
    return out


@given(
    base=st.integers(0, 2**40),
    gaps=st.lists(st.integers(0, 5_000), max_size=200),
)
def test_finished_offsets_round_trip(base: int, gaps: list[int]) -> None:
    finished = _offsets(base, gaps)
    text = encode_finished(base, finished)
    assert len(text) <= MAX_OFFSET_METADATA_CHARS
    assert decode_finished(base, text) == set(finished)


@given(
    base=st.integers(0, 2**40),
    gaps=st.lists(st.integers(0, 2**20), min_size=1, max_size=3_000),
)
def test_encoded_metadata_keeps_a_prefix_and_fits(base: int, gaps: list[int]) -> None:
    finished = _offsets(base, gaps)
    text = encode_finished(base, finished)
    assert len(text) <= MAX_OFFSET_METADATA_CHARS
    decoded = decode_finished(base, text)
    # What is kept is the lower part: every finished offset up to the highest one kept.
    assert decoded == {o for o in finished if decoded and o <= max(decoded)}


def test_truncation_keeps_the_lower_runs_under_the_limit() -> None:
    rng = random.Random(5)
    base = 1_000
    # Thousands of runs with random gaps and lengths: far more than the metadata can hold.
    finished: list[int] = []
    cursor = base
    for _ in range(6_000):
        cursor += rng.randint(2, 50_000)
        finished.extend(range(cursor, cursor + rng.randint(1, 4)))
        cursor = finished[-1]
    text = encode_finished(base, finished)
    assert text.startswith("r1:")
    assert len(text) <= MAX_OFFSET_METADATA_CHARS
    decoded = decode_finished(base, text)
    assert 0 < len(decoded) < len(finished)
    assert decoded == set(finished[: len(decoded)])


def test_nothing_finished_is_empty_metadata() -> None:
    assert encode_finished(7, []) == ""
    assert decode_finished(7, "") == set()
    assert decode_finished(7, None) == set()


@pytest.mark.parametrize(
    "metadata",
    ["some other tool's note", "r1:", "r1:!!!not base64!!!", "r1:AAAA", "r2:eJwDAAAAAAE"],
)
def test_unreadable_metadata_means_nothing_is_known_finished(metadata: str) -> None:
    assert decode_finished(10, metadata) == set()


def test_metadata_is_relative_to_its_committed_offset() -> None:
    text = encode_finished(100, [102, 103, 107])
    assert decode_finished(100, text) == {102, 103, 107}
    assert decode_finished(0, text) == {2, 3, 7}


def test_the_committed_offset_stops_at_the_first_unfinished_record() -> None:
    progress = PartitionProgress(10, None)
    for read in range(10, 15):
        progress.start(read, produced_at_ms=1_000 + read)
    assert progress.finish(11) == 1_011
    assert progress.finish(13) == 1_013
    offset, metadata = progress.snapshot()
    assert offset == 10
    assert decode_finished(10, metadata) == {11, 13}
    progress.finish(10)
    offset, metadata = progress.snapshot()
    assert offset == 12
    assert decode_finished(12, metadata) == {13}
    assert progress.unfinished == 2
    assert progress.is_open(12)
    assert not progress.is_open(13)


def test_the_next_owner_skips_what_the_metadata_lists() -> None:
    earlier = PartitionProgress(0, None)
    for read in range(4):
        earlier.start(read)
    earlier.finish(1)
    earlier.finish(3)
    offset, metadata = earlier.snapshot()
    assert offset == 0

    progress = PartitionProgress(offset, metadata)
    assert [o for o in range(4) if progress.finished_before(o)] == [1, 3]
    for o in range(4):
        progress.start(o)
    progress.finish(0)
    progress.finish(1)  # skipped: finished by the earlier owner
    offset, metadata = progress.snapshot()
    assert offset == 2
    assert decode_finished(2, metadata) == {3}  # still listed until the offset passes it
    progress.finish(2)
    progress.finish(3)
    assert progress.snapshot() == (4, "")


def test_a_partition_never_committed_starts_at_its_first_record() -> None:
    progress = PartitionProgress()
    assert progress.snapshot() == (None, "")
    progress.start(42)
    assert progress.snapshot() == (42, "")
    progress.finish(42)
    assert progress.snapshot() == (43, "")


def test_offsets_go_forward_and_finish_once() -> None:
    progress = PartitionProgress(0, None)
    progress.start(3)
    with pytest.raises(ValueError, match="not after"):
        progress.start(3)
    progress.finish(3)
    with pytest.raises(ValueError, match="finished twice"):
        progress.finish(3)
