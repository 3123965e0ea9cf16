"""The host inventory watcher: files in a directory, endpoint records on a real broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from portcullis.brokers import Broker
from portcullis.topics_admin import check_topics
from topics.records import EndpointRecord
from topics.specs import topic_name
from watchers.inventory import InventoryWatcher, seed_from_topic
from watchers.mirror import Mirror
from watchers.publisher import KafkaPublisher, producer_for
from watchers.topicstate import read_state

PARTITIONS = 3

VM = """name: {name}
interfaces:
  - name: eth0
    ips: [{ip}]
labels:
  app: billing
"""


@pytest.fixture
async def prefix(broker: Broker, topic_prefix: str) -> str:
    report = await check_topics(
        {"bootstrap_servers": broker.bootstrap}, topic_prefix, PARTITIONS, create=True
    )
    assert report.ok, report.lines()
    return topic_prefix


async def endpoints(broker: Broker, prefix: str) -> dict[str, EndpointRecord]:
    return await read_state(
        {"bootstrap_servers": broker.bootstrap}, topic_name(prefix, "endpoints"), EndpointRecord
    )


async def message_count(broker: Broker, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def eventually_on_topic(broker: Broker, prefix: str, check: object) -> dict[str, object]:
    for _ in range(100):
        state = await endpoints(broker, prefix)
        if check(state):  # type: ignore[operator]
            return state  # type: ignore[return-value]
        await asyncio.sleep(0.1)
    raise AssertionError(f"not on the topic in time: {sorted(state)}")


@contextlib.asynccontextmanager
async def watching(
    broker: Broker, prefix: str, directory: Path, mirror: Mirror | None = None
) -> AsyncIterator[InventoryWatcher]:
    producer = producer_for({"bootstrap_servers": broker.bootstrap}, "test-inventory")
    await producer.start()
    stop = asyncio.Event()
    watcher = InventoryWatcher(directory, KafkaPublisher(producer, prefix), mirror)
    task = asyncio.create_task(watcher.run(stop))
    try:
        await asyncio.wait_for(watcher.ready.wait(), 10)
        yield watcher
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await producer.stop()


async def test_vm_file_dropped_in_is_published_and_removed_file_tombstoned(
    broker: Broker, prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "existing.yaml").write_text(VM.format(name="old-vm", ip="10.9.0.1"))
    async with watching(broker, prefix, tmp_path):
        state = await endpoints(broker, prefix)
        assert set(state) == {"vm//old-vm"}  # the initial scan

        (tmp_path / "new.yaml").write_text(VM.format(name="new-vm", ip="10.9.0.2"))
        state = await eventually_on_topic(broker, prefix, lambda s: "vm//new-vm" in s)
        record = state["vm//new-vm"]
        assert isinstance(record, EndpointRecord)
        assert (record.ips, record.interface, record.source) == (("10.9.0.2",), "eth0",
                                                                  "inventory")

        (tmp_path / "existing.yaml").unlink()
        await eventually_on_topic(broker, prefix, lambda s: set(s) == {"vm//new-vm"})


async def test_a_broken_file_is_reported_and_changes_nothing(
    broker: Broker, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = tmp_path / "vm.yaml"
    host.write_text(VM.format(name="vm-1", ip="10.9.0.1"))
    async with watching(broker, prefix, tmp_path) as watcher:
        before = await message_count(broker, topic_name(prefix, "endpoints"))
        assert before == 1
        host.write_text(VM.format(name="vm-1", ip="10.9.0.300"))
        (tmp_path / "other.yaml").write_text("name: vm-2\ninterfaces: nope\n")
        for _ in range(100):
            if len(watcher.inventory.errors) == 2:
                break
            await asyncio.sleep(0.05)
        assert f"{host}: interfaces[0].ips[0]" in watcher.inventory.errors[str(host)]
        assert f"{tmp_path / 'other.yaml'}: interfaces" in caplog.text
        await asyncio.sleep(0.3)
        assert await message_count(broker, topic_name(prefix, "endpoints")) == before
        assert (await endpoints(broker, prefix))["vm//vm-1"].ips == ("10.9.0.1",)

        host.write_text(VM.format(name="vm-1", ip="10.9.0.7"))  # fixed: published
        await eventually_on_topic(
            broker, prefix, lambda s: s["vm//vm-1"].ips == ("10.9.0.7",))


async def test_a_relative_directory_sees_edits_as_edits(
    broker: Broker, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("hosts").mkdir()
    host = Path("hosts") / "vm.yaml"
    host.write_text(VM.format(name="vm-1", ip="10.9.0.1"))
    async with watching(broker, prefix, Path("hosts")) as watcher:
        host.write_text(VM.format(name="vm-1", ip="10.9.0.2"))
        await eventually_on_topic(
            broker, prefix, lambda s: s["vm//vm-1"].ips == ("10.9.0.2",))
        assert watcher.inventory.errors == {}


async def test_a_restart_tombstones_hosts_removed_while_down(
    broker: Broker, prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "a.yaml").write_text(VM.format(name="vm-a", ip="10.9.0.1"))
    (tmp_path / "b.yaml").write_text(VM.format(name="vm-b", ip="10.9.0.2"))
    async with watching(broker, prefix, tmp_path):
        pass
    (tmp_path / "a.yaml").unlink()  # while nobody watches
    mirror = Mirror()
    assert seed_from_topic(mirror, await endpoints(broker, prefix)) == 2
    async with watching(broker, prefix, tmp_path, mirror):
        await eventually_on_topic(broker, prefix, lambda s: set(s) == {"vm//vm-b"})
