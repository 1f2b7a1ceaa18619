"""The bare baseline: consume, PUT, produce. No transactions, no retries, no guarantees.

``python -m bench.baseline --bootstrap ... --input T --output T --group G --url U --app-id A
--secret S``: logs in once, then for every record of the input topic sends the PUT of the
platform's key refresh (Bearer token, ``app_key`` header) with at most ``--concurrency`` calls in
flight, and produces a small result record to the output topic. It exits after ``--count``
results (or never, with 0). What the service does on top of this is what the benchmark prices.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

REFRESH_KEY_PATH = "/iocm/app/reg/v1.1.0/deviceCredentials/{device_id}"
LOGIN_PATH = "/iocm/app/sec/v1.1.0/login"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--app-id", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--count", type=int, default=0)
    return p.parse_args(argv)


async def login(http: httpx.AsyncClient, app_id: str, secret: str) -> str:
    resp = await http.post(LOGIN_PATH, data={"appId": app_id, "secret": secret})
    resp.raise_for_status()
    return str(resp.json()["accessToken"])


async def amain(args: argparse.Namespace) -> None:
    limits = httpx.Limits(
        max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2
    )
    http = httpx.AsyncClient(base_url=args.url, limits=limits, timeout=10.0)
    token = await login(http, args.app_id, args.secret)
    headers = {"Authorization": f"Bearer {token}", "app_key": args.app_id}
    consumer = AIOKafkaConsumer(
        args.input,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        auto_offset_reset="earliest",
        max_poll_records=500,
    )
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, linger_ms=5)
    await consumer.start()
    await producer.start()
    slots = asyncio.Semaphore(args.concurrency)
    done = asyncio.Event()
    produced = 0
    tasks: set[asyncio.Task[None]] = set()

    async def work(record: Any) -> None:
        nonlocal produced
        try:
            event = orjson.loads(record.value)
            data = event["data"]
            device_id, node_id = data["deviceId"], data["nodeId"]
            body = {"nodeId": node_id, "verifyCode": node_id, "timeout": 0}
            resp = await http.put(
                REFRESH_KEY_PATH.format(device_id=device_id), json=body, headers=headers
            )
            result = {"swapEventId": event["id"], "deviceId": device_id, "status": resp.status_code}
            await producer.send(args.output, orjson.dumps(result), key=record.key)
        finally:
            slots.release()
            produced += 1
            if args.count and produced >= args.count:
                done.set()

    async def consume() -> None:
        async for record in consumer:
            await slots.acquire()
            task = asyncio.create_task(work(record))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    consuming = asyncio.create_task(consume())
    try:
        await done.wait()
        await producer.flush()
    finally:
        consuming.cancel()
        await asyncio.gather(consuming, *tasks, return_exceptions=True)
        await producer.stop()
        await consumer.stop()
        await http.aclose()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
