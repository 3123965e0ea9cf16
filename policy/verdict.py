"""The one definition of what a policy set decides for a packet.

Streams, enforcers, tests and ``portcullis explain`` all ask this function, so "what
should happen" is written once, as Felix's chains behave:

1. Host endpoints first accept Calico's failsafe ports (before any policy, so a bad policy
   cannot lock operators out of a node).
2. Tiers in order (``compile.arrange``); within a tier, the policies that apply to the
   endpoint (applies-to selector matches and ``types`` includes the direction) in order;
   within a policy, rules in order: ``Allow`` accepts, ``Deny`` drops, ``Pass`` skips the
   rest of the tier, ``Log`` carries on.
3. A tier in which at least one policy applied but no rule decided ends with the tier's
   default action: ``Deny`` drops, ``Pass`` goes on to the next tier. Tiers with no
   applicable policy are skipped.
4. After the last tier (or with no policy at all) the endpoint's profile decides: Kubernetes
   pods' namespace profiles allow; host endpoints have none and are denied (pass
   ``default_action="allow"`` for an endpoint with Calico's default-allow profile).

Connection tracking (established/related) is not modelled: this is the decision for the
first packet of a connection.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from policy.compile import CompiledEntity, CompiledPolicy, TierPolicies, policy_selectors
from policy.domains import matches as domain_matches
from policy.labels import network_set_labels
from policy.model import (
    EndpointPort,
    EntityRule,
    NetworkSet,
    Policy,
    PolicyType,
    Port,
    Protocol,
    Rule,
)

EndpointKind = Literal["workload", "host"]
Decision = Literal["allow", "deny"]

PROTOCOL_NUMBERS: dict[str, int] = {
    "TCP": 6,
    "UDP": 17,
    "ICMP": 1,
    "ICMPV6": 58,
    "SCTP": 132,
    "UDPLITE": 136,
}

FAILSAFE_INBOUND: tuple[tuple[str, int], ...] = (
    ("TCP", 22),
    ("UDP", 68),
    ("TCP", 179),
    ("TCP", 2379),
    ("TCP", 2380),
    ("TCP", 5473),
    ("TCP", 6443),
    ("TCP", 6666),
    ("TCP", 6667),
)
"""Felix's default ``FailsafeInboundHostPorts``."""

FAILSAFE_OUTBOUND: tuple[tuple[str, int], ...] = (
    ("UDP", 53),
    ("UDP", 67),
    ("TCP", 179),
    ("TCP", 2379),
    ("TCP", 2380),
    ("TCP", 5473),
    ("TCP", 6443),
    ("TCP", 6666),
    ("TCP", 6667),
)
"""Felix's default ``FailsafeOutboundHostPorts``."""


def protocol_number(protocol: Protocol) -> int:
    """IP protocol number for a Calico protocol name (any case) or number."""
    if isinstance(protocol, int):
        return protocol
    try:
        return PROTOCOL_NUMBERS[protocol.upper()]
    except KeyError:
        raise ValueError(f"unknown protocol {protocol!r}") from None


@dataclass(frozen=True, slots=True)
class Peer:
    """One side of a packet as policy sees it.

    ``label_sets`` are the labels of every endpoint and network set that holds ``ip`` (a
    selector matches the peer when it matches any of them, as an IP set would).
    ``domain_label_sets`` are the labels of network sets that match only through their
    ``allowedEgressDomains`` (they count for egress Allow rules only, as in Calico).
    ``domains`` are the names the IP was resolved from; ``named_ports`` the peer's named
    ports; ``services`` the ``namespace/name`` of Services the peer backs.
    """

    ip: str | None = None
    label_sets: tuple[Mapping[str, str], ...] = ()
    domain_label_sets: tuple[Mapping[str, str], ...] = ()
    domains: tuple[str, ...] = ()
    named_ports: tuple[EndpointPort, ...] = ()
    services: frozenset[str] = frozenset()


def peer_of(
    ip: str | None,
    *,
    labels: Iterable[Mapping[str, str]] = (),
    network_sets: Iterable[NetworkSet] = (),
    domains: Iterable[str] = (),
    namespace_labels: Mapping[str, Mapping[str, str]] | None = None,
    named_ports: tuple[EndpointPort, ...] = (),
    services: frozenset[str] = frozenset(),
) -> Peer:
    """A Peer whose label sets come from the endpoints holding ``ip`` (``labels``, already
    built with ``policy.labels``) and from the network sets that contain it, by CIDR or,
    for egress Allow rules only, by one of ``domains`` matching ``allowedEgressDomains``.

    ``namespace_labels`` maps namespace name to its labels, for namespaced sets' ``pcns.``
    inheritance.
    """
    names = tuple(domains)
    by_ip: list[Mapping[str, str]] = list(labels)
    by_domain: list[Mapping[str, str]] = []
    for network_set in network_sets:
        inherited = (namespace_labels or {}).get(network_set.namespace or "")
        set_labels = network_set_labels(dict(network_set.labels), network_set.namespace, inherited)
        if ip is not None and _in_nets(ip, network_set.nets):
            by_ip.append(set_labels)
        elif any(
            domain_matches(pattern, name)
            for pattern in network_set.allowed_egress_domains
            for name in names
        ):
            by_domain.append(set_labels)
    return Peer(
        ip=ip,
        label_sets=tuple(by_ip),
        domain_label_sets=tuple(by_domain),
        domains=names,
        named_ports=named_ports,
        services=services,
    )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The endpoint policy is enforced for (a pod, or a host interface)."""

    kind: EndpointKind
    labels: Mapping[str, str]
    ip: str | None = None
    named_ports: tuple[EndpointPort, ...] = ()
    services: frozenset[str] = frozenset()

    def as_peer(self) -> Peer:
        return Peer(
            ip=self.ip,
            label_sets=(self.labels,),
            named_ports=self.named_ports,
            services=self.services,
        )


@dataclass(frozen=True, slots=True)
class Packet:
    """The first packet of a connection, seen from the endpoint.

    ``remote`` is the destination for egress and the source for ingress; ``port`` is the
    destination port and ``source_port`` the source port.
    """

    protocol: Protocol
    remote: Peer = field(default_factory=Peer)
    port: int | None = None
    source_port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What happens to the packet, and what decided it."""

    action: Decision
    tier: str | None
    policy: str | None
    rule_index: int | None
    reason: str

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


@functools.lru_cache(maxsize=4096)
def compiled(policy: Policy) -> CompiledPolicy:
    """Compiled form of a policy, cached (policies are immutable and hashable)."""
    return policy_selectors(policy)


def verdict(
    endpoint: Endpoint,
    tiers: Sequence[TierPolicies],
    packet: Packet,
    direction: PolicyType = "Egress",
    *,
    default_action: Decision | None = None,
    failsafe: Iterable[tuple[str, int]] | None = None,
) -> Verdict:
    """Decide one packet for one endpoint; see the module docstring for the order of play.

    ``tiers`` may hold every policy (those that do not apply to the endpoint are skipped).
    ``default_action`` is what the endpoint's profile does after the last tier (default:
    allow for workloads, deny for host endpoints). ``failsafe`` overrides the host
    endpoint failsafe (protocol, port) list for the direction.
    """
    if endpoint.kind == "host":
        ports = failsafe
        if ports is None:
            ports = FAILSAFE_OUTBOUND if direction == "Egress" else FAILSAFE_INBOUND
        if packet.port is not None:
            number = protocol_number(packet.protocol)
            for proto, port in ports:
                if protocol_number(proto) == number and port == packet.port:
                    return Verdict(
                        "allow", None, None, None, f"failsafe {proto.lower()}:{port} (host)"
                    )

    local = endpoint.as_peer()
    source, destination = (
        (local, packet.remote)
        if direction == "Egress"
        else (
            packet.remote,
            local,
        )
    )
    any_policy = False
    for tier_policies in tiers:
        tier = tier_policies.tier
        applied = False
        passed = False
        for policy in tier_policies.policies:
            compiled_policy = compiled(policy)
            if not compiled_policy.applies_in(direction):
                continue
            if not compiled_policy.applies_to.matches(endpoint.labels):
                continue
            applied = any_policy = True
            for crule in compiled_policy.rules(direction):
                if not _rule_matches(
                    crule.rule,
                    crule.source,
                    crule.destination,
                    policy,
                    packet,
                    source,
                    destination,
                    direction,
                ):
                    continue
                action = crule.rule.action
                if action == "Log":
                    continue
                where = f"{direction.lower()} rule {crule.index} of {policy.key}"
                if action == "Allow":
                    return Verdict("allow", tier.name, policy.key, crule.index, f"Allow {where}")
                if action == "Deny":
                    return Verdict("deny", tier.name, policy.key, crule.index, f"Deny {where}")
                passed = True  # Pass: on to the next tier
                break
            if passed:
                break
        if applied and not passed and tier.default_action == "Deny":
            return Verdict(
                "deny",
                tier.name,
                None,
                None,
                f"no rule matched in tier {tier.name!r}, whose default action is Deny",
            )

    final = default_action or ("allow" if endpoint.kind == "workload" else "deny")
    if not any_policy:
        reason = f"no policy applies to this {endpoint.kind} endpoint; default {final}"
    else:
        reason = f"every applicable tier passed; the endpoint's profile says {final}"
    return Verdict(final, None, None, None, reason)


def _rule_matches(
    rule: Rule,
    source_sel: CompiledEntity,
    destination_sel: CompiledEntity,
    policy: Policy,
    packet: Packet,
    source: Peer,
    destination: Peer,
    direction: PolicyType,
) -> bool:
    number = protocol_number(packet.protocol)
    if rule.protocol is not None and protocol_number(rule.protocol) != number:
        return False
    if rule.not_protocol is not None and protocol_number(rule.not_protocol) == number:
        return False
    if rule.icmp is not None and not _icmp_matches(rule.icmp.type, rule.icmp.code, packet):
        return False
    if rule.not_icmp is not None and _icmp_matches(rule.not_icmp.type, rule.not_icmp.code, packet):
        return False
    if rule.ip_version is not None:
        ip = destination.ip or source.ip
        if ip is None or ipaddress.ip_address(ip).version != rule.ip_version:
            return False
    domain_sets = direction == "Egress" and rule.action == "Allow"
    return _side_matches(
        rule.source, source_sel, source, packet.source_port, number, policy, False
    ) and _side_matches(
        rule.destination, destination_sel, destination, packet.port, number, policy, domain_sets
    )


def _icmp_matches(icmp_type: int | None, icmp_code: int | None, packet: Packet) -> bool:
    if icmp_type is not None and packet.icmp_type != icmp_type:
        return False
    return icmp_code is None or packet.icmp_code == icmp_code


def _side_matches(
    entity: EntityRule,
    compiled_side: CompiledEntity,
    peer: Peer,
    port: int | None,
    protocol: int,
    policy: Policy,
    with_domain_sets: bool,
) -> bool:
    if entity.nets and not _in_nets(peer.ip, entity.nets):
        return False
    if entity.not_nets and _in_nets(peer.ip, entity.not_nets):
        return False
    label_sets: tuple[Mapping[str, str], ...] = peer.label_sets
    if with_domain_sets:
        label_sets = label_sets + peer.domain_label_sets
    selector = compiled_side.selector
    if selector is not None and not any(selector.matches(ls) for ls in label_sets):
        return False
    not_selector = compiled_side.not_selector
    if not_selector is not None and any(not_selector.matches(ls) for ls in peer.label_sets):
        return False
    if entity.ports and not _port_matches(entity.ports, port, protocol, peer):
        return False
    if entity.not_ports and _port_matches(entity.not_ports, port, protocol, peer):
        return False
    if entity.domains and not any(
        domain_matches(pattern, name) for pattern in entity.domains for name in peer.domains
    ):
        return False
    if entity.services is not None:
        namespace = entity.services.namespace or policy.namespace or ""
        if f"{namespace}/{entity.services.name}" not in peer.services:
            return False
    return True


def _in_nets(ip: str | None, nets: Sequence[str]) -> bool:
    if ip is None:
        return False
    address = ipaddress.ip_address(ip)
    return any(
        address.version == (network := ipaddress.ip_network(net)).version and address in network
        for net in nets
    )


def _port_matches(ports: Sequence[Port], port: int | None, protocol: int, peer: Peer) -> bool:
    if port is None:
        return False
    for entry in ports:
        if entry.name is None:
            if entry.first <= port <= entry.last:
                return True
        elif any(
            named.name == entry.name
            and named.port == port
            and protocol_number(named.protocol) == protocol
            for named in peer.named_ports
        ):
            return True
    return False
