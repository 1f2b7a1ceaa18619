"""How token records reach the token topic (docs/tokens.md, *Fencing*).

* :class:`HolderChannel`: the holder's **transactional** producer. Its transactional id is the
  same on every replica of a group (``<prefix>-<group>-token``), so starting it (Kafka's
  ``InitProducerId``) fences whichever replica held before: that one's next write fails with
  :class:`HolderFencedError`, and an open transaction of it is aborted. The holder writes a
  *rotating* record before every login or refresh, so a fenced replica finds out before it
  calls the platform, not after.
* :class:`NoticeChannel`: a plain producer for the followers' notices (need, refused, draining),
  which fence nothing and need no transaction.

Readers of the topic read committed records only, so an aborted write of a fenced holder is
never seen.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import ProducerFenced

from service.config import KafkaSettings
from service.kafka import client_options, ensure_compacted_topic, producer_fatal

log = structlog.get_logger(__name__)

READ_RETRY_SECONDS: Final = 1.0
Publish = Callable[[bytes, bytes], Awaitable[None]]


class HolderFencedError(Exception):
    """Another replica started the token holder's transactional id: this one holds no more."""


def token_transactional_id(kafka: KafkaSettings) -> str:
    """One per consumer group: the token holder's (under the service's transactional prefix)."""
    return f"{kafka.transactional_id_prefix}-{kafka.group_id}-token"


class Channel(Protocol):
    async def start(self) -> None: ...

    async def write(self, records: list[tuple[bytes, bytes]]) -> None: ...

    async def stop(self) -> None: ...


class HolderChannel:
    """The transactional producer of the token holder (one per stint as holder)."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._topic = topic
        self.transactional_id = token_transactional_id(kafka)
        self._producer = AIOKafkaProducer(
            **client_options(kafka),
            transactional_id=self.transactional_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=0,
        )

    async def start(self) -> None:
        """Initialise the transactional id: fences the previous holder."""
        try:
            await self._producer.start()
        except ProducerFenced as exc:  # another replica started it at the same moment
            raise HolderFencedError(str(exc)) from exc

    async def write(self, records: list[tuple[bytes, bytes]]) -> None:
        """Write ``records`` (key, value) to partition 0 in one transaction."""
        producer = self._producer
        try:
            async with producer.transaction():
                delivered = [
                    await producer.send(self._topic, value, key=key, partition=0)
                    for key, value in records
                ]
                await asyncio.gather(*delivered)  # their errors are ours (none left unread)
        except ProducerFenced as exc:
            raise HolderFencedError(f"fenced: {self.transactional_id} started elsewhere") from exc
        except Exception as exc:
            if producer_fatal(producer):
                raise HolderFencedError(f"{self.transactional_id} can no longer commit") from exc
            raise

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._producer.stop()


class HookChannel:
    """A channel that hands every record to a function (tests, tools): never fenced."""

    def __init__(self, publish: Publish) -> None:
        self._publish = publish

    async def start(self) -> None:
        return None

    async def write(self, records: list[tuple[bytes, bytes]]) -> None:
        for key, value in records:
            await self._publish(key, value)

    async def stop(self) -> None:
        return None


class NoticeChannel:
    """The plain (idempotent, not transactional) producer of the followers' notices."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._topic = topic
        self._producer = AIOKafkaProducer(**client_options(kafka), acks="all", linger_ms=0)

    async def start(self) -> None:
        await self._producer.start()

    async def write(self, records: list[tuple[bytes, bytes]]) -> None:
        for key, value in records:
            await self._producer.send_and_wait(self._topic, value, key=key, partition=0)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._producer.stop()


async def ensure_token_topic(kafka: KafkaSettings, topic: str) -> None:
    """Create the token topic (compacted, one partition) when it is missing."""
    if await ensure_compacted_topic(client_options(kafka), topic, setting="REBIND_TOPICS__TOKEN"):
        log.warning("token_topic_created", topic=topic, cleanup_policy="compact")


class TokenReader:
    """Reads the token topic from its beginning, committed records only, and hands every
    record to ``receive`` in offset order (no group, no commits: every replica reads it all)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        receive: Callable[[bytes | None, bytes | None, int], None],
    ) -> None:
        self._kafka = kafka
        self._tp = TopicPartition(topic, 0)
        self._receive = receive
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._position = 0

    @property
    def position(self) -> int:
        """The offset of the next record to read."""
        return self._position

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            **client_options(self._kafka),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            fetch_max_wait_ms=100,
        )
        await self._consumer.start()
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        self._task = asyncio.create_task(self._read_loop(), name="token-reader")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def _read_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                batch = await consumer.getmany(self._tp, timeout_ms=500)
                for msg in batch.get(self._tp, ()):
                    self._receive(msg.key, msg.value, msg.offset)
                self._position = await consumer.position(self._tp)
            except Exception as exc:  # noqa: BLE001 - a broker hiccup must not end the reader
                log.warning("token_topic_read_failed", error=type(exc).__name__)
                await asyncio.sleep(READ_RETRY_SECONDS)

    async def catch_up(self, timeout: float) -> bool:
        """Read the topic up to its last stable offset (True), or give up after ``timeout``."""
        if self._consumer is None:
            return True
        loop = asyncio.get_running_loop()
        try:
            end = (await self._consumer.end_offsets([self._tp]))[self._tp]
            deadline = loop.time() + timeout
            while self._position < end:
                if loop.time() >= deadline:
                    return False
                await asyncio.sleep(0.05)
        except Exception as exc:  # noqa: BLE001 - a broker hiccup: adopt what we have
            log.warning("token_topic_catch_up_failed", error=type(exc).__name__)
            return False
        return True
