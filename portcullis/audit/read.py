"""Read append-only topics to the end they had when reading began (the Kafka edge of audit).

A history topic is read from its first offset to the end offsets taken at the start, so
an audit is a snapshot even while watchers keep publishing. A record that is not a
`HistoryRecord` is skipped and reported (never guessed at).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from portcullis.audit.history import Change
from topics.endoffsets import true_end_offsets
from topics.records import HISTORY_OF, HistoryRecord, RecordError
from topics.specs import topic_name

log = logging.getLogger(__name__)

#: How much later than a change's ``at`` its broker timestamp may be (batching, a slow
#: broker, clock skew between producer and broker) and still be read.
STAMP_SLACK_MS = 60_000


@dataclass
class Skipped:
    """Records that could not be read, one line each (topic, partition, offset, why), and
    notes on what the history cannot tell (``notes``)."""

    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    messages: int = 0  # history messages read

    def add(self, topic: str, partition: int, offset: int, why: object) -> None:
        self.lines.append(f"{topic}[{partition}]@{offset}: {why}")


async def read_log(
    kafka_kwargs: dict[str, Any],
    topic: str,
    *,
    timeout: float = 120.0,
    max_fetch_bytes: int = 16 * 1024 * 1024,
    starts: dict[int, int] | None = None,
) -> AsyncIterator[tuple[int, int, bytes | None, bytes | None, int]]:
    """(partition, offset, key, value, timestamp ms) of every message up to the end offsets
    at the start; LookupError when the topic does not exist. ``starts`` is filled with each
    partition's first retained offset (above 0 where retention has deleted messages)."""
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
            # Tansu lists the base of the last batch as the end: raise it to the true end
            ends = await true_end_offsets(consumer._client, await consumer.end_offsets(tps))
            if starts is not None:
                begins = await consumer.beginning_offsets(tps)
                starts.update({tp.partition: begins[tp] for tp in tps})
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


def history_change(topic: str, partition: int, offset: int, value: bytes | None) -> Change:
    """A history message as a Change; RecordError when it is not a valid HistoryRecord."""
    if value is None:
        raise RecordError("HistoryRecord: a tombstone on a history topic")
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"HistoryRecord: not valid JSON: {exc}") from None
    change = Change(HistoryRecord.from_dict(data), partition, offset)
    if HISTORY_OF.get(change.topic) != topic:
        raise RecordError(f"HistoryRecord: a {change.topic} change on the {topic} topic")
    return change


_HEAD = b'{"v":1,"topic":"'
_AT = b',"at":'


def fast_at(value: bytes) -> float | None:
    """The ``at`` of a HistoryRecord as this build encodes it (fields in a fixed order), read
    without parsing the JSON; None when the value is not laid out that way.

    The first ``,"at":`` is the top-level field: it comes before ``record``, and inside a
    JSON string a quote is always escaped, so the bytes cannot occur in the earlier ones.
    """
    if not value.startswith(_HEAD):
        return None
    start = value.find(_AT)
    if start < 0:
        return None
    start += len(_AT)
    end = value.find(b",", start)
    try:
        return float(value[start:end])
    except ValueError:
        return None


def latest_until(
    messages: Iterable[tuple[str, int, int, bytes | None, bytes | None]], at: float,
    skipped: Skipped,
) -> list[Change]:
    """Per key, the last change published at or before `at`, from (history topic suffix,
    partition, offset, key, value) in log order per partition. Only those are decoded (and
    checked against the message key): replaying a week to a time costs little more than
    reading it."""
    latest: dict[tuple[str, bytes], tuple[int, int, bytes]] = {}
    for suffix, partition, offset, key, value in messages:
        if value is None or key is None:
            skipped.add(suffix, partition, offset, "a history message without key or value")
            continue
        when = fast_at(value)
        if when is None:  # not our layout: decode it to know when it was
            try:
                when = history_change(suffix, partition, offset, value).at
            except (RecordError, TypeError) as exc:
                skipped.add(suffix, partition, offset, exc)
                continue
        if when <= at:
            latest[(suffix, key)] = (partition, offset, value)
    out = []
    for (suffix, key), (partition, offset, value) in latest.items():
        try:
            change = history_change(suffix, partition, offset, value)
        except (RecordError, TypeError) as exc:
            skipped.add(suffix, partition, offset, exc)
            continue
        if change.key.encode("utf-8") != key or change.at > at:
            skipped.add(suffix, partition, offset, "the record's key or time disagrees with "
                        "the message key or its layout")
            continue
        out.append(change)
    return out


async def read_history_until(
    kafka_kwargs: dict[str, Any],
    prefix: str,
    at: float,
    topics: Sequence[str] = tuple(HISTORY_OF),
    *,
    skipped: Skipped | None = None,
    timeout: float = 300.0,
) -> list[Change]:
    """The changes that make up the state at `at`: per key, the last one at or before it.

    Where retention has deleted the start of a history partition, an object with no
    retained change has been as its state topic holds it since before the oldest retained
    change: it is taken from there. The state before that horizon is incomplete, and
    `skipped.notes` says so.
    """
    skipped = skipped if skipped is not None else Skipped()
    until_ms = int(at * 1000) + STAMP_SLACK_MS
    messages: list[tuple[str, int, int, bytes | None, bytes | None]] = []
    for state_topic in topics:
        suffix = HISTORY_OF[state_topic]
        starts: dict[int, int] = {}
        oldest: dict[int, int] = {}  # partition -> time (ms) of its oldest retained message
        seen: set[bytes] = set()
        async for partition, offset, key, value, stamp in read_log(
            kafka_kwargs, topic_name(prefix, suffix), timeout=timeout, starts=starts
        ):
            oldest.setdefault(partition, stamp)
            skipped.messages += 1
            if key is not None:
                seen.add(key)
            if stamp <= until_ms:
                messages.append((suffix, partition, offset, key, value))
        trimmed = {p for p, start in starts.items() if start > 0}
        if trimmed:
            messages.extend(await _unchanged_since_the_horizon(
                kafka_kwargs, prefix, state_topic, trimmed, len(starts), seen))
            horizon = max(oldest.get(p, until_ms) for p in trimmed) / 1000
            if at < horizon:
                skipped.notes.append(
                    f"{suffix}: retention has deleted the changes before "
                    f"{_iso(horizon)}: the state at an earlier time is incomplete")
    return latest_until(messages, at, skipped)


async def _unchanged_since_the_horizon(
    kafka_kwargs: dict[str, Any], prefix: str, state_topic: str, trimmed: set[int],
    count: int, seen: set[bytes],
) -> list[tuple[str, int, int, bytes | None, bytes | None]]:
    """Objects of trimmed partitions that no retained change mentions, as changes at time 0
    (their state-topic record), so they are in the state at any time after the horizon."""
    from topics.codec import encode
    from topics.partitioner import partition_for_key
    from topics.specs import spec_for
    from watchers.topicstate import read_state

    name = topic_name(prefix, state_topic)
    records = await read_state(kafka_kwargs, name, spec_for(name).record)
    out: list[tuple[str, int, int, bytes | None, bytes | None]] = []
    for key, record in records.items():
        raw_key = key.encode("utf-8")
        if raw_key in seen:
            continue
        history = HistoryRecord(state_topic, key, "upsert", "(before the retained history)",
                                "state topic", 0.0, record.to_dict())
        partition = partition_for_key(history.partition_key, count)
        if partition in trimmed:
            out.append((HISTORY_OF[state_topic], partition, -1, raw_key, encode(history)))
    return out


def _iso(seconds: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


async def read_history(
    kafka_kwargs: dict[str, Any],
    prefix: str,
    topics: Sequence[str] = tuple(HISTORY_OF),
    *,
    skipped: Skipped | None = None,
    timeout: float = 300.0,
) -> list[Change]:
    """Every change on the history topics of `topics` (state topic suffixes).

"""
    skipped = skipped if skipped is not None else Skipped()
    out: list[Change] = []
    for state_topic in topics:
        suffix = HISTORY_OF[state_topic]
        name = topic_name(prefix, suffix)
        async for partition, offset, _key, value, _stamp in read_log(
            kafka_kwargs, name, timeout=timeout
        ):
            try:
                out.append(history_change(suffix, partition, offset, value))
            except (RecordError, TypeError) as exc:
                skipped.add(name, partition, offset, exc)
    for line in skipped.lines:
        log.warning("skipped: %s", line)
    return out
