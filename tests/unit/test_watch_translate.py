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


def test_a_pending_pod_with_an_ip_is_an_endpoint() -> None:
    # Init containers run (and send traffic) before the pod is Running: filter them too.
    for phase in ("Pending", "Unknown"):
        rec = translate.pod_endpoint(pod(phase=phase), 0.0).value
        assert isinstance(rec, EndpointRecord) and rec.ips == ("10.1.2.3", "fd00::3")
    no_phase = pod()
    del no_phase["status"]["phase"]
    assert translate.pod_endpoint(no_phase, 0.0).value is not None


def test_finished_unscheduled_host_network_and_ipless_pods_are_tombstones() -> None:
    for obj in (pod(phase="Succeeded"), pod(phase="Failed"), pod(phase="Completed"),
                pod(phase="Pending", ip=None), pod(ip=None), pod(hostNetwork=True),
                pod(nodeName="")):
        pub = translate.pod_endpoint(obj, 0.0)
        assert pub.value is None and pub.key == "pod/prod/web-1"
    assert translate.pod_endpoint(pod(), 0.0, deleted=True).value is None


def test_a_terminating_pod_is_finished_once_its_cni_released_the_ip() -> None:
    terminating = pod()
    terminating["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    assert translate.pod_endpoint(terminating, 0.0).value is not None  # grace period
    for annotation in ("cni.projectcalico.org/podIP", "vpc.amazonaws.com/pod-ips"):
        terminating["metadata"]["annotations"] = {annotation: ""}
        assert translate.pod_endpoint(terminating, 0.0).value is None


PHASES = (None, "Pending", "Running", "Unknown", "Succeeded", "Failed", "Completed")
#: (deletionTimestamp set, annotations): no deletion, deletion in its grace period, deletion
#: after Calico or AWS CNI emptied its IP annotation, and the misleading mixtures.
DELETION_STATES: tuple[tuple[bool, dict[str, str]], ...] = (
    (False, {}),
    (True, {}),
    (True, {"cni.projectcalico.org/podIP": ""}),
    (True, {"vpc.amazonaws.com/pod-ips": ""}),
    (True, {"cni.projectcalico.org/podIP": "10.1.2.3/32"}),
    (False, {"cni.projectcalico.org/podIP": ""}),  # not being deleted: the annotation says nothing
    (True, {"cni.projectcalico.org/podIPs": ""}),  # the plural is not Calico's release signal
)
IP_SHAPES = ("none", "podIP", "podIPs", "both", "empty entries")


@given(
    phase=st.sampled_from(PHASES),
    host_network=st.sampled_from((None, False, True)),
    node=st.sampled_from((None, "", "node-1")),
    ip_shape=st.sampled_from(IP_SHAPES),
    deletion=st.sampled_from(DELETION_STATES),
    deleted=st.booleans(),
)
@settings(max_examples=400, deadline=None)
def test_pod_endpoint_follows_calicos_workload_endpoint_rule(
    phase: str | None, host_network: bool | None, node: str | None, ip_shape: str,
    deletion: tuple[bool, dict[str, str]], deleted: bool,
) -> None:
    deleting, annotations = deletion
    meta: dict[str, Any] = {"name": "w", "namespace": "ns", "annotations": dict(annotations)}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    spec: dict[str, Any] = {}
    if host_network is not None:
        spec["hostNetwork"] = host_network
    if node is not None:
        spec["nodeName"] = node
    status: dict[str, Any] = {}
    if phase is not None:
        status["phase"] = phase
    if ip_shape in ("podIP", "both"):
        status["podIP"] = "10.0.0.1"
    if ip_shape in ("podIPs", "both"):
        status["podIPs"] = [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]
    if ip_shape == "empty entries":
        status["podIPs"] = [{"ip": ""}, {}]
    obj = {"metadata": meta, "spec": spec, "status": status}

    # The oracle, straight from Calico's IsScheduled, IsHostNetworked, HasIPAddress, IsFinished.
    released = deleting and any(
        annotations.get(a) == "" for a in ("cni.projectcalico.org/podIP",
                                           "vpc.amazonaws.com/pod-ips"))
    finished = phase in ("Succeeded", "Failed", "Completed") or released
    expected = (not deleted and node == "node-1" and host_network is not True
                and ip_shape in ("podIP", "podIPs", "both") and not finished)

    pub = translate.pod_endpoint(obj, 0.0, deleted=deleted)
    assert pub.key == "pod/ns/w" and pub.partition_key == "ns"
    assert (pub.value is not None) == expected
    if expected:
        rec = pub.value
        assert isinstance(rec, EndpointRecord) and rec.node == "node-1"
        assert rec.ips == (("10.0.0.1",) if ip_shape == "podIP" else ("10.0.0.1", "fd00::1"))


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
