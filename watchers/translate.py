"""Kubernetes objects (plain JSON dicts) and policy objects into the records the topics carry.

Pure: every function takes what the API server sent and returns `Publication`s
(an upsert, or a tombstone when the object no longer stands for a record, e.g.
a pod that finished). The keys depend only on the object's identity, never on
its state, so a DELETED event and a MODIFIED event that makes a pod unusable
produce the same tombstone.

A pod is a workload endpoint as in Calico (libcalico-go's Kubernetes
conversion): scheduled (``spec.nodeName``), not host-networked, with at least
one IP (``status.podIPs``, else ``status.podIP``), and not finished. Finished
is Calico's ``IsFinished``: phase Succeeded, Failed or Completed, or being
deleted (``deletionTimestamp``) with the CNI plugin's IP annotation emptied.
Any other phase (Pending, Running, Unknown, none) with an IP is an endpoint: a
Pending pod whose init containers run already sends traffic and must be
filtered like a Running one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import policy
from policy import kubernetes as kubernetes_policy
from topics.records import (
    DEFAULT_ALLOW_PROFILE,
    EndpointRecord,
    PolicyRecord,
    ProfileRecord,
    endpoint_key,
    profile_key,
)
from watchers.mirror import Publication

log = logging.getLogger(__name__)

ENDPOINTS = "endpoints"
PROFILES = "profiles"
POLICIES = "policies"

#: Who a policy record says applied it when it came from the cluster.
KUBERNETES_ACTOR = "kubernetes"
AUTO_HEP_SUFFIX = "-auto-hep"


class TranslationError(ValueError):
    """An object from the cluster cannot become a record; the message says which and why."""


def veth_name(namespace: str, pod: str, prefix: str = "cali") -> str:
    """The host-side interface name Calico's CNI gives a pod (`VethNameForWorkload`)."""
    digest = hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()
    return f"{prefix}{digest[:11]}"


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise TranslationError(f"object without metadata.name: {str(obj)[:120]}")
    return meta


def _labels(meta: Mapping[str, Any]) -> dict[str, str]:
    labels = meta.get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


def _rv(meta: Mapping[str, Any]) -> str | None:
    rv = meta.get("resourceVersion")
    return str(rv) if rv not in (None, "") else None


def object_id(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` (``/name`` when cluster-scoped): how we name an object in logs."""
    meta = _meta(obj)
    return f"{meta.get('namespace') or ''}/{meta['name']}"


def pod_ips(pod: Mapping[str, Any]) -> list[str]:
    status = pod.get("status") or {}
    entries = [p for p in status.get("podIPs") or [] if isinstance(p, Mapping)]
    ips = [str(p["ip"]) for p in entries if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    return ips


#: Phases after which a pod no longer owns its IPs (the kubelet has released them). Calico's
#: ``IsFinished`` also lists "Completed", which the API does not define but some tools report.
FINISHED_PHASES = frozenset({"Succeeded", "Failed", "Completed"})
#: Annotations a CNI plugin sets to "" when it has torn down a terminating pod's network:
#: Calico CNI's ``cni.projectcalico.org/podIP`` and AWS VPC CNI's ``vpc.amazonaws.com/pod-ips``.
RELEASED_IP_ANNOTATIONS = ("cni.projectcalico.org/podIP", "vpc.amazonaws.com/pod-ips")


def pod_is_finished(pod: Mapping[str, Any]) -> bool:
    """Calico's ``IsFinished``: the pod no longer owns its IPs, though it may still exist.

    Either its phase is Succeeded, Failed or Completed, or it is being deleted
    (``metadata.deletionTimestamp`` set) and its CNI plugin has said the network
    is gone by setting its IP annotation to the empty string. A terminating pod
    without that signal still owns its IPs (it is in its grace period) and
    stays an endpoint until its phase says otherwise or it is deleted.
    """
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        annotations = meta.get("annotations") or {}
        if any(annotations.get(a) == "" for a in RELEASED_IP_ANNOTATIONS):
            return True
    return (pod.get("status") or {}).get("phase") in FINISHED_PHASES


def pod_is_workload_endpoint(pod: Mapping[str, Any]) -> bool:
    """Calico's rule: scheduled, not host-networked, has an IP, and not finished.

    Any other phase (Pending, Running, Unknown, or none) qualifies: a pod whose
    init containers run already has its IP and its traffic must be filtered.
    Host-network pods share their node's addresses and have no interface of
    their own, so they are never workload endpoints.
    """
    spec = pod.get("spec") or {}
    return (
        bool(spec.get("nodeName"))
        and not spec.get("hostNetwork")
        and bool(pod_ips(pod))
        and not pod_is_finished(pod)
    )


def pod_endpoint(
    pod: Mapping[str, Any], observed_at: float, *, deleted: bool = False
) -> Publication:
    """The pod's endpoint record if `pod_is_workload_endpoint`, else (or if deleted) a tombstone.

    The tombstone does not trust the server to have filtered finished pods out:
    whatever the watch sends, a finished pod is never an endpoint.
    """
    meta = _meta(pod)
    namespace = str(meta.get("namespace") or "default")
    name = str(meta["name"])
    key = endpoint_key("pod", namespace, name)
    if deleted or not pod_is_workload_endpoint(pod):
        return Publication.tombstone(ENDPOINTS, key, namespace)
    spec = pod.get("spec") or {}
    ips = pod_ips(pod)
    record = EndpointRecord(
        kind="pod",
        namespace=namespace,
        name=name,
        node=str(spec["nodeName"]),
        interface=veth_name(namespace, name),
        ips=tuple(ips),
        labels=_labels(meta),
        service_account=str(spec.get("serviceAccountName") or "default"),
        source="kubernetes",
        observed_at=observed_at,
        resource_version=_rv(meta),
    )
    return Publication.upsert(ENDPOINTS, record)


def namespace_profile(
    ns: Mapping[str, Any], observed_at: float, *, deleted: bool = False
) -> Publication:
    """A namespace's labels, which its pods inherit as ``pcns.`` labels."""
    meta = _meta(ns)
    name = str(meta["name"])
    if deleted:
        return Publication.tombstone(PROFILES, profile_key(name), name)
    record = ProfileRecord(
        kind="namespace", namespace=name, name=None, labels=_labels(meta),
        observed_at=observed_at, resource_version=_rv(meta),
    )
    return Publication.upsert(PROFILES, record)


def serviceaccount_profile(
    sa: Mapping[str, Any], observed_at: float, *, deleted: bool = False
) -> Publication:
    """A service account's labels, which pods running as it inherit as ``pcsa.`` labels."""
    meta = _meta(sa)
    namespace = str(meta.get("namespace") or "default")
    name = str(meta["name"])
    if deleted:
        return Publication.tombstone(PROFILES, profile_key(namespace, name), namespace)
    record = ProfileRecord(
        kind="serviceaccount", namespace=namespace, name=name, labels=_labels(meta),
        observed_at=observed_at, resource_version=_rv(meta),
    )
    return Publication.upsert(PROFILES, record)


def node_addresses(node: Mapping[str, Any]) -> list[str]:
    status = node.get("status") or {}
    out = []
    for addr in status.get("addresses") or []:
        wanted = isinstance(addr, Mapping) and addr.get("type") in ("InternalIP", "ExternalIP")
        if wanted and addr.get("address"):
            out.append(str(addr["address"]))
    return out


def node_host_endpoint(
    node: Mapping[str, Any], observed_at: float, *, deleted: bool = False
) -> Publication:
    """Calico's automatic host endpoint: ``<node>-auto-hep``, every interface, the node's
    labels, and (as Calico gives it) the default-allow profile: turning automatic host
    endpoints on puts nodes under policy without default-denying their egress."""
    meta = _meta(node)
    node_name = str(meta["name"])
    name = node_name + AUTO_HEP_SUFFIX
    if deleted:
        return Publication.tombstone(ENDPOINTS, endpoint_key("hostendpoint", None, name), name)
    record = EndpointRecord(
        kind="hostendpoint",
        namespace=None,
        name=name,
        node=node_name,
        interface="*",
        ips=tuple(node_addresses(node)),
        labels=_labels(meta),
        service_account=None,
        source="kubernetes",
        observed_at=observed_at,
        resource_version=_rv(meta),
        profiles=(DEFAULT_ALLOW_PROFILE,),
    )
    return Publication.upsert(ENDPOINTS, record)


# ---------------------------------------------------------------------------
# Policy objects (from `portcullis apply` or from our custom resources)
# ---------------------------------------------------------------------------


def _endpoint_kind(kind: str) -> str | None:
    return {
        "NetworkSet": "networkset",
        "GlobalNetworkSet": "globalnetworkset",
        "HostEndpoint": "hostendpoint",
    }.get(kind)


def policy_keys(kind: str, namespace: str | None, name: str) -> list[Publication]:
    """Tombstones for everything a policy object of this identity publishes."""
    pk = namespace if namespace is not None else name
    pubs = [Publication.tombstone(POLICIES, endpoint_key(kind, namespace, name), pk)]
    ep_kind = _endpoint_kind(kind)
    if ep_kind is not None:
        pubs.append(Publication.tombstone(ENDPOINTS, endpoint_key(ep_kind, namespace, name), pk))
    return pubs


def policy_publications(
    obj: Any, *, actor: str, applied_at: float, observed_at: float, source: str,
    resource_version: str | None = None,
) -> list[Publication]:
    """A loaded policy object as its policy record, plus an endpoint for sets and host endpoints.

    Network sets and host endpoints are members that selectors match, so they
    also go to the endpoints topic (keyed ``networkset/ns/name`` etc.); the
    policies topic keeps the full document (domains, ports) for enforcers and `get`.
    """
    kind = str(obj.kind)
    namespace = obj.namespace
    name = str(obj.name)
    pubs = [
        Publication.upsert(
            POLICIES,
            PolicyRecord(
                kind=kind, namespace=namespace, name=name, document=obj.to_document(),
                actor=actor, applied_at=applied_at, observed_at=observed_at,
            ),
        )
    ]
    labels = dict(obj.labels)
    if kind in ("NetworkSet", "GlobalNetworkSet"):
        ep_kind = "networkset" if kind == "NetworkSet" else "globalnetworkset"
        pubs.append(Publication.upsert(ENDPOINTS, EndpointRecord(
            kind=ep_kind,  # type: ignore[arg-type]
            namespace=namespace, name=name, node=None, interface=None,
            ips=tuple(obj.nets), labels=labels, service_account=None, source=source,
            observed_at=observed_at, resource_version=resource_version,
        )))
    elif kind == "HostEndpoint":
        pubs.append(Publication.upsert(ENDPOINTS, EndpointRecord(
            kind="hostendpoint", namespace=None, name=name, node=str(obj.node),
            interface=obj.interface_name or None, ips=tuple(obj.expected_ips),
            labels=labels, service_account=None, source=source,
            observed_at=observed_at, resource_version=resource_version,
            profiles=tuple(obj.profiles),
        )))
    return pubs


def custom_resource_document(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The user's document inside a custom resource, without the server's bookkeeping."""
    meta = _meta(obj)
    doc_meta: dict[str, Any] = {"name": meta["name"]}
    if meta.get("namespace"):
        doc_meta["namespace"] = meta["namespace"]
    if meta.get("labels"):
        doc_meta["labels"] = dict(meta["labels"])
    doc: dict[str, Any] = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": doc_meta,
    }
    if "spec" in obj:
        doc["spec"] = obj["spec"]
    return doc


def custom_resource_publications(
    obj: Mapping[str, Any], observed_at: float, *, deleted: bool = False,
) -> list[Publication]:
    """A Portcullis (Calico v3 shaped) custom resource as policy (and endpoint) records.

    Raises `TranslationError` with every problem the policy loader found: the
    watcher logs it and keeps the last valid state of that object.
    """
    meta = _meta(obj)
    kind = str(obj.get("kind") or "")
    namespace = meta.get("namespace") or None
    if deleted:
        return policy_keys(kind, namespace, str(meta["name"]))
    source = f"kubernetes {kind} {object_id(obj)}"
    try:
        loaded = policy.load_document(custom_resource_document(obj), source)
    except policy.PolicyError as exc:
        raise TranslationError(str(exc)) from None
    return policy_publications(
        loaded, actor=KUBERNETES_ACTOR, applied_at=observed_at, observed_at=observed_at,
        source="kubernetes", resource_version=_rv(meta),
    )


def network_policy_publications(
    obj: Mapping[str, Any], observed_at: float, *, deleted: bool = False,
) -> list[Publication]:
    """A Kubernetes NetworkPolicy, translated into the Calico model (``knp.default.<name>``)."""
    meta = _meta(obj)
    namespace = str(meta.get("namespace") or "default")
    name = "knp.default." + str(meta["name"])
    if deleted:
        return policy_keys("NetworkPolicy", namespace, name)
    try:
        loaded = kubernetes_policy.translate(obj, f"kubernetes NetworkPolicy {object_id(obj)}")
    except policy.PolicyError as exc:
        raise TranslationError(str(exc)) from None
    return policy_publications(
        loaded, actor=KUBERNETES_ACTOR, applied_at=observed_at, observed_at=observed_at,
        source="kubernetes", resource_version=_rv(meta),
    )
