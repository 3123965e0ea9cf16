"""Malformed records reach the enforcer through real brokers: the ones this node owns land in
the dead-letter topic with their reason, the rest are only counted, and enforcement goes on.

Dry-run ipset and iptables backends: no root or kernel needed, the programmed state is
inspected directly.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from enforcers.engine import DeadLetterPublisher, DryRunIptables, Enforcer, Programmer
from enforcers.ipsets import DryRunIpsets, set_name
from enforcers.metrics import EnforcerMetrics
from enforcers.state import EnforcerState
from portcullis.brokers import Broker
from tests.dataplane.test_traffic import NODE
from tests.integration.test_enforcer import (
    PARTITIONS,
    eventually,
    make_topics,
    publish,
    standard_world,
)
from topics import codec
from topics.partitioner import partition_for_key
from topics.records import DeadLetterRecord, PolicyRecord

SHOP = partition_for_key("shop", PARTITIONS)
NOW = time.time()
BAD_POLICY = PolicyRecord(
    "NetworkPolicy", "shop", "bad",
    {"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
     "metadata": {"name": "bad", "namespace": "shop"}, "spec": {"selector": "app == "}},
    "test", NOW, NOW,
)
# (topic suffix, partition, key, value): read at start-up
AT_START: list[tuple[str, int, bytes, bytes]] = [
    # names this node, but is no endpoint record: ours to dead-letter
    ("endpoints", SHOP, b"pod/shop/broken", orjson.dumps({"v": 1, "node": NODE, "kind": "pod"})),
    # nobody can tell whose this is: the processor's match agent dead-letters it
    ("endpoints", SHOP, b"pod/shop/garbage", b"not json at all"),
    # a membership of our local pod A: ours
    ("memberships", SHOP, b"s:test|pod/shop/a", b'{"v": 1, "selector_uid": '),
    # a network set's membership: no node owns it (only an auditor dead-letters it)
    ("memberships", partition_for_key("nowhere", PARTITIONS),
     b"s:test|globalnetworkset//nowhere", b"[1, 2, 3]"),
    # fails policy.load_document: the processor's compile agent dead-letters it, not us
    ("policies", SHOP, b"NetworkPolicy/shop/bad", codec.encode(BAD_POLICY)),
]
# published while the enforcer runs: our local pod A's record turns malformed
WHILE_RUNNING = ("endpoints", SHOP, b"pod/shop/a", b'{"v": 7, "node": "%s"}' % NODE.encode())


async def send_raw(bootstrap: str, prefix: str,
                   records: list[tuple[str, int, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for suffix, partition, key, value in records:
            await producer.send_and_wait(prefix + suffix, value, key=key, partition=partition)
    finally:
        await producer.stop()


async def read_dead_letters(bootstrap: str, prefix: str, expected: int,
                            timeout: float = 30, settle: float = 1.5
                            ) -> list[tuple[bytes | None, DeadLetterRecord]]:
    """Every dead letter, once `expected` arrived and `settle` seconds brought no more."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    letters: list[tuple[bytes | None, DeadLetterRecord]] = []
    try:
        tp = TopicPartition(prefix + "deadletter", 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout
        quiet_until = None
        while time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=300)
            for msg in batch.get(tp, []):
                letter = codec.decode_as(DeadLetterRecord, msg.value)
                assert letter is not None
                letters.append((msg.key, letter))
            if len(letters) >= expected:
                if batch:
                    quiet_until = time.monotonic() + settle
                elif quiet_until is not None and time.monotonic() >= quiet_until:
                    break
                quiet_until = quiet_until or time.monotonic() + settle
    finally:
        await consumer.stop()
    return letters


def dry_run_enforcer(node: str, bootstrap: str, prefix: str,
                     unowned: bool = False) -> tuple[Enforcer, DryRunIpsets]:
    ipsets = DryRunIpsets()
    enforcer = Enforcer(EnforcerState(node, set_name), Programmer(ipsets, DryRunIptables()),
                        {"bootstrap_servers": bootstrap}, prefix, resync_interval=0.5,
                        dead_letter_unowned=unowned)
    return enforcer, ipsets


def has_member(ipsets: DryRunIpsets, net: str) -> bool:
    return any(net in members for members in ipsets.list_sets().values())


async def test_owned_malformed_records_are_dead_lettered_and_enforcement_goes_on(
    broker: Broker, topic_prefix: str
) -> None:
    bootstrap = broker.bootstrap
    await make_topics(bootstrap, topic_prefix)
    world, _sources = standard_world()
    await publish(bootstrap, topic_prefix, world.changes())
    await send_raw(bootstrap, topic_prefix, AT_START)

    enforcer, ipsets = dry_run_enforcer(NODE, bootstrap, topic_prefix)
    auditor, _ = dry_run_enforcer("auditor", bootstrap, topic_prefix, unowned=True)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(e.run(stop)) for e in (enforcer, auditor)]
    try:
        await asyncio.wait_for(enforcer.synced.wait(), 30)
        await asyncio.wait_for(auditor.synced.wait(), 30)
        # the good records are programmed despite the bad ones among them
        assert has_member(ipsets, "10.66.1.0/24")
        assert "shop/a" in " ".join(enforcer.state.endpoints)
        assert enforcer.metrics.rejected.value == len(AT_START)

        # a good change and a bad one together, while running
        world.put_endpoint("globalnetworkset", None, "saas", ("10.66.1.0/25",), {"kind": "saas"},
                           node=None)
        await publish(bootstrap, topic_prefix, world.changes())
        await send_raw(bootstrap, topic_prefix, [WHILE_RUNNING])
        await eventually(lambda: has_member(ipsets, "10.66.1.0/25")
                         and not has_member(ipsets, "10.66.1.0/24"))
        await eventually(lambda: enforcer.metrics.rejected.value == len(AT_START) + 1)

        await eventually(lambda: enforcer.metrics.dead_letters.value >= 3
                         and auditor.metrics.dead_letters.value >= 2, 20)
        letters = await read_dead_letters(bootstrap, topic_prefix, expected=5)
        assert not any(t.done() for t in tasks), "an enforcer stopped"
        # pod A stays as it was programmed before its record turned malformed
        assert "pod/shop/a" in enforcer.state.endpoints
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)

    seen = [(d.rejected_by, d.topic, d.partition, d.offset) for _k, d in letters]
    # at-least-once: a retried publish may repeat a letter, never more than that
    assert len(set(seen)) == 5, f"expected 5 distinct dead letters, got {sorted(seen)}"
    ours = {(d.topic, d.key): (key, d) for key, d in letters if d.rejected_by == f"enforcer/{NODE}"}
    assert set(ours) == {
        (topic_prefix + "endpoints", "pod/shop/broken"),
        (topic_prefix + "memberships", "s:test|pod/shop/a"),
        (topic_prefix + "endpoints", "pod/shop/a"),
    }
    sent = {key: (suffix, partition, value) for suffix, partition, key, value
            in [*AT_START, WHILE_RUNNING]}
    for (_topic, text_key), (kafka_key, letter) in ours.items():
        assert text_key is not None and kafka_key == text_key.encode()  # the original key
        _suffix, partition, value = sent[text_key.encode()]
        assert letter.partition == partition and letter.offset >= 0
        assert letter.raw_value() == value  # the original bytes, for replay after a fix
    assert "missing" in ours[(topic_prefix + "endpoints", "pod/shop/broken")][1].reason
    assert "JSON" in ours[(topic_prefix + "memberships", "s:test|pod/shop/a")][1].reason
    assert "version 7" in ours[(topic_prefix + "endpoints", "pod/shop/a")][1].reason
    assert enforcer.metrics.dead_letters.value == 3
    assert enforcer.metrics.dead_letter_failures.value == 0

    # the auditor takes the memberships it does not own; endpoints and policies never
    audited = {(d.topic, d.key) for _k, d in letters if d.rejected_by == "enforcer/auditor"}
    assert audited == {
        (topic_prefix + "memberships", "s:test|pod/shop/a"),
        (topic_prefix + "memberships", "s:test|globalnetworkset//nowhere"),
    }


async def test_a_failed_dead_letter_publish_is_logged_and_never_raises() -> None:
    from portcullis.brokers import free_port

    metrics = EnforcerMetrics()
    publisher = DeadLetterPublisher(
        {"bootstrap_servers": f"127.0.0.1:{free_port()}", "request_timeout_ms": 1000},
        "x.deadletter", "enforcer/test", metrics, attempts=2, send_timeout=2,
    )
    task = asyncio.create_task(publisher.run())
    where = ("x.endpoints", 0, 3)
    publisher.reject(where, b"pod/a/b", b"{", ValueError("bad"))
    publisher.reject(where, b"pod/a/b", b"{", ValueError("bad"))  # once per record
    await asyncio.wait_for(publisher.queue.join(), 20)
    assert metrics.dead_letter_failures.value == 1
    assert metrics.dead_letters.value == 0
    assert not task.done()  # still there for the next one
    await publisher.stop(task)
    assert task.done()
