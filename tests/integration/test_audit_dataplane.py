"""`portcullis explain --at` agrees with real TCP connections made at that time.

A real `portcullis enforce` in a node namespace follows a scripted history on a broker
(policies applied, changed and deleted; a pod relabelled), published through the watchers'
publisher so the history topics hold it. After each step the pods connect to servers
outside; afterwards, `explain --at` for the instant of each attempt must say what the
kernel did. A staged policy that would deny everything is on the topics all along."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from portcullis import cli
from portcullis.brokers import Broker, free_port
from tests.dataplane.conftest import make_netns  # noqa: F401  (fixture)
from tests.dataplane.test_traffic import (
    NODE,
    Topology,
    World,
    topology,  # noqa: F401  (fixture)
)
from tests.integration.test_enforcer import PARTITIONS, _metric, _stop, eventually, make_topics
from topics.records import split_endpoint_key, split_membership_key
from watchers.mirror import Publication
from watchers.publisher import KafkaPublisher

pytestmark = pytest.mark.dataplane

BASE = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: shop-default-deny}
spec:
  order: 2000
  selector: projectcalico.org/namespace == 'shop'
  types: [Egress]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web-out, namespace: shop}
spec:
  order: 100
  selector: app == 'web'
  types: [Egress]
  egress:
  - action: Allow
    protocol: TCP
    destination: {selector: kind == 'saas', namespaceSelector: global(), ports: [443]}
"""
# on the topics throughout, never enforced: were it, pod a could reach nothing
STAGED = """
apiVersion: projectcalico.org/v3
kind: StagedNetworkPolicy
metadata: {name: lock-a, namespace: shop}
spec:
  order: 1
  selector: app == 'web'
  types: [Egress]
  egress: [{action: Deny}]
"""
PROBES = (("a", "10.66.1.1", 443), ("a", "10.66.1.1", 80), ("b", "10.66.1.1", 443),
          ("a", "10.66.2.1", 443))


def _publication(suffix: str, key: str, rec: object) -> Publication:
    if rec is not None:
        return Publication.upsert(suffix, rec)  # type: ignore[arg-type]
    endpoint = split_membership_key(key)[1] if suffix == "memberships" else key
    _kind, namespace, name = split_endpoint_key(endpoint)
    return Publication.tombstone(suffix, key, namespace or name)


async def _publish(bootstrap: str, prefix: str, world: World, actor: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        pubs = [_publication(*change) for change in world.changes()]
        await KafkaPublisher(producer, prefix, actor=actor, source="test").publish(pubs)
    finally:
        await producer.stop()


async def test_explain_at_agrees_with_the_connections_made_then(
    tansu_broker: Broker, topic_prefix: str, topology: Topology, tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    bootstrap = tansu_broker.bootstrap
    await make_topics(bootstrap, topic_prefix)
    world = World()
    world.put_endpoint("pod", "shop", "a", ("10.65.1.2",), {"app": "web"}, "veth-a")
    world.put_endpoint("pod", "shop", "b", ("10.65.2.2",), {"app": "batch"}, "veth-b")
    world.put_endpoint("globalnetworkset", None, "saas", ("10.66.1.0/24",), {"kind": "saas"},
                       node=None)
    world.put_objects(BASE)
    world.put_objects(STAGED)
    await _publish(bootstrap, topic_prefix, world, "alice")
    port = free_port()
    log = tmp_path / "enforcer.log"
    exe = os.path.join(os.path.dirname(sys.executable), "portcullis")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [exe, "enforce", "--node", NODE, "--netns", topology.node.name, "--bootstrap",
             bootstrap, "--topic-prefix", topic_prefix, "--metrics-port", str(port),
             "--no-dns-learning"], stdout=subprocess.DEVNULL, stderr=out)
    attempts: list[tuple[float, str, str, int, bool]] = []
    try:
        await eventually(lambda: _metric(port, "portcullis_enforcer_in_sync") == 1, 30)

        async def step(change: Callable[[], None] | None, actor: str) -> None:
            if change is not None:
                before = _metric(port, "portcullis_enforcer_batches_total") or 0
                change()
                await _publish(bootstrap, topic_prefix, world, actor)
                await eventually(lambda: (_metric(port, "portcullis_enforcer_batches_total")
                                          or 0) > before, 20)
                time.sleep(0.5)  # let any trailing batch land
            for pod, ip, dport in PROBES:
                ok = topology.connect(f"pod-{pod}", ip, dport)
                attempts.append((time.time(), pod, ip, dport, ok))

        await step(None, "alice")
        await step(lambda: world.put_objects(BASE.replace("ports: [443]", "ports: [443, 80]")),
                   "bob")
        await step(lambda: world.put_endpoint("pod", "shop", "b", ("10.65.2.2",),
                                              {"app": "web"}, "veth-b"), "kubernetes")
        await step(lambda: world.delete_object("NetworkPolicy/shop/web-out"), "carol")
    finally:
        _stop(proc, 15)
    assert proc.returncode == 0, log.read_text()[-2000:]
    results = [ok for *_x, ok in attempts]
    assert any(results) and not all(results), attempts  # the script is not trivial

    capsys.readouterr()
    for at, pod, ip, dport, ok in attempts:
        code = await asyncio.to_thread(cli.main, [
            "explain", f"shop/{pod}", f"{ip}:{dport}", "--at", f"@{at}", "-o", "json",
            "--bootstrap", bootstrap, "--topic-prefix", topic_prefix,
            "--partitions", str(PARTITIONS)])
        assert code == 0, capsys.readouterr().err
        said = json.loads(capsys.readouterr().out)
        assert said["verdict"] == ("allow" if ok else "deny"), (pod, ip, dport, at, said)
