"""Read append-only topics to the end they had when reading began (the Kafka edge of audit).

A history topic is read from its first offset to the end offsets taken at the start, so
an audit is a snapshot even while watchers keep publishing. A record that is not a
`HistoryRecord` is skipped and reported (never guessed at).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from portcullis.audit.history import Change
from topics.records import HISTORY_OF, HistoryRecord, RecordError
from topics.specs import topic_name

log = logging.getLogger(__name__)


@dataclass
class Skipped:
    """Records that could not be read, one line each (topic, partition, offset, why)."""

    lines: list[str] = field(default_factory=list)

    def add(self, topic: str, partition: int, offset: int, why: object) -> None:
        self.lines.append(f"{topic}[{partition}]@{offset}: {why}")


async def read_log(
    kafka_kwargs: dict[str, Any],
    topic: str,
    *,
    timeout: float = 120.0,
    max_fetch_bytes: int = 16 * 1024 * 1024,
) -> AsyncIterator[tuple[int, int, bytes | None, bytes | None, int]]:
    """(partition, offset, key, value, timestamp ms) of every message up to the end offsets
    at the start; LookupError when the topic does not exist."""
    consumer = AIOKafkaConsumer(
        **kafka_kwargs, enable_auto_commit=False, auto_offset_reset="earliest",
        client_id="portcullis-audit", max_partition_fetch_bytes=max_fetch_bytes,
        fetch_max_bytes=4 * max_fetch_bytes,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(timeout):
            tps = await _partitions(consumer, topic)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            pending = {tp for tp in tps if ends[tp] > 0}
            while pending:
                batch = await consumer.getmany(*pending, timeout_ms=500)
                for tp, messages in batch.items():
                    end = ends[tp]
                    for msg in messages:
                        if msg.offset >= end:
                            break
                        yield tp.partition, msg.offset, msg.key, msg.value, msg.timestamp
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    parts = consumer.partitions_for_topic(topic)
    if parts is None:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise LookupError(f"topic {topic!r} does not exist (run `portcullis topics create`)")
    return [TopicPartition(topic, p) for p in sorted(parts)]


def history_change(
    topic: str, partition: int, offset: int, value: bytes | None
) -> Change:
    """A history message as a Change; RecordError when it is not a valid HistoryRecord."""
    if value is None:
        raise RecordError("HistoryRecord: a tombstone on a history topic")
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"HistoryRecord: not valid JSON: {exc}") from None
    history = HistoryRecord.from_dict(data)
    if HISTORY_OF[history.topic] != topic:
        raise RecordError(f"HistoryRecord: a {history.topic} change on the {topic} topic")
    return Change(history, partition, offset)


async def read_history(
    kafka_kwargs: dict[str, Any],
    prefix: str,
    topics: Sequence[str] = tuple(HISTORY_OF),
    *,
    skipped: Skipped | None = None,
    until_ms: int | None = None,
    timeout: float = 300.0,
    progress: Callable[[int], None] | None = None,
) -> list[Change]:
    """Every change on the history topics of `topics` (state topic suffixes).

    ``until_ms``: messages whose broker timestamp is later than this are not decoded (a
    change published after the audited time cannot be in its state; the record's own
    ``at`` still decides for those that are).
    """
    skipped = skipped if skipped is not None else Skipped()
    out: list[Change] = []
    for state_topic in topics:
        suffix = HISTORY_OF[state_topic]
        name = topic_name(prefix, suffix)
        async for partition, offset, _key, value, stamp in read_log(
            kafka_kwargs, name, timeout=timeout
        ):
            if until_ms is not None and stamp > until_ms:
                continue
            try:
                out.append(history_change(suffix, partition, offset, value))
            except (RecordError, TypeError) as exc:
                skipped.add(name, partition, offset, exc)
            if progress is not None and len(out) % 100_000 == 0:
                progress(len(out))
    for line in skipped.lines:
        log.warning("skipped: %s", line)
    return out
