"""The real brokers the rest of the suite relies on: they start, answer, keep data and groups,
and fail loudly (naming their log) instead of hanging."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from portcullis.brokers import (
    Broker,
    BrokerError,
    TansuBroker,
    free_port,
    kafka_cluster_id,
    missing_kafka_tools,
    parse_java_major,
    render_server_properties,
)
from tests.conftest import skip_or_fail


async def create_topic(
    bootstrap: str, name: str, partitions: int, configs: dict[str, str] | None = None
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
        assert [err[1] for err in resp.topic_errors] == [0], resp
        # Kafka answers CreateTopics before its metadata cache shows the topic: wait for it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            [desc] = await admin.describe_topics([name])
            if desc["error_code"] == 0 and len(desc["partitions"]) == partitions:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"topic {name} not visible 10 s after it was created")
    finally:
        await admin.close()


async def read_partition(
    bootstrap: str, tp: TopicPartition, count: int, timeout: float = 20
) -> list[tuple[bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: list[tuple[bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]] = []
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=500)
            got += [(m.key, m.value, tuple(m.headers)) for m in batch.get(tp, [])]
    finally:
        await consumer.stop()
    return got


async def test_produce_consume_round_trip(broker: Broker, topic_prefix: str) -> None:
    topic = topic_prefix + "roundtrip"
    await create_topic(broker.bootstrap, topic, 3)
    sent: dict[int, list[tuple[bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]]] = {
        p: [] for p in range(3)
    }
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(30):
            key = f"ns{i % 5}/pod-{i}".encode()
            value = None if i % 7 == 6 else f'{{"n":{i}}}'.encode()  # tombstones too
            headers = (("v", str(i).encode()),)
            meta = await producer.send_and_wait(
                topic, value, key=key, partition=i % 3, headers=list(headers)
            )
            sent[meta.partition].append((key, value, headers))
    finally:
        await producer.stop()
    for partition, expected in sent.items():
        tp = TopicPartition(topic, partition)
        got = await read_partition(broker.bootstrap, tp, len(expected))
        assert got == expected, f"partition {partition}"


async def test_consumer_group_commits_and_resumes(broker: Broker, topic_prefix: str) -> None:
    topic, group = topic_prefix + "groups", topic_prefix + "group"
    await create_topic(broker.bootstrap, topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, str(i).encode(), key=b"k")
    finally:
        await producer.stop()

    tp = TopicPartition(topic, 0)

    async def consume(n: int, committed_after: int) -> list[bytes]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=broker.bootstrap, group_id=group,
            auto_offset_reset="earliest", enable_auto_commit=False,
            # Tansu completes a join only after about the session timeout (deploy/README.md);
            # our Kafka allows timeouts this short (group.min.session.timeout.ms).
            session_timeout_ms=1000, heartbeat_interval_ms=300,
        )
        await consumer.start()
        values: list[bytes] = []
        try:
            deadline = time.monotonic() + 30
            while len(values) < n and time.monotonic() < deadline:
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=n - len(values))
                for msg in batch.get(tp, []):
                    assert msg.value is not None
                    values.append(msg.value)
                    await consumer.commit({tp: msg.offset + 1})
            assert await consumer.committed(tp) == committed_after
        finally:
            await consumer.stop()
        return values

    assert await consume(4, committed_after=4) == [b"0", b"1", b"2", b"3"]
    # A new member of the same group resumes where the committed offset says.
    assert await consume(6, committed_after=10) == [str(i).encode() for i in range(4, 10)]


async def test_kafka_accepts_and_applies_compaction(
    kafka_broker: Broker, topic_prefix: str
) -> None:
    topic = topic_prefix + "compacted"
    configs = {
        "cleanup.policy": "compact",
        "segment.ms": "100",
        "min.cleanable.dirty.ratio": "0.01",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": "100",
    }
    await create_topic(kafka_broker.bootstrap, topic, 1, configs)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        [resp] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        described = {entry[0]: entry[1] for entry in resp.resources[0][4]}
    finally:
        await admin.close()
    assert described["cleanup.policy"] == "compact"
    assert described["segment.ms"] == "100"

    # The cleaner really runs: many versions of two keys shrink to (about) the latest ones.
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    tp = TopicPartition(topic, 0)
    try:
        for i in range(200):
            await producer.send(topic, str(i).encode(), key=f"k{i % 2}".encode(), partition=0)
        await producer.flush()
        deadline = time.monotonic() + 60
        remaining = 200
        while time.monotonic() < deadline:
            # Segments roll on the next append after segment.ms; only closed ones are cleaned.
            await asyncio.sleep(1)
            await producer.send_and_wait(topic, b"roll", key=b"roll", partition=0)
            remaining = len(await read_partition(kafka_broker.bootstrap, tp, 10_000, timeout=2))
            if remaining < 50:
                break
    finally:
        await producer.stop()
    assert remaining < 50, f"compaction left {remaining} records"


async def test_tansu_rejects_the_idempotent_producer(
    tansu_broker: Broker, topic_prefix: str
) -> None:
    """Documented limit (deploy/README.md): if Tansu gains it, update the docs and this test."""
    topic = topic_prefix + "idem"
    await create_topic(tansu_broker.bootstrap, topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=tansu_broker.bootstrap, enable_idempotence=True)
    try:
        with pytest.raises(Exception, match="Unknown"):
            await producer.start()
            await producer.send_and_wait(topic, b"x")
    finally:
        await producer.stop()


@pytest.mark.broker
def test_stopped_broker_frees_its_port_and_a_dead_one_names_its_log() -> None:
    port = free_port()
    broker = TansuBroker(port=port)
    try:
        broker.start()
        assert broker.bootstrap == f"127.0.0.1:{port}"
        with pytest.raises(BrokerError, match="already in use"):
            TansuBroker(port=port).start()
        assert broker.stop() is not None
        assert not broker.running
        broker.start()  # the same port again: it was freed
        assert broker.process is not None
        os.kill(broker.process.pid, signal.SIGKILL)
        broker.process.wait()
        with pytest.raises(BrokerError, match=str(broker.log_path)):
            broker.check_alive()
    finally:
        broker.cleanup()


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
        ('java version "1.8.0_402"\nJava(TM) SE Runtime Environment', 8),
        ('openjdk version "21" 2023-09-19', 21),
        ("no java here", None),
    ],
)
def test_java_version_is_read_from_its_banner(output: str, major: int | None) -> None:
    assert parse_java_major(output) == major


def test_server_properties_are_fully_filled_in(tmp_path: Path) -> None:
    text = render_server_properties(19001, 19002, tmp_path / "data")
    assert "@" not in text.replace("1@127.0.0.1", "")  # only the quorum voter's node@host
    props = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19001,CONTROLLER://127.0.0.1:19002"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19002"
    assert props["log.dirs"] == str(tmp_path / "data")
    assert props["log.cleaner.enable"] == "true"
    cluster_id = kafka_cluster_id()
    assert len(cluster_id) == 22 and set(cluster_id) <= set(string.ascii_letters + "0123456789-_")



def test_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """0xf8 encodes to a leading "-", which the storage tool reads as an option."""
    draws = iter([b"\xf8" + bytes(15), b"\x10" + bytes(15)])
    monkeypatch.setattr(os, "urandom", lambda n: next(draws))
    cluster_id = kafka_cluster_id()
    assert cluster_id == base64.urlsafe_b64encode(b"\x10" + bytes(15)).decode().rstrip("=")
    assert base64.urlsafe_b64decode(cluster_id + "==") == b"\x10" + bytes(15)

@pytest.mark.broker
def test_portcullis_broker_command_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from portcullis.cli import main; sys.exit(main())",
         "broker", "--port", str(port),
         "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"ready at 127.0.0.1:{port}" in first, first
        assert str(tmp_path / "tansu.log") in first

        async def produce() -> int:
            producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{port}")
            await producer.start()
            try:
                return (await producer.send_and_wait("cmdtest", b"x", partition=0)).offset
            finally:
                await producer.stop()

        assert asyncio.run(produce()) == 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "stopped" in out
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # the broker is gone: its port is free again
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.broker
def test_kafka_script_starts_reports_and_stops(tmp_path: Path) -> None:
    missing = missing_kafka_tools()
    if missing:
        skip_or_fail("Apache Kafka tier needs " + " and ".join(missing))
    script = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "kafka.sh"
    port, cport = free_port(), free_port()
    args = ["--port", str(port), "--controller-port", str(cport), "--data-dir", str(tmp_path)]
    try:
        started = subprocess.run(
            [str(script), "start", *args], capture_output=True, text=True, timeout=180
        )
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == f"127.0.0.1:{port}"
        status = subprocess.run([str(script), "status", *args], capture_output=True, text=True)
        assert status.returncode == 0 and "running" in status.stdout
        pid = int((tmp_path / "kafka.pid").read_text())

        async def answers() -> list[int]:
            admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
            await admin.start()
            try:
                return [b["port"] for b in (await admin.describe_cluster())["brokers"]]
            finally:
                await admin.close()

        assert asyncio.run(answers()) == [port]
        again = subprocess.run([str(script), "start", *args], capture_output=True, text=True)
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        stopped = subprocess.run(
            [str(script), "stop", *args], capture_output=True, text=True, timeout=60
        )
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    status = subprocess.run([str(script), "status", *args], capture_output=True, text=True)
    assert status.returncode == 1 and "not running" in status.stdout
