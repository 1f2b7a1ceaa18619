"""The platform client's cost per call: ``PYTHONPATH=. .venv/bin/python -m bench.http_calls``.

Starts the platform simulator (its own process, no flow control), seeds ``--calls`` devices and
runs ``PlatformClient.refresh_device_key`` for each, ``--in-flight`` at a time, ``--rounds``
times. Prints, per round, this process's CPU milliseconds per call and calls/s; for the last
round also the Python function calls per refresh (``cProfile``), a count that does not move with
the machine's load (issue 24, docs/benchmarks.md "Section 1, CPU per call").
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import time

from pydantic import SecretStr

from service.config import LogSettings, PlatformSettings
from service.logs import configure
from service.metrics import Metrics
from service.platform import PlatformClient, RateBudget, build_request
from tests.simulator.control import SimulatorControl
from tests.simulator.process import SimulatorProcess
from tests.simulator.state import HOME_APP_ID, HOME_SECRET

UNLIMITED = 1_000_000


async def run(calls: int, in_flight: int, rounds: int) -> None:
    with open(os.devnull, "wb") as sink:  # noqa: ASYNC230 - opened once, before any call
        configure(LogSettings(level="INFO"), stream=sink)
        sim = SimulatorProcess(rate_limit_per_minute=UNLIMITED)
        url = sim.start()
        try:
            control = SimulatorControl(url)
            for start in range(0, calls, 2_000):
                await control.seed_devices(
                    [
                        {"device_id": f"d-{i:07d}", "node_id": f"old-{i}", "status": "OFFLINE"}
                        for i in range(start, min(calls, start + 2_000))
                    ]
                )
            settings = PlatformSettings(
                base_url=url,
                app_id=HOME_APP_ID,
                secret=SecretStr(HOME_SECRET),
                rate_limit_per_minute=UNLIMITED,
                max_concurrency=in_flight,
            )
            metrics = Metrics()
            budget = RateBudget(UNLIMITED, metrics=metrics)
            client = PlatformClient(settings, metrics, budget)
            slots = asyncio.Semaphore(in_flight)

            async def one(r: int, i: int) -> None:
                async with slots:
                    req = build_request(f"d-{i:07d}", f"new-{r}-{i}", None, None, None, 0)
                    result = await client.refresh_device_key(req)
                    if not result.ok:
                        raise RuntimeError(f"call {i}: {result}")

            for r in range(rounds):
                profile = cProfile.Profile() if r == rounds - 1 else None
                if profile is not None:
                    profile.enable()
                cpu, wall = time.process_time(), time.monotonic()
                await asyncio.gather(*(one(r, i) for i in range(calls)))
                cpu, wall = time.process_time() - cpu, time.monotonic() - wall
                if profile is not None:
                    profile.disable()
                    total = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
                    print(f"Python function calls per refresh: {total / calls:.0f}")
                    print(f"round {r} (under cProfile): {calls / wall:.0f} calls/s")
                else:
                    print(
                        f"round {r}: {cpu / calls * 1000:.3f} ms CPU per call, "
                        f"{calls / wall:.0f} calls/s, load {os.getloadavg()[0]:.1f}"
                    )
            await client.aclose()
            await budget.aclose()
            await control.aclose()
        finally:
            sim.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.http_calls", description=__doc__)
    p.add_argument("--calls", type=int, default=3_000)
    p.add_argument("--in-flight", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    asyncio.run(run(args.calls, args.in_flight, args.rounds))


if __name__ == "__main__":
    main()
