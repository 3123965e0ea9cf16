"""The one place watchers write to Kafka: explicit partitions, tombstones, history records.

Every record goes to its compacted state topic on the partition of its
namespace (else name), computed by `topics.partitioner` so every producer
agrees. Every change to endpoints, profiles and policies is also appended to
that topic's history topic as a `HistoryRecord` (who, through what, when, and
the record or the delete), which is what `portcullis audit` replays.
`publish` returns only when the broker has acknowledged everything, so the
caller can commit its mirror.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from topics.codec import encode
from topics.partitioner import partition_for_key
from topics.records import HISTORY_OF, EndpointRecord, HistoryRecord, PolicyRecord
from topics.specs import topic_name
from watchers.metrics import WatchMetrics
from watchers.mirror import Publication

log = logging.getLogger(__name__)

#: State topics whose every change is also appended to a history topic.
HISTORY = HISTORY_OF


class PublishError(RuntimeError):
    """Kafka did not take a batch; nothing in it may be assumed published."""


class Publisher(Protocol):
    async def publish(self, publications: Sequence[Publication]) -> None: ...


class KafkaPublisher:
    """Publishes `Publication`s with an aiokafka producer (which the caller starts and stops).

    ``actor`` and ``source`` go on the history records of changes that do not name their
    own actor (a policy record's ``actor`` wins; then the publication's).
    """

    def __init__(
        self, producer: AIOKafkaProducer, prefix: str, *, history: bool = True,
        actor: str = "kubernetes", source: str = "kubernetes",
        metrics: WatchMetrics | None = None,
    ) -> None:
        self._producer = producer
        self.metrics = metrics
        self._prefix = prefix
        self._history = history
        self._actor = actor
        self._source = source
        self._partitions: dict[str, int] = {}
        self.published = 0

    async def partition_count(self, topic: str) -> int:
        if topic not in self._partitions:
            parts = await self._producer.partitions_for(topic)
            if not parts:
                raise PublishError(f"topic {topic!r} does not exist (run `portcullis topics`)")
            self._partitions[topic] = len(parts)
        return self._partitions[topic]

    async def _send(
        self, suffix: str, pub: Publication, value: bytes | None, stamp_ms: int | None = None
    ) -> Any:
        topic = topic_name(self._prefix, suffix)
        partition = partition_for_key(pub.partition_key, await self.partition_count(topic))
        return await self._producer.send(
            topic, value=value, key=pub.key.encode("utf-8"), partition=partition,
            timestamp_ms=stamp_ms,
        )

    def history_record(self, pub: Publication, at: float) -> HistoryRecord:
        """The audit record of one change: the record (or the delete), who and through what."""
        return history_record(pub, at, actor=self._actor, source=self._source)

    async def publish(self, publications: Sequence[Publication]) -> None:
        if not publications:
            return
        try:
            futures = []
            at = time.time()
            topics = []
            for pub in publications:
                value = None if pub.value is None else encode(pub.value)
                futures.append(await self._send(pub.topic, pub, value))
                topics.append(pub.topic)
                if self._history and pub.topic in HISTORY:
                    # the message time is never before the change's own (audit reads
                    # only messages up to a little after the time it replays to)
                    history = encode(self.history_record(pub, at))
                    futures.append(await self._send(HISTORY[pub.topic], pub, history,
                                                    math.ceil(at * 1000)))
                    topics.append(HISTORY[pub.topic])
            await asyncio.gather(*futures)
        except KafkaError as exc:
            if self.metrics is not None:
                self.metrics.publish_failures.inc()
            raise PublishError(
                f"Kafka did not accept {len(publications)} record(s): {exc}"
            ) from exc
        self.published += len(publications)
        if self.metrics is not None:
            for topic in topics:
                self.metrics.published.inc(topic=topic)
            self.metrics.last_publish.set(time.time())
        log.debug("published %d record(s)", len(publications))


def history_record(pub: Publication, at: float, *, actor: str, source: str) -> HistoryRecord:
    """`pub` as a history record; ``actor``/``source`` are used when it names none itself."""
    record = pub.value
    who = pub.actor or actor
    via = source
    if isinstance(record, PolicyRecord):
        who = record.actor if pub.actor is None else pub.actor
    elif isinstance(record, EndpointRecord):
        via = record.source
    return HistoryRecord(
        topic=pub.topic, key=pub.key, change="delete" if record is None else "upsert",
        actor=who, source=via, at=at, record=None if record is None else record.to_dict(),
    )


def producer_for(kafka_kwargs: dict[str, Any], client_id: str) -> AIOKafkaProducer:
    """A producer that waits for every in-sync replica and batches a few milliseconds."""
    return AIOKafkaProducer(
        **kafka_kwargs, client_id=client_id, acks="all", linger_ms=5,
        request_timeout_ms=30_000,
    )
