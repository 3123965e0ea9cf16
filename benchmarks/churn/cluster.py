"""A seeded synthetic cluster and its churn, as the watchers would publish them. Pure.

The cluster is shaped like a real one so that selectors, tiers and set sizes stress the
pipeline the way production would:

- namespaces ``<team>-<environment>`` labelled ``team`` and ``environment`` (plus the
  system namespaces ``kube-system`` with kube-dns and ``monitoring`` with prometheus);
- apps per namespace, pods labelled ``app``, ``tier``, ``team``, ``environment``,
  ``version``, ``pod-template-hash`` and one service account per app;
- pods spread over N simulated nodes, each node with its own /22 pod CIDR; a deleted pod's
  IP goes back to its node's pool and is often the next one handed out, so IPs are reused
  across namespaces, as Calico IPAM does;
- global network sets of SaaS CIDRs (``role: saas-api``, ``vendor``) and a block list;
- one host endpoint per node (``role: k8s-worker``);
- a policy set: tiers ``security`` and ``platform`` (default action Pass) ahead of
  ``default``; per-namespace default-deny with DNS; Calico's global
  deny-all-except-kube-dns recipe; app-to-app and app-to-network-set allows; a few global
  policies (block list, quarantine, monitoring, host endpoints).

Every policy object is built as a Calico v3 document and validated through
`policy.load_document`, then turned into topic records by the watchers' own
`watchers.translate.policy_publications`, so the records are exactly what
`portcullis apply` would publish.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import policy
from topics.records import EndpointRecord, PolicyRecord, ProfileRecord, endpoint_key

__all__ = [
    "ChurnEvent",
    "ChurnGenerator",
    "Cluster",
    "ClusterSpec",
    "Pod",
    "build_cluster",
]

TEAMS = (
    "payments", "search", "identity", "checkout", "catalog", "ads", "mail", "ml",
    "infra", "growth", "risk", "media", "support", "maps", "billing", "data",
)
ENVIRONMENTS = ("prod", "staging", "dev")
TIERS = ("frontend", "backend", "db", "cache", "worker")
APP_WORDS = (
    "api", "web", "auth", "cart", "queue", "index", "render", "sync", "report", "feed",
    "notify", "ingest", "export", "session", "profile", "ledger", "pricing", "router",
)
VENDORS = (
    "stripe", "twilio", "sendgrid", "datadog", "github", "slack", "okta", "segment",
    "pagerduty", "sentry", "auth0", "algolia", "mapbox", "plaid", "zendesk", "intercom",
    "snowflake", "cloudflare", "fastly", "akamai", "salesforce", "hubspot", "mailgun",
    "newrelic",
)
SYSTEM_NAMESPACES = ("kube-system", "monitoring")
ACTOR = "bench"

#: A churn operation on one pod.
Op = Literal["create", "delete", "relabel"]


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """Sizes of the synthetic cluster; every figure is a parameter, the seed makes it reusable."""

    pods: int = 20_000
    nodes: int = 100
    policies: int = 500
    network_sets: int = 24
    cidrs_per_set: int = 20
    seed: int = 1
    pods_per_namespace: int = 200
    apps_per_namespace: int = 5

    def __post_init__(self) -> None:
        for name in ("pods", "nodes", "policies", "network_sets", "cidrs_per_set",
                     "pods_per_namespace", "apps_per_namespace"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClusterSpec.{name} must be at least 1")
        if self.nodes > 4096:
            raise ValueError("at most 4096 nodes (each gets a /22 of 10.0.0.0/8)")

    @property
    def namespaces(self) -> int:
        return max(2, -(-self.pods // self.pods_per_namespace))


@dataclass(frozen=True, slots=True)
class App:
    namespace: str
    name: str
    tier: str
    team: str
    environment: str

    @property
    def service_account(self) -> str:
        return f"sa-{self.name}"


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod as the generator tracks it (the record is built when it is published)."""

    namespace: str
    name: str
    node: str
    ip: str
    labels: tuple[tuple[str, str], ...]
    service_account: str

    @property
    def key(self) -> str:
        return endpoint_key("pod", self.namespace, self.name)

    def record(self, observed_at: float) -> EndpointRecord:
        from watchers.translate import veth_name

        return EndpointRecord(
            kind="pod", namespace=self.namespace, name=self.name, node=self.node,
            interface=veth_name(self.namespace, self.name), ips=(self.ip,),
            labels=dict(self.labels), service_account=self.service_account,
            source="kubernetes", observed_at=observed_at,
        )


@dataclass
class Cluster:
    """The initial state (profiles, policy and endpoint records) and what churn needs."""

    spec: ClusterSpec
    nodes: list[str]
    namespaces: dict[str, dict[str, str]]  # name -> labels
    apps: list[App]
    profiles: list[ProfileRecord]
    policy_objects: list[policy.PolicyObject]
    policy_records: list[PolicyRecord]
    endpoint_records: list[EndpointRecord]  # network sets and host endpoints
    pods: dict[str, Pod]  # endpoint key -> pod
    ipam: Ipam
    rng: random.Random
    counter: int = 0

    def summary(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for obj in self.policy_objects:
            kinds[obj.kind] = kinds.get(obj.kind, 0) + 1
        return {
            "seed": self.spec.seed,
            "nodes": len(self.nodes),
            "namespaces": len(self.namespaces),
            "apps": len(self.apps),
            "pods": len(self.pods),
            "policies": kinds.get("NetworkPolicy", 0) + kinds.get("GlobalNetworkPolicy", 0),
            "tiers": kinds.get("Tier", 0),
            "network_sets": kinds.get("GlobalNetworkSet", 0) + kinds.get("NetworkSet", 0),
            "host_endpoints": kinds.get("HostEndpoint", 0),
        }


@dataclass
class Ipam:
    """Per-node /22 pools; freed IPs go to the front of a reuse queue (Calico reuses quickly)."""

    pools: dict[str, list[str]] = field(default_factory=dict)  # never-used IPs, popped from end
    freed: dict[str, deque[str]] = field(default_factory=dict)

    @classmethod
    def for_nodes(cls, nodes: list[str]) -> Ipam:
        ipam = cls()
        base = int(ipaddress.ip_address("10.0.0.0"))
        for i, node in enumerate(nodes):
            net = ipaddress.ip_network((base + i * 1024, 22))
            hosts = [str(h) for h in net.hosts()]
            hosts.reverse()
            ipam.pools[node] = hosts
            ipam.freed[node] = deque()
        return ipam

    def allocate(self, node: str, rng: random.Random) -> str:
        freed = self.freed[node]
        if freed and (rng.random() < 0.7 or not self.pools[node]):
            return freed.popleft()
        if not self.pools[node]:
            raise RuntimeError(f"node {node} has no free pod IP left (its /22 is full)")
        return self.pools[node].pop()

    def release(self, node: str, ip: str) -> None:
        self.freed[node].append(ip)


# --------------------------------------------------------------------------- documents


def _doc(kind: str, name: str, spec: dict[str, Any], namespace: str | None = None,
         labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": meta, "spec": spec}


def _dns_rules() -> list[dict[str, Any]]:
    dest = {
        "selector": "k8s-app == 'kube-dns'",
        "namespaceSelector": "projectcalico.org/name == 'kube-system'",
        "ports": [53],
    }
    return [
        {"action": "Allow", "protocol": "UDP", "destination": dict(dest)},
        {"action": "Allow", "protocol": "TCP", "destination": dict(dest)},
    ]


def _saas_cidrs(rng: random.Random, index: int, count: int) -> list[str]:
    """CIDRs of one SaaS vendor, from 100.64.0.0/10 (never overlapping pod or host ranges)."""
    base = int(ipaddress.ip_address("100.64.0.0")) + index * (1 << 16)
    out: set[str] = set()
    while len(out) < count:
        prefix = rng.choice((24, 26, 28, 32))
        offset = rng.randrange(0, 1 << 16) & ~((1 << (32 - prefix)) - 1)
        out.add(str(ipaddress.ip_network((base + offset, prefix))))
    return sorted(out)


def growth_cidrs(count: int, start: int = 0) -> list[str]:
    """`count` distinct /32s from 198.18.0.0/15 (for growing a network set in the storm)."""
    base = int(ipaddress.ip_address("198.18.0.0"))
    if start + count > 1 << 17:
        raise ValueError("at most 131072 growth CIDRs")
    return [str(ipaddress.ip_address(base + start + i)) + "/32" for i in range(count)]


def storm_documents(cluster: Cluster, growth: int) -> list[tuple[str, dict[str, Any]]]:
    """The storm: a global policy selecting every pod, then a SaaS set grown by `growth`."""
    doc = _doc("GlobalNetworkPolicy", "security.storm-block", {
        "tier": "security", "order": 5, "namespaceSelector": "all()", "types": ["Egress"],
        "egress": [{"action": "Deny", "destination": {
            "selector": "role == 'blocklist'", "namespaceSelector": "global()"}},
            {"action": "Pass"}],
    })
    saas = next(o for o in cluster.policy_objects
                if o.kind == "GlobalNetworkSet" and o.name.startswith("saas-"))
    grown = saas.to_document()
    grown["spec"]["nets"] = [*grown["spec"].get("nets", []), *growth_cidrs(growth)]
    return [("global policy selecting every pod", doc),
            (f"network set {saas.name} + {growth} CIDRs", grown)]


def storm_records(
    obj: policy.PolicyObject, at: float
) -> tuple[PolicyRecord, EndpointRecord | None]:
    """The records `portcullis apply` publishes for a storm object, observed at `at`."""
    from watchers.translate import policy_publications

    pubs = policy_publications(obj, actor=ACTOR, applied_at=at, observed_at=at, source="apply")
    pol = next(p.value for p in pubs if isinstance(p.value, PolicyRecord))
    ep = next((p.value for p in pubs if isinstance(p.value, EndpointRecord)), None)
    return pol, ep


def _documents(spec: ClusterSpec, rng: random.Random, namespaces: dict[str, dict[str, str]],
               apps: list[App], nodes: list[str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        _doc("Tier", "security", {"order": 100, "defaultAction": "Pass"}),
        _doc("Tier", "platform", {"order": 200, "defaultAction": "Pass"}),
    ]
    vendors = [VENDORS[i % len(VENDORS)] + ("" if i < len(VENDORS) else f"-{i}")
               for i in range(spec.network_sets)]
    for i, vendor in enumerate(vendors):
        docs.append(_doc("GlobalNetworkSet", f"saas-{vendor}",
                         {"nets": _saas_cidrs(rng, i, spec.cidrs_per_set)},
                         labels={"role": "saas-api", "vendor": vendor}))
    docs.append(_doc("GlobalNetworkSet", "blocklist",
                     {"nets": _saas_cidrs(rng, 200, spec.cidrs_per_set)},
                     labels={"role": "blocklist"}))
    for i, node in enumerate(nodes):
        docs.append(_doc("HostEndpoint", f"{node}-eth0", {
            "node": node, "interfaceName": "eth0",
            "expectedIPs": [str(ipaddress.ip_address("192.168.0.0") + 10 + i)],
        }, labels={"role": "k8s-worker", "environment": "production", "node": node}))
    # --- global policies: the things a platform team writes once
    docs.append(_doc("GlobalNetworkPolicy", "security.blocklist", {
        "tier": "security", "order": 10, "selector": "all()", "types": ["Egress"],
        "egress": [{"action": "Deny", "destination": {
            "selector": "role == 'blocklist'", "namespaceSelector": "global()"}},
            {"action": "Pass"}],
    }))
    docs.append(_doc("GlobalNetworkPolicy", "security.quarantine", {
        "tier": "security", "order": 20, "selector": "quarantine == 'true'",
        "types": ["Egress"], "egress": [{"action": "Deny"}],
    }))
    docs.append(_doc("GlobalNetworkPolicy", "platform.monitoring", {
        "tier": "platform", "order": 10, "selector": "has(app)",
        "namespaceSelector": "environment == 'prod'", "types": ["Egress"],
        "egress": [{"action": "Allow", "protocol": "TCP", "destination": {
            "selector": "app == 'prometheus'",
            "namespaceSelector": "projectcalico.org/name == 'monitoring'",
            "ports": [9090, 9091]}}, {"action": "Pass"}],
    }))
    docs.append(_doc("GlobalNetworkPolicy", "platform.worker-egress", {
        "tier": "platform", "order": 20, "selector": "role == 'k8s-worker'", "types": ["Egress"],
        "egress": [
            {"action": "Allow", "protocol": "TCP",
             "destination": {"nets": ["10.0.0.0/8"], "ports": [443, 10250, "2379:2380"]}},
            {"action": "Allow", "protocol": "UDP", "destination": {"ports": [53, 123]}},
            {"action": "Allow", "destination": {
                "selector": "role == 'saas-api' && vendor == 'datadog'",
                "namespaceSelector": "global()"}},
            {"action": "Deny"}],
    }))
    docs.append(_doc("GlobalNetworkPolicy", "deny-app-policy", {
        "namespaceSelector": "has(projectcalico.org/name) && projectcalico.org/name not in "
                             "{'kube-system', 'monitoring'}",
        "types": ["Egress"], "egress": _dns_rules(),
    }))
    docs.append(_doc("GlobalNetworkPolicy", "allow-ntp", {
        "order": 500, "selector": "has(app)", "types": ["Egress"],
        "egress": [{"action": "Allow", "protocol": "UDP",
                    "destination": {"nets": ["192.0.2.0/24"], "ports": [123]}}],
    }))
    globals_count = 6
    # --- per namespace: default deny with DNS
    user_namespaces = [n for n in namespaces if n not in SYSTEM_NAMESPACES]
    for ns in user_namespaces:
        docs.append(_doc("NetworkPolicy", "default-deny", {
            "order": 1000, "selector": "all()", "types": ["Ingress", "Egress"],
            "egress": _dns_rules(),
        }, namespace=ns))
    # --- per app: allows to same-namespace peers, other teams' databases and SaaS sets
    budget = max(0, spec.policies - globals_count - len(user_namespaces))
    by_ns: dict[str, list[App]] = {}
    for app in apps:
        by_ns.setdefault(app.namespace, []).append(app)
    user_apps = [a for a in apps if a.namespace not in SYSTEM_NAMESPACES]
    for i in range(budget):
        app = user_apps[i % len(user_apps)]
        round_ = i // len(user_apps)
        peers = [a for a in by_ns[app.namespace] if a.name != app.name]
        egress: list[dict[str, Any]] = []
        if peers:
            peer = rng.choice(peers)
            egress.append({"action": "Allow", "protocol": "TCP", "destination": {
                "selector": f"app == '{peer.name}'", "ports": [8080, 8443]}})
        vendor = rng.choice(vendors)
        egress.append({"action": "Allow", "protocol": "TCP", "destination": {
            "selector": f"role == 'saas-api' && vendor == '{vendor}'",
            "namespaceSelector": "global()", "ports": [443]}})
        if rng.random() < 0.4:
            team = rng.choice(TEAMS)
            egress.append({"action": "Allow", "protocol": "TCP", "destination": {
                "selector": "tier == 'db'", "namespaceSelector": f"team == '{team}'",
                "ports": [5432]}})
        if rng.random() < 0.2:
            egress.append({"action": "Allow", "protocol": "TCP", "destination": {
                "selector": f"app == '{app.name}' && tier in {{'cache', 'db'}}",
                "ports": ["6379:6380"]}})
        docs.append(_doc("NetworkPolicy", f"{app.name}-egress-{round_}", {
            "order": 100 + round_, "selector": f"app == '{app.name}'", "types": ["Egress"],
            "egress": egress,
        }, namespace=app.namespace))
    return docs


# --------------------------------------------------------------------------- building


def _app_labels(app: App, rng: random.Random) -> tuple[tuple[str, str], ...]:
    labels = {
        "app": app.name, "tier": app.tier, "team": app.team,
        "environment": app.environment, "version": f"v{rng.randint(1, 9)}",
        "pod-template-hash": f"{rng.getrandbits(32):08x}",
    }
    if app.name == "kube-dns":
        labels = {"k8s-app": "kube-dns", "pod-template-hash": labels["pod-template-hash"]}
    return tuple(sorted(labels.items()))


def build_cluster(spec: ClusterSpec) -> Cluster:
    """The whole initial cluster for `spec` (deterministic in `spec.seed`)."""
    rng = random.Random(spec.seed)
    nodes = [f"node-{i:03d}" for i in range(spec.nodes)]
    namespaces: dict[str, dict[str, str]] = {
        "kube-system": {"kubernetes.io/metadata.name": "kube-system"},
        "monitoring": {"team": "infra", "environment": "prod"},
    }
    user = spec.namespaces
    for i in range(user):
        team = TEAMS[i % len(TEAMS)]
        env = ENVIRONMENTS[(i // len(TEAMS)) % len(ENVIRONMENTS)]
        suffix = i // (len(TEAMS) * len(ENVIRONMENTS))
        name = f"{team}-{env}" + (f"-{suffix}" if suffix else "")
        namespaces[name] = {"team": team, "environment": env,
                            "kubernetes.io/metadata.name": name}
    apps: list[App] = [
        App("kube-system", "kube-dns", "backend", "infra", "prod"),
        App("monitoring", "prometheus", "backend", "infra", "prod"),
    ]
    for ns, labels in namespaces.items():
        if ns in SYSTEM_NAMESPACES:
            continue
        words = rng.sample(APP_WORDS, min(spec.apps_per_namespace, len(APP_WORDS)))
        for j, word in enumerate(words):
            apps.append(App(ns, f"{labels['team']}-{word}", TIERS[j % len(TIERS)],
                            labels["team"], labels["environment"]))
    profiles: list[ProfileRecord] = []
    for ns, labels in namespaces.items():
        profiles.append(ProfileRecord("namespace", ns, None, labels, observed_at=1.0))
    for app in apps:
        profiles.append(ProfileRecord("serviceaccount", app.namespace, app.service_account,
                                      {"app": app.name}, observed_at=1.0))
    docs = _documents(spec, rng, namespaces, apps, nodes)
    objects = [policy.load_document(d, source=f"bench cluster doc {i}")
               for i, d in enumerate(docs)]
    from watchers.translate import policy_publications

    policy_records: list[PolicyRecord] = []
    endpoint_records: list[EndpointRecord] = []
    for obj in objects:
        for pub in policy_publications(obj, actor=ACTOR, applied_at=1.0, observed_at=1.0,
                                       source="apply"):
            if isinstance(pub.value, PolicyRecord):
                policy_records.append(pub.value)
            elif isinstance(pub.value, EndpointRecord):
                endpoint_records.append(pub.value)
    cluster = Cluster(spec, nodes, namespaces, apps, profiles, objects, policy_records,
                      endpoint_records, {}, Ipam.for_nodes(nodes), rng)
    # two kube-dns and two prometheus replicas, then the user pods
    for app in apps[:2]:
        for _ in range(2):
            pod = new_pod(cluster, app)
            cluster.pods[pod.key] = pod
    user_apps = [a for a in apps if a.namespace not in SYSTEM_NAMESPACES]
    while len(cluster.pods) < spec.pods:
        pod = new_pod(cluster, rng.choice(user_apps))
        cluster.pods[pod.key] = pod
    return cluster


def new_pod(cluster: Cluster, app: App) -> Pod:
    """A fresh pod of `app` on a random node, with an IP from that node's pool."""
    rng = cluster.rng
    cluster.counter += 1
    node = rng.choice(cluster.nodes)
    return Pod(app.namespace, f"{app.name}-{cluster.counter:06d}-{rng.getrandbits(20):05x}",
               node, cluster.ipam.allocate(node, rng), _app_labels(app, rng), app.service_account)


# --------------------------------------------------------------------------- churn


@dataclass(frozen=True, slots=True)
class ChurnEvent:
    """One pod change: `pod` is the new state (None for a delete)."""

    op: Op
    key: str
    namespace: str
    pod: Pod | None
    node: str

    def record(self, observed_at: float) -> EndpointRecord | None:
        return None if self.pod is None else self.pod.record(observed_at)


class ChurnGenerator:
    """Pod creates, deletes and relabels that keep the pod count about steady.

    Relabels change what selectors see: a pod is quarantined or released (a global
    security policy selects it), moves to another app of its namespace (other app
    policies and peer sets), or changes tier (the database peer sets).
    """

    def __init__(self, cluster: Cluster, *, relabel_share: float = 0.2) -> None:
        self.cluster = cluster
        self.rng = random.Random(cluster.spec.seed * 7919 + 17)
        self.relabel_share = relabel_share
        self.keys = [k for k, p in cluster.pods.items() if p.namespace not in SYSTEM_NAMESPACES]
        self.positions = {k: i for i, k in enumerate(self.keys)}
        self.user_apps = [a for a in cluster.apps if a.namespace not in SYSTEM_NAMESPACES]
        self.apps_by_ns: dict[str, list[App]] = {}
        for app in self.user_apps:
            self.apps_by_ns.setdefault(app.namespace, []).append(app)
        self.target = len(self.keys)

    def _remove_key(self, key: str) -> None:
        i = self.positions.pop(key)
        last = self.keys.pop()
        if last != key:
            self.keys[i] = last
            self.positions[last] = i

    def _add_key(self, key: str) -> None:
        self.positions[key] = len(self.keys)
        self.keys.append(key)

    def next(self) -> ChurnEvent:
        rng = self.rng
        cluster = self.cluster
        roll = rng.random()
        if roll < self.relabel_share and self.keys:
            key = rng.choice(self.keys)
            pod = cluster.pods[key]
            labels = dict(pod.labels)
            what = rng.random()
            if what < 0.4:
                if labels.get("quarantine") == "true":
                    del labels["quarantine"]
                else:
                    labels["quarantine"] = "true"
            elif what < 0.7:
                app = rng.choice(self.apps_by_ns[pod.namespace])
                labels.update(app=app.name, tier=app.tier)
            else:
                labels["tier"] = rng.choice(TIERS)
            labels["version"] = f"v{rng.randint(1, 9)}"
            new = dataclasses.replace(pod, labels=tuple(sorted(labels.items())))
            cluster.pods[key] = new
            return ChurnEvent("relabel", key, pod.namespace, new, pod.node)
        grow = len(self.keys) < self.target or (len(self.keys) == self.target and roll < 0.6)
        if grow or not self.keys:
            app = rng.choice(self.user_apps)
            pod = new_pod(cluster, app)
            cluster.pods[pod.key] = pod
            self._add_key(pod.key)
            return ChurnEvent("create", pod.key, pod.namespace, pod, pod.node)
        key = rng.choice(self.keys)
        pod = cluster.pods.pop(key)
        self._remove_key(key)
        cluster.ipam.release(pod.node, pod.ip)
        return ChurnEvent("delete", key, pod.namespace, None, pod.node)

    def stream(self, count: int) -> Iterator[ChurnEvent]:
        for _ in range(count):
            yield self.next()


def schedule(rate_per_minute: float, count: int) -> list[float]:
    """Offsets (seconds from the phase start) at which `count` events are due at this rate."""
    if rate_per_minute <= 0:
        raise ValueError("the churn rate must be positive")
    step = 60.0 / rate_per_minute
    return [i * step for i in range(count)]
