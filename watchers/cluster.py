"""What `portcullis watch kubernetes` watches, how each resource is translated, and who owns what.

Each watched resource owns the keys it publishes (its mirror owner is the
resource name). At startup the mirror is seeded from the topics, each record
given back to the resource that would have written it, so an object deleted
while the watcher was down is tombstoned by the first relist.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from kubernetes_asyncio import client as k8s

from topics.records import EndpointRecord, PolicyRecord, ProfileRecord, Record
from watchers import kubernetes as kw
from watchers import translate
from watchers.metrics import WatchMetrics
from watchers.mirror import Mirror
from watchers.publisher import Publisher
from watchers.reflector import Reflector, Translator

log = logging.getLogger(__name__)

_CR_BY_KIND = {r.kind: r for r in kw.POLICY_RESOURCES}
_ENDPOINT_KIND_TO_CR = {
    "networkset": "NetworkSet", "globalnetworkset": "GlobalNetworkSet",
    "hostendpoint": "HostEndpoint",
}


@dataclass(frozen=True)
class Selection:
    """Which resources to watch (nodes only when automatic host endpoints are wanted)."""

    pods: bool = True
    profiles: bool = True
    auto_host_endpoints: bool = False
    policy_resources: bool = True
    network_policies: bool = True


def resources(selection: Selection) -> list[tuple[kw.Resource, Translator]]:
    out: list[tuple[kw.Resource, Translator]] = []
    if selection.pods:
        out.append((kw.PODS, translate.pod_endpoint))
    if selection.profiles:
        out.append((kw.NAMESPACES, translate.namespace_profile))
        out.append((kw.SERVICE_ACCOUNTS, translate.serviceaccount_profile))
    if selection.auto_host_endpoints:
        out.append((kw.NODES, translate.node_host_endpoint))
    if selection.network_policies:
        out.append((kw.NETWORK_POLICIES, translate.network_policy_publications))
    if selection.policy_resources:
        out.extend((r, translate.custom_resource_publications) for r in kw.POLICY_RESOURCES)
    return out


def owner_of(topic: str, key: str, record: Record) -> str | None:
    """The resource that publishes this record, or None when it is not the watcher's."""
    if topic == "endpoints" and isinstance(record, EndpointRecord):
        if record.source != "kubernetes":
            return None
        if record.kind == "pod":
            return kw.PODS.name
        if record.kind == "hostendpoint" and record.name.endswith(translate.AUTO_HEP_SUFFIX):
            return kw.NODES.name
        cr = _CR_BY_KIND.get(_ENDPOINT_KIND_TO_CR.get(record.kind, ""))
        return cr.name if cr else None
    if topic == "profiles" and isinstance(record, ProfileRecord):
        return (kw.NAMESPACES if record.kind == "namespace" else kw.SERVICE_ACCOUNTS).name
    if topic == "policies" and isinstance(record, PolicyRecord):
        if record.actor != translate.KUBERNETES_ACTOR:
            return None
        if record.kind == "NetworkPolicy" and record.name.startswith("knp.default."):
            return kw.NETWORK_POLICIES.name
        cr = _CR_BY_KIND.get(record.kind)
        return cr.name if cr else None
    return None


def seed(mirror: Mirror, state: Mapping[str, Mapping[str, Record]], watched: set[str]) -> int:
    """Adopt the records on the topics that the watched resources own; returns how many."""
    by_owner: dict[str, dict[tuple[str, str], Record]] = {}
    for topic, records in state.items():
        for key, record in records.items():
            owner = owner_of(topic, key, record)
            if owner in watched:
                by_owner.setdefault(owner, {})[(topic, key)] = record
    for owner, owned in by_owner.items():
        mirror.seed(owner, owned)
    return sum(len(r) for r in by_owner.values())


def watchers(
    api: k8s.ApiClient,
    publisher: Publisher,
    selection: Selection,
    options: kw.WatchOptions | None = None,
    mirror: Mirror | None = None,
    metrics: WatchMetrics | None = None,
) -> list[kw.ResourceWatcher]:
    """A resource watcher for every selected resource, all publishing through one reflector."""
    chosen = resources(selection)
    reflector = Reflector({r.name: t for r, t in chosen}, publisher, mirror, metrics=metrics)
    return [kw.ResourceWatcher(api, r, reflector, options, metrics) for r, _t in chosen]


async def watch(
    api: k8s.ApiClient,
    publisher: Publisher,
    selection: Selection,
    options: kw.WatchOptions | None = None,
    mirror: Mirror | None = None,
) -> None:
    """Run every selected resource watcher until cancelled."""
    chosen = watchers(api, publisher, selection, options, mirror)
    log.info("watching %s", ", ".join(w.resource.name for w in chosen))
    await kw.run_all(chosen)


async def api_client(kubeconfig: str | None, context: str | None) -> k8s.ApiClient:
    """In-cluster credentials when running in a pod (and no kubeconfig given), else kubeconfig."""
    import os

    from kubernetes_asyncio import config

    conf = k8s.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=conf
        )
    return k8s.ApiClient(conf)
