"""`true_end_offsets` against both real brokers: after multi-record batches, the end offset a
recovery reads up to is the offset after the last record, on Tansu as on Kafka."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from topics.endoffsets import true_end_offsets

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


async def _produce_batches(bootstrap: str, topic: str, sizes: dict[int, list[int]]) -> None:
    """Per partition, batches of the given sizes (each batch sent and awaited together)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=100)
    await producer.start()
    try:
        for partition, batches in sizes.items():
            for size in batches:
                sent = [await producer.send(topic, b"v", key=b"k", partition=partition)
                        for _ in range(size)]
                await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def test_end_offsets_reach_past_the_last_batch(broker: Any, topic_prefix: str) -> None:
    topic = f"{topic_prefix}.ends"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 4, 1)])
    finally:
        await admin.close()
    # partition 3 stays empty; 2 has a single record; 0 and 1 end with multi-record batches
    sizes = {0: [10, 5], 1: [1, 7], 2: [1]}
    await _produce_batches(broker.bootstrap, topic, sizes)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(4)]
        consumer.assign(tps)
        listed = await consumer.end_offsets(tps)
        ends = await true_end_offsets(consumer._client, listed)
        # what a reader really finds: every record, one past the last offset
        found: dict[TopicPartition, int] = {}
        for tp in tps[:3]:
            consumer.seek(tp, 0)
        while sum(found.get(tp, 0) for tp in tps) < sum(map(sum, sizes.values())):
            for tp, messages in (await consumer.getmany(timeout_ms=2000)).items():
                found[tp] = found.get(tp, 0) + len(messages)
                assert messages[-1].offset + 1 == found[tp]
    finally:
        await consumer.stop()
    expected = {tp: sum(sizes.get(tp.partition, [])) for tp in tps}
    assert found == {tp: n for tp, n in expected.items() if n}
    assert ends == expected, f"listed by the broker: {listed}"
    assert all(listed[tp] <= ends[tp] for tp in tps)
