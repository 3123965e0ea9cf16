"""The benchmark's synthetic cluster and churn: seeded, valid, realistic where it matters."""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import replace

import pytest

import policy
from benchmarks.churn.cluster import ChurnGenerator, ClusterSpec, build_cluster, schedule

SMALL = ClusterSpec(pods=400, nodes=4, policies=30, network_sets=4, cidrs_per_set=5, seed=11)


def test_same_seed_same_cluster_and_churn() -> None:
    a, b = build_cluster(SMALL), build_cluster(SMALL)
    assert a.summary() == b.summary()
    assert list(a.pods) == list(b.pods)
    assert [p.ip for p in a.pods.values()] == [p.ip for p in b.pods.values()]
    ga, gb = ChurnGenerator(a), ChurnGenerator(b)
    ea = [(e.op, e.key, e.pod) for e in ga.stream(200)]
    eb = [(e.op, e.key, e.pod) for e in gb.stream(200)]
    assert ea == eb


def test_another_seed_another_cluster() -> None:
    assert list(build_cluster(SMALL).pods) != list(build_cluster(replace(SMALL, seed=12)).pods)


def test_sizes_and_policy_shape() -> None:
    cluster = build_cluster(SMALL)
    summary = cluster.summary()
    assert summary["pods"] == SMALL.pods
    assert summary["nodes"] == SMALL.nodes
    assert summary["policies"] == SMALL.policies
    assert summary["host_endpoints"] == SMALL.nodes
    assert summary["tiers"] == 2
    kinds = Counter((o.kind, getattr(o, "tier", None)) for o in cluster.policy_objects)
    assert kinds[("GlobalNetworkPolicy", "security")] >= 1
    assert kinds[("GlobalNetworkPolicy", "platform")] >= 1
    names = {o.name for o in cluster.policy_objects}
    assert "deny-app-policy" in names  # Calico's deny-all-except-kube-dns recipe
    user_namespaces = [n for n in cluster.namespaces if n not in ("kube-system", "monitoring")]
    default_deny = [o for o in cluster.policy_objects if o.name == "default-deny"]
    assert {o.namespace for o in default_deny} == set(user_namespaces)
    # Pass actions exist (tiers that pass on), and network sets are selected by label
    docs = [r.document for r in cluster.policy_records]
    assert any(rule.get("action") == "Pass"
               for d in docs for rule in d.get("spec", {}).get("egress", []))
    assert any("role == 'saas-api'" in str(d) for d in docs)


def test_every_document_validates_and_records_round_trip() -> None:
    cluster = build_cluster(SMALL)
    for record in cluster.policy_records:
        obj = policy.load_document(record.document, source=record.key)
        assert obj.key == record.key
    kinds = Counter(r.kind for r in cluster.endpoint_records)
    assert kinds["globalnetworkset"] == SMALL.network_sets + 1  # + the block list
    assert kinds["hostendpoint"] == SMALL.nodes


def test_pod_ips_unique_inside_their_node_cidr_and_reused_after_delete() -> None:
    cluster = build_cluster(SMALL)
    gen = ChurnGenerator(cluster)
    freed: set[tuple[str, str, str]] = set()
    reused_across_namespaces = 0
    for _ in range(1500):
        before = {k: (p.node, p.ip, p.namespace) for k, p in cluster.pods.items()}
        event = gen.next()
        if event.op == "delete":
            assert event.key not in cluster.pods
            node, ip, namespace = before[event.key]
            freed.add((node, ip, namespace))
        if event.op == "create":
            assert event.pod is not None
            reused_across_namespaces += sum(
                1 for node, ip, ns in freed
                if (node, ip) == (event.pod.node, event.pod.ip) and ns != event.pod.namespace)
        live = list(cluster.pods.values())
        assert len({p.ip for p in live}) == len(live), "two live pods share an IP"
    assert reused_across_namespaces > 0, "deleted pods' IPs never go to another namespace"
    for pod in cluster.pods.values():
        index = cluster.nodes.index(pod.node)
        net = ipaddress.ip_network((int(ipaddress.ip_address("10.0.0.0")) + index * 1024, 22))
        assert ipaddress.ip_address(pod.ip) in net


def test_churn_keeps_the_pod_count_steady_and_mixes_operations() -> None:
    cluster = build_cluster(SMALL)
    gen = ChurnGenerator(cluster)
    ops = Counter(e.op for e in gen.stream(2000))
    assert set(ops) == {"create", "delete", "relabel"}
    assert abs(len(cluster.pods) - SMALL.pods) <= 5
    assert 0.1 < ops["relabel"] / 2000 < 0.3


def test_relabels_change_labels_selectors_see() -> None:
    cluster = build_cluster(SMALL)
    gen = ChurnGenerator(cluster)
    changed = set()
    for event in gen.stream(600):
        if event.op == "relabel":
            before = cluster.pods[event.key]
            assert event.pod == before  # the generator updated its view
            changed |= {k for k, _v in event.pod.labels}
    assert {"app", "tier", "quarantine"} & changed


def test_schedule_spacing() -> None:
    assert schedule(6000, 3) == [0.0, 0.01, 0.02]
    with pytest.raises(ValueError):
        schedule(0, 3)
