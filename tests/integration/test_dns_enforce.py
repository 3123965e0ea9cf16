"""`portcullis enforce` with domain rules, as a user runs it: a broker, a node namespace, a
real DNS server outside, lookups and TCP from a pod; learned answers survive a restart and
are published on the dns topic."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from portcullis.brokers import Broker, free_port
from tests.dataplane.conftest import Netns, make_netns  # noqa: F401  (fixture)
from tests.dataplane.test_dns_policy import DNS_IP, DnsServer, resolve
from tests.dataplane.test_traffic import NODE, Topology, World, build_topology, ip
from tests.integration.test_enforcer import _metric, _stop, eventually, make_topics, publish
from topics import codec
from topics.records import DnsRecord

NETNS_PREFIX = "pc-de-"
pytestmark = pytest.mark.dataplane

POLICY = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: default-deny}
spec:
  order: 2000
  selector: has(projectcalico.org/namespace)
  types: [Egress]
  egress:
  - {action: Allow, protocol: UDP, destination: {nets: [10.66.0.53/32], ports: [53]}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web-to-api, namespace: shop}
spec:
  order: 100
  selector: app == 'web'
  types: [Egress]
  egress:
  - {action: Allow, protocol: TCP, destination: {domains: ["*.api.example.test"], ports: [80]}}
"""


@pytest.fixture
def topology_and_dns(make_netns: Callable[[], Netns]) -> Iterator[tuple[Topology, DnsServer]]:  # noqa: F811
    topo = build_topology(make_netns)
    ip("-n", topo.outside.name, "addr", "add", f"{DNS_IP}/32", "dev", "eth0")
    for i in (1, 2):
        ip("-n", topo.outside.name, "addr", "add", f"10.66.4.{i}/32", "dev", "eth0")
    server = DnsServer(topo.outside, DNS_IP)
    server.zone["eu.api.example.test"] = [("A", 3600, "10.66.4.1")]
    server.zone["us.api.example.test"] = [("A", 3600, "10.66.4.2")]
    server.start()
    try:
        yield topo, server
    finally:
        server.close()
        topo.stop.set()
        for sock in topo.servers:
            sock.close()


def _start(bootstrap: str, prefix: str, netns: str, port: int, state: Path,
           log: Path) -> subprocess.Popen[bytes]:
    exe = os.path.join(os.path.dirname(sys.executable), "portcullis")
    with log.open("ab") as out:
        return subprocess.Popen(
            [exe, "enforce", "--node", NODE, "--netns", netns, "--bootstrap", bootstrap,
             "--topic-prefix", prefix, "--metrics-port", str(port), "--dns-server", DNS_IP,
             "--dns-queue", "91", "--dns-state-file", str(state)],
            stdout=subprocess.DEVNULL, stderr=out,
        )


async def _dns_records(bootstrap: str, topic: str) -> list[DnsRecord]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        out = []
        batch = await consumer.getmany(timeout_ms=2000)
        for messages in batch.values():
            for msg in messages:
                rec = codec.decode_as(DnsRecord, msg.value)
                if rec is not None:
                    out.append(rec)
        return out
    finally:
        await consumer.stop()


async def test_enforce_learns_domains_and_keeps_them_across_a_restart(
    tansu_broker: Broker, topic_prefix: str, topology_and_dns: tuple[Topology, DnsServer],
    tmp_path: Path,
) -> None:
    topo, _server = topology_and_dns
    bootstrap = tansu_broker.bootstrap
    await make_topics(bootstrap, topic_prefix)
    world = World()
    world.put_endpoint("pod", "shop", "a", ("10.65.1.2",), {"app": "web"}, "veth-a")
    world.put_objects(POLICY)
    await publish(bootstrap, topic_prefix, world.changes())
    port = free_port()
    state, log = tmp_path / "dns.json", tmp_path / "enforcer.log"
    procs = [_start(bootstrap, topic_prefix, topo.node.name, port, state, log)]
    try:
        await eventually(lambda: _metric(port, "portcullis_enforcer_in_sync") == 1, 30)
        assert not topo.connect("pod-a", "10.66.4.1", 80)  # default deny, nothing learned
        assert resolve(topo, "pod-a", "eu.api.example.test") == ["10.66.4.1"]
        assert topo.connect("pod-a", "10.66.4.1", 80)  # the first attempt after the lookup
        assert not topo.connect("pod-a", "10.66.4.1", 443)
        assert not topo.connect("pod-a", "10.66.4.2", 80)  # us.: not looked up yet

        _stop(procs[-1], signal.SIGTERM)
        assert procs[-1].returncode == 0, log.read_text()[-2000:]
        assert state.exists()
        procs.append(_start(bootstrap, topic_prefix, topo.node.name, port, state, log))
        await eventually(lambda: _metric(port, "portcullis_enforcer_in_sync") == 1, 30)
        # the pod cached its answer: no new lookup, and still allowed after the restart
        assert topo.connect("pod-a", "10.66.4.1", 80)
        assert not topo.connect("pod-a", "10.66.4.2", 80)
        assert resolve(topo, "pod-a", "us.api.example.test") == ["10.66.4.2"]
        assert topo.connect("pod-a", "10.66.4.2", 80)
        assert (_metric(port, "portcullis_enforcer_dns_answers_total") or 0) >= 1

        async def published() -> list[DnsRecord]:
            return await _dns_records(bootstrap, topic_prefix + "dns")

        for _ in range(50):
            records = await published()
            if {r.name for r in records} >= {"eu.api.example.test", "us.api.example.test"}:
                break
            await asyncio.sleep(0.2)
        by_name = {r.name: r for r in records}
        eu = by_name["eu.api.example.test"]
        assert (eu.node, eu.endpoint, eu.address, eu.server, eu.ips, eu.ttl) == (
            NODE, "pod/shop/a", "10.65.1.2", DNS_IP, ("10.66.4.1",), 3600)
    finally:
        for p in procs:
            _stop(p, signal.SIGTERM)
            if p.returncode not in (0, None):
                pytest.fail(f"enforcer exited {p.returncode}: {log.read_text()[-2000:]}")
