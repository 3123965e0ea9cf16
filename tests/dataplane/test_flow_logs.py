"""Flow logs hold every denied attempt of a real traffic test (and allowed ones only when
asked for): the enforcer's chains with flow-log rules in a node namespace, real TCP from
pods and from the node, the real kernel's NFLOG, our reader and aggregator.

Topology: ``test_traffic``'s (pods A and B on ``veth-a``/``veth-b``, an outside network
with servers on 80, 443 and 6443). Pod A is an endpoint under policy; pod B's interface
has the workload prefix but no endpoint (unknown interface); the node's ``to-out`` is a
host endpoint with no profile (default deny)."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from enforcers.flowlog import NameTable
from enforcers.flowlogger import FlowLogger, FlowSettings
from enforcers.metrics import EnforcerMetrics
from tests.dataplane.conftest import Netns
from tests.dataplane.test_traffic import NODE, Node, Topology, World, build_topology
from topics.records import FlowRecord

NETNS_PREFIX = "pc-fl-"
GROUP = 23

POLICIES = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: default-deny}
spec:
  order: 2000
  selector: has(projectcalico.org/namespace)
  types: [Egress]
  egress:
  - {action: Allow, protocol: UDP, destination: {ports: [53]}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  order: 100
  selector: app == 'web'
  types: [Egress]
  egress:
  - {action: Deny, protocol: TCP, destination: {nets: [10.66.3.0/24]}}
  - {action: Allow, protocol: TCP, destination: {nets: [10.66.1.0/24], ports: [443]}}
"""
WEB = "NetworkPolicy/shop/web"
POD_A = "pod/shop/a"
HOST = "hostendpoint//node-1-out"

# (source, destination, port) -> (attempts, action, tier, policy, rule, reason)
DENIED = {
    ("pod-a", "10.66.3.1", 80): (3, "deny", "default", WEB, "egress[0]", "rule"),
    ("pod-a", "10.66.3.1", 443): (2, "deny", "default", WEB, "egress[0]", "rule"),
    ("pod-a", "10.66.0.2", 80): (4, "deny", "default", None, None, "end of tier"),
    ("pod-a", "10.66.1.1", 6443): (2, "deny", "default", None, None, "end of tier"),
    ("pod-b", "10.66.1.1", 443): (3, "deny", None, None, None, "unknown workload interface"),
    ("node", "10.66.0.2", 80): (2, "deny", None, None, None, "host endpoint default deny"),
}
ALLOWED = {
    ("pod-a", "10.66.1.1", 443): (3, "allow", "default", WEB, "egress[1]", "rule"),
}
SOURCE_IP = {"pod-a": "10.65.1.2", "pod-b": "10.65.2.2", "node": "10.66.0.1"}
SOURCE_ENDPOINT = {"pod-a": POD_A, "pod-b": None, "node": HOST}


@pytest.fixture
def topology(make_netns: Callable[[], Netns]) -> Iterator[Topology]:
    topo = build_topology(make_netns)
    try:
        yield topo
    finally:
        topo.stop.set()
        for sock in topo.servers:
            sock.close()


def _world() -> World:
    world = World()
    world.put_endpoint("pod", "shop", "a", ("10.65.1.2",), {"app": "web"}, "veth-a")
    world.put_endpoint("hostendpoint", None, "node-1-out", ("10.66.0.1",), {"host": "yes"},
                       "to-out")
    world.put_objects(POLICIES)
    return world


def _read_until(logger: FlowLogger, metrics: EnforcerMetrics, events: int) -> None:
    """Read the group until `events` logged packets arrived (or a generous deadline)."""
    deadline = time.monotonic() + 10
    while metrics.flow_events.value < events and time.monotonic() < deadline:
        logger.readable()
        time.sleep(0.02)
    logger.readable()


def _flows(topology: Topology, allowed: bool) -> tuple[list[FlowRecord], EnforcerMetrics]:
    world = _world()
    settings = FlowSettings(GROUP, allowed=allowed, namespace=topology.node.name)
    node = Node(topology, world, prefixes=("veth",), flows=settings.rules())
    node.sync()
    metrics = EnforcerMetrics()
    local = {ip: ep.key for ep in node.state.endpoints.values() for ip in ep.ips}
    names = NameTable.from_policies({k: p.tier for k, p in node.state.policies.items()})
    logger = FlowLogger(NODE, settings, metrics, lambda: names, lambda: local)
    assert logger.open()
    try:
        expected_ok = dict(ALLOWED)
        for cases, ok in ((DENIED, False), (expected_ok, True)):
            for (source, dst, port), (attempts, *_rest) in cases.items():
                for _ in range(attempts):
                    assert topology.connect(source, dst, port) is ok, (source, dst, port)
        logged = sum(a for a, *_ in DENIED.values())
        logged += sum(a for a, *_ in ALLOWED.values()) if allowed else 0
        _read_until(logger, metrics, logged)
        return logger.flush(time.time()), metrics
    finally:
        logger.stop()


def _by_flow(records: list[FlowRecord]) -> dict[tuple[str, str, int | None], FlowRecord]:
    counts = Counter((r.source_ip, r.dest_ip, r.dest_port) for r in records)
    assert all(n == 1 for n in counts.values()), counts  # one interval: one record a flow
    return {(r.source_ip, r.dest_ip, r.dest_port): r for r in records}


def _check(records: dict[tuple[str, str, int | None], FlowRecord],
           expected: dict[tuple[str, str, int], tuple[object, ...]]) -> None:
    for (source, dst, port), (attempts, action, tier, policy, rule, reason) in expected.items():
        record = records[(SOURCE_IP[source], dst, port)]
        assert (record.node, record.direction, record.protocol) == (NODE, "egress", "TCP")
        assert record.source_endpoint == SOURCE_ENDPOINT[source]
        assert record.dest_endpoint is None
        assert (record.action, record.tier, record.policy, record.rule, record.reason) == (
            action, tier, policy, rule, reason), record
        assert record.attempts == attempts, record
        assert record.packets >= record.attempts  # SYN retransmissions are packets
        assert record.start <= record.end <= record.observed_at


@pytest.mark.parametrize("allowed", [False, True], ids=["denied-only", "with-allowed"])
def test_flow_logs_hold_every_denied_attempt_of_real_traffic(
    topology: Topology, allowed: bool,
) -> None:
    records, metrics = _flows(topology, allowed)
    by_flow = _by_flow(records)
    expected = {**DENIED, **(ALLOWED if allowed else {})}
    assert set(by_flow) == {(SOURCE_IP[s], d, p) for s, d, p in expected}
    _check(by_flow, expected)
    assert metrics.flow_kernel_dropped.value == 0
    assert metrics.flow_malformed.value == 0
    assert metrics.flow_overflow.value == 0


def test_established_traffic_is_not_logged(topology: Topology) -> None:
    """Only the first packet of a connection goes to NFLOG: a connection that sends data
    logs once, like one that only opens."""
    import socket

    from enforcers import netns as netns_mod

    world = _world()
    settings = FlowSettings(GROUP, allowed=True, namespace=topology.node.name)
    node = Node(topology, world, prefixes=("veth",), flows=settings.rules())
    node.sync()
    metrics = EnforcerMetrics()
    logger = FlowLogger(NODE, settings, metrics, NameTable, dict)
    assert logger.open()
    try:
        sock = netns_mod.open_socket(topology.pods["pod-a"].name, socket.AF_INET,
                                     socket.SOCK_STREAM)
        sock.settimeout(2)
        sock.connect(("10.66.1.1", 443))
        with contextlib.suppress(OSError):  # the server closes at once; the sends still go
            for _ in range(20):
                sock.send(b"x" * 100)
        sock.close()
        _read_until(logger, metrics, 1)
        records = logger.flush(time.time())
    finally:
        logger.stop()
    assert [(r.dest_ip, r.dest_port, r.action, r.packets, r.attempts) for r in records] == [
        ("10.66.1.1", 443, "allow", 1, 1)]
    # the policy was unknown to this logger's names: the record keeps the rule's tag
    assert records[0].policy is not None and records[0].policy.startswith("?")
    assert records[0].rule == "egress[1]"
