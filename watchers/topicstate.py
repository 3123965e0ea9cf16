"""Read a compacted topic to its end: the current state, key by key.

`portcullis apply` compares against it (created / configured / unchanged),
`portcullis get` prints it, and a restarted watcher seeds its mirror with it
so deletions that happened while it was down still become tombstones.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from topics.codec import decode_as, decode_key
from topics.endoffsets import true_end_offsets
from topics.records import Record, RecordError

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Record)


async def read_state(
    kafka_kwargs: dict[str, Any], topic: str, record: type[R], *, timeout: float = 30.0
) -> dict[str, R]:
    """Latest record per key (tombstones remove the key); malformed records are skipped, logged."""
    consumer = AIOKafkaConsumer(
        **kafka_kwargs, enable_auto_commit=False, auto_offset_reset="earliest",
        client_id="portcullis-state-reader",
    )
    await consumer.start()
    state: dict[str, R] = {}
    try:
        async with asyncio.timeout(timeout):
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic)
            if not parts:
                raise LookupError(f"topic {topic!r} does not exist (run `portcullis topics`)")
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            # Tansu lists the base of the last batch as the end: raise it to the true end
            ends = await true_end_offsets(consumer._client, await consumer.end_offsets(tps))
            pending = {tp for tp in tps if ends[tp] > 0}
            while pending:
                batch = await consumer.getmany(*pending, timeout_ms=500)
                for tp, messages in batch.items():
                    for msg in messages:
                        try:
                            key = decode_key(msg.key)
                            value = decode_as(record, msg.value)
                        except RecordError as exc:
                            log.warning("%s[%d]@%d: skipped: %s", topic, tp.partition,
                                        msg.offset, exc)
                            continue
                        if value is None:
                            state.pop(key, None)
                        else:
                            state[key] = value
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
    finally:
        await consumer.stop()
    return state
