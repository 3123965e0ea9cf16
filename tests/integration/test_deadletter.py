"""A malformed record on `endpoints` does not stop a consumer: it lands in `deadletter`,
with where it was, why it was rejected and its original bytes; good records still pass."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from portcullis.brokers import Broker
from portcullis.topics_admin import check_topics
from topics import codec
from topics.partitioner import partition_for
from topics.records import DeadLetterRecord, EndpointRecord, Record, RecordError
from topics.specs import topic_names

PARTITIONS = 2
GOOD = EndpointRecord(
    "pod", "shop", "web-1", "node-1", "cali1", ("10.0.0.1",), {"app": "web"}, "default",
    "kubernetes", 1764100000.5,
)
# (key, value, the reason the dead letter must give)
BAD: list[tuple[bytes, bytes, str]] = [
    (b"pod/shop/web-2", b'{"v": 1, "kind": "pod", ', "not valid JSON"),
    (b"pod/shop/web-3", b'{"v": 9, "kind": "pod"}', "unknown version 9"),
    (
        b"pod/shop/web-4",
        codec.encode(GOOD).replace(b'"10.0.0.1"', b'"10.0.0.999"'),
        "EndpointRecord.ips: not an IP address or CIDR: '10.0.0.999'",
    ),
    (b"\xfe\xff-binary", b"\x00\x01\x02", "key is not UTF-8"),
]


async def consume_endpoints_once(
    bootstrap: str, prefix: str, expected: int, timeout: float = 30
) -> tuple[list[Record | None], int]:
    """A small consumer loop as every Portcullis consumer runs it: decode, or dead-letter."""
    names = topic_names(prefix)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    records: list[Record | None] = []
    rejected = 0
    try:
        tps = [TopicPartition(names["endpoints"], p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while len(records) + rejected < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(*tps, timeout_ms=500)
            for messages in batch.values():
                for msg in messages:
                    try:
                        codec.decode_key(msg.key)
                        records.append(codec.decode("endpoints", msg.value))
                    except RecordError as exc:
                        letter = codec.dead_letter(
                            msg.topic, msg.partition, msg.offset, msg.key, msg.value, exc,
                            rejected_by="test_deadletter",
                        )
                        await producer.send_and_wait(
                            names["deadletter"],
                            codec.encode(letter),
                            key=codec.encode_key(letter),
                            partition=partition_for(letter, 1),
                        )
                        rejected += 1
    finally:
        await consumer.stop()
        await producer.stop()
    return records, rejected


async def read_dead_letters(
    bootstrap: str, topic: str, count: int
) -> list[tuple[bytes | None, DeadLetterRecord]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: list[tuple[bytes | None, DeadLetterRecord]] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + 30
        while len(got) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=500)
            for msg in batch.get(tp, []):
                letter = codec.decode("deadletter", msg.value)
                assert isinstance(letter, DeadLetterRecord)
                got.append((msg.key, letter))
    finally:
        await consumer.stop()
    return got


async def test_malformed_endpoints_land_in_deadletter_with_their_reason(
    broker: Broker, topic_prefix: str
) -> None:
    report = await check_topics(
        {"bootstrap_servers": broker.bootstrap}, topic_prefix, PARTITIONS, create=True
    )
    assert report.ok, report.lines()
    names = topic_names(topic_prefix)
    good_partition = partition_for(GOOD, PARTITIONS)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    sent: dict[bytes, tuple[int, int]] = {}
    try:
        await producer.send_and_wait(
            names["endpoints"], codec.encode(GOOD), key=codec.encode_key(GOOD),
            partition=good_partition,
        )
        for i, (key, value, _reason) in enumerate(BAD):
            meta = await producer.send_and_wait(
                names["endpoints"], value, key=key, partition=i % PARTITIONS
            )
            sent[key] = (meta.partition, meta.offset)
        await producer.send_and_wait(  # a tombstone is not an error
            names["endpoints"], None, key=codec.encode_key(GOOD), partition=good_partition
        )
    finally:
        await producer.stop()

    records, rejected = await consume_endpoints_once(
        broker.bootstrap, topic_prefix, expected=len(BAD) + 2
    )
    assert records == [GOOD, None]
    assert rejected == len(BAD)

    letters = await read_dead_letters(broker.bootstrap, names["deadletter"], len(BAD))
    assert len(letters) == len(BAD)
    by_key = {letter.raw_key(): (kafka_key, letter) for kafka_key, letter in letters}
    for key, value, reason in BAD:
        kafka_key, letter = by_key[key]
        assert kafka_key == key  # the dead letter keeps the original key
        assert reason in letter.reason
        assert letter.raw_value() == value
        assert (letter.topic, letter.partition, letter.offset) == (names["endpoints"], *sent[key])
        assert letter.rejected_by == "test_deadletter"
    assert by_key[b"\xfe\xff-binary"][1].key_encoding == "base64"
