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

from portcullis.brokers import die_with_parent_fn
from portcullis.topics_admin import check_topics
from streams.oracle import Payload, oracle_memberships, payload
from topics.codec import decode_as, encode
from topics.partitioner import partition_for_key
from topics.records import (
    DeadLetterRecord,
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

        def take(batch: dict[Any, list[Any]]) -> None:
            for messages in batch.values():
                for msg in messages:
                    assert msg.key is not None
                    key = msg.key.decode()
                    record = decode_as(MembershipRecord, msg.value)
                    if record is None:
                        result.pop(key, None)
                    else:
                        result[key] = record

        while await behind():
            take(await consumer.getmany(*tps, timeout_ms=1000))
        # Tansu reports a partition's end offset as the last batch's base offset + 1, so the
        # rest of that batch lies beyond it: fetch once more to get it.
        take(await consumer.getmany(*tps, timeout_ms=300))
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

    def __init__(self, bootstrap: str, prefix: str, log_dir: Path, name: str = "w",
                 store: str = "memory", data_dir: str | None = None) -> None:
        self.log_path = log_dir / f"{name}.log"
        self.args = [
            sys.executable, "-c", "import sys; from portcullis.cli import main; sys.exit(main())",
            "process", "--store", store,
            "--bootstrap", bootstrap, "--topic-prefix", prefix,
            "--partitions", str(PARTITIONS), "--data-dir", str(log_dir / (data_dir or name)),
            "--session-timeout", "2",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=REPO, env=env, preexec_fn=die_with_parent_fn())
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


async def test_replay_gives_identical_memberships(broker: Any, topic_prefix: str,
                                                  tmp_path: Path, workers: list[Worker]) -> None:
    """The same inputs processed twice, from scratch, give identical compacted memberships
    (what enforcers use: node, interface, IPs; `observed_at` names whichever event came
    last, which depends on how the brokers interleave the topics)."""
    events = random_workload(seed=2, size=200)
    expected = expected_for(events)
    runs = []
    for run in ("one", "two"):
        prefix = f"{topic_prefix}{run}."
        await create_topics(broker.bootstrap, prefix)
        await publish(broker.bootstrap, prefix, events)
        worker = Worker(broker.bootstrap, prefix, tmp_path, run).start()
        workers.append(worker)
        got = await wait_for(broker.bootstrap, prefix, expected)
        assert got == expected, diff(expected, got) + "\n" + worker.log_tail()
        compacted = await read_memberships(broker.bootstrap, prefix)
        runs.append({k: payload(v) for k, v in compacted.items()})
        worker.stop()
    assert runs[0] == runs[1]


async def wait_until_logged(worker: Worker, text: str, timeout: float = 60.0) -> None:
    """Until the worker's log contains `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in worker.log_path.read_text(errors="replace"):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"worker never logged {text!r}:\n" + worker.log_tail())


async def wait_until_idle(worker: Worker, timeout: float = 60.0) -> None:
    """Until the worker has logged a restored partition state for every match partition."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = worker.log_path.read_text(errors="replace")
        if sum(f"match partition {p}: restored" in text for p in range(PARTITIONS)) == PARTITIONS:
            await asyncio.sleep(1.0)
            return
        await asyncio.sleep(0.3)
    raise AssertionError("worker did not start every match partition:\n" + worker.log_tail())


async def test_sigkill_and_restart(broker: Any, topic_prefix: str, tmp_path: Path,
                                   workers: list[Worker]) -> None:
    """Workers SIGKILLed at random points mid-stream and restarted lose and leave nothing.

    With the production store (rocksdb, kept across restarts in the same directory), so
    recovery combines local state with the changelogs' tails.
    """
    await create_topics(broker.bootstrap, topic_prefix)
    events = random_workload(seed=3, size=1500)
    rng = random.Random(3)
    chunks = [events[:600], events[600:1100], events[1100:]]
    for round_, chunk in enumerate(chunks):
        worker = Worker(broker.bootstrap, topic_prefix, tmp_path, f"w{round_}",
                        store="rocksdb", data_dir="state").start()
        workers.append(worker)
        await publish(broker.bootstrap, topic_prefix, chunk)
        if round_ < len(chunks) - 1:
            await asyncio.sleep(rng.uniform(2.0, 5.0))
            worker.kill()
    expected = expected_for(events)
    got = await wait_for(broker.bootstrap, topic_prefix, expected, timeout=90)
    assert got == expected, diff(expected, got) + "\n" + workers[-1].log_tail()


async def test_two_workers_one_leaves(broker: Any, topic_prefix: str, tmp_path: Path,
                                      workers: list[Worker]) -> None:
    """Two workers share the partitions; one leaves mid-stream; the other takes over."""
    await create_topics(broker.bootstrap, topic_prefix)
    events = random_workload(seed=4, size=900)
    a = Worker(broker.bootstrap, topic_prefix, tmp_path, "a").start()
    b = Worker(broker.bootstrap, topic_prefix, tmp_path, "b").start()
    workers.extend([a, b])
    await publish(broker.bootstrap, topic_prefix, events[:250])
    await wait_until_logged(b, "Successfully synced group")
    await publish(broker.bootstrap, topic_prefix, events[250:500])
    await wait_until_logged(b, "match partition")  # b owns and works on a partition
    await asyncio.sleep(1.0)
    b.stop()
    await publish(broker.bootstrap, topic_prefix, events[500:])
    expected = expected_for(events)
    got = await wait_for(broker.bootstrap, topic_prefix, expected, timeout=90)
    assert got == expected, diff(expected, got) + "\n" + a.log_tail()
    text = b.log_path.read_text(errors="replace")
    assert "match partition" in text, "worker b never owned a partition:\n" + b.log_tail()


async def test_malformed_records_are_dead_lettered(broker: Any, topic_prefix: str,
                                                   tmp_path: Path,
                                                   workers: list[Worker]) -> None:
    """Bad JSON, a wrong record and an invalid policy go to deadletter; the rest is processed."""
    await create_topics(broker.bootstrap, topic_prefix)
    good = [
        ("profiles", "kns.ns1", namespace("ns1", {"team": "a"})),
        ("endpoints", "pod/ns1/p1", pod("ns1", "p1", "10.0.0.1", {"app": "web"})),
        ("policies", "GlobalNetworkPolicy//g1", policy("g1", None, "app == 'web'", "all()")),
    ]
    bad_policy = policy("g2", None, "app == 'web'", "all()")
    bad_doc = dict(bad_policy.document)
    bad_doc["spec"] = {**bad_doc["spec"], "selector": "app === 'web'"}
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        p_ns1 = partition_for_key("ns1", PARTITIONS)
        await producer.send_and_wait(topic_name(topic_prefix, "endpoints"), key=b"pod/ns1/bad",
                                     value=b"{not json", partition=p_ns1)
        await producer.send_and_wait(topic_name(topic_prefix, "endpoints"), key=b"pod/ns1/p9",
                                     value=encode(namespace("ns1", {})), partition=p_ns1)
        bad = PolicyRecord(kind=bad_policy.kind, namespace=None, name="g2", document=bad_doc,
                           actor="t", applied_at=1.0, observed_at=1.0)
        await producer.send_and_wait(topic_name(topic_prefix, "policies"),
                                     key=b"GlobalNetworkPolicy//g2", value=encode(bad),
                                     partition=partition_for_key("g2", PARTITIONS))
    finally:
        await producer.stop()
    await publish(broker.bootstrap, topic_prefix, good)
    workers.append(Worker(broker.bootstrap, topic_prefix, tmp_path).start())
    expected = expected_for(good)
    assert len(expected) == 2  # the applies-to selector and the all() peer
    got = await wait_for(broker.bootstrap, topic_prefix, expected)
    assert got == expected
    consumer = AIOKafkaConsumer(topic_name(topic_prefix, "deadletter"),
                                bootstrap_servers=broker.bootstrap,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        letters: list[Any] = []
        deadline = time.monotonic() + 20
        while len(letters) < 3 and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                letters.extend(decode_as(DeadLetterRecord, m.value) for m in messages)
    finally:
        await consumer.stop()
    by_key = {letter.key: letter for letter in letters}
    assert set(by_key) == {"pod/ns1/bad", "pod/ns1/p9", "GlobalNetworkPolicy//g2"}
    assert "not valid JSON" in by_key["pod/ns1/bad"].reason
    assert by_key["GlobalNetworkPolicy//g2"].rejected_by == "streams.compile"
    assert "selector" in by_key["GlobalNetworkPolicy//g2"].reason


FAULT = """
import sys
import streams.app
match_event = streams.app.Processor._match_event
def faulty(self, batch, msg, republished):
    if msg.key == b"pod/ns1/boom":
        raise RuntimeError("injected fault")
    return match_event(self, batch, msg, republished)
streams.app.Processor._match_event = faulty
from portcullis.cli import main
sys.exit(main())
"""


async def test_an_unexpected_error_stops_the_worker_and_loses_nothing(
        broker: Any, topic_prefix: str, tmp_path: Path, workers: list[Worker]) -> None:
    """A bug while matching (not a bad record) stops the worker with an error instead of
    running on with a hole; its records are not committed, so the next worker does them."""
    await create_topics(broker.bootstrap, topic_prefix)
    events: list[Event] = [
        ("profiles", "kns.ns1", namespace("ns1", {"team": "a"})),
        ("policies", "GlobalNetworkPolicy//g1", policy("g1", None, "app == 'web'", "all()")),
        ("endpoints", "pod/ns1/p1", pod("ns1", "p1", "10.0.0.1", {"app": "web"})),
        ("endpoints", "pod/ns1/boom", pod("ns1", "boom", "10.0.0.2", {"app": "web"})),
        ("endpoints", "pod/ns1/p3", pod("ns1", "p3", "10.0.0.3", {"app": "web"})),
    ]
    await publish(broker.bootstrap, topic_prefix, events)
    faulty = Worker(broker.bootstrap, topic_prefix, tmp_path, name="faulty")
    faulty.args[1:3] = ["-c", FAULT]
    workers.append(faulty.start())
    assert faulty.proc is not None
    try:
        code = await asyncio.to_thread(faulty.proc.wait, 60)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker ran on after an unexpected error:\n" + faulty.log_tail())
    assert code != 0, faulty.log_tail()
    assert "injected fault" in faulty.log_path.read_text(errors="replace")
    workers.append(Worker(broker.bootstrap, topic_prefix, tmp_path, name="fixed").start())
    expected = expected_for(events)
    got = await wait_for(broker.bootstrap, topic_prefix, expected)
    assert got == expected, diff(expected, got)


def test_process_refuses_to_start_without_topics(tansu_broker: Any, topic_prefix: str,
                                                 tmp_path: Path) -> None:
    """Without `portcullis topics create` the worker says what to do instead of hanging."""
    worker = Worker(tansu_broker.bootstrap, topic_prefix, tmp_path)
    done = subprocess.run(worker.args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "portcullis topics create" in done.stderr
    assert f"{topic_prefix}endpoints: missing" in done.stderr
