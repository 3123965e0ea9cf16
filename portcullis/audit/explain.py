"""Why a connection is allowed or denied: `policy.verdict` over the state the topics hold.

Pure: an `AuditState` (now, or replayed to a time) becomes a `World` of policy objects
and endpoints with their effective labels; `World.explain` resolves a source endpoint by
name and a destination (IP, endpoint, or a domain name from a network set) and asks the
one definition of policy. ``staged=True`` answers for the policy set as it would be with
every staged policy applied (Set replaces or adds its policy, Delete removes it).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from policy import compile as pcompile
from policy import verdict as pverdict
from policy.domains import matches as domain_matches
from policy.load import PolicyError, load_document
from policy.model import NetworkSet, Policy, PolicyObject, StagedPolicy, Tier
from portcullis.audit.history import AuditState
from streams.membership import effective_labels
from topics.records import DEFAULT_ALLOW_PROFILE, EndpointRecord, profile_key

#: Endpoint kinds policy is enforced for (network sets are only ever peers).
ENFORCED_KINDS = ("pod", "hostendpoint", "vm")
_PORT_RE = re.compile(r"^(?P<port>\d{1,5})(?:/(?P<proto>[A-Za-z0-9]+))?$")


class ExplainError(ValueError):
    """The source or destination cannot be resolved: the message says why."""


@dataclass(frozen=True, slots=True)
class Destination:
    """Where the first packet goes: an address and/or a name, a port and a protocol."""

    text: str
    ip: str | None
    domain: str | None
    endpoint: str | None  # endpoint key, when the destination was named as one
    port: int | None
    protocol: str


@dataclass(frozen=True, slots=True)
class Explanation:
    source: EndpointRecord
    destination: Destination
    verdict: pverdict.Verdict
    applied: tuple[str, ...]  # policies of the deciding tier that applied (tier default Deny)
    staged: bool

    @property
    def decided_by(self) -> str:
        """tier · policy · rule, in words a reader of the YAML recognises."""
        v = self.verdict
        if v.policy is None:
            if v.tier is not None:
                names = ", ".join(self.applied) or "its policies"
                return f"tier {v.tier} · no rule of {names} matched · tier default Deny"
            return v.reason
        return f"tier {v.tier} · {v.policy} · egress rule {v.rule_index} ({v.action})"


@dataclass
class World:
    """Policy objects and endpoints as of one state, ready for `policy.verdict`."""

    state: AuditState
    objects: dict[str, PolicyObject] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, state: AuditState) -> World:
        world = cls(state)
        for key, record in sorted(state.policies.items()):
            try:
                world.objects[key] = load_document(record.document, f"policies {key}")
            except PolicyError as exc:
                world.problems.append(f"{key}: {exc}")
        return world

    # -- policy sets ------------------------------------------------------------------------

    def enforced(self) -> dict[str, PolicyObject]:
        return {k: o for k, o in self.objects.items() if not isinstance(o, StagedPolicy)}

    def staged(self) -> list[StagedPolicy]:
        return [o for o in self.objects.values() if isinstance(o, StagedPolicy)]

    def previewed(self) -> dict[str, PolicyObject]:
        """The enforced objects with every staged policy applied."""
        out = self.enforced()
        for staged in self.staged():
            out.pop(staged.target_key, None)
            if staged.action == "Set" and staged.policy is not None:
                out[staged.target_key] = staged.policy
        return out

    def arranged(self, staged: bool = False) -> list[pcompile.TierPolicies]:
        objects = (self.previewed() if staged else self.enforced()).values()
        tiers = [o for o in objects if isinstance(o, Tier)]
        return pcompile.arrange(tiers, [o for o in objects if isinstance(o, Policy)])

    # -- endpoints --------------------------------------------------------------------------

    def labels_of(self, rec: EndpointRecord) -> dict[str, str]:
        profiles = self.state.profiles
        ns = profiles.get(profile_key(rec.namespace)) if rec.namespace else None
        sa = (profiles.get(profile_key(rec.namespace, rec.service_account))
              if rec.namespace and rec.service_account else None)
        return effective_labels(rec, ns.labels if ns else None, sa.labels if sa else None)

    def find_endpoint(self, text: str, namespace: str | None = None,
                      kinds: Iterable[str] = ENFORCED_KINDS) -> EndpointRecord:
        """A pod (``ns/name``, or ``name`` with `namespace`), host endpoint or VM by name, or an
        endpoint key (``pod/ns/name``)."""
        wanted = tuple(kinds)
        endpoints = self.state.endpoints
        if text in endpoints and endpoints[text].kind in wanted:
            return endpoints[text]
        ns, _sep, name = text.rpartition("/") if "/" in text else (namespace, "", text)
        found = [
            r for r in endpoints.values()
            if r.kind in wanted and r.name == name
            and (ns is None or r.namespace == ns or (r.namespace is None and not _sep))
        ]
        if not found:
            scope = f" in namespace {ns}" if ns else ""
            raise ExplainError(f"no endpoint named {text!r}{scope} (kinds: {', '.join(wanted)})")
        if len(found) > 1:
            keys = ", ".join(sorted(r.key for r in found))
            raise ExplainError(f"{text!r} names several endpoints ({keys}): give the key")
        return found[0]

    def destination(self, text: str, namespace: str | None = None) -> Destination:
        """``IP``, ``IP:PORT[/PROTO]`` (``[v6]:PORT``), an endpoint or a domain name, each
        optionally followed by ``:PORT[/PROTO]`` (protocol TCP when not given)."""
        target, port, protocol = _split_port(text)
        try:
            ip = str(ipaddress.ip_address(target))
            return Destination(text, ip, None, None, port, protocol)
        except ValueError:
            pass
        try:
            rec = self.find_endpoint(target, namespace)
        except ExplainError:
            rec = None
        if rec is not None:
            if not rec.ips:
                raise ExplainError(f"endpoint {rec.key} has no IP")
            return Destination(text, rec.ips[0].split("/")[0], None, rec.key, port, protocol)
        if any(domain_matches(p, target) for s in self.network_sets()
               for p in s.allowed_egress_domains) or self._named_in_rules(target):
            return Destination(text, None, target, None, port, protocol)
        raise ExplainError(f"destination {target!r} is not an IP, an endpoint, or a domain "
                           "name of a network set or rule")

    def _named_in_rules(self, name: str) -> bool:
        return any(
            domain_matches(pattern, name)
            for o in self.objects.values() if isinstance(o, Policy)
            for rule in o.egress for pattern in rule.destination.domains
        )

    def network_sets(self) -> list[NetworkSet]:
        return [o for o in self.enforced().values() if isinstance(o, NetworkSet)]

    def peer(self, dest: Destination) -> pverdict.Peer:
        # every endpoint record holding the IP, network sets included (selectors match them
        # by their nets there, as the processor does); the sets' policy documents add the
        # matches by allowedEgressDomains
        holders = [
            self.labels_of(r) for r in self.state.endpoints.values()
            if dest.ip is not None and _holds(r.ips, dest.ip)
        ]
        namespace_labels = {
            p.namespace: dict(p.labels) for p in self.state.profiles.values()
            if p.kind == "namespace"
        }
        return pverdict.peer_of(
            dest.ip, labels=holders, network_sets=self.network_sets(),
            domains=(dest.domain,) if dest.domain else (), namespace_labels=namespace_labels,
        )

    # -- the question -----------------------------------------------------------------------

    def explain(self, source: str, destination: str, *, namespace: str | None = None,
                staged: bool = False) -> Explanation:
        src = self.find_endpoint(source, namespace)
        dest = self.destination(destination, namespace)
        return self.explain_records(src, dest, staged=staged)

    def explain_records(self, src: EndpointRecord, dest: Destination, *,
                        staged: bool = False) -> Explanation:
        labels = self.labels_of(src)
        kind: pverdict.EndpointKind = "host" if src.kind == "hostendpoint" else "workload"
        default: pverdict.Decision | None = (
            "allow" if kind == "host" and DEFAULT_ALLOW_PROFILE in src.profiles else None
        )
        endpoint = pverdict.Endpoint(kind, labels, src.ips[0] if src.ips else None)
        packet = pverdict.Packet(dest.protocol, self.peer(dest), port=dest.port)
        arranged = self.arranged(staged)
        v = pverdict.verdict(endpoint, arranged, packet, default_action=default)
        return Explanation(src, dest, v, _applied(arranged, v, labels), staged)


def _applied(arranged: Iterable[pcompile.TierPolicies], v: pverdict.Verdict,
             labels: Mapping[str, str]) -> tuple[str, ...]:
    if v.tier is None or v.policy is not None:
        return ()
    for tier_policies in arranged:
        if tier_policies.tier.name == v.tier:
            return tuple(
                p.key for p in tier_policies.policies
                if "Egress" in p.types and pverdict.compiled(p).applies_to.matches(labels)
            )
    return ()


def _holds(ips: Iterable[str], ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    for item in ips:
        net = ipaddress.ip_network(item, strict=False)
        if net.version == addr.version and addr in net:
            return True
    return False


def _split_port(text: str) -> tuple[str, int | None, str]:
    """(target, port, protocol) from ``target[:PORT[/PROTO]]``; IPv6 needs brackets with a port."""
    target, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ExplainError(f"{text!r}: missing ']' after the IPv6 address")
        target, rest = text[1:close], text[close + 1:]
        if rest and not rest.startswith(":"):
            raise ExplainError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        target, port_text = text.split(":")
    if not port_text:
        return target, None, "TCP"
    match = _PORT_RE.match(port_text)
    if match is None:
        raise ExplainError(f"{text!r}: expected PORT or PORT/PROTOCOL after ':', e.g. 443/TCP")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ExplainError(f"{text!r}: port {port} is out of range (1-65535)")
    protocol = (match["proto"] or "TCP").upper()
    try:
        pverdict.protocol_number(protocol)
    except ValueError:
        raise ExplainError(f"{text!r}: unknown protocol {match['proto']!r}") from None
    return target, port, protocol
