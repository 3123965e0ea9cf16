"""`portcullis process` against real brokers: compacted memberships equal the oracle.

Events are published with aiokafka to explicit partitions (as the watchers do), the worker
runs as a real subprocess, and the memberships topic is read back and compacted in the test
(last value per key; a tombstone deletes) before comparing with `oracle_memberships`.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from portcullis.topics_admin import check_topics
from streams.oracle import Payload, oracle_memberships, payload
from topics.codec import decode_as, encode
from topics.partitioner import partition_for_key
from topics.records import (
    EndpointRecord,
    MembershipRecord,
    PolicyRecord,
    ProfileRecord,
    split_endpoint_key,
)
from topics.specs import topic_name

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]

PARTITIONS = 4
REPO = Path(__file__).resolve().parents[2]

Event = tuple[str, str, Any]  # (topic suffix, key, record or None)


# ---------------------------------------------------------------------------- workload


def pod(ns: str, name: str, ip: str, labels: dict[str, str], sa: str | None = None,
        at: float = 1.0) -> EndpointRecord:
    return EndpointRecord(
        kind="pod", namespace=ns, name=name, node="node-1", interface=f"cali{name}",
        ips=(ip,), labels=labels, service_account=sa, source="kubernetes", observed_at=at,
    )


def netset(name: str, nets: tuple[str, ...], labels: dict[str, str]) -> EndpointRecord:
    return EndpointRecord(
        kind="globalnetworkset", namespace=None, name=name, node=None, interface=None,
        ips=nets, labels=labels, service_account=None, source="apply", observed_at=1.0,
    )


def namespace(ns: str, labels: dict[str, str], at: float = 1.0) -> ProfileRecord:
    return ProfileRecord(kind="namespace", namespace=ns, name=None, labels=labels, observed_at=at)


def policy(name: str, ns: str | None, selector: str, peer: str, at: float = 1.0,
           ns_selector: str | None = None) -> PolicyRecord:
    kind = "NetworkPolicy" if ns else "GlobalNetworkPolicy"
    metadata: dict[str, Any] = {"name": name}
    if ns:
        metadata["namespace"] = ns
    destination: dict[str, Any] = {"selector": peer}
    if ns_selector:
        destination["namespaceSelector"] = ns_selector
    doc = {
        "apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": metadata,
        "spec": {"selector": selector, "types": ["Egress"],
                 "egress": [{"action": "Allow", "destination": destination}]},
    }
    return PolicyRecord(kind=kind, namespace=ns, name=name, document=doc, actor="test",
                        applied_at=at, observed_at=at)


def random_workload(seed: int, size: int) -> list[Event]:
    """Endpoints, namespace labels and policies changing in a random but seeded order."""
    rng = random.Random(seed)
    namespaces = [f"ns{i}" for i in range(6)]
    apps = ["web", "db", "cache"]
    events: list[Event] = []
    for ns in namespaces:
        events.append(("profiles", f"kns.{ns}", namespace(ns, {"team": rng.choice("ab")})))
    events.append(("endpoints", "globalnetworkset//corp",
                   netset("corp", ("10.20.0.0/16",), {"role": "corp"})))
    for i in range(size):
        roll = rng.random()
        ns = rng.choice(namespaces)
        at = 1000.0 + i
        if roll < 0.6:
            name = f"pod{rng.randrange(12)}"
            key = f"pod/{ns}/{name}"
            if rng.random() < 0.15:
                events.append(("endpoints", key, None))
            else:
                ip = f"10.0.0.{rng.randrange(1, 40)}"  # reused across namespaces
                labels = {"app": rng.choice(apps)}
                if rng.random() < 0.5:
                    labels["env"] = rng.choice(["prod", "dev"])
                events.append(("endpoints", key, pod(ns, name, ip, labels, at=at)))
        elif roll < 0.7:
            events.append(("profiles", f"kns.{ns}",
                           namespace(ns, {"team": rng.choice("ab")}, at=at)))
        else:
            glob = rng.random() < 0.4
            name = f"pol{rng.randrange(5)}"
            key = f"GlobalNetworkPolicy//{name}" if glob else f"NetworkPolicy/{ns}/{name}"
            if rng.random() < 0.2:
                events.append(("policies", key, None))
            else:
                sel = rng.choice(["app == 'web'", "has(env)", "env == 'prod'", "all()"])
                peer = rng.choice(["app == 'db'", "role == 'corp'", "app in {'db', 'cache'}"])
                nsel = rng.choice([None, "team == 'a'", "all()"])
                events.append(("policies", key,
                               policy(name, None if glob else ns, sel, peer, at, nsel)))
    return events


def final_state(events: list[Event]) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = {"endpoints": {}, "profiles": {}, "policies": {}}
    for suffix, key, record in events:
        if record is None:
            state[suffix].pop(key, None)
        else:
            state[suffix][key] = record
    return state


def expected_for(events: list[Event]) -> dict[str, Payload]:
    final = final_state(events)
    return oracle_memberships(
        final["endpoints"].values(), final["profiles"].values(), final["policies"].values()
    )


def partition_of(suffix: str, key: str, partitions: int) -> int:
    if suffix == "profiles":
        return partition_for_key(key[4:].partition(".")[0], partitions)
    _kind, ns, name = split_endpoint_key(key)
    return partition_for_key(ns if ns is not None else name, partitions)


# ---------------------------------------------------------------------------- broker I/O


async def create_topics(bootstrap: str, prefix: str, partitions: int = PARTITIONS) -> None:
    report = await check_topics({"bootstrap_servers": bootstrap}, prefix, partitions, 1,
                                create=True, timeout=30)
    assert not report.failures(), report.lines()


async def publish(bootstrap: str, prefix: str, events: list[Event],
                  partitions: int = PARTITIONS) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = []
        for suffix, key, record in events:
            futures.append(await producer.send(
                topic_name(prefix, suffix), key=key.encode(),
                value=encode(record) if record is not None else None,
                partition=partition_of(suffix, key, partitions),
            ))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_memberships(bootstrap: str, prefix: str,
                           partitions: int = PARTITIONS) -> dict[str, MembershipRecord]:
    """The memberships topic compacted: last value per key, tombstones delete."""
    topic = topic_name(prefix, "memberships")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        result: dict[str, MembershipRecord] = {}
        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            batch = await consumer.getmany(*tps, timeout_ms=1000)
            for messages in batch.values():
                for msg in messages:
                    assert msg.key is not None
                    key = msg.key.decode()
                    record = decode_as(MembershipRecord, msg.value)
                    if record is None:
                        result.pop(key, None)
                    else:
                        result[key] = record
        return result
    finally:
        await consumer.stop()


async def wait_for(bootstrap: str, prefix: str, expected: dict[str, Payload],
                   timeout: float = 60.0) -> dict[str, Payload]:
    """Poll the compacted memberships until they equal `expected` (or time runs out)."""
    deadline = time.monotonic() + timeout
    got: dict[str, Payload] = {}
    while time.monotonic() < deadline:
        got = {k: payload(v) for k, v in (await read_memberships(bootstrap, prefix)).items()}
        if got == expected:
            return got
        await asyncio.sleep(0.5)
    return got


# ---------------------------------------------------------------------------- the worker


class Worker:
    """`portcullis process` as a subprocess, logging to a file."""

    def __init__(self, bootstrap: str, prefix: str, log_dir: Path, name: str = "w") -> None:
        self.log_path = log_dir / f"{name}.log"
        self.args = [
            sys.executable, "-c", "import sys; from portcullis.cli import main; sys.exit(main())",
            "process", "--store", "memory",
            "--bootstrap", bootstrap, "--topic-prefix", prefix,
            "--partitions", str(PARTITIONS), "--data-dir", str(log_dir / name),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=REPO, env=env)
        log.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def diff(expected: dict[str, Payload], got: dict[str, Payload]) -> str:
    missing = sorted(set(expected) - set(got))[:5]
    extra = sorted(set(got) - set(expected))[:5]
    changed = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])[:5]
    return (f"{len(expected)} expected, {len(got)} got; missing {missing}; extra {extra}; "
            f"changed {changed}")


# ---------------------------------------------------------------------------- tests


async def test_memberships_equal_oracle(broker: Any, topic_prefix: str, tmp_path: Path,
                                        workers: list[Worker]) -> None:
    """Random endpoint/namespace/policy churn; compacted memberships equal the oracle."""
    await create_topics(broker.bootstrap, topic_prefix)
    events = random_workload(seed=1, size=300)
    worker = Worker(broker.bootstrap, topic_prefix, tmp_path).start()
    workers.append(worker)
    await publish(broker.bootstrap, topic_prefix, events)
    expected = expected_for(events)
    assert len(expected) > 20  # the workload makes real memberships
    got = await wait_for(broker.bootstrap, topic_prefix, expected)
    assert got == expected, diff(expected, got) + "\n" + worker.log_tail()
