from __future__ import annotations

import asyncio

from service.pipeline.scheduler import KeyedScheduler


async def test_same_key_in_order_different_keys_in_parallel() -> None:
    scheduler = KeyedScheduler(concurrency=4)
    seen: list[tuple[str, int]] = []
    running = 0
    peak = 0
    gate = asyncio.Event()
    full = asyncio.Event()

    def job(key: str, n: int):  # type: ignore[no-untyped-def]
        async def run() -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            if running == 4:
                full.set()
            await gate.wait()
            seen.append((key, n))
            running -= 1

        return run

    for n in range(3):
        for key in ("a", "b", "c", "d", "e", "f"):
            scheduler.submit(key, job(key, n))
    # Wait until the bound is reached: four keys run, the others queue.
    await asyncio.wait_for(full.wait(), 5)
    assert peak == 4
    gate.set()
    assert await scheduler.join(timeout=5)
    for key in "abcdef":
        assert [n for k, n in seen if k == key] == [0, 1, 2]
    assert peak == 4
    assert scheduler.queued_keys == 0


async def test_a_failing_job_does_not_stop_its_key() -> None:
    scheduler = KeyedScheduler(concurrency=1)
    done: list[int] = []

    async def boom() -> None:
        raise RuntimeError("bug")

    async def ok() -> None:
        done.append(1)

    scheduler.submit("k", boom)
    scheduler.submit("k", ok)
    assert await scheduler.join(timeout=5)
    assert done == [1]


async def test_join_times_out_and_cancel_all_stops_work() -> None:
    scheduler = KeyedScheduler(concurrency=2)
    never = asyncio.Event()

    async def stuck() -> None:
        await never.wait()

    scheduler.submit("x", stuck)
    assert not await scheduler.join(timeout=0.05)
    await scheduler.cancel_all()
    assert scheduler.queued_keys == 0


async def test_an_urgent_key_runs_while_every_ordinary_slot_is_held() -> None:
    """Bulk jobs hold their slots while they wait for the budget: an urgent job takes one of
    the extra slots at once, goes before queued bulk keys when a slot frees, and a device's
    queued bulk job rides its urgent slot (per-device order kept)."""
    scheduler = KeyedScheduler(concurrency=2, urgent_extra=1)
    gate = asyncio.Event()
    started: list[str] = []
    three = asyncio.Event()  # bulk-a, bulk-b and bulk-d started

    def job(name: str, *, hold: bool = True):  # type: ignore[no-untyped-def]
        async def run() -> None:
            started.append(name)
            if {"bulk-a", "bulk-b", "bulk-d"} <= set(started):
                three.set()
            if hold:
                await gate.wait()

        return run

    for key in ("a", "b", "c", "d"):
        scheduler.submit(key, job(f"bulk-{key}"))
    scheduler.submit("d", job("urgent-d", hold=False), urgent=True)  # d's bulk job goes first
    scheduler.submit("u", job("urgent-u", hold=False), urgent=True)

    await asyncio.wait_for(three.wait(), 5)
    assert "bulk-c" not in started  # d (urgent) overtook c, which waits for an ordinary slot
    gate.set()
    assert await scheduler.join(timeout=5)
    assert started.index("bulk-d") < started.index("urgent-d")
    assert started.index("urgent-u") < started.index("bulk-c")


async def test_ordinary_slots_go_round_the_groups_first_come_first_served_within_one() -> None:
    """A backlog read a partition at a time (group 0's keys all queued before group 1's) is
    worked in turns: one key of each group with keys waiting, in order within a group; an urgent
    key still goes before them all."""
    scheduler = KeyedScheduler(concurrency=1, urgent_extra=0)
    started: list[str] = []
    gate = asyncio.Event()
    first = asyncio.Event()

    def job(key: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            started.append(key)
            first.set()
            await gate.wait()

        return run

    for key in ("a0", "a1", "a2", "a3"):
        scheduler.submit(key, job(key), group=0)
    for key in ("b0", "b1"):
        scheduler.submit(key, job(key), group=1)
    scheduler.submit("c0", job("c0"), group=2)
    scheduler.submit("u", job("u"), urgent=True, group=1)
    # The first key runs (the others, scheduled before this test resumes, wait for its slot).
    await asyncio.wait_for(first.wait(), 5)
    assert scheduler.running == 1
    gate.set()
    assert await scheduler.join(timeout=5)
    assert started == ["a0", "u", "a1", "b0", "c0", "a2", "b1", "a3"]
    assert scheduler.queued_keys == 0
