"""Probe: what one transaction of a partition producer costs on a real broker, step by step.

``PYTHONPATH=. .venv/bin/python -m bench.txn_probe [--bootstrap HOST:PORT] [--pattern ...]``
starts a broker of its own (unless ``--bootstrap``) and runs, for ``--producers`` transactional
producers at once (one per "input partition", as the service has), ``--cycles`` cycles of one of
two patterns:

* ``split`` (the core before issue 24): a claim transaction (one ledger record and the offset),
  the calls (``--call-ms``), then an outcome transaction (outcome, dedupe and ledger records and
  the offset), each begun as soon as the previous one ended;
* ``joined``: one transaction per cycle carrying the outcomes of the previous batch and the
  claims of the next one.

For every transaction it times the steps (the first produce acknowledged, the offsets sent, the
EndTxn) and the gap from the producer's previous EndTxn to this transaction's first produce
acknowledged, and it counts aiokafka's "Got error produce response ..., retrying" warnings (each
is one retried produce of one partition). ``--retry-backoff-ms`` sets the producers' backoff,
``--gap-ms`` waits after each EndTxn, ``--offsets-after`` sends the offsets only once the
transaction's records are acknowledged (what :class:`service.pipeline.committer.PartitionCommitter`
does since issue 24) instead of while they are in flight. Before counting, every producer writes
one transaction to every topic, so the leader elections of fresh topics are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from tests.support.kafka_broker import KafkaBroker, create_topics


class RetryCounter(logging.Handler):
    """Counts aiokafka's retried produce requests, per topic-partition text."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.by_kind: Counter[str] = Counter()
        self.total = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "retrying" in message:
            self.total += 1
            self.by_kind[message.rsplit("Error: ", 1)[-1]] += 1


@dataclass
class Steps:
    produce_ms: list[float] = field(default_factory=list)
    offsets_ms: list[float] = field(default_factory=list)
    commit_ms: list[float] = field(default_factory=list)
    txn_ms: list[float] = field(default_factory=list)
    gap_ms: list[float] = field(default_factory=list)
    """From the producer's previous EndTxn to this transaction's first produce acknowledged."""
    calls_ms: list[float] = field(default_factory=list)


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    p50 = ordered[len(ordered) // 2]
    return f"mean {statistics.fmean(values):6.1f}  p50 {p50:6.1f}  p99 {p99:6.1f}"


async def transaction(
    producer: AIOKafkaProducer,
    records: list[tuple[str, int]],
    offsets: dict[TopicPartition, OffsetAndMetadata],
    *,
    group: str,
    steps: Steps,
    last_end: list[float],
    offsets_after: bool = False,
    gap_ms: float = 0.0,
) -> None:
    if gap_ms and last_end:
        await asyncio.sleep(max(0.0, last_end[0] + gap_ms / 1000 - time.monotonic()))
    started = time.monotonic()
    async with producer.transaction():
        futures = [
            await producer.send(topic, b"x" * 300, key=b"k", partition=p) for topic, p in records
        ]
        if not offsets_after:
            t_offsets = time.monotonic()
            await producer.send_offsets_to_transaction(offsets, group)
            steps.offsets_ms.append((time.monotonic() - t_offsets) * 1000)
        first = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
        acked = time.monotonic()
        steps.produce_ms.append((acked - started) * 1000)
        if last_end:
            steps.gap_ms.append((acked - last_end[0]) * 1000)
        await asyncio.gather(*first[0], *first[1])
        if offsets_after:
            t_offsets = time.monotonic()
            await producer.send_offsets_to_transaction(offsets, group)
            steps.offsets_ms.append((time.monotonic() - t_offsets) * 1000)
        t_commit = time.monotonic()
    ended = time.monotonic()
    steps.commit_ms.append((ended - t_commit) * 1000)
    steps.txn_ms.append((ended - started) * 1000)
    last_end[:] = [ended]


async def run_producer(args: argparse.Namespace, p: int, steps: Steps, prefix: str) -> None:
    tid = f"{prefix}-tx-{p}"
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap_actual,
        transactional_id=tid,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        retry_backoff_ms=args.retry_backoff_ms,
    )
    await producer.start()
    group = f"{prefix}-group"
    tp = TopicPartition(f"{prefix}.in", p)
    last_end: list[float] = []
    offset = 0
    try:
        for _ in range(args.cycles):
            batch = args.batch
            if args.pattern == "split":
                offset += batch
                claim = [(f"{prefix}.ledger", p)] * batch
                await transaction(
                    producer,
                    claim,
                    {tp: OffsetAndMetadata(offset, "")},
                    group=group,
                    steps=steps,
                    last_end=last_end,
                    offsets_after=args.offsets_after,
                    gap_ms=args.gap_ms,
                )
            called = time.monotonic()
            await asyncio.sleep(args.call_ms / 1000)
            steps.calls_ms.append((time.monotonic() - called) * 1000)
            outputs = [(f"{prefix}.out", p), (f"{prefix}.dedupe", p), (f"{prefix}.ledger", p)]
            outputs = outputs * batch
            if args.pattern == "joined":
                offset += batch
                outputs += [(f"{prefix}.ledger", p)] * batch  # the next batch's claims
            await transaction(
                producer,
                outputs,
                {tp: OffsetAndMetadata(offset, "")},
                group=group,
                steps=steps,
                last_end=last_end,
                offsets_after=args.offsets_after,
                gap_ms=args.gap_ms,
            )
    finally:
        await producer.stop()


async def warm_up(args: argparse.Namespace, p: int, prefix: str) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap_actual, transactional_id=f"{prefix}-warm-{p}"
    )
    await producer.start()
    try:
        async with producer.transaction():
            for name in ("in", "out", "dedupe", "ledger"):
                await producer.send_and_wait(f"{prefix}.{name}", b"warm-up", partition=p)
    finally:
        await producer.stop()


async def amain(args: argparse.Namespace) -> None:
    prefix = f"probe{int(time.time())}"
    counts = {f"{prefix}.{name}": args.producers for name in ("in", "out", "dedupe", "ledger")}
    await create_topics(args.bootstrap_actual, list(counts), counts)
    counter = RetryCounter()
    logging.getLogger("aiokafka").addHandler(counter)
    await asyncio.gather(*(warm_up(args, p, prefix) for p in range(args.producers)))
    counter.total, counter.by_kind = 0, Counter()
    steps = Steps()
    started = time.monotonic()
    await asyncio.gather(*(run_producer(args, p, steps, prefix) for p in range(args.producers)))
    seconds = time.monotonic() - started
    cycles = args.cycles * args.producers
    print(
        f"pattern {args.pattern}, {args.producers} producers x {args.cycles} cycles, batch "
        f"{args.batch}, calls {args.call_ms} ms, retry_backoff_ms "
        f"{args.retry_backoff_ms}, offsets "
        f"{'after the records are acknowledged' if args.offsets_after else 'with the records'}"
    )
    print(f"  cycles/s per producer   {args.cycles / seconds:8.1f}   ({seconds:.1f} s)")
    print(f"  transactions            {len(steps.txn_ms)}")
    print(f"  txn total ms            {summary(steps.txn_ms)}")
    print(f"  first produce acked ms  {summary(steps.produce_ms)}")
    print(f"  send_offsets ms         {summary(steps.offsets_ms)}")
    print(f"  EndTxn (commit) ms      {summary(steps.commit_ms)}")
    print(f"  EndTxn -> next produce acked ms {summary(steps.gap_ms)}")
    print(f"  calls ms                {summary(steps.calls_ms)}")
    per_cycle = counter.total / cycles if cycles else 0.0
    print(
        f"  retried produce requests {counter.total} ({per_cycle:.2f} per cycle) "
        f"{dict(counter.by_kind)}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.txn_probe", description=__doc__)
    p.add_argument("--bootstrap", default="")
    p.add_argument("--pattern", choices=("split", "joined"), default="split")
    p.add_argument("--producers", type=int, default=6)
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--batch", type=int, default=10, help="swaps per cycle and producer")
    p.add_argument("--call-ms", type=float, default=20.0)
    p.add_argument("--retry-backoff-ms", type=int, default=100)
    p.add_argument("--gap-ms", type=float, default=0.0, help="wait after each EndTxn")
    p.add_argument("--offsets-after", action="store_true", help="offsets once produced")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("aiokafka").propagate = False
    if args.bootstrap:
        args.bootstrap_actual = args.bootstrap
        asyncio.run(amain(args))
        return 0
    KafkaBroker.fetch(echo=False)
    broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="txn-probe-")) / "kafka")
    args.bootstrap_actual = broker.start()
    try:
        asyncio.run(amain(args))
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
