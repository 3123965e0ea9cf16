"""Rule rendering: structure of the restore text, stable hashes, and the verdict property.

The property: for random tiers, policies, endpoints and packets, running the rendered
rules through ``render.simulate`` (an interpreter of the rule list, not of the text)
gives exactly what ``policy.verdict`` decides.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcers import render
from enforcers.render import (
    MAX_CHAIN_NAME,
    EndpointSpec,
    PeerSpec,
    PolicySpec,
    PortRange,
    RuleSpec,
    TierSpec,
)
from enforcers.state import (
    CompiledPolicy,
    Dataplane,
    EnforcerState,
    LocalEndpoint,
    compile_object,
)
from policy import compile as pcompile
from policy import verdict as pverdict
from policy.labels import NAMESPACE_LABEL
from policy.model import (
    EndpointPort,
    EntityRule,
    ICMPMatch,
    Policy,
    Port,
    Rule,
    ServiceMatch,
    Tier,
)


def namer(uid: str) -> str:
    return "pc-" + uid[2:22]


def _example() -> list[EndpointSpec]:
    allow = RuleSpec("Allow", "tcp", destination=PeerSpec(
        nets=("10.0.0.0/8", "192.168.0.0/16"), not_nets=("10.1.0.0/16", "10.2.0.0/16"),
        ports=(PortRange(80, 80), PortRange(1000, 2000))))
    deny = RuleSpec("Deny", destination=PeerSpec(set_name="pc-s:abc", not_set_name="pc-s:def"))
    pas = RuleSpec("Pass", "udp", destination=PeerSpec(not_ports=(PortRange(53, 53),)))
    pol = PolicySpec("GlobalNetworkPolicy//p", (allow, RuleSpec("Log"), deny, pas))
    pol2 = PolicySpec("NetworkPolicy/ns/q", (RuleSpec("Allow"),))
    tiers = (TierSpec("sec", "Pass", (pol,)), TierSpec("default", "Deny", (pol2,)))
    return [
        EndpointSpec("pod/ns/a", "workload", "veth-a", tiers),
        EndpointSpec("pod/ns/b", "workload", "veth-b", tiers[1:]),
        EndpointSpec("hostendpoint//n1", "host", "eth0"),
    ]


def test_restore_text_declares_every_chain_it_uses_and_comments_every_rule() -> None:
    chains = render.render(_example())
    text = render.restore_text(chains.values(), (), render.HOOKS)
    declared = set(re.findall(r"^:(\S+) - \[0:0\]$", text, re.M))
    assert declared == set(chains)
    builtin = {"ACCEPT", "DROP", "RETURN", "MARK", "LOG"}
    for line in text.splitlines():
        if line.startswith("-A "):
            assert re.search(r'-m comment --comment "pc:[a-z0-9]{16}"', line), line
            target = re.search(r" -[jg] (\S+)", line)
            assert target and (target.group(1) in builtin or target.group(1) in declared), line
    assert all(len(name) <= MAX_CHAIN_NAME for name in chains)
    assert text.count("-I FORWARD 1") == 1 and text.count("-I OUTPUT 1") == 1
    assert text.count("-I INPUT 1") == 1
    assert text.startswith("*filter\n") and text.endswith("COMMIT\n")


def test_unchanged_chains_keep_their_hashes_and_a_change_touches_only_its_chain() -> None:
    first = render.render(_example())
    again = render.render(_example())
    assert {n: c.hashes for n, c in first.items()} == {n: c.hashes for n, c in again.items()}
    eps = _example()
    changed_policy = PolicySpec("NetworkPolicy/ns/q", (RuleSpec("Deny"),))
    eps[1] = EndpointSpec("pod/ns/b", "workload", "veth-b",
                          (TierSpec("default", "Deny", (changed_policy,)),))
    eps[0] = EndpointSpec("pod/ns/a", "workload", "veth-a",
                          (eps[0].tiers[0], TierSpec("default", "Deny", (changed_policy,))))
    second = render.render(eps)
    differ = {n for n in first if first[n].hashes != second[n].hashes}
    assert differ == {render.policy_chain("NetworkPolicy/ns/q")}


def test_one_calico_rule_acts_at_most_once_even_with_many_nets() -> None:
    rule = RuleSpec("Log", "tcp", destination=PeerSpec(
        nets=("10.0.0.0/8", "10.1.0.0/16"), ports=tuple(PortRange(p, p) for p in range(1, 20))))
    chain = render.render_policy(PolicySpec("GlobalNetworkPolicy//log", (rule,)))
    logged: list[str] = []
    pkt = render.Packet("10.9.9.9", "10.1.2.3", "tcp", dport=17)
    render.simulate({chain.name: chain}, chain.name, pkt, {}, logged.append)
    assert len(logged) == 1
    pkt = render.Packet("10.9.9.9", "10.1.2.3", "tcp", dport=25)
    render.simulate({chain.name: chain}, chain.name, pkt, {}, logged.append)
    assert len(logged) == 1


def test_host_endpoints_keep_failsafe_ports_and_default_deny() -> None:
    chains = render.render([EndpointSpec("hostendpoint//n1", "host", "eth0")])
    def run(proto: str, port: int) -> str:
        pkt = render.Packet("10.0.0.1", "10.9.0.1", proto, dport=port, out_iface="eth0")
        return render.simulate(chains, render.OUTPUT_CHAIN, pkt, {})
    assert run("udp", 53) == "ACCEPT"
    assert run("tcp", 6443) == "ACCEPT"
    assert run("tcp", 80) == "DROP"
    other = render.Packet("10.0.0.1", "10.9.0.1", "tcp", dport=80, out_iface="eth9")
    assert render.simulate(chains, render.OUTPUT_CHAIN, other, {}) == "RETURN"


def test_rules_only_for_the_other_family_never_match() -> None:
    rule = RuleSpec("Allow", destination=PeerSpec(nets=("fd00::/64",)))
    assert render.render_rule(rule, "k") == []
    rule = RuleSpec("Deny", destination=PeerSpec(not_nets=("fd00::/64",)))
    (only,) = render.render_rule(rule, "k")
    assert only.conds == () and only.target == render.DROP


# --------------------------------------------------------------------------- the property

LOCAL_IP = "10.0.0.1"
SHOP = "shop"
PEERS: list[tuple[str, str, dict[str, str]]] = [
    ("pod/shop/api", "10.1.0.1", {"role": "api", NAMESPACE_LABEL: SHOP}),
    ("pod/shop/cache", "10.1.0.1", {"role": "cache", NAMESPACE_LABEL: SHOP}),  # shared IP
    ("pod/shop/db", "10.1.0.2", {"role": "db", NAMESPACE_LABEL: SHOP}),
    ("pod/other/api", "10.1.0.3", {"role": "api", NAMESPACE_LABEL: "other"}),
    ("globalnetworkset//saas", "10.2.0.0/24", {"kind": "saas"}),
    # Not 0.0.0.0/0: policy.verdict sees the source as its own labels only, while ipsets
    # (Calico's and ours) also match network sets whose CIDRs contain the source IP.
    ("globalnetworkset//world", "8.0.0.0/7", {"kind": "world"}),
]
DST_IPS = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.2.0.5", "10.3.0.1", LOCAL_IP, "8.8.8.8"]
NETS = ["10.1.0.0/24", "10.1.0.1/32", "10.2.0.0/16", "10.0.0.0/8", "10.3.0.0/24", "fd00::/64",
        "0.0.0.0/0"]
SELECTORS = ["role == 'api'", "role in {'api', 'db'}", "has(kind)", "all()", "kind == 'saas'",
             "role == 'cache'", "app == 'web'"]
APPLIES = ["all()", "app == 'web'", "app == 'db'", "has(app)", "!has(app)"]
PORTS = [Port(80, 80), Port(443, 443), Port(53, 53), Port(8000, 8100), Port(6443, 6443)]


@st.composite
def entities(draw: st.DrawFn, ports_ok: bool) -> EntityRule:
    return EntityRule(
        nets=tuple(draw(st.lists(st.sampled_from(NETS), max_size=2, unique=True))),
        not_nets=tuple(draw(st.lists(st.sampled_from(NETS), max_size=2, unique=True))),
        selector=draw(st.none() | st.sampled_from(SELECTORS)),
        not_selector=draw(st.none() | st.sampled_from(SELECTORS)),
        ports=tuple(draw(st.lists(st.sampled_from(PORTS), max_size=3, unique=True)))
        if ports_ok else (),
        not_ports=tuple(draw(st.lists(st.sampled_from(PORTS), max_size=2, unique=True)))
        if ports_ok else (),
    )


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    protocol = draw(st.none() | st.sampled_from(["TCP", "UDP", 6]))
    return Rule(
        action=draw(st.sampled_from(["Allow", "Deny", "Pass", "Log"])),
        protocol=protocol,
        not_protocol=draw(st.none() | st.sampled_from(["UDP", "TCP"])),
        destination=draw(entities(protocol is not None)),
        source=draw(st.just(EntityRule()) | entities(False)),
    )


@st.composite
def policies(draw: st.DrawFn, index: int) -> Policy:
    namespaced = draw(st.booleans())
    return Policy(
        kind="NetworkPolicy" if namespaced else "GlobalNetworkPolicy",
        name=f"p{index}",
        namespace=SHOP if namespaced else None,
        tier=draw(st.sampled_from(["default", "sec", "undefined"])),
        order=draw(st.none() | st.sampled_from([1.0, 5.0, 10.0])),
        selector=draw(st.sampled_from(APPLIES)),
        types=draw(st.sampled_from([("Egress",), ("Ingress",), ("Ingress", "Egress")])),
        egress=tuple(draw(st.lists(rules(), max_size=4))),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Tier], list[Policy], str, dict[str, str]]:
    n = draw(st.integers(0, 4))
    pols = [draw(policies(i)) for i in range(n)]
    tiers = [Tier("sec", order=10.0, default_action=draw(st.sampled_from(["Deny", "Pass"])))]
    kind = draw(st.sampled_from(list(LOCAL_KINDS)))
    labels = {"app": draw(st.sampled_from(["web", "db"]))} if draw(st.booleans()) else {}
    if kind == "pod":
        labels[NAMESPACE_LABEL] = SHOP
    return tiers, pols, kind, labels


#: The kinds of local endpoint: (key, enforcer kind, interfaces, default-allow profile,
#: where its traffic is seen: (chain it enters, interface field of the packet, interface)).
LOCAL_KINDS: dict[str, tuple[str, render.EndpointKind, str, bool | None,
                             list[tuple[str, str, str]]]] = {
    "pod": ("pod/shop/me", "workload", "veth-me", None,
            [(render.FORWARD_CHAIN, "in", "veth-me"), (render.INPUT_CHAIN, "in", "veth-me")]),
    "vm-taps": ("vm//me", "workload", "tap0,tap1", None,
                [(render.FORWARD_CHAIN, "in", "tap1"), (render.INPUT_CHAIN, "in", "tap0")]),
    "guest": ("vm//me", "guest", "eth0,eth1", None,
              [(render.OUTPUT_CHAIN, "out", "eth1"), (render.FORWARD_CHAIN, "out", "eth0")]),
    "host": ("hostendpoint//me", "host", "eth0", None, [(render.OUTPUT_CHAIN, "out", "eth0")]),
    "host-allow": ("hostendpoint//me", "host", "*", True,
                   [(render.OUTPUT_CHAIN, "out", "eth7")]),
}


def programmed(tiers: list[Tier], pols: list[Policy],
               universe: list[tuple[str, str, dict[str, str]]],
               local: LocalEndpoint, flows: render.FlowLog | None = None) -> Dataplane:
    """The desired dataplane for one local endpoint, every selector's members from
    `universe` (key, ip, labels); ``flows``: with flow-log rules."""
    state = EnforcerState("n1", namer, flows=flows)
    for tier in tiers:
        state.upsert_tier(compile_object(tier))  # type: ignore[arg-type]
    for pol in pols:
        state.upsert_policy(compile_object(pol))  # type: ignore[arg-type]
        for selector in pcompile.all_selectors(pol):
            for key, ip, member_labels in universe:
                if selector.matches(member_labels):
                    state.upsert_membership(selector.uid, key, [ip])
    own = next(labels for key, _ip, labels in universe if key == local.key)
    state.upsert_endpoint(dataclasses.replace(local, labels=own))
    return state.desired()


def _contains(net: str, ip: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(net, strict=False)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.lists(st.tuples(
    st.sampled_from(DST_IPS), st.sampled_from(["tcp", "udp"]),
    st.sampled_from([80, 443, 53, 8050, 6443, 22])), min_size=1, max_size=8))
def test_rendered_rules_decide_as_policy_verdict(scenario: tuple, packets: list) -> None:
    tiers, pols, kind, labels = scenario
    local_key, ep_kind, iface, allow, paths = LOCAL_KINDS[kind]
    universe = [(local_key, LOCAL_IP, labels), *PEERS]

    desired = programmed(tiers, pols, universe, LocalEndpoint(local_key, ep_kind, iface,
                                                              (LOCAL_IP,), allow=allow))
    arranged = pcompile.arrange(tiers, pols)
    endpoint = pverdict.Endpoint("host" if ep_kind == "host" else "workload", labels, LOCAL_IP)

    for dst, proto, port in packets:
        label_sets = tuple(lab for _k, ip, lab in universe if _contains(ip, dst))
        expected = pverdict.verdict(
            endpoint, arranged,
            pverdict.Packet(proto.upper(), pverdict.Peer(dst, label_sets), port=port),
            default_action="allow" if allow else None,
        )
        # every path its traffic takes: forwarded, to the host itself, sent by itself
        for start, direction, name in paths:
            pkt = render.Packet(LOCAL_IP, dst, proto, dport=port,
                                in_iface=name if direction == "in" else "",
                                out_iface=name if direction == "out" else "")
            got = render.simulate(desired.chains, start, pkt, desired.sets)
            assert (got != "DROP") == expected.allowed, (start, dst, proto, port,
                                                         expected.reason)


def test_ipv6_keeps_neighbour_discovery_working_under_default_deny() -> None:
    deny_all = PolicySpec("GlobalNetworkPolicy//deny", ())
    eps = [EndpointSpec("pod/ns/a", "workload", "veth-a", (TierSpec("default", "Deny",
                                                                    (deny_all,)),)),
           EndpointSpec("hostendpoint//n1", "host", "eth0")]
    ns = render.Packet("fd65::2", "ff02::1:ff00:1", "ipv6-icmp", in_iface="veth-a",
                       out_iface="eth0", icmp_type=135)
    tcp = render.Packet("fd65::2", "fd65::1", "tcp", dport=80, in_iface="veth-a",
                        out_iface="eth0")
    v6 = render.render(eps, family=6)
    for start in (render.INPUT_CHAIN, render.OUTPUT_CHAIN):
        assert render.simulate(v6, start, ns, {}) == "ACCEPT"
        assert render.simulate(v6, start, tcp, {}) == "DROP"
    v4 = render.render(eps, family=4)
    assert "icmpv6" not in render.restore_text(v4.values())
    assert "-m icmp6 --icmpv6-type 135" in render.restore_text(v6.values())


_RULES = [render.IptRule((render.Iface("in", f"veth{i}"),), render.Jump(f"pc-tw-{i}", True))
          for i in range(6)] + [render.IptRule((), render.ACCEPT)]


@given(st.lists(st.sampled_from(_RULES), max_size=8), st.lists(st.sampled_from(_RULES),
                                                                max_size=8),
       st.sampled_from([render.FORWARD_CHAIN, render.INPUT_CHAIN]))
def test_reusing_an_earlier_chain_gives_the_hashes_of_building_it_afresh(
    before: list, after: list, name: str
) -> None:
    earlier = render.Chain.build(render.FORWARD_CHAIN, before)
    assert render.Chain.build(name, after, earlier) == render.Chain.build(name, after)
    assert render.Chain.build(name, before + after, earlier) == render.Chain.build(
        name, before + after)


# --------------------------------------------------------- rules not programmable yet

SERVICES = {"10.1.0.1": frozenset({"shop/api"}), "10.1.0.2": frozenset({"shop/db"}),
            "10.2.0.5": frozenset({"saas/gw"})}
NAMED_PORTS = (EndpointPort("http", "TCP", 80), EndpointPort("dns", "UDP", 53))
DOMAINS = {"10.2.0.5": ("api.saas.example",), "8.8.8.8": ("dns.google",)}


@st.composite
def gap_entities(draw: st.DrawFn, ports_ok: bool) -> EntityRule:
    """A destination that may use Services, named ports or domain names."""
    base = draw(entities(ports_ok))
    named = st.lists(st.sampled_from([Port(name="http"), Port(name="dns"), Port(name="nope")]),
                     max_size=1 if ports_ok else 0)
    return EntityRule(
        nets=base.nets, not_nets=base.not_nets, selector=base.selector,
        not_selector=base.not_selector,
        ports=base.ports + tuple(draw(named)),
        not_ports=base.not_ports + tuple(draw(named)),
        services=draw(st.none() | st.sampled_from(
            [ServiceMatch("api", "shop"), ServiceMatch("db"), ServiceMatch("gw", "saas")])),
        domains=tuple(draw(st.lists(st.sampled_from(["*.saas.example", "dns.google"]),
                                    max_size=1))),
    )


@st.composite
def gap_rules(draw: st.DrawFn) -> Rule:
    protocol = draw(st.none() | st.sampled_from(["TCP", "UDP"]))
    return Rule(
        action=draw(st.sampled_from(["Allow", "Deny", "Pass", "Log"])),
        protocol=protocol,
        destination=draw(gap_entities(protocol is not None)),
        not_icmp=draw(st.none() | st.just(ICMPMatch(type=8))),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(gap_rules(), st.sampled_from(["default", "sec"]),
                          st.sampled_from(APPLIES)), min_size=1, max_size=4),
       st.sampled_from(["Deny", "Pass"]),
       st.lists(st.tuples(st.sampled_from(DST_IPS), st.sampled_from(["tcp", "udp"]),
                          st.sampled_from([80, 443, 53, 8050])), min_size=1, max_size=6))
def test_rules_that_cannot_be_programmed_yet_fail_closed(
    spec: list[tuple[Rule, str, str]], sec_default: str, packets: list[tuple[str, str, int]],
) -> None:
    """Whatever policy denies is dropped, whatever the rule's Services, named ports, domain
    names or notICMP (an Allow is narrowed, a Deny widened, a Pass becomes a Deny)."""
    tiers = [Tier("sec", order=10.0, default_action=sec_default)]  # type: ignore[arg-type]
    pols = [Policy(kind="NetworkPolicy", name=f"p{i}", namespace=SHOP, tier=tier, order=float(i),
                   selector=applies, types=("Egress",), egress=(rule,))
            for i, (rule, tier, applies) in enumerate(spec)]
    labels = {"app": "web", NAMESPACE_LABEL: SHOP}
    universe = [("pod/shop/me", LOCAL_IP, labels), *PEERS]
    desired = programmed(tiers, pols, universe,
                         LocalEndpoint("pod/shop/me", "workload", "veth-me", (LOCAL_IP,)))
    arranged = pcompile.arrange(tiers, pols)
    endpoint = pverdict.Endpoint("workload", labels, LOCAL_IP)
    for dst, proto, port in packets:
        peer = pverdict.Peer(
            dst, tuple(lab for _k, ip, lab in universe if _contains(ip, dst)),
            domains=DOMAINS.get(dst, ()), named_ports=NAMED_PORTS,
            services=SERVICES.get(dst, frozenset()),
        )
        expected = pverdict.verdict(endpoint, arranged, pverdict.Packet(proto.upper(), peer,
                                                                        port=port))
        pkt = render.Packet(LOCAL_IP, dst, proto, dport=port, in_iface="veth-me")
        got = render.simulate(desired.chains, render.FORWARD_CHAIN, pkt, desired.sets)
        if not expected.allowed:
            assert got == "DROP", (dst, proto, port, expected.reason)


def test_a_deny_to_a_service_is_not_skipped_but_widened() -> None:
    """Before: the Deny was left out, and the Allow after it let the Service through."""
    deny = Rule(action="Deny", destination=EntityRule(services=ServiceMatch("db")))
    allow = Rule(action="Allow")
    pol = Policy(kind="NetworkPolicy", name="p", namespace=SHOP, selector="all()",
                 types=("Egress",), egress=(deny, allow))
    compiled = compile_object(pol)
    assert isinstance(compiled, CompiledPolicy)
    first, second = compiled.rules
    assert first.spec.action == "Deny" and first.spec.never is None
    assert first.unenforced is not None and "fail closed" in first.unenforced
    assert second.unenforced is None
    state = EnforcerState("n1", namer)
    state.upsert_policy(compiled)
    state.upsert_membership(compiled.applies_uid, "pod/shop/me", [LOCAL_IP])
    state.upsert_endpoint(LocalEndpoint("pod/shop/me", "workload", "veth-me", (LOCAL_IP,),
                                        labels={NAMESPACE_LABEL: SHOP}))
    desired = state.desired()
    to_db = render.Packet(LOCAL_IP, "10.1.0.2", "tcp", dport=5432, in_iface="veth-me")
    assert render.simulate(desired.chains, render.FORWARD_CHAIN, to_db, desired.sets) == "DROP"


def test_an_allow_with_a_named_not_port_never_matches() -> None:
    """Leaving the named port out of notPorts would allow it; the rule matches nothing."""
    allow = Rule(action="Allow", protocol="TCP",
                 destination=EntityRule(not_ports=(Port(name="http"),)))
    pol = Policy(kind="NetworkPolicy", name="p", namespace=SHOP, selector="all()",
                 types=("Egress",), egress=(allow,))
    compiled = compile_object(pol)
    assert isinstance(compiled, CompiledPolicy)
    (rule,) = compiled.rules
    assert rule.spec.never is not None and rule.unenforced is not None


def test_unknown_workload_interfaces_are_dropped_and_skipped_by_host_endpoints() -> None:
    """Calico's "unknown interface": a workload interface nobody owns yet is dropped, in
    FORWARD and INPUT; a '*' host endpoint never claims traffic to workload interfaces."""
    eps = [EndpointSpec("pod/ns/a", "workload", "cali-a"),
           EndpointSpec("hostendpoint//n1", "host", "*")]
    chains = render.render(eps, workload_prefixes=("cali", "tap"))
    for iface in ("cali-new", "tap9"):
        pkt = render.Packet("10.65.0.9", "10.66.0.2", "tcp", dport=80, in_iface=iface)
        assert render.simulate(chains, render.FORWARD_CHAIN, pkt, {}) == "DROP"
        assert render.simulate(chains, render.INPUT_CHAIN, pkt, {}) == "DROP"
        to_pod = render.Packet("10.0.0.1", "10.65.0.9", "tcp", dport=80, out_iface=iface)
        assert render.simulate(chains, render.OUTPUT_CHAIN, to_pod, {}) == "RETURN"
    known = render.Packet("10.65.0.2", "10.66.0.2", "tcp", dport=80, in_iface="cali-a")
    assert render.simulate(chains, render.FORWARD_CHAIN, known, {}) == "ACCEPT"
    other = render.Packet("10.0.0.1", "10.66.0.2", "tcp", dport=80, in_iface="eth0")
    assert render.simulate(chains, render.FORWARD_CHAIN, other, {}) == "RETURN"
