"""The demo's small cluster, its example policies, and what policy says of each connection.

Pure: plain data in, plain data out. The records are made by the watcher's own
translation (`watchers.translate`), from Kubernetes-shaped objects, so the demo publishes
exactly what the Kubernetes watcher would; the expected verdicts come from
`policy.verdict`, the one definition of what a policy set decides.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from policy import compile as pcompile
from policy import verdict as pverdict
from policy.domains import matches as domain_matches
from policy.labels import network_set_labels
from policy.load import load
from policy.model import HostEndpoint, NetworkSet, Policy, PolicyObject, Tier
from portcullis.demo import DemoError
from topics.records import EndpointRecord, PolicyRecord, ProfileRecord

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
#: The examples the demo applies: default deny with DNS (prod), the SaaS network set and an
#: app allowed to it, and a host endpoint with its platform-tier policy.
EXAMPLES = ("default-deny.yaml", "saas-networkset.yaml", "host-endpoint.yaml")
#: The node of examples/host-endpoint.yaml; the demo's node namespace plays it.
NODE = "node1"
POD_CIDR = "10.65.0.0/16"
ACTOR = "portcullis-demo"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Pod:
    """A pod on the node; its network namespace gets `ip` on eth0, routed via `gateway`."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    index: int  # 10.65.<index>.0/24 is its link to the node

    @property
    def key(self) -> str:
        return f"pod/{self.namespace}/{self.name}"

    @property
    def display(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ip(self) -> str:
        return f"10.65.{self.index}.2"

    @property
    def gateway(self) -> str:
        return f"10.65.{self.index}.1"


@dataclass(frozen=True)
class Server:
    """A TCP server: in the outside network (`pod` None) or in a pod. One with a `domain`
    is reached by name: the client looks it up (kube-dns answers `ip`), then connects."""

    name: str
    ip: str
    port: int
    pod: str | None = None  # pod key when the server runs in a pod
    domain: str | None = None

    @property
    def display(self) -> str:
        return f"{self.name} {self.domain or self.ip}:{self.port}"


@dataclass(frozen=True)
class Source:
    """Who connects: a pod, or the node itself (through its host endpoint)."""

    key: str  # endpoint key
    display: str
    kind: Literal["pod", "host"]
    netns_role: str  # "node" or the pod key


@dataclass(frozen=True)
class Case:
    source: Source
    server: Server


@dataclass(frozen=True)
class Cluster:
    """Everything the demo creates, before any policy."""

    namespaces: tuple[Namespace, ...]
    pods: tuple[Pod, ...]
    servers: tuple[Server, ...]
    relabel: tuple[str, Mapping[str, str]]  # (pod key, its new labels) for the label change

    def pod(self, key: str) -> Pod:
        for pod in self.pods:
            if pod.key == key:
                return pod
        raise KeyError(key)

    @property
    def outside_servers(self) -> tuple[Server, ...]:
        return tuple(s for s in self.servers if s.pod is None)


def default_cluster() -> Cluster:
    """Two application namespaces (prod has a default deny, staging none) and kube-dns."""
    namespaces = (
        Namespace("prod", {"environment": "production"}),
        Namespace("staging", {"environment": "staging"}),
        Namespace("kube-system", {}),
    )
    pods = (
        Pod("prod", "billing", {"app": "billing"}, 1),
        Pod("prod", "reports", {"app": "reports"}, 2),
        Pod("staging", "web", {"app": "web"}, 3),
        Pod("kube-system", "coredns", {"k8s-app": "kube-dns"}, 4),
    )
    servers = (
        Server("payments-api", "203.0.113.10", 443),
        Server("payments-api", "203.0.113.10", 80),
        # a SaaS address outside the network set's nets: allowed only through its domain
        Server("payments-api", "192.0.2.80", 443, domain="api.payments.example.com"),
        Server("orders-db", "10.0.20.5", 5432),
        Server("pkg-mirror", "10.0.30.5", 80),
        Server("kube-apiserver", "10.0.40.5", 6443),
        Server("kube-dns", pods[3].ip, 53, pod=pods[3].key),
    )
    return Cluster(namespaces, pods, servers, ("pod/prod/reports", {"app": "billing"}))


def load_examples(directory: Path = EXAMPLES_DIR, names: Iterable[str] = EXAMPLES) -> list[Any]:
    """The example policy objects, validated by `policy.load` (as `portcullis apply` does)."""
    objects: list[Any] = []
    for name in names:
        path = directory / name
        try:
            text = path.read_text()
        except OSError as exc:
            raise DemoError(f"cannot read the example policies {path}: {exc.strerror}") from None
        objects.extend(load(text, str(path)))
    return objects


def host_endpoint(objects: Iterable[Any]) -> HostEndpoint:
    """The example host endpoint on the demo's node (its interface and IP shape the node)."""
    for obj in objects:
        if isinstance(obj, HostEndpoint) and obj.node == NODE:
            if not obj.interface_name or not obj.expected_ips:
                raise DemoError(f"host endpoint {obj.name} needs interfaceName and expectedIPs")
            return obj
    raise DemoError(f"the examples declare no HostEndpoint on node {NODE!r}")


# --------------------------------------------------------------------------- Kubernetes objects


def namespace_object(ns: Namespace) -> dict[str, Any]:
    return {"metadata": {"name": ns.name, "labels": dict(ns.labels), "resourceVersion": "1"}}


def pod_object(
    pod: Pod, labels: Mapping[str, str] | None = None, version: int = 1
) -> dict[str, Any]:
    """The pod as the API server would show it, running on the demo's node."""
    return {
        "metadata": {
            "namespace": pod.namespace, "name": pod.name,
            "labels": dict(pod.labels if labels is None else labels),
            "resourceVersion": str(version),
        },
        "spec": {"nodeName": NODE, "serviceAccountName": "default"},
        "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]},
    }


# --------------------------------------------------------------------------- the world


def _contains(ip: str, nets: Iterable[str]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(
        addr.version == (n := ipaddress.ip_network(net, strict=False)).version and addr in n
        for net in nets
    )


@dataclass
class World:
    """The inputs as published (endpoints, profiles, policy objects), and their verdicts."""

    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)
    profiles: dict[str, ProfileRecord] = field(default_factory=dict)
    policies: dict[str, PolicyRecord] = field(default_factory=dict)
    objects: dict[str, PolicyObject] = field(default_factory=dict)

    def take(self, publications: Iterable[Any]) -> None:
        """Follow what is published (watcher `Publication`s), as the topics will hold it."""
        for pub in publications:
            tables: dict[str, dict[str, Any]] = {
                "endpoints": self.endpoints, "profiles": self.profiles,
                "policies": self.policies,
            }
            table = tables.get(pub.topic)
            if table is None:
                continue
            if pub.value is None:
                table.pop(pub.key, None)
            else:
                table[pub.key] = pub.value

    def add_objects(self, objects: Iterable[PolicyObject]) -> None:
        for obj in objects:
            self.objects[obj.key] = obj

    def labels_of(self, rec: EndpointRecord) -> dict[str, str]:
        """The labels selectors see, as the processor computes them."""
        from streams.membership import effective_labels

        ns = self.profiles.get(f"kns.{rec.namespace}") if rec.namespace else None
        return effective_labels(rec, ns.labels if ns else None, None)

    def arranged(self) -> list[pcompile.TierPolicies]:
        tiers = [o for o in self.objects.values() if isinstance(o, Tier)]
        policies = [o for o in self.objects.values() if isinstance(o, Policy)]
        return pcompile.arrange(tiers, policies)

    def applied(self, source_key: str, tier: str) -> list[str]:
        """The policies of `tier` that apply to an endpoint's egress, in order."""
        labels = self.labels_of(self.endpoints[source_key])
        for tier_policies in self.arranged():
            if tier_policies.tier.name != tier:
                continue
            return [
                p.name for p in tier_policies.policies
                if "Egress" in p.types and pverdict.compiled(p).applies_to.matches(labels)
            ]
        return []

    def why(self, source_key: str, server: Server) -> str:
        v = self.verdict(source_key, server)
        applied = self.applied(source_key, v.tier) if v.tier and v.policy is None else []
        return why(v, applied)

    def verdict(self, source_key: str, server: Server) -> pverdict.Verdict:
        """What policy decides for the first packet of a TCP connection to `server`."""
        src = self.endpoints[source_key]
        kind: pverdict.EndpointKind = "host" if src.kind == "hostendpoint" else "workload"
        endpoint = pverdict.Endpoint(kind, self.labels_of(src), src.ips[0] if src.ips else None)
        label_sets = tuple(
            self.labels_of(rec) for rec in self.endpoints.values()
            if rec.ips and _contains(server.ip, rec.ips)
        )
        # reached by name: network sets whose allowedEgressDomains cover it count too
        by_domain = tuple(
            network_set_labels(dict(o.labels), o.namespace)
            for o in self.objects.values()
            if server.domain and isinstance(o, NetworkSet)
            and any(domain_matches(p, server.domain) for p in o.allowed_egress_domains)
        )
        peer = pverdict.Peer(server.ip, label_sets, by_domain,
                             (server.domain,) if server.domain else ())
        packet = pverdict.Packet("TCP", peer, port=server.port)
        return pverdict.verdict(endpoint, self.arranged(), packet)


def sources(cluster: Cluster, hep: HostEndpoint) -> list[Source]:
    """Every pod that is not itself a server, then the node through its host endpoint."""
    server_pods = {s.pod for s in cluster.servers if s.pod}
    out = [
        Source(p.key, p.display, "pod", p.key) for p in cluster.pods if p.key not in server_pods
    ]
    out.append(Source(f"hostendpoint//{hep.name}", f"{NODE} (host)", "host", "node"))
    return out


def cases(cluster: Cluster, hep: HostEndpoint) -> list[Case]:
    """Pods to every server; the node only to the outside (its host endpoint is its uplink,
    and a host endpoint's policy governs only traffic through its interface)."""
    out: list[Case] = []
    for source in sources(cluster, hep):
        targets = (cluster.servers if source.kind == "pod" else
                   tuple(s for s in cluster.outside_servers if not s.domain))
        out.extend(Case(source, server) for server in targets)
    return out


def why(v: pverdict.Verdict, applied: Iterable[str] = ()) -> str:
    """tier / policy / rule, in words a reader of the YAML recognises.

    `applied` names the policies of the deciding tier that applied to the endpoint, for a
    tier that ends in its default Deny (which `policy.verdict` reports without a policy).
    """
    if v.policy is None:
        if v.tier is not None:
            names = ", ".join(applied)
            return (f"tier {v.tier}: no rule of {names or 'its policies'} matched; "
                    "the tier ends in Deny")
        return v.reason  # failsafe port, or no policy / every tier passed: the profile
    kind, namespace, name = v.policy.split("/", 2)
    where = f"{namespace}/{name}" if namespace else name
    rule = f"egress rule {v.rule_index}" if v.rule_index is not None else "default"
    return f"tier {v.tier} · {kind} {where} · {rule} ({'Allow' if v.allowed else 'Deny'})"
