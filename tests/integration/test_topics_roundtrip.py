"""Every record type through both real brokers: produce to the partition the partitioner
picks, consume, decode, and get back an equal record (tombstones included)."""

from __future__ import annotations

import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from portcullis.brokers import Broker
from portcullis.topics_admin import check_topics
from topics import codec
from topics.partitioner import partition_for, partition_for_key, partitions_for
from topics.records import (
    DeadLetterRecord,
    EndpointRecord,
    MembershipRecord,
    PolicyRecord,
    ProfileRecord,
    Record,
    SelectorRecord,
)
from topics.specs import topic_names

PARTITIONS = 3
NOW = 1764100000.123456

POD = EndpointRecord(
    "pod", "shop", "web-7f9c", "node-1", "cali1a2b3c", ("10.0.3.7", "fd00:10::7"),
    {"app": "web", "tier": "frontend", "ünïcode": "ok ✓"}, "web", "kubernetes", NOW, "1234",
)
HOST = EndpointRecord(
    "hostendpoint", None, "node-1", "node-1", "eth0", ("192.0.2.10",), {"role": "worker"},
    None, "kubernetes", NOW,
)
NETSET = EndpointRecord(
    "globalnetworkset", None, "corp", None, None, ("203.0.113.0/24", "2001:db8::/32"),
    {"trust": "corp"}, None, "apply", NOW,
)
VM = EndpointRecord(
    "vm", None, "billing-vm", "hv-3", "tap0", ("10.20.0.5",), {"app": "billing"},
    None, "inventory", NOW,
)

SAMPLES: dict[str, list[tuple[str, Record | None]]] = {
    "endpoints": [
        (POD.key, POD),
        (HOST.key, HOST),
        (NETSET.key, NETSET),
        (VM.key, VM),
        (POD.key, None),  # the pod is deleted
    ],
    "profiles": [
        ("kns.shop", ProfileRecord("namespace", "shop", None, {"team": "shop"}, NOW, "77")),
        ("ksa.shop.web", ProfileRecord("serviceaccount", "shop", "web", {"pci": "no"}, NOW)),
        ("kns.shop", None),
    ],
    "policies": [
        (
            "NetworkPolicy/shop/allow-dns",
            PolicyRecord(
                "NetworkPolicy", "shop", "allow-dns",
                {
                    "apiVersion": "projectcalico.org/v3",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": "allow-dns", "namespace": "shop"},
                    "spec": {
                        "order": 100.5,
                        "selector": "app == 'web'",
                        "types": ["Egress"],
                        "egress": [{"action": "Allow", "protocol": "UDP",
                                    "destination": {"ports": [53]}}],
                    },
                },
                "alice", NOW - 1, NOW,
            ),
        ),
        (
            "GlobalNetworkPolicy//default-deny",
            PolicyRecord("GlobalNetworkPolicy", None, "default-deny",
                         {"spec": {"selector": "all()"}}, "bob", NOW, NOW),
        ),
    ],
    "selectors": [
        ("s:abc_-123", SelectorRecord("s:abc_-123", "app == \"web\"", "shop", True, NOW)),
        ("s:global", SelectorRecord("s:global", "all()", None, True, NOW)),
        ("s:abc_-123", SelectorRecord("s:abc_-123", "app == \"web\"", "shop", False, NOW)),
    ],
    "memberships": [
        (
            f"s:abc|{POD.key}",
            MembershipRecord("s:abc", POD.key, "shop", "node-1", "cali1a2b3c", POD.ips, NOW),
        ),
        (
            f"s:abc|{HOST.key}",
            MembershipRecord("s:abc", HOST.key, None, "node-1", "eth0", HOST.ips, NOW),
        ),
        (f"s:abc|{POD.key}", None),
    ],
    "deadletter": [
        (
            "dl-1",  # label only: a dead letter's Kafka key is the original key bytes
            codec.dead_letter(
                "x.endpoints", 2, 41, b"\xffraw", b"{not json", "bad", "test", at=NOW
            ),
        ),
        ("dl-2", codec.dead_letter("x.endpoints", 0, 7, b"pod/shop/a", None, "x", "t", at=NOW)),
    ],
}


def _key_bytes(key: str, record: Record | None) -> bytes:
    if record is not None:
        return codec.encode_key(record)
    return key.encode()


def _partitions(record: Record | None, key: str, partitions: int) -> tuple[int, ...]:
    if record is None:
        # A tombstone goes where the record it deletes went: use that record's partition.
        previous = next(r for k, r in SAMPLES_BY_KEY[key] if r is not None)
        return partitions_for(previous, partitions)
    return partitions_for(record, partitions)


SAMPLES_BY_KEY: dict[str, list[tuple[str, Record | None]]] = {}
for _topic, _items in SAMPLES.items():
    for _key, _record in _items:
        SAMPLES_BY_KEY.setdefault(_key, []).append((_key, _record))


async def _consume_all(
    bootstrap: str, topic: str, partitions: int, count: int, timeout: float = 30
) -> list[tuple[int, bytes | None, bytes | None]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: list[tuple[int, bytes | None, bytes | None]] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(*tps, timeout_ms=500)
            for tp, messages in sorted(batch.items()):
                got += [(tp.partition, m.key, m.value) for m in messages]
    finally:
        await consumer.stop()
    return got


@pytest.mark.parametrize("suffix", list(SAMPLES))
async def test_records_round_trip_through_the_broker(
    broker: Broker, topic_prefix: str, suffix: str
) -> None:
    report = await check_topics(
        {"bootstrap_servers": broker.bootstrap}, topic_prefix, PARTITIONS, create=True
    )
    assert report.ok, report.lines()
    topic = topic_names(topic_prefix)[suffix]
    count = PARTITIONS if suffix != "deadletter" else 1

    expected: list[tuple[int, bytes | None, Record | None]] = []
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        for key, record in SAMPLES[suffix]:
            key_bytes = _key_bytes(key, record)
            value = None if record is None else codec.encode(record)
            for partition in _partitions(record, key, count):
                meta = await producer.send_and_wait(
                    topic, value, key=key_bytes, partition=partition
                )
                assert meta.partition == partition
                expected.append((partition, key_bytes, record))
    finally:
        await producer.stop()

    got = await _consume_all(broker.bootstrap, topic, count, len(expected))
    decoded = [(p, k, codec.decode(suffix, v)) for p, k, v in got]
    # Kafka orders within a partition, not across: compare per partition, in order.
    for partition in range(count):
        want = [(k, r) for p, k, r in expected if p == partition]
        have = [(k, r) for p, k, r in decoded if p == partition]
        assert have == want, f"{topic} partition {partition}"
    assert len(decoded) == len(expected)


async def test_global_selectors_reach_every_partition_and_namespaced_ones_one(
    broker: Broker, topic_prefix: str
) -> None:
    report = await check_topics(
        {"bootstrap_servers": broker.bootstrap}, topic_prefix, PARTITIONS, create=True
    )
    assert report.ok, report.lines()
    topic = topic_names(topic_prefix)["selectors"]
    scoped = SelectorRecord("s:scoped", "app == 'a'", "shop", True, NOW)
    everywhere = SelectorRecord("s:global", "all()", None, True, NOW)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for record in (scoped, everywhere):
            for partition in partitions_for(record, PARTITIONS):
                await producer.send_and_wait(
                    topic, codec.encode(record), key=codec.encode_key(record), partition=partition
                )
    finally:
        await producer.stop()
    got = await _consume_all(broker.bootstrap, topic, PARTITIONS, 1 + PARTITIONS)
    where: dict[str, set[int]] = {}
    for partition, _key, value in got:
        decoded = codec.decode(SelectorRecord, value)
        assert decoded is not None
        where.setdefault(decoded.uid, set()).add(partition)
    assert where == {
        "s:scoped": {partition_for(scoped, PARTITIONS)},
        "s:global": set(range(PARTITIONS)),
    }


async def test_a_producer_keyed_by_namespace_agrees_with_the_partitioner(
    broker: Broker, topic_prefix: str
) -> None:
    """Every producer agrees: a client that lets its default (Java-compatible) partitioner
    place messages keyed by namespace puts them where `partition_for_key` says."""
    topic = topic_prefix + "agree"
    partitions = 5
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    namespaces = [f"team-{i}" for i in range(40)]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for ns in namespaces:
            meta = await producer.send_and_wait(topic, b"x", key=ns.encode())
            assert meta.partition == partition_for_key(ns, partitions), ns
    finally:
        await producer.stop()
    got = await _consume_all(broker.bootstrap, topic, partitions, len(namespaces))
    assert sorted((p, k) for p, k, _v in got) == sorted(
        (partition_for_key(ns, partitions), ns.encode()) for ns in namespaces
    )


def test_samples_cover_every_record_type() -> None:
    kinds = {type(r) for items in SAMPLES.values() for _k, r in items if r is not None}
    assert kinds == {
        EndpointRecord, ProfileRecord, PolicyRecord, SelectorRecord, MembershipRecord,
        DeadLetterRecord,
    }
