"""The enforcer against real brokers and a real node namespace.

Records go through Kafka (both brokers), the engine reads the topics to the end, programs,
follows changes, and survives restarts without ever letting a denied connection through.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from enforcers.engine import Enforcer, Programmer
from enforcers.ipsets import NetlinkIpsets, set_name
from enforcers.iptables import Iptables
from enforcers.state import EnforcerState
from policy import compile as pcompile
from policy.load import load
from portcullis.brokers import Broker, TansuBroker
from portcullis.topics_admin import check_topics
from tests.dataplane.conftest import Netns, make_netns  # noqa: F401  (fixture)
from tests.dataplane.test_traffic import (
    NODE,
    POLICIES,
    Topology,
    World,
    build_topology,
    check_matrix,
)
from topics import codec
from topics.partitioner import partition_for, partition_for_key
from topics.records import MembershipRecord, split_endpoint_key, split_membership_key

NETNS_PREFIX = "pc-tr-"
TO_EXTRA = """
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: to-extra, namespace: shop}
spec:
  order: 50
  selector: app == 'web'
  types: [Egress]
  egress:
  - action: Allow
    protocol: TCP
    destination: {selector: kind == 'extra', namespaceSelector: global(), ports: [80]}
"""
PARTITIONS = 3
pytestmark = pytest.mark.dataplane


@pytest.fixture
def topology(make_netns: Callable[[], Netns]) -> Iterator[Topology]:  # noqa: F811
    topo = build_topology(make_netns)
    try:
        yield topo
    finally:
        topo.stop.set()
        for sock in topo.servers:
            sock.close()


def _partition(suffix: str, key: str, rec: object) -> int:
    if rec is not None:
        return partition_for(rec, PARTITIONS)  # type: ignore[arg-type]
    if suffix == "memberships":
        key = split_membership_key(key)[1]
    _kind, namespace, name = split_endpoint_key(key)
    return partition_for_key(namespace or name, PARTITIONS)


async def publish(bootstrap: str, prefix: str, changes: list[tuple[str, str, object]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    try:
        for suffix, key, rec in changes:
            value = codec.encode(rec) if rec is not None else None  # type: ignore[arg-type]
            await producer.send(prefix + suffix, value, key=key.encode(),
                                partition=_partition(suffix, key, rec))
        await producer.flush()
    finally:
        await producer.stop()


async def make_topics(bootstrap: str, prefix: str) -> None:
    report = await check_topics({"bootstrap_servers": bootstrap}, prefix, PARTITIONS, create=True)
    assert not report.failures(), report.lines()


def standard_world() -> tuple[World, dict[str, str]]:
    world = World()
    a = world.put_endpoint("pod", "shop", "a", ("10.65.1.2",), {"app": "web"}, "veth-a")
    b = world.put_endpoint("pod", "shop", "b", ("10.65.2.2",), {"app": "batch"}, "veth-b")
    hep = world.put_endpoint("hostendpoint", None, "node-1-out", ("10.66.0.1",),
                             {"host": "yes"}, "to-out")
    world.put_endpoint("globalnetworkset", None, "saas", ("10.66.1.0/24",), {"kind": "saas"},
                       node=None)
    world.put_objects(POLICIES)
    return world, {"pod-a": a.key, "pod-b": b.key, "node": hep.key}


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_engine_programs_from_the_topics_and_follows_changes(
    broker: Broker, topic_prefix: str, topology: Topology
) -> None:
    await make_topics(broker.bootstrap, topic_prefix)
    world, sources = standard_world()
    await publish(broker.bootstrap, topic_prefix, world.changes())
    ipsets = NetlinkIpsets(netns=topology.node.name)
    enforcer = Enforcer(
        EnforcerState(NODE, set_name), Programmer(ipsets, Iptables(topology.node.name)),
        {"bootstrap_servers": broker.bootstrap}, topic_prefix, resync_interval=0.5,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(enforcer.run(stop))
    try:
        await asyncio.wait_for(enforcer.synced.wait(), 30)
        await asyncio.to_thread(check_matrix, topology, world, sources)

        # a pod labelled in reaches the SaaS set, through the topics
        world.put_endpoint("pod", "shop", "b", ("10.65.2.2",), {"app": "web"}, "veth-b")
        await publish(broker.bootstrap, topic_prefix, world.changes())
        await eventually(lambda: topology.connect("pod-b", "10.66.1.1", 443))
        await asyncio.to_thread(check_matrix, topology, world, sources)
        assert enforcer.metrics.latency.n > 0

        # a rule deleted by hand: the periodic resync restores it and counts the repair
        topology.node.run("iptables", "-D", "pc-fwd", "1")
        await eventually(lambda: enforcer.metrics.repairs.value >= 1)
        await asyncio.to_thread(check_matrix, topology, world, sources)

        # the policy deleted: default deny again
        world.delete_object("NetworkPolicy/shop/web-to-saas")
        await publish(broker.bootstrap, topic_prefix, world.changes())
        await eventually(lambda: not topology.connect("pod-a", "10.66.1.1", 443))
        await asyncio.to_thread(check_matrix, topology, world, sources)

        # a new rule peer whose memberships reach the enforcer before its policy does:
        # pruned at first (nothing used them), then read again when the policy arrives
        extra = world.put_endpoint("globalnetworkset", None, "extra", ("10.66.2.0/24",),
                                   {"kind": "extra"}, node=None)
        await publish(broker.bootstrap, topic_prefix, world.changes())
        (policy,) = load(TO_EXTRA)
        peer = pcompile.policy_selectors(policy).egress[0].destination.selector
        assert peer is not None
        early = MembershipRecord(peer.uid, extra.key, None, None, None, extra.ips,
                                 extra.observed_at)
        world.published[early.key] = early
        await publish(broker.bootstrap, topic_prefix, [("memberships", early.key, early)])
        await eventually(lambda: peer.uid in enforcer.state.pruned)
        assert not topology.connect("pod-a", "10.66.2.1", 80)
        world.put_objects(TO_EXTRA)
        changes = world.changes()
        assert early.key not in [c[1] for c in changes]  # the early membership is not resent
        await publish(broker.bootstrap, topic_prefix, changes)
        await eventually(lambda: topology.connect("pod-a", "10.66.2.1", 80))
        assert enforcer.metrics.rereads.value >= 1
        await asyncio.to_thread(check_matrix, topology, world, sources)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        ipsets.close()


def _start_enforcer(bootstrap: str, prefix: str, netns: str, port: int,
                    log: Path) -> subprocess.Popen[bytes]:
    exe = os.path.join(os.path.dirname(sys.executable), "portcullis")
    with log.open("ab") as out:  # a file, not a pipe: a full pipe would stall the enforcer
        return subprocess.Popen(
            [exe, "enforce", "--node", NODE, "--netns", netns, "--bootstrap", bootstrap,
             "--topic-prefix", prefix, "--metrics-port", str(port), "--resync-interval", "1"],
            stdout=subprocess.DEVNULL, stderr=out,
        )


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_restarts_never_let_a_denied_connection_through(
    tansu_broker: Broker, topic_prefix: str, topology: Topology, tmp_path: Path
) -> None:
    from portcullis.brokers import free_port

    bootstrap = tansu_broker.bootstrap
    await make_topics(bootstrap, topic_prefix)
    world, sources = standard_world()
    await publish(bootstrap, topic_prefix, world.changes())
    port = free_port()
    log = tmp_path / "enforcer.log"

    def start() -> subprocess.Popen[bytes]:
        return _start_enforcer(bootstrap, topic_prefix, topology.node.name, port, log)

    proc = start()
    procs = [proc]
    # denied whatever the changes below do (pod B's label, the set's nets)
    denied = [("pod-b", "10.66.1.1", 80), ("pod-a", "10.66.0.2", 80), ("pod-b", "10.66.0.2", 443),
              ("pod-a", "10.66.1.1", 80), ("node", "10.66.3.1", 443)]
    allowed = [("pod-a", "10.66.1.1", 443), ("node", "10.66.2.1", 80)]
    for case in denied:
        assert not world.expected(sources[case[0]], case[1], case[2])
    for case in allowed:
        assert world.expected(sources[case[0]], case[1], case[2])
    try:
        await eventually(lambda: _metric(port, "portcullis_enforcer_in_sync") == 1, 30)
        await asyncio.to_thread(check_matrix, topology, world, sources)

        leaks: list[tuple[str, str, int]] = []
        attempts = [0]
        done = threading.Event()

        def hammer() -> None:
            while not done.is_set():
                for case in denied:
                    attempts[0] += 1
                    if topology.connect(*case):
                        leaks.append(case)

        threads = [threading.Thread(target=hammer, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for round_, sig in enumerate((signal.SIGTERM, signal.SIGKILL, signal.SIGTERM)):
                await asyncio.sleep(0.5)
                _stop(procs[-1], sig)
                # while nobody enforces (the kernel keeps what is there), things change, so
                # the restart must swap set contents and rewrite chains under traffic
                app = "web" if round_ % 2 == 0 else "batch"
                nets = ("10.66.1.0/25",) if round_ % 2 == 0 else ("10.66.1.0/24",)
                world.put_endpoint("pod", "shop", "b", ("10.65.2.2",), {"app": app}, "veth-b")
                world.put_endpoint("globalnetworkset", None, "saas", nets, {"kind": "saas"},
                                   node=None)
                await publish(bootstrap, topic_prefix, world.changes())
                procs.append(start())
                await eventually(lambda: _metric(port, "portcullis_enforcer_in_sync") == 1, 30)
        finally:
            done.set()
            for t in threads:
                t.join(10)
        assert attempts[0] > 20
        assert not leaks, f"denied connections succeeded during restarts: {leaks}"
        for case in allowed:
            assert topology.connect(*case), case
        await asyncio.to_thread(check_matrix, topology, world, sources)  # pod B is web now

        # a change published while no enforcer runs is applied by the next one
        _stop(procs[-1], signal.SIGTERM)
        world.put_endpoint("pod", "shop", "b", ("10.65.2.2",), {"app": "batch"}, "veth-b")
        await publish(bootstrap, topic_prefix, world.changes())
        procs.append(start())
        await eventually(lambda: not topology.connect("pod-b", "10.66.1.1", 443), 30)
        await asyncio.to_thread(check_matrix, topology, world, sources)
    finally:
        for p in procs:
            _stop(p, signal.SIGTERM)
            if p.returncode not in (0, -signal.SIGKILL, None):
                pytest.fail(f"enforcer exited {p.returncode}: {log.read_text()[-2000:]}")


async def test_fail_static_when_the_brokers_go_away(
    topic_prefix: str, topology: Topology
) -> None:
    own = TansuBroker()
    own.start()
    try:
        await make_topics(own.bootstrap, topic_prefix)
        world, sources = standard_world()
        await publish(own.bootstrap, topic_prefix, world.changes())
        enforcer = Enforcer(
            EnforcerState(NODE, set_name),
            Programmer(NetlinkIpsets(netns=topology.node.name), Iptables(topology.node.name)),
            {"bootstrap_servers": own.bootstrap, "request_timeout_ms": 2000},
            topic_prefix, resync_interval=0.3,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(enforcer.run(stop))
        await asyncio.wait_for(enforcer.synced.wait(), 30)
        before = await asyncio.to_thread(topology.matrix, list(sources))
        own.stop()
        await eventually(lambda: enforcer.metrics.connected.value == 0, 15)
        after = await asyncio.to_thread(topology.matrix, list(sources))
        assert after == before  # nothing flushed, nothing opened
        assert not task.done()
        stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 15)
    finally:
        own.cleanup() if own.running else own.stop()


PROD_EGRESS = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: prod-egress}
spec:
  selector: app == 'web'
  namespaceSelector: env == 'prod'
  types: [Egress]
  egress:
  - {action: Allow, protocol: TCP, destination: {nets: [10.66.1.0/24], ports: [443]}}
"""


async def test_a_new_pod_is_under_its_policies_without_waiting_for_the_processor(
    broker: Broker, topic_prefix: str, topology: Topology
) -> None:
    """Which policies apply to a local endpoint is decided on the node, from its labels and
    those it inherits from its namespace (the profiles topic), as Felix does. Before, it
    came from the processor's memberships: until they arrived (or, with the processor
    down, forever) a new pod had no policy and was allowed everything. No processor runs
    here, and no membership is ever published."""
    from topics.records import ProfileRecord

    await make_topics(broker.bootstrap, topic_prefix)
    world = World()
    world.put_objects(PROD_EGRESS)
    prod = ProfileRecord("namespace", "shop", None, {"env": "prod"}, time.time())
    await publish(broker.bootstrap, topic_prefix,
                  [*world.changes(), ("profiles", prod.key, prod)])
    ipsets = NetlinkIpsets(netns=topology.node.name)
    enforcer = Enforcer(
        EnforcerState(NODE, set_name), Programmer(ipsets, Iptables(topology.node.name)),
        {"bootstrap_servers": broker.bootstrap}, topic_prefix, resync_interval=0.5,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(enforcer.run(stop))
    try:
        await asyncio.wait_for(enforcer.synced.wait(), 30)
        assert topology.connect("pod-a", "10.66.0.2", 80)  # no endpoint yet: not ours
        pod = world.put_endpoint("pod", "shop", "a", ("10.65.1.2",), {"app": "web"}, "veth-a")
        await publish(broker.bootstrap, topic_prefix, [("endpoints", pod.key, pod)])
        await eventually(lambda: pod.key in enforcer.state.endpoints)
        await eventually(lambda: not topology.connect("pod-a", "10.66.0.2", 80))
        assert topology.connect("pod-a", "10.66.1.1", 443)
        assert not topology.connect("pod-a", "10.66.1.1", 80)

        # the namespace is relabelled: the policy no longer applies, default allow
        dev = ProfileRecord("namespace", "shop", None, {"env": "dev"}, time.time())
        await publish(broker.bootstrap, topic_prefix, [("profiles", dev.key, dev)])
        await eventually(lambda: topology.connect("pod-a", "10.66.0.2", 80))
        # and the pod's own label change takes effect with its endpoint record alone
        await publish(broker.bootstrap, topic_prefix, [("profiles", prod.key, prod)])
        await eventually(lambda: not topology.connect("pod-a", "10.66.0.2", 80))
        pod = world.put_endpoint("pod", "shop", "a", ("10.65.1.2",), {"app": "db"}, "veth-a")
        await publish(broker.bootstrap, topic_prefix, [("endpoints", pod.key, pod)])
        await eventually(lambda: topology.connect("pod-a", "10.66.0.2", 80))
        assert not any(s == "memberships" for s, _k, _r in world.pending)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        ipsets.close()
