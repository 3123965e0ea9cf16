"""The policy model: typed, immutable objects mirroring Calico's v3 resources.

Every object is a frozen, slotted dataclass made only of strings, numbers,
tuples and other model objects, so it is hashable, safe to share between
tasks, and compares by value. ``to_document()`` writes the Calico v3 document
back, so records can carry documents and ``load(dump(obj)) == obj`` holds.

Selectors are kept as the text the user wrote (validated at load time);
``policy.compile`` turns them into effective, namespace-scoped selectors.
Validation lives in ``policy.load``: constructing these classes directly
does not validate, so build them through ``load``/``load_document`` when the
input is not trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

API_VERSION = "projectcalico.org/v3"
"""The apiVersion ``to_document()`` writes (``policy.portcullis.io/v1`` is read as an alias)."""

Action: TypeAlias = Literal["Allow", "Deny", "Pass", "Log"]
PolicyType: TypeAlias = Literal["Ingress", "Egress"]
PolicyKind: TypeAlias = Literal["NetworkPolicy", "GlobalNetworkPolicy"]
NetworkSetKind: TypeAlias = Literal["NetworkSet", "GlobalNetworkSet"]
TierAction: TypeAlias = Literal["Deny", "Pass"]
Protocol: TypeAlias = str | int
"""A protocol name in Calico's spelling (``TCP``, ``UDP``, ``ICMP``, ``ICMPv6``, ``SCTP``,
``UDPLite``) or an IP protocol number 1-255."""

Labels: TypeAlias = tuple[tuple[str, str], ...]
"""Labels as (key, value) pairs sorted by key: hashable, and equal when the mappings are."""

DEFAULT_TIER_NAME = "default"
DEFAULT_TIER_ORDER = 1_000_000.0
"""Calico gives the implicit ``default`` tier order 1,000,000 (tiers after it need more)."""
KUBERNETES_POLICY_ORDER = 1000.0
"""The order Calico gives a translated Kubernetes NetworkPolicy."""


def labels_from(mapping: Mapping[str, str] | None) -> Labels:
    """Freeze a label mapping into the sorted pair form the model stores."""
    return tuple(sorted((mapping or {}).items()))


def _number(value: float) -> int | float:
    """Write integral floats as ints, as a person would have written them."""
    return int(value) if float(value).is_integer() else value


def _metadata(name: str, namespace: str | None, labels: Labels = ()) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    return meta


@dataclass(frozen=True, slots=True)
class Port:
    """One entry of ``ports``/``notPorts``: a single port, an inclusive range, or a named port."""

    first: int = 0
    last: int = 0
    name: str | None = None

    @property
    def is_named(self) -> bool:
        return self.name is not None

    def contains(self, port: int) -> bool:
        """Whether a numeric port is in this range (named ports never contain a number)."""
        return self.name is None and self.first <= port <= self.last

    def to_document(self) -> int | str:
        if self.name is not None:
            return self.name
        if self.first == self.last:
            return self.first
        return f"{self.first}:{self.last}"

    @staticmethod
    def single(port: int) -> Port:
        return Port(port, port)

    @staticmethod
    def range(first: int, last: int) -> Port:
        return Port(first, last)

    @staticmethod
    def named(name: str) -> Port:
        return Port(0, 0, name)


@dataclass(frozen=True, slots=True)
class ICMPMatch:
    """Calico's ``icmp``/``notICMP``: an ICMP type and optionally a code."""

    type: int | None = None
    code: int | None = None

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.type is not None:
            doc["type"] = self.type
        if self.code is not None:
            doc["code"] = self.code
        return doc


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    """``serviceAccounts``: service-account names and/or a selector over their labels."""

    names: tuple[str, ...] = ()
    selector: str = ""

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.names:
            doc["names"] = list(self.names)
        if self.selector:
            doc["selector"] = self.selector
        return doc


@dataclass(frozen=True, slots=True)
class ServiceMatch:
    """``services``: a Kubernetes Service by name (and namespace for global policies)."""

    name: str
    namespace: str | None = None

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name}
        if self.namespace is not None:
            doc["namespace"] = self.namespace
        return doc


@dataclass(frozen=True, slots=True)
class EntityRule:
    """A rule's ``source`` or ``destination``: all present fields must match (AND)."""

    nets: tuple[str, ...] = ()
    not_nets: tuple[str, ...] = ()
    selector: str | None = None
    not_selector: str | None = None
    namespace_selector: str | None = None
    ports: tuple[Port, ...] = ()
    not_ports: tuple[Port, ...] = ()
    service_accounts: ServiceAccountMatch | None = None
    services: ServiceMatch | None = None
    domains: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return self == EntityRule()

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.nets:
            doc["nets"] = list(self.nets)
        if self.not_nets:
            doc["notNets"] = list(self.not_nets)
        if self.selector is not None:
            doc["selector"] = self.selector
        if self.not_selector is not None:
            doc["notSelector"] = self.not_selector
        if self.namespace_selector is not None:
            doc["namespaceSelector"] = self.namespace_selector
        if self.ports:
            doc["ports"] = [p.to_document() for p in self.ports]
        if self.not_ports:
            doc["notPorts"] = [p.to_document() for p in self.not_ports]
        if self.service_accounts is not None:
            doc["serviceAccounts"] = self.service_accounts.to_document()
        if self.services is not None:
            doc["services"] = self.services.to_document()
        if self.domains:
            doc["domains"] = list(self.domains)
        return doc


@dataclass(frozen=True, slots=True)
class Rule:
    """One ingress or egress rule; every present match must hold for the action to apply."""

    action: Action
    protocol: Protocol | None = None
    not_protocol: Protocol | None = None
    icmp: ICMPMatch | None = None
    not_icmp: ICMPMatch | None = None
    ip_version: Literal[4, 6] | None = None
    source: EntityRule = EntityRule()
    destination: EntityRule = EntityRule()
    annotations: Labels = ()

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"action": self.action}
        if self.annotations:
            doc["metadata"] = {"annotations": dict(self.annotations)}
        if self.protocol is not None:
            doc["protocol"] = self.protocol
        if self.not_protocol is not None:
            doc["notProtocol"] = self.not_protocol
        if self.icmp is not None:
            doc["icmp"] = self.icmp.to_document()
        if self.not_icmp is not None:
            doc["notICMP"] = self.not_icmp.to_document()
        if self.ip_version is not None:
            doc["ipVersion"] = self.ip_version
        if not self.source.is_empty:
            doc["source"] = self.source.to_document()
        if not self.destination.is_empty:
            doc["destination"] = self.destination.to_document()
        return doc


@dataclass(frozen=True, slots=True)
class Policy:
    """A Calico NetworkPolicy (namespaced) or GlobalNetworkPolicy (``namespace is None``).

    Kubernetes NetworkPolicies are translated into this class too (``policy.kubernetes``),
    named ``knp.default.<name>`` in the ``default`` tier, as Calico does.
    """

    kind: PolicyKind
    name: str
    namespace: str | None = None
    tier: str = DEFAULT_TIER_NAME
    order: float | None = None
    selector: str = ""
    namespace_selector: str = ""
    service_account_selector: str = ""
    types: tuple[PolicyType, ...] = ("Ingress",)
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    apply_on_forward: bool = False
    labels: Labels = ()

    @property
    def key(self) -> str:
        """``kind/namespace/name`` (``kind//name`` for global objects), the topic key."""
        return f"{self.kind}/{self.namespace or ''}/{self.name}"

    @property
    def is_global(self) -> bool:
        return self.namespace is None

    def rules(self, direction: PolicyType) -> tuple[Rule, ...]:
        """The rules for a direction, empty when the policy's types exclude it."""
        if direction not in self.types:
            return ()
        return self.ingress if direction == "Ingress" else self.egress

    def to_document(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"tier": self.tier}
        if self.order is not None:
            spec["order"] = _number(self.order)
        spec["selector"] = self.selector
        if self.namespace_selector:
            spec["namespaceSelector"] = self.namespace_selector
        if self.service_account_selector:
            spec["serviceAccountSelector"] = self.service_account_selector
        spec["types"] = list(self.types)
        if self.ingress:
            spec["ingress"] = [r.to_document() for r in self.ingress]
        if self.egress:
            spec["egress"] = [r.to_document() for r in self.egress]
        if self.apply_on_forward:
            spec["applyOnForward"] = True
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": _metadata(self.name, self.namespace, self.labels),
            "spec": spec,
        }


@dataclass(frozen=True, slots=True)
class NetworkSet:
    """A NetworkSet (namespaced) or GlobalNetworkSet: a labelled member whose IPs are CIDRs."""

    kind: NetworkSetKind
    name: str
    namespace: str | None = None
    labels: Labels = ()
    nets: tuple[str, ...] = ()
    allowed_egress_domains: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace or ''}/{self.name}"

    def to_document(self) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if self.nets:
            spec["nets"] = list(self.nets)
        if self.allowed_egress_domains:
            spec["allowedEgressDomains"] = list(self.allowed_egress_domains)
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": _metadata(self.name, self.namespace, self.labels),
            "spec": spec,
        }


@dataclass(frozen=True, slots=True)
class EndpointPort:
    """A named port on a host endpoint, so rules can refer to it by name."""

    name: str
    protocol: str
    port: int

    def to_document(self) -> dict[str, Any]:
        return {"name": self.name, "protocol": self.protocol, "port": self.port}


DEFAULT_ALLOW_PROFILE = "projectcalico-default-allow"
"""Calico's built-in profile: allow what no policy decides (automatic host endpoints have it)."""


@dataclass(frozen=True, slots=True)
class HostEndpoint:
    """A host interface (or ``*`` for all of a node's interfaces) that policies can select.

    After the last tier a host endpoint denies, unless ``profiles`` holds
    ``DEFAULT_ALLOW_PROFILE``."""

    name: str
    node: str
    interface_name: str = ""
    expected_ips: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    labels: Labels = ()
    ports: tuple[EndpointPort, ...] = ()

    kind: Literal["HostEndpoint"] = "HostEndpoint"
    namespace: None = None

    @property
    def key(self) -> str:
        return f"{self.kind}//{self.name}"

    def to_document(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"node": self.node}
        if self.interface_name:
            spec["interfaceName"] = self.interface_name
        if self.expected_ips:
            spec["expectedIPs"] = list(self.expected_ips)
        if self.profiles:
            spec["profiles"] = list(self.profiles)
        if self.ports:
            spec["ports"] = [p.to_document() for p in self.ports]
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": _metadata(self.name, None, self.labels),
            "spec": spec,
        }


@dataclass(frozen=True, slots=True)
class Tier:
    """A policy tier: evaluated in ``order``; ``default_action`` applies at the tier's end."""

    name: str
    order: float | None = None
    default_action: TierAction = "Deny"
    labels: Labels = ()

    kind: Literal["Tier"] = "Tier"
    namespace: None = None

    @property
    def key(self) -> str:
        return f"{self.kind}//{self.name}"

    def to_document(self) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if self.order is not None:
            spec["order"] = _number(self.order)
        spec["defaultAction"] = self.default_action
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": _metadata(self.name, None, self.labels),
            "spec": spec,
        }


DEFAULT_TIER = Tier(name=DEFAULT_TIER_NAME, order=DEFAULT_TIER_ORDER, default_action="Deny")
"""The tier every policy without ``tier`` belongs to; exists even when never loaded."""

StagedKind: TypeAlias = Literal[
    "StagedNetworkPolicy", "StagedGlobalNetworkPolicy", "StagedKubernetesNetworkPolicy"
]
StagedAction: TypeAlias = Literal["Set", "Delete"]
STAGED_TARGET_KIND: Mapping[str, PolicyKind] = {
    "StagedNetworkPolicy": "NetworkPolicy",
    "StagedGlobalNetworkPolicy": "GlobalNetworkPolicy",
    "StagedKubernetesNetworkPolicy": "NetworkPolicy",
}


@dataclass(frozen=True, slots=True)
class StagedPolicy:
    """A Calico staged policy: accepted and shown, never enforced.

    ``action`` Set would put ``policy`` in place of the enforced policy of the same name
    (``target_key``), or add it; Delete would remove that policy. A
    StagedKubernetesNetworkPolicy's ``policy`` is the translation of its Kubernetes spec
    (named ``knp.default.<name>``, as the enforced one would be). ``spec`` is the staged
    document's spec as JSON text (kept as written for Kubernetes specs), so the object
    stays hashable and ``to_document`` gives the document back.
    """

    kind: StagedKind
    name: str
    namespace: str | None
    action: StagedAction
    policy: Policy | None
    spec: str
    labels: Labels = ()

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace or ''}/{self.name}"

    @property
    def target_key(self) -> str:
        """The key of the enforced policy this one would set or delete."""
        name = self.name
        if self.kind == "StagedKubernetesNetworkPolicy":
            name = "knp.default." + name
        return f"{STAGED_TARGET_KIND[self.kind]}/{self.namespace or ''}/{name}"

    def to_document(self) -> dict[str, Any]:
        import json

        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": _metadata(self.name, self.namespace, self.labels),
            "spec": json.loads(self.spec),
        }


PolicyObject: TypeAlias = Policy | NetworkSet | HostEndpoint | Tier | StagedPolicy
"""Everything ``policy.load`` can return."""
