"""Kubernetes objects into records, and the mirror that dedupes and finds what vanished."""

from __future__ import annotations

import hashlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import policy
from topics.records import EndpointRecord
from watchers import translate
from watchers.mirror import Mirror, Publication


def pod(name: str = "web-1", ns: str = "prod", phase: str = "Running",
        ip: str | None = "10.1.2.3", **spec: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}, {"ip": "fd00::3"}]
    return {
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"},
                     "resourceVersion": "42"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "api", **spec},
        "status": status,
    }


def test_interface_name_is_calicos_veth_name() -> None:
    # Calico's VethNameForWorkload: "cali" + first 11 hex of sha1("<namespace>.<pod>").
    name = translate.veth_name("prod", "web-1")
    assert name == "cali" + hashlib.sha1(b"prod.web-1").hexdigest()[:11]
    assert len(name) == 15  # IFNAMSIZ - 1
    assert translate.veth_name("dev", "web-1") != name


def test_running_pod_with_ips_is_an_endpoint() -> None:
    pub = translate.pod_endpoint(pod(), 7.0)
    rec = pub.value
    assert rec is not None and pub.key == "pod/prod/web-1" and pub.partition_key == "prod"
    assert (rec.node, rec.service_account, rec.resource_version) == ("node-1", "api", "42")
    assert rec.ips == ("10.1.2.3", "fd00::3")
    assert rec.interface == translate.veth_name("prod", "web-1")


def test_pods_that_are_not_running_endpoints_are_tombstones() -> None:
    for obj in (pod(phase="Pending"), pod(phase="Succeeded"), pod(ip=None),
                pod(hostNetwork=True)):
        pub = translate.pod_endpoint(obj, 0.0)
        assert pub.value is None and pub.key == "pod/prod/web-1"
    assert translate.pod_endpoint(pod(), 0.0, deleted=True).value is None


def test_nodes_get_automatic_host_endpoints() -> None:
    node = {"metadata": {"name": "n1", "labels": {"zone": "a"}}, "status": {"addresses": [
        {"type": "InternalIP", "address": "192.168.0.10"}, {"type": "Hostname", "address": "n1"},
    ]}}
    rec = translate.node_host_endpoint(node, 0.0).value
    assert rec is not None and rec.key == "hostendpoint//n1-auto-hep"
    assert (rec.interface, rec.ips, rec.node) == ("*", ("192.168.0.10",), "n1")
    # as Calico's: what no policy decides is allowed (no default deny of every node's egress)
    assert rec.profiles == ("projectcalico-default-allow",)


def test_namespaces_and_service_accounts_are_profiles() -> None:
    ns = translate.namespace_profile({"metadata": {"name": "prod", "labels": {"e": "p"}}}, 0.0)
    sa = translate.serviceaccount_profile({"metadata": {"name": "api", "namespace": "prod"}}, 0.0)
    assert (ns.key, sa.key) == ("kns.prod", "ksa.prod.api")
    assert ns.value is not None and ns.value.labels == {"e": "p"}


def test_custom_resources_are_validated_and_become_policy_and_member_records() -> None:
    obj = {"apiVersion": "policy.portcullis.io/v1", "kind": "GlobalNetworkSet",
           "metadata": {"name": "corp", "uid": "x", "resourceVersion": "9",
                        "labels": {"role": "corp"}},
           "spec": {"nets": ["10.0.0.0/8"]}}
    pubs = translate.custom_resource_publications(obj, 1.0)
    assert [(p.topic, p.key) for p in pubs] == [
        ("policies", "GlobalNetworkSet//corp"), ("endpoints", "globalnetworkset//corp")]
    obj["spec"] = {"nets": ["10.0.0.0/33"]}
    try:
        translate.custom_resource_publications(obj, 1.0)
    except translate.TranslationError as exc:
        assert "spec.nets[0]" in str(exc)
    else:
        raise AssertionError("an invalid custom resource was accepted")


# -- the mirror -------------------------------------------------------------------------


def test_an_unchanged_record_is_not_published_again() -> None:
    mirror = Mirror()
    first = translate.pod_endpoint(pod(), 1.0)
    mirror.commit("pods", mirror.changes([first]))
    again = translate.pod_endpoint({**pod(), "metadata": {**pod()["metadata"],
                                                        "resourceVersion": "43"}}, 2.0)
    assert mirror.changes([again]) == []
    assert mirror.changes([translate.pod_endpoint(pod(), 3.0, deleted=True)]) != []


def _ep(i: int, gen: int) -> Publication:
    return translate.pod_endpoint(pod(name=f"p{i}", ip=f"10.0.0.{i + 1}") | {
        "metadata": {"name": f"p{i}", "namespace": "ns", "labels": {"g": str(gen)}}}, 0.0)


events = st.lists(st.one_of(
    st.tuples(st.just("up"), st.integers(0, 5), st.integers(0, 2)),
    st.tuples(st.just("del"), st.integers(0, 5), st.just(0)),
    st.tuples(st.just("relist"), st.just(0), st.just(0)),
), max_size=30)


@given(events, st.sets(st.integers(0, 5)))
@settings(max_examples=200, deadline=None)
def test_topic_follows_the_cluster_through_missed_events_and_relists(
    ops: list[tuple[str, int, int]], missed: set[int]
) -> None:
    """Events for pods in `missed` are lost (as during a 410); the next relist repairs them."""
    cluster: dict[int, int] = {}
    mirror, topic = Mirror(), {}

    def apply(changes: list[Publication]) -> None:
        mirror.commit("pods", changes)
        for pub in changes:
            if pub.value is None:
                topic.pop(pub.key, None)
            else:
                topic[pub.key] = pub.value.labels["g"]

    for op, i, gen in ops:
        if op == "up":
            cluster[i] = gen
            if i not in missed:
                apply(mirror.changes([_ep(i, gen)]))
        elif op == "del":
            cluster.pop(i, None)
            if i not in missed:
                apply(mirror.changes([translate.pod_endpoint(pod(name=f"p{i}", ns="ns"), 0.0,
                                                             deleted=True)]))
        else:
            apply(mirror.snapshot_changes("pods", [_ep(k, g) for k, g in cluster.items()]))
    apply(mirror.snapshot_changes("pods", [_ep(k, g) for k, g in cluster.items()]))
    assert topic == {f"pod/ns/p{k}": str(g) for k, g in cluster.items()}


def test_a_host_endpoint_carries_its_profiles_to_the_endpoint_record() -> None:
    (hep,) = policy.load(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\n"
        "spec: {node: n1, interfaceName: eth0, profiles: [projectcalico-default-allow]}\n")
    pubs = translate.policy_publications(hep, actor="a", applied_at=1.0, observed_at=1.0,
                                         source="apply")
    (record,) = [p.value for p in pubs if p.topic == "endpoints"]
    assert isinstance(record, EndpointRecord)
    assert (record.interface, record.profiles) == ("eth0", ("projectcalico-default-allow",))
