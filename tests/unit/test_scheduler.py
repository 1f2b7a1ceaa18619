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
