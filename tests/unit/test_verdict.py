"""policy.verdict: the one definition of allow/deny, checked case by case and against an
independent (flattened) formulation of Calico's tier semantics."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import EndpointPort, EntityRule, ICMPMatch, Policy, Port, Rule, ServiceMatch, Tier
from policy.compile import arrange
from policy.verdict import Endpoint, Packet, Peer, protocol_number, verdict

POD = Endpoint("workload", {"app": "web", "projectcalico.org/namespace": "prod"}, ip="10.0.0.1")


def _gnp(
    name: str,
    *egress: Rule,
    tier: str = "default",
    order: float | None = None,
    selector: str = "app == 'web'",
    types: tuple[str, ...] = ("Egress",),
) -> Policy:
    return Policy(
        "GlobalNetworkPolicy",
        name,
        tier=tier,
        order=order,
        selector=selector,
        types=types,
        egress=egress,  # type: ignore[arg-type]
    )


def _decide(
    *policies: Policy,
    tiers: tuple[Tier, ...] = (),
    packet: Packet | None = None,
    endpoint: Endpoint = POD,
) -> tuple[str, str | None, str | None, int | None]:
    packet = packet or Packet("TCP", Peer(ip="192.0.2.1"), port=443)
    v = verdict(endpoint, arrange(tiers, policies), packet)
    return v.action, v.tier, v.policy, v.rule_index


def test_no_policy_workload_allowed_host_denied() -> None:
    assert _decide()[0] == "allow"
    host = Endpoint("host", {"role": "node"})
    assert _decide(endpoint=host)[0] == "deny"
    v = verdict(host, [], Packet("TCP", Peer("192.0.2.1"), port=443), default_action="allow")
    assert v.allowed


def test_first_matching_rule_decides_and_log_continues() -> None:
    policy = _gnp(
        "p", Rule("Log"), Rule("Deny", protocol="UDP"), Rule("Allow", protocol="TCP"), Rule("Deny")
    )
    assert _decide(policy) == ("allow", "default", "GlobalNetworkPolicy//p", 2)


def test_end_of_tier_denies_when_a_policy_applied() -> None:
    policy = _gnp("p", Rule("Allow", protocol="UDP"))
    assert _decide(policy) == ("deny", "default", None, None)
    # ...but not when no policy in the tier applies to the endpoint.
    other = _gnp("p", Rule("Deny"), selector="app == 'db'")
    assert _decide(other)[0] == "allow"
    # ...nor when the policy does not cover the direction.
    ingress_only = _gnp("p", Rule("Deny"), types=("Ingress",))
    assert _decide(ingress_only)[0] == "allow"


def test_policy_order_within_tier() -> None:
    deny = _gnp("a-deny", Rule("Deny"), order=200.0)
    allow = _gnp("z-allow", Rule("Allow"), order=100.0)
    assert _decide(deny, allow)[2] == "GlobalNetworkPolicy//z-allow"
    unordered = _gnp("b", Rule("Deny"))
    assert _decide(unordered, _gnp("a", Rule("Allow")))[2] == "GlobalNetworkPolicy//a"


def test_pass_skips_to_the_next_tier() -> None:
    security = Tier("security", 10.0)
    passer = _gnp("s", Rule("Pass", protocol="TCP"), Rule("Deny"), tier="security", order=1.0)
    later_in_tier = _gnp("s2", Rule("Allow"), tier="security", order=1000.0)
    deny_default = _gnp("d", Rule("Deny"))
    assert _decide(passer, later_in_tier, deny_default, tiers=(security,))[:3] == (
        "deny",
        "default",
        "GlobalNetworkPolicy//d",
    )
    # A Pass out of the last tier lands on the profile: workloads are allowed.
    assert _decide(passer, tiers=(security,))[0] == "allow"
    udp = Packet("UDP", Peer("192.0.2.1"), port=53)
    assert _decide(passer, deny_default, tiers=(security,), packet=udp)[:2] == ("deny", "security")


def test_tier_default_pass() -> None:
    tier = Tier("platform", 1.0, "Pass")
    nothing_matches = _gnp("p", Rule("Allow", protocol="UDP"), tier="platform")
    assert _decide(nothing_matches, tiers=(tier,))[0] == "allow"
    assert _decide(nothing_matches, _gnp("d", Rule("Deny")), tiers=(tier,))[1] == "default"


def test_host_failsafe_before_policy() -> None:
    host = Endpoint("host", {"role": "node"}, ip="10.0.0.2")
    deny_all = _gnp("d", Rule("Deny"), selector="role == 'node'")
    for proto, port in (("UDP", 53), ("TCP", 6443), ("TCP", 2379)):
        packet = Packet(proto, Peer("10.0.0.9"), port=port)
        assert verdict(host, arrange((), [deny_all]), packet).reason.startswith("failsafe")
    packet = Packet("TCP", Peer("10.0.0.9"), port=22)  # inbound failsafe only
    assert not verdict(host, arrange((), [deny_all]), packet).allowed
    assert verdict(host, arrange((), [deny_all]), packet, "Ingress").allowed
    assert not verdict(
        host, arrange((), [deny_all]), Packet("TCP", Peer("x"), port=6443), failsafe=()
    ).allowed


@dataclass
class Case:
    rule: Rule
    packet: Packet
    matches: bool


PEER_DB = Peer(
    ip="10.1.2.3",
    label_sets=({"app": "db", "projectcalico.org/namespace": "prod"},),
    named_ports=(EndpointPort("pg", "TCP", 5432),),
    services=frozenset({"prod/db"}),
    domains=("db.example.com",),
)
CASES = {
    "protocol by number": Case(Rule("Allow", protocol=6), Packet("TCP", PEER_DB, port=1), True),
    "protocol mismatch": Case(Rule("Allow", protocol="UDP"), Packet(6, PEER_DB, port=1), False),
    "not protocol": Case(Rule("Allow", not_protocol="TCP"), Packet("TCP", PEER_DB, 1), False),
    "port range": Case(
        Rule("Allow", protocol="TCP", destination=EntityRule(ports=(Port(5000, 6000),))),
        Packet("TCP", PEER_DB, port=5432),
        True,
    ),
    "not ports": Case(
        Rule("Allow", protocol="TCP", destination=EntityRule(not_ports=(Port(5432, 5432),))),
        Packet("TCP", PEER_DB, port=5432),
        False,
    ),
    "named port": Case(
        Rule("Allow", protocol="TCP", destination=EntityRule(ports=(Port.named("pg"),))),
        Packet("TCP", PEER_DB, port=5432),
        True,
    ),
    "named port, other number": Case(
        Rule("Allow", protocol="TCP", destination=EntityRule(ports=(Port.named("pg"),))),
        Packet("TCP", PEER_DB, port=5433),
        False,
    ),
    "source port": Case(
        Rule("Allow", protocol="TCP", source=EntityRule(ports=(Port(1024, 65535),))),
        Packet("TCP", PEER_DB, port=5432, source_port=40000),
        True,
    ),
    "nets": Case(
        Rule("Allow", destination=EntityRule(nets=("10.1.0.0/16",))),
        Packet("TCP", PEER_DB, port=1),
        True,
    ),
    "nets v6 vs v4": Case(
        Rule("Allow", destination=EntityRule(nets=("::/0",))), Packet("TCP", PEER_DB, port=1), False
    ),
    "not nets": Case(
        Rule("Allow", destination=EntityRule(not_nets=("10.1.2.0/24",))),
        Packet("TCP", PEER_DB, port=1),
        False,
    ),
    "source nets are the endpoint": Case(
        Rule("Allow", source=EntityRule(nets=("10.0.0.0/24",))), Packet("TCP", PEER_DB, 1), True
    ),
    "selector": Case(
        Rule("Allow", destination=EntityRule(selector="app == 'db'")),
        Packet("TCP", PEER_DB, port=1),
        True,
    ),
    "selector scoped to other namespace": Case(
        Rule(
            "Allow", destination=EntityRule(selector="app == 'db'", namespace_selector="x == 'y'")
        ),
        Packet("TCP", PEER_DB, port=1),
        False,
    ),
    "not selector": Case(
        Rule("Allow", destination=EntityRule(not_selector="app == 'db'")),
        Packet("TCP", PEER_DB, port=1),
        False,
    ),
    "ip version": Case(Rule("Allow", ip_version=6), Packet("TCP", PEER_DB, port=1), False),
    "icmp type": Case(
        Rule("Allow", protocol="ICMP", icmp=ICMPMatch(8)),
        Packet("ICMP", PEER_DB, icmp_type=8, icmp_code=0),
        True,
    ),
    "icmp code": Case(
        Rule("Allow", protocol="ICMP", icmp=ICMPMatch(8, 1)),
        Packet("ICMP", PEER_DB, icmp_type=8, icmp_code=0),
        False,
    ),
    "not icmp": Case(
        Rule("Allow", protocol="ICMP", not_icmp=ICMPMatch(8)),
        Packet("ICMP", PEER_DB, icmp_type=8),
        False,
    ),
    "service": Case(
        Rule("Allow", destination=EntityRule(services=ServiceMatch("db"))),
        Packet("TCP", PEER_DB, port=1),
        True,
    ),
    "service elsewhere": Case(
        Rule("Allow", destination=EntityRule(services=ServiceMatch("db", "dev"))),
        Packet("TCP", PEER_DB, port=1),
        False,
    ),
    "domain wildcard": Case(
        Rule("Allow", destination=EntityRule(domains=("*.example.com",))),
        Packet("TCP", PEER_DB, port=1),
        True,
    ),
    "domain apex is not the wildcard": Case(
        Rule("Allow", destination=EntityRule(domains=("*.db.example.com",))),
        Packet("TCP", PEER_DB, port=1),
        False,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_match_cases(name: str) -> None:
    case = CASES[name]
    policy = Policy("NetworkPolicy", "p", "prod", types=("Egress",), egress=(case.rule,))
    result = verdict(POD, arrange((), [policy]), case.packet)
    assert result.allowed == case.matches, result


def test_domain_network_sets_only_count_for_egress_allow_rules() -> None:
    saas = {"role": "saas"}
    peer = Peer(ip="198.51.100.1", domain_label_sets=(saas,), domains=("api.saas.example",))
    allow = _gnp("a", Rule("Allow", destination=EntityRule(selector="role == 'saas'")))
    assert _decide(allow, packet=Packet("TCP", peer, port=443))[0] == "allow"
    deny_then_deny = _gnp(
        "a", Rule("Deny", destination=EntityRule(selector="role == 'saas'")), Rule("Allow")
    )
    # The Deny rule does not see the domain-only membership, so the Allow-all decides.
    assert _decide(deny_then_deny, packet=Packet("TCP", peer, port=443))[3] == 1


def test_protocol_number() -> None:
    assert protocol_number("tcp") == 6 and protocol_number("ICMPv6") == 58
    assert protocol_number(132) == 132
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_number("QUIC")


# -- properties --------------------------------------------------------------------------------

_PORTS = range(1, 6)
_rule = st.builds(
    lambda action, proto, ports: Rule(
        action,
        protocol=proto,
        destination=EntityRule(ports=tuple(Port.single(p) for p in ports))
        if proto
        else EntityRule(),
    ),
    st.sampled_from(["Allow", "Deny", "Pass", "Log"]),
    st.sampled_from([None, "TCP", "UDP"]),
    st.lists(st.sampled_from(list(_PORTS)), max_size=2, unique=True),
)
_policy = st.builds(
    lambda name, tier, order, selector, egress, types: Policy(
        "GlobalNetworkPolicy",
        name,
        tier=tier,
        order=order,
        selector=selector,
        types=types,
        egress=tuple(egress),
    ),
    st.text("abcdef", min_size=1, max_size=3),
    st.sampled_from(["default", "t1", "t2"]),
    st.sampled_from([None, 1.0, 2.0]),
    st.sampled_from(["all()", "app == 'web'", "app == 'db'"]),
    st.lists(_rule, max_size=4),
    st.sampled_from([("Egress",), ("Ingress",), ("Ingress", "Egress")]),
)
_tiers = st.tuples(
    st.builds(
        lambda o, a: Tier("t1", o, a),
        st.sampled_from([None, 1.0, 5.0]),
        st.sampled_from(["Deny", "Pass"]),
    ),
    st.builds(
        lambda o, a: Tier("t2", o, a),
        st.sampled_from([None, 1.0, 5.0]),
        st.sampled_from(["Deny", "Pass"]),
    ),
)
_packet = st.builds(
    lambda proto, port: Packet(proto, Peer("192.0.2.1"), port=port),
    st.sampled_from(["TCP", "UDP"]),
    st.sampled_from(list(_PORTS)),
)


def _rule_matches(rule: Rule, packet: Packet) -> bool:
    if rule.protocol is not None and rule.protocol != packet.protocol:
        return False
    ports = rule.destination.ports
    return not ports or any(p.first == packet.port for p in ports)


def _oracle(tiers: tuple[Tier, ...], policies: list[Policy], packet: Packet) -> str:
    """Calico's tiers, stated differently: per tier, flatten the matching rules of the
    applicable policies into one list; the first non-Log action decides the tier."""
    by_name = {"default": Tier("default", 1_000_000.0), **{t.name: t for t in tiers}}
    tier_names = sorted(
        by_name, key=lambda n: (by_name[n].order is None, by_name[n].order or 0.0, n)
    )
    for name in tier_names:
        members = sorted(
            (
                p
                for p in policies
                if p.tier == name
                and "Egress" in p.types
                and p.selector in ("all()", "app == 'web'")
            ),
            key=lambda p: (p.order if p.order is not None else float("inf"), p.name),
        )
        if not members:
            continue
        actions = [r.action for p in members for r in p.egress if _rule_matches(r, packet)]
        decisive = next((a for a in actions if a != "Log"), None)
        if decisive == "Allow":
            return "allow"
        if decisive == "Deny":
            return "deny"
        if decisive is None and by_name[name].default_action == "Deny":
            return "deny"
    return "allow"


@settings(max_examples=300, deadline=None)
@given(
    policies=st.lists(_policy, max_size=5, unique_by=lambda p: p.name), tiers=_tiers, packet=_packet
)
def test_tier_semantics_match_the_oracle(
    policies: list[Policy], tiers: tuple[Tier, ...], packet: Packet
) -> None:
    endpoint = Endpoint("workload", {"app": "web"})
    result = verdict(endpoint, arrange(tiers, policies), packet)
    assert result.action == _oracle(tiers, policies, packet)


@settings(max_examples=200, deadline=None)
@given(
    policies=st.lists(_policy, min_size=1, max_size=5, unique_by=lambda p: p.name), packet=_packet
)
def test_allow_only_policies_never_deny_a_packet_one_of_them_allows(
    policies: list[Policy], packet: Packet
) -> None:
    only_allow = [
        Policy(
            p.kind,
            p.name,
            tier="default",
            order=p.order,
            selector=p.selector,
            types=p.types,
            egress=tuple(r for r in p.egress if r.action == "Allow"),
        )
        for p in policies
    ]
    endpoint = Endpoint("workload", {"app": "web"})
    applicable = [p for p in only_allow if "Egress" in p.types and p.selector != "app == 'db'"]
    some_rule_allows = any(_rule_matches(r, packet) for p in applicable for r in p.egress)
    result = verdict(endpoint, arrange((), only_allow), packet)
    if some_rule_allows:
        assert result.allowed
    elif applicable:
        assert not result.allowed and result.tier == "default"
    else:
        assert result.allowed and result.policy is None


def test_peer_of_network_sets_by_cidr_and_by_domain() -> None:
    from policy import NetworkSet
    from policy.verdict import peer_of

    saas = NetworkSet(
        "GlobalNetworkSet",
        "saas",
        labels=(("role", "saas"),),
        nets=("203.0.113.0/24",),
        allowed_egress_domains=("*.saas.example",),
    )
    local = NetworkSet("NetworkSet", "db", "prod", labels=(("role", "db"),), nets=("10.9.0.0/16",))
    by_ip = peer_of("203.0.113.7", network_sets=[saas, local])
    assert by_ip.label_sets == ({"role": "saas"},) and by_ip.domain_label_sets == ()
    by_name = peer_of("192.0.2.1", network_sets=[saas], domains=["api.saas.example"])
    assert by_name.label_sets == () and by_name.domain_label_sets == ({"role": "saas"},)
    assert (
        peer_of("192.0.2.1", network_sets=[saas], domains=["saas.example"]).domain_label_sets == ()
    )
    namespaced = peer_of("10.9.1.1", network_sets=[local], namespace_labels={"prod": {"t": "a"}})
    assert namespaced.label_sets == (
        {
            "role": "db",
            "projectcalico.org/namespace": "prod",
            "pcns.t": "a",
            "pcns.projectcalico.org/name": "prod",
        },
    )
    allow = _gnp("a", Rule("Allow", destination=EntityRule(selector="role == 'saas'")))
    assert _decide(allow, packet=Packet("TCP", by_name, port=443))[0] == "allow"
